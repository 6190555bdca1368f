"""Tiny training runs shared by the training, memory and demo tests (imported, not collected)."""

from __future__ import annotations

from pathlib import Path

import torch

from noblankslate.runtime import DistributedContext

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
