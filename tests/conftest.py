"""Test setup: offline, deterministic, and light on the CPU (the machine has 2 cores)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import pytest
import torch

from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data sets in ../shared/data (CI has them beside the clone)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} not found: the tests need ../shared beside the project")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """48 training and 12 held-out ProsQA-style examples on tiny graphs (shared by the run tests)."""
    folder = tmp_path_factory.mktemp("data")
    config = ProsQAConfig.small(concepts=(3, 4), distance=(2, 2))
    train_examples = generate_prosqa(48, seed=0, config=config)
    val_examples = generate_prosqa(12, seed=1, config=config, exclude_questions={e["question"] for e in train_examples})
    (folder / "train.json").write_text(json.dumps(train_examples))
    (folder / "valid.json").write_text(json.dumps(val_examples))
    return folder / "train.json", folder / "valid.json"
