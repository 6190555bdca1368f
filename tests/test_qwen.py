"""Qwen2 and Qwen3 bases: built from ``model_config`` like GPT-2 and Llama. Their forward and generation are
checked against the no-cache oracles with every other base (tiny_qwen2/tiny_qwen3 in tests/helpers.py,
through MODEL_FACTORIES in test_coconut_oracle.py, test_generate.py and test_thought_controller.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

from noblankslate.config import config_from_dict
from noblankslate.model.build import build_base_model


class _Vocabulary:
    """What build_base_model reads from a tokenizer: its vocabulary and eos id."""

    eos_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {f"w{i}": i for i in range(40)}

    def __len__(self) -> int:
        return 40


@pytest.mark.parametrize("arch, cls", [("qwen2", Qwen2ForCausalLM), ("qwen3", Qwen3ForCausalLM)])
def test_model_config_builds_qwen_from_scratch(arch, cls):
    config = config_from_dict({"coconut": True, "model_config": {"arch": arch, "n_layer": 2, "n_embd": 48,
                                                                 "n_head": 4, "n_kv_head": 2}})
    model = build_base_model(config, _Vocabulary())
    assert type(model) is cls
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 48 and attention.k_proj.out_features == 24  # head size 12, 2 kv heads
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as gpt2/llama here
    assert model.get_input_embeddings().weight.shape == (40, 48)
    again = build_base_model(config, _Vocabulary())  # seeded: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
