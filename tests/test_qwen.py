"""Qwen2 and Qwen3 bases, tested as Llama is: the multi-pass forward and batched generation against the
no-cache oracles, on tiny configs built from scratch (no weights are downloaded).

Qwen2 differs from Llama by biases on q/k/v; Qwen3 by RMS norms on q and k per head and a head size that
is its own setting (not hidden / heads), so a builder that forgets ``head_dim`` makes the wrong shape.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from model_helpers import EOS, VOCAB, ragged_batch, wrap
from test_coconut_oracle import RAGGED, _grads, assert_close_scaled, oracle_forward
from test_generate import ROWS, oracle_generate, pad, prompt

from noblankslate.config import config_from_dict
from noblankslate.model.build import build_base_model


def _shape(**extra) -> dict:
    return dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.3,
                bos_token_id=EOS, eos_token_id=EOS, **extra)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_shape(tie_word_embeddings=False)))
    with torch.no_grad():  # the biases start at zero; make them matter
        for name, parameter in model.named_parameters():
            if name.endswith("proj.bias"):
                parameter.normal_(0, 0.3)
    return model.float().eval()


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**_shape(tie_word_embeddings=True, head_dim=16)))  # 4 heads x 16 != 32
    with torch.no_grad():  # the q/k norms start at one; make them matter
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 1.5)
    return model.float().eval()


QWEN_FACTORIES = {"qwen2": tiny_qwen2, "qwen3": tiny_qwen3}


@pytest.mark.parametrize("arch", list(QWEN_FACTORIES))
@pytest.mark.parametrize("shapes", [RAGGED, [(6, 0, 3), (3, 0, 5)]], ids=["ragged", "no-thoughts"])
def test_forward_matches_oracle(arch, shapes):
    base = QWEN_FACTORIES[arch]()
    reference = copy.deepcopy(base)
    batch = ragged_batch(seed=1, shapes=shapes)
    real = batch["attention_mask"].bool()
    fast = wrap(base)(**batch)
    fast.loss.backward()
    slow_loss, slow_logits, slow_embeds = oracle_forward(reference, **batch)
    slow_loss.backward()
    torch.testing.assert_close(fast.loss, slow_loss, rtol=1e-5, atol=1e-6)
    assert_close_scaled(fast.logits[real], slow_logits[real], "logits")
    assert_close_scaled(fast.inputs_embeds[real], slow_embeds[real], "inputs_embeds")
    fast_grads, slow_grads = _grads(base), _grads(reference)
    assert fast_grads.keys() == slow_grads.keys() and fast_grads
    for name in fast_grads:
        assert_close_scaled(fast_grads[name], slow_grads[name], name)


@pytest.mark.parametrize("arch", list(QWEN_FACTORIES))
def test_batched_generation_equals_each_row_alone_and_the_oracle(arch):
    rng = random.Random(0)
    rows = [prompt(rng, q, n) for q, n in ROWS]
    model = wrap(QWEN_FACTORIES[arch]())
    ids, mask = pad(rows, "left")
    batched = model.generate(ids, mask, max_new_tokens=10)
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=10)
        assert batched.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert batched.sequences()[b] == oracle_generate(model.base_causallm, row, 10, EOS), f"row {b}"
        assert batched.forward_passes[b] == alone.forward_passes[0]
    assert any(len(s) > 1 for s in batched.sequences())  # the comparison is not between empty answers


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
