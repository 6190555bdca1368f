"""nbs export: a Hugging Face folder that transformers loads with the same logits, and that load() and
nbs generate answer from exactly as from the checkpoint; original-code checkpoints convert too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import questions, trained_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from noblankslate.cli import main
from noblankslate.inference import load
from noblankslate.inference.export import ExportError, export_model
from noblankslate.model.checkpoint_files import CheckpointError
from noblankslate.model.special_tokens import END_LATENT, LATENT, START_LATENT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", str(run_dir / "checkpoint_6"), str(out)]) == 0
    return out


def test_a_llama_export_round_trips(tmp_path_factory, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_data, arch="llama")
    thinking = load(run)
    export_model(thinking, tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = torch.tensor([[1, 5, 9, thinking.spec.start_id, thinking.spec.latent_id, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, thinking.model.base_causallm(ids).logits)
    qs = questions(tiny_data[1])
    assert [a.to_dict() for a in load(tmp_path / "llama").answer(qs)] == [a.to_dict() for a in thinking.answer(qs)]


def test_transformers_loads_the_export_with_the_same_logits(run_dir, exported):
    thinking = load(run_dir / "checkpoint_6")
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([[1, 5, 9, thinking.spec.start_id, thinking.spec.latent_id, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, thinking.model.base_causallm(ids).logits)
    for token, expected in ((START_LATENT, thinking.spec.start_id), (END_LATENT, thinking.spec.end_id),
                            (LATENT, thinking.spec.latent_id)):
        assert tokenizer.convert_tokens_to_ids(token) == expected
    question = "Carol is a dumpus. Is Carol a quimpus or gwompus?\n"
    assert tokenizer(question)["input_ids"] == thinking.tokenizer(question)["input_ids"]
    info = json.loads((exported / "coconut.json").read_text())
    assert info["latent_token_ids"] == {"start": thinking.spec.start_id, "end": thinking.spec.end_id,
                                        "latent": thinking.spec.latent_id}
    assert (info["format_version"], info["method"], info["c_thought"], info["num_thoughts"]) == (1, "coconut", 1, 2)


def test_the_export_answers_as_the_checkpoint(capsys, run_dir, exported, tiny_data):
    qs = questions(tiny_data[1])
    from_checkpoint = load(run_dir).answer(qs, top_tokens=2)
    from_export = load(exported).answer(qs, top_tokens=2)
    assert [a.to_dict() for a in from_export] == [a.to_dict() for a in from_checkpoint]
    capsys.readouterr()
    assert main(["generate", str(exported), "-q", qs[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == load(run_dir).answer(qs[0])[0].to_dict()
    assert main(["eval", str(exported), "--data", str(tiny_data[1]), "--json",
                 "--predictions", str(exported.parent / "p.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["accuracy"] == [m for m in metrics if m["event"] == "epoch"][-1]["accuracy"]


def test_the_model_card_has_the_config_and_the_measured_accuracy(run_dir, exported):
    card = (exported / "README.md").read_text()
    epoch6 = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if m["event"] == "epoch" and m["epoch"] == 6][0]
    assert f"at epoch 6 (stage 2): **{epoch6['accuracy']:.4f}** ({epoch6['correct']}/{epoch6['total']})" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == yaml.safe_load((run_dir / "checkpoint_6" / "config.yaml").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")


def test_an_original_code_checkpoint_converts_through_the_same_path(run_dir, tmp_path, tiny_data):
    """The original saved ``torch.save(model.state_dict())`` of its wrapper, with the duplicate
    ``embedding.weight``; with the run's config it exports to the same model."""
    thinking = load(run_dir / "checkpoint_6")
    state = {f"base_causallm.{k}": v.clone() for k, v in thinking.model.base_causallm.state_dict().items()}
    state["embedding.weight"] = state["base_causallm.transformer.wte.weight"]
    original = tmp_path / "checkpoint_6"
    torch.save(state, original)
    config = tmp_path / "run.yaml"
    config.write_text((run_dir / "checkpoint_6" / "config.yaml").read_text())
    assert main(["export", str(original), str(tmp_path / "out"), "--config", str(config)]) == 0
    qs = questions(tiny_data[1])
    assert [a.output for a in load(tmp_path / "out").answer(qs)] == [a.output for a in thinking.answer(qs)]
    with pytest.raises(CheckpointError, match="need the run config"):
        load(original)


def test_export_merges_a_peft_model_and_refuses_a_used_folder(run_dir, tmp_path):
    thinking = load(run_dir / "checkpoint_6")
    merged = AutoModelForCausalLM.from_config(thinking.model.base_causallm.config)
    thinking.model.base_causallm.merge_and_unload = lambda: merged  # what a peft model offers
    export_model(thinking, tmp_path / "merged")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(saved.lm_head.weight, merged.lm_head.weight)
    assert not torch.equal(saved.lm_head.weight, thinking.model.base_causallm.lm_head.weight)
    with pytest.raises(ExportError, match="already exists and is not an empty folder"):
        export_model(thinking, tmp_path / "merged")


def test_an_export_with_an_unknown_method_is_refused(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    info = json.loads((copy / "coconut.json").read_text())
    (copy / "coconut.json").write_text(json.dumps({**info, "method": "telepathy"}))
    with pytest.raises(CheckpointError, match="unknown method 'telepathy'"):
        load(copy)
