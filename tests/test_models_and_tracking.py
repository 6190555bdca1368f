"""Model and tokenizer sources, wandb tracking, save_only_improve, and the train command's errors."""

from __future__ import annotations

import sys
import types

import torch
from helpers import CPU, tiny_config
from transformers import GPT2Config, GPT2LMHeadModel

from noblankslate.cli import main
from noblankslate.config import Config, config_from_dict
from noblankslate.model.build import build_model, build_tokenizer, gpt2_bpe_tokenizer
from noblankslate.model.tokenizer import build_word_tokenizer
from noblankslate.train.track import Tracker


def test_the_offline_gpt2_bpe_files_are_the_real_gpt2_vocabulary():
    tokenizer = gpt2_bpe_tokenizer()
    assert len(tokenizer) == 50257 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert tokenizer.convert_tokens_to_ids("<<") == 16791  # the row Coconut copies into its new tokens


def test_model_id_can_be_a_local_folder(tmp_path):
    """The real from_pretrained path, offline: a tiny GPT-2 and a tokenizer saved to a folder."""
    tokenizer = build_word_tokenizer(["Every wumpus is a yumpus.\n", "### Tom is a yumpus."])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer),
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = Config(coconut=True, model_id=str(tmp_path / "model"))
    loaded_tokenizer = build_tokenizer(config, lambda: [])
    built = build_model(config, loaded_tokenizer)
    assert len(built.tokenizer) == len(tokenizer) + 3
    assert built.model.base_causallm.get_input_embeddings().weight.shape[0] == len(tokenizer) + 3
    torch.testing.assert_close(built.model.base_causallm.get_input_embeddings().weight[: len(tokenizer)],
                               model.get_input_embeddings().weight)


def test_wandb_is_used_offline_when_installed(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda data: calls.append(("log", data)), finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = Tracker(tmp_path, Config(coconut=True, project="proj", name="n"), active=True)
    tracker.log({"event": "epoch", "accuracy": 0.5, "note": "text"})
    tracker.close()
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["project"] == "proj"
    assert calls[1] == ("log", {"accuracy": 0.5}) and calls[2] == ("finish",)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_wandb_disabled_or_absent_still_writes_metrics(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    tracker = Tracker(tmp_path, Config(coconut=True), active=True)
    tracker.log({"event": "epoch"})
    assert tracker.wandb_run is None and (tmp_path / "metrics.jsonl").is_file()


def test_save_only_improve_saves_only_better_epochs(tmp_path, tiny_data, monkeypatch):
    from noblankslate.train import loop

    accuracies = iter([0.5, 0.25, 0.75])
    original = loop.Trainer.evaluate

    def scripted(self, epoch, stage):
        val_loss, evaluation = original(self, epoch, stage)
        evaluation.correct, evaluation.total = int(100 * next(accuracies)), 100
        return val_loss, evaluation

    monkeypatch.setattr(loop.Trainer, "evaluate", scripted)
    loop.train(config_from_dict(tiny_config(tmp_path, tiny_data, num_epochs=3, save_only_improve=True)), CPU)
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_1", "checkpoint_3"]


def test_train_command_reports_config_errors_before_any_work(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("coconut: true\nlearning_rate: 0.1\n")
    assert main(["train", str(path)]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_a_gpt2_from_scratch_uses_the_fused_tanh_gelu_which_computes_gelu_new():
    """The scratch GPT-2 swaps gelu_new's eight elementwise ops for one kernel: same function, same logits
    up to rounding, so runs built before and after the swap load and answer alike."""
    config = config_from_dict({"coconut": True, "model_config": {"arch": "gpt2", "n_layer": 2, "n_embd": 32,
                                                                "n_head": 2, "tokenizer": "word"}})
    tokenizer = build_tokenizer(config, lambda: ["Every wumpus is a yumpus.\n", "### Tom is a yumpus."])
    base = build_model(config, tokenizer).model.base_causallm.eval()
    assert base.config.activation_function == "gelu_pytorch_tanh"
    reference = GPT2LMHeadModel(GPT2Config(**{**base.config.to_dict(), "activation_function": "gelu_new"})).eval()
    reference.load_state_dict(base.state_dict())
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, plain = base(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
