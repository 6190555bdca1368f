"""Helpers shared by the tests (imported, not collected): tiny models and ragged Coconut batches, tiny
training runs and their configs, and one trained run for the inference and export tests. No network, no
downloaded weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from noblankslate.config import config_from_dict
from noblankslate.model.coconut import Coconut
from noblankslate.runtime import DistributedContext
from noblankslate.train.loop import train

VOCAB = 64
EOS, START, END, LATENT = 60, 61, 62, 63
WORDS = list(range(1, 60))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=256,
                        initializer_range=0.3, bos_token_id=EOS, eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).float().eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         initializer_range=0.3, bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float().eval()


def _qwen_shape(**extra) -> dict:
    return dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.3,
                bos_token_id=EOS, eos_token_id=EOS, **extra)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_qwen_shape(tie_word_embeddings=False)))
    with torch.no_grad():  # the biases start at zero; make them matter
        for name, parameter in model.named_parameters():
            if name.endswith("proj.bias"):
                parameter.normal_(0, 0.3)
    return model.float().eval()


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**_qwen_shape(tie_word_embeddings=True, head_dim=16)))  # 4 heads x 16 != 32
    with torch.no_grad():  # the q/k norms start at one; make them matter
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 1.5)
    return model.float().eval()


MODEL_FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3}
"""Every base the oracle and generation tests run on. Qwen2 differs from Llama by biases on q/k/v; Qwen3 by
RMS norms on q and k per head and a head size of its own (not hidden / heads), so a builder that forgets
``head_dim`` makes the wrong shape."""


def wrap(base) -> Coconut:
    return Coconut(base, LATENT, START, END, EOS)


def make_row(rng: random.Random, question_len: int, n_latent: int, tail_len: int) -> tuple[list[int], list[int]]:
    """question + <start> + latents + <end> + tail; labels cover only the tail (as the curriculum does)."""
    question = [rng.choice(WORDS) for _ in range(question_len)]
    tail = [rng.choice(WORDS) for _ in range(tail_len)] + [EOS]
    markers = [START] + [LATENT] * n_latent + [END]
    ids = question + markers + tail
    labels = [-100] * (len(question) + len(markers)) + tail
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """The Coconut layout, written plainly: left-pad rows with thoughts so their first latent aligns."""
    firsts = [ids.index(LATENT) for ids, _ in rows if LATENT in ids]
    target = max(firsts) if firsts else 0
    laid = []
    for ids, labels in rows:
        pad = target - ids.index(LATENT) if LATENT in ids else 0
        laid.append(([EOS] * pad + ids, [-100] * pad + labels, [0] * pad + [1] * len(ids),
                     [0] * pad + list(range(len(ids)))))
    width = max(len(r[0]) for r in laid)
    out = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for ids, labels, mask, pos in laid:
        extra = width - len(ids)
        out["input_ids"].append(ids + [EOS] * extra)
        out["labels"].append(labels + [-100] * extra)
        out["attention_mask"].append(mask + [0] * extra)
        out["position_ids"].append(pos + [0] * extra)
    return {k: torch.tensor(v) for k, v in out.items()}


def ragged_batch(seed: int, shapes: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    return collate([make_row(rng, q, n, t) for q, n, t in shapes])


# Tiny training runs

ROOT = Path(__file__).resolve().parents[1]


def run_script(config_path: Path, *overrides: str, processes: int = 1) -> None:
    """``run.py CONFIG key=value ...`` in a subprocess, under torchrun with ``processes`` CPU processes (gloo)
    when more than one, one thread each; a failure shows the end of its stderr."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(ROOT / "run.py"), str(config_path), *overrides],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_config(tmp_path: Path, data: tuple[Path, Path], **overrides) -> dict:
    raw = {
        "save_path": str(tmp_path / "runs"), "name": "tiny", "coconut": True, "c_thought": 1,
        "epochs_per_stage": 1, "max_latent_stage": 2, "pad_latent_to_max": True, "reset_optimizer": True,
        "train_path": str(data[0]), "val_path": str(data[1]), "batch_size_training": 8, "num_epochs": 3,
        "lr": 1e-3, "max_new_tokens": 6, "seed": 3,
        "model_config": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.1},
    }
    raw.update(overrides)
    return raw


def memory_metrics_without_timings(metrics: dict) -> dict:
    """A ``retrieval_metrics_epoch_{E}.json`` dict without what depends on the clock or on where the memory
    was written, so two evaluations of one model with one memory compare equal (``==``) on everything else."""
    out = json.loads(json.dumps(metrics))
    out.pop("time", None)
    out["index"].pop("path", None)
    out["index"].get("build", {}).pop("seconds", None)
    for key in [k for k in out["exit"] if "seconds" in k or k.startswith("wall_clock")]:
        del out["exit"][key]
    return out


# One trained run for the inference and export tests

_RUNS: dict[tuple, Path] = {}


def trained_run(tmp_path_factory, data: tuple[Path, Path], arch: str = "gpt2") -> Path:
    """A 6-epoch Coconut run (2 epochs per stage, 2 thoughts at the end) that has learnt the answer format
    ("### X is a Y."), trained once per test session and data set (about a second)."""
    key = (*(str(p) for p in data), arch)
    if key not in _RUNS:
        folder = tmp_path_factory.mktemp("trained")
        raw = tiny_config(folder, data, num_epochs=6, epochs_per_stage=2, lr=1e-2, max_new_tokens=8,
                          model_config={"arch": arch, "n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.0})
        train(config_from_dict(raw), CPU)
        _RUNS[key] = folder / "runs" / "tiny"
    return _RUNS[key]


def questions(path: Path) -> list[str]:
    return [record["question"] for record in json.loads(path.read_text())]


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
