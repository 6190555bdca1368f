"""Every file the project ships for users: each YAML in args/ validates; the Docker files parse and name
files that exist (no Docker engine here, so the image itself is not built in CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from noblankslate.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ARGS = sorted((ROOT / "args").glob("*.yaml"))
SEED_FILES = {"gsm_cot", "gsm_coconut", "gsm_coconut_eval", "prontoqa_coconut", "prontoqa_coconut_eval",
              "prosqa_coconut", "prosqa_coconut_eval"}


def test_the_seed_configs_are_shipped():
    assert SEED_FILES <= {path.stem for path in ARGS}


@pytest.mark.parametrize("path", ARGS, ids=[p.name for p in ARGS])
def test_every_config_validates(path):
    config = load_config(path)
    assert config.method
    if path.stem.endswith("_eval"):
        assert config.only_eval and config.load_model_path


def test_paper_hyperparameters():
    prosqa = load_config(ROOT / "args" / "prosqa_coconut.yaml")
    assert (prosqa.c_thought, prosqa.epochs_per_stage, prosqa.max_latent_stage, prosqa.num_epochs) == (1, 5, 6, 50)
    gsm = load_config(ROOT / "args" / "gsm_coconut.yaml")
    assert (gsm.c_thought, gsm.epochs_per_stage, gsm.max_latent_stage, gsm.resume) == (2, 3, 3, 3)
    generated = load_config(ROOT / "args" / "prosqa_coconut_generated.yaml")
    assert generated.model_config.n_layer == 12 and generated.model_config.n_embd == 768
    assert generated.val_path == "../shared/data/prosqa_valid.json"


def test_dockerfile_copies_files_that_exist_and_takes_the_uid_args():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    assert "ARG USER_UID" in text and "ARG USER_GID" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_compose_file_matches_the_seed():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["coconut"]
    assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert set(service["build"]["args"]) == {"USER_UID", "USER_GID"}
    volumes = " ".join(service["volumes"])
    assert "/workspace/.cache/huggingface" in volumes and "/workspace/.cache/wandb" in volumes
    assert "WANDB_API_KEY" in service["environment"] and service["environment"]["WANDB_MODE"].endswith("offline}")
    assert set(compose["volumes"]) == {"coconut_hf_cache", "coconut_wandb"}
