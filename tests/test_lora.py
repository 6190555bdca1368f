"""LoRA through peft: the adapted model is the one that thinks, adapters at init change nothing, only
adapters (and the new token rows) train, checkpoints resume bit-exact, and weights move between LoRA and
non-LoRA runs (fresh adapters on a full fine-tune's weights; adapters merged when not continued)."""

from __future__ import annotations

import copy
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    CPU,
    END,
    EOS,
    LATENT,
    MODEL_FACTORIES,
    START,
    ragged_batch,
    run_script,
    tiny_config,
    wrap,
)
from safetensors.torch import load_file
from test_coconut_oracle import RAGGED, assert_close_scaled, oracle_forward
from test_generate import ROWS, oracle_generate, pad, prompt

from noblankslate.config import ConfigError, LoraConfig, config_from_dict, load_config
from noblankslate.model import lora
from noblankslate.model.lora import apply_lora, has_adapters, resolve_targets
from noblankslate.model.weights import read_state_dict
from noblankslate.train.loop import Trainer, train
from noblankslate.train.track import read_metrics

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="LoRA needs peft: pip install -e '.[lora]'")
FACTORIES = {arch: MODEL_FACTORIES[arch] for arch in ("gpt2", "llama", "qwen2")}
SETTINGS = LoraConfig(enabled=True, rank=4, alpha=8.0)
NEW_TOKENS = (START, END, LATENT)


def _perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give B (zero at init) and the token rows values, so the adapters change the computation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora.trainable_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


@needs_peft
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_adapters_at_init_compute_exactly_what_the_base_does(arch):
    base = FACTORIES[arch]()
    reference = wrap(copy.deepcopy(base))
    adapted = wrap(apply_lora(base, SETTINGS, NEW_TOKENS))
    batch = ragged_batch(seed=1, shapes=RAGGED)
    got, want = adapted(**batch), reference(**batch)
    assert torch.equal(got.loss, want.loss)
    assert torch.equal(got.logits, want.logits)
    rows = [prompt(random.Random(0), q, n) for q, n in ROWS]
    ids, mask = pad(rows, "left")
    assert adapted.generate(ids, mask, max_new_tokens=8).sequences() == reference.generate(ids, mask, max_new_tokens=8).sequences()


@needs_peft
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_thoughts_are_hidden_states_of_the_adapted_model(arch):
    """With adapters that do something, the fast forward equals the no-cache oracle run on the adapted
    model (which fills every thought from the adapted model's hidden states) and differs from the base's."""
    base = FACTORIES[arch]()
    plain = copy.deepcopy(base)
    adapted = apply_lora(base, SETTINGS, NEW_TOKENS)
    _perturb_adapters(adapted)
    batch = ragged_batch(seed=2, shapes=RAGGED)
    real = batch["attention_mask"].bool()
    fast = wrap(adapted)(**batch)
    slow_loss, slow_logits, slow_embeds = oracle_forward(adapted, **batch)
    torch.testing.assert_close(fast.loss, slow_loss, rtol=1e-5, atol=1e-6)
    assert_close_scaled(fast.logits[real], slow_logits[real], "logits")
    assert_close_scaled(fast.inputs_embeds[real], slow_embeds[real], "thoughts")
    latent = batch["input_ids"] == LATENT
    assert not torch.allclose(fast.inputs_embeds[latent], wrap(plain)(**batch).inputs_embeds[latent], atol=1e-3)
    rows = [prompt(random.Random(1), q, n) for q, n in ROWS]
    ids, mask = pad(rows, "left")
    generated = wrap(adapted).generate(ids, mask, max_new_tokens=8).sequences()
    assert generated == [oracle_generate(adapted, row, 8, EOS) for row in rows]
    merged = wrap(adapted.merge_and_unload())  # what nbs export writes: the same function without peft
    assert merged.generate(ids, mask, max_new_tokens=8).sequences() == generated


@needs_peft
def test_only_adapters_and_new_token_rows_train():
    base = FACTORIES["llama"]()
    adapted = apply_lora(base, SETTINGS, NEW_TOKENS)
    names = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n or "trainable_tokens_delta" in n for n in names)
    assert sum("q_proj.lora_A" in n for n in names) == 2 and sum("down_proj.lora_B" in n for n in names) == 2
    assert sum("trainable_tokens_delta" in n for n in names) == 1
    line = lora.describe(adapted)
    assert line.startswith("LoRA: rank 4, alpha 8 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
                           "and the embedding rows of tokens [61, 62, 63]; ")
    # per layer r * (in + out): q, o 4 * (32 + 32); k, v 4 * (32 + 16); gate, up, down 4 * (32 + 64); 2 layers; 3 x 32 rows
    assert f" {2 * (2 * 256 + 2 * 192 + 3 * 384) + 96:,} of " in line
    model = wrap(adapted)
    model(**ragged_batch(seed=3, shapes=RAGGED)).loss.backward()
    embedding = adapted.get_input_embeddings().token_adapter
    assert embedding.trainable_tokens_delta["default"].grad.abs().sum() > 0  # the markers' rows learn
    assert embedding.trainable_tokens_delta["default"].shape == (3, 32)
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)


def test_default_targets_and_bad_target_names():
    for arch, expected in [("gpt2", ["c_attn", "c_proj", "c_fc"]), ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                "gate_proj", "up_proj", "down_proj"])]:
        assert resolve_targets(SETTINGS, FACTORIES[arch]()) == expected
    with pytest.raises(ConfigError, match=r"lora.target_modules: 'qkv' matches no layer of LlamaForCausalLM; its "
                                          r"linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj"):
        resolve_targets(LoraConfig(target_modules=["q_proj", "qkv"]), FACTORIES["llama"]())


def test_lora_section_is_validated_with_the_key_named(tmp_path):
    def load(**lora_keys):
        return config_from_dict({"coconut": True, "lora": lora_keys}).lora

    assert load(enabled=True, target_modules=["q_proj"]).target_modules == ["q_proj"]
    assert not load().enabled  # off by default
    saved = config_from_dict({"coconut": True, "lora": {"enabled": True, "rank": 4, "target_modules": ["c_attn"]}})
    saved.save(tmp_path / "config.yaml")  # what a checkpoint keeps, read back by resume and by merging
    assert load_config(tmp_path / "config.yaml", ["lora.alpha=32"]).lora == LoraConfig(True, 4, 32.0, 0.0, ["c_attn"])
    for keys, message in [({"rank": 0}, "lora.rank must be >= 1, got 0"),
                          ({"alpha": -1}, "lora.alpha must be a finite number > 0"),
                          ({"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
                          ({"target_modules": "q_proj"}, r"lora.target_modules: expected a list \(each a string\) or null"),
                          ({"target_modules": ["q_proj", {}]}, r"lora.target_modules\[1\]: expected a string"),
                          ({"target_modules": []}, "lora.target_modules: an empty list adapts nothing"),
                          ({"rnak": 4}, "unknown config key 'lora.rnak'; did you mean 'lora.rank'")]:
        with pytest.raises(ConfigError, match=message):
            load(**keys)


def test_without_peft_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    with pytest.raises(ConfigError, match=r"lora: LoRA needs the peft package: pip install -e '.\[lora\]'"):
        apply_lora(FACTORIES["gpt2"](), SETTINGS, NEW_TOKENS)


def _lora_raw(tmp_path, tiny_data, **overrides) -> dict:
    """A tiny Llama Coconut run under LoRA, with adapter dropout (so resume must restore the RNG)."""
    return tiny_config(tmp_path, tiny_data, **{
        "num_epochs": 2, "epochs_per_stage": 2, "reset_optimizer": False,
        "model_config": {"arch": "llama", "n_layer": 1, "n_embd": 32, "n_head": 2},
        "lora": {"enabled": True, "rank": 2, "dropout": 0.1}, **overrides})


def _weights(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return read_state_dict(run_dir / f"checkpoint_{epoch}")  # tied tensors under both names


@needs_peft
def test_a_lora_run_resumes_bit_exact_and_optimizes_only_the_adapters(tmp_path, tiny_data):
    raw = _lora_raw(tmp_path, tiny_data)
    straight = Trainer(config_from_dict({**raw, "name": "straight"}), CPU)
    in_optimizer = [p for group in straight.optimizer.param_groups for p in group["params"]]
    assert in_optimizer == lora.trainable_parameters(straight.parallel.model)
    assert sum(p.numel() for p in in_optimizer) < 0.2 * sum(p.numel() for p in straight.parallel.model.parameters())
    straight.run()
    train(config_from_dict({**raw, "num_epochs": 1}), CPU)  # one epoch, stopped; then the second from its checkpoint
    train(config_from_dict(raw), CPU)
    run_dir, straight_dir = tmp_path / "runs" / "tiny", tmp_path / "runs" / "straight"
    got, want = _weights(run_dir, 2), _weights(straight_dir, 2)
    assert got.keys() == want.keys() and has_adapters(got)
    assert all(torch.equal(got[k], want[k]) for k in got)
    first = _weights(run_dir, 1)
    trained = [k for k in got if not torch.equal(got[k], first[k])]
    assert trained and all(".lora_" in k or "trainable_tokens_delta" in k for k in trained)  # the base stays frozen
    steps = lambda d: [(r["step"], r["train_loss"]) for r in read_metrics(d) if r["event"] == "step"]
    assert steps(run_dir) == steps(straight_dir)
    optimizer = torch.load(run_dir / "checkpoint_2" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(in_optimizer)


@needs_peft
def test_weights_move_between_lora_and_full_runs(tmp_path, tiny_data):
    """A full fine-tune's checkpoint under fresh adapters computes what it computed; a LoRA checkpoint
    loaded by a run without LoRA has its adapters merged and computes what the LoRA run computed."""
    from noblankslate.eval.setup import setup_run

    full = tiny_config(tmp_path, tiny_data, num_epochs=1, name="full",
                       model_config={"arch": "llama", "n_layer": 1, "n_embd": 32, "n_head": 2})
    train(config_from_dict(full), CPU)
    full_checkpoint = str(tmp_path / "runs" / "full" / "checkpoint_1")
    raw_batch = ragged_batch(seed=4, shapes=[(5, 2, 3), (4, 0, 2)])

    def loss(raw: dict) -> torch.Tensor:
        setup = setup_run(config_from_dict(raw))
        ids = raw_batch["input_ids"]
        words = ids % 20 + 5  # inside the word vocabulary, clear of the latent tokens
        for helper_id, run_id in zip((START, END, LATENT), setup.latent_ids.as_tuple()):
            words = torch.where(ids == helper_id, run_id, words)
        with torch.no_grad():
            return setup.model.eval()(**{**raw_batch, "input_ids": words}).loss

    evaluate = {**full, "name": "eval", "only_eval": True, "load_model_path": full_checkpoint}
    under_adapters = {**evaluate, "lora": {"enabled": True, "rank": 2}}
    assert torch.equal(loss(under_adapters), loss(evaluate))
    assert all(float(p.detach().abs().max()) == 0 for n, p in setup_run(config_from_dict(under_adapters)).model.named_parameters()
               if ".lora_B." in n)  # fresh adapters

    lora_run = {**full, "name": "lora", "load_model_path": full_checkpoint, "lora": {"enabled": True, "rank": 2}}
    train(config_from_dict(lora_run), CPU)
    lora_checkpoint = str(tmp_path / "runs" / "lora" / "checkpoint_1")
    continued = {**lora_run, "name": "eval", "only_eval": True, "load_model_path": lora_checkpoint}
    merged = {**continued, "lora": {"enabled": False}}
    assert not torch.equal(loss(continued), loss(under_adapters))  # the adapters trained
    torch.testing.assert_close(loss(merged), loss(continued), rtol=1e-5, atol=1e-6)
    model = setup_run(config_from_dict(merged)).model
    assert not lora.is_adapted(model.base_causallm)


@needs_peft
def test_a_lora_cot_run_starts_coconut_with_its_adapters_merged(tmp_path, tiny_data):
    from noblankslate.eval.setup import setup_run

    cot = tiny_config(tmp_path, tiny_data, num_epochs=1, name="cot", coconut=False, cot=True,
                      model_config={"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
                      lora={"enabled": True, "rank": 2, "alpha": 4.0})
    train(config_from_dict(cot), CPU)
    checkpoint = tmp_path / "runs" / "cot" / "checkpoint_1"
    assert has_adapters(load_file(checkpoint / "model.safetensors"))
    ids = torch.tensor([[3, 7, 11, 5, 2]])
    cot_model = setup_run(config_from_dict({**cot, "only_eval": True, "load_model_path": str(checkpoint)})).model
    coconut = setup_run(config_from_dict({**cot, "cot": False, "coconut": True, "load_model_path": str(checkpoint),
                                          "lora": {"enabled": True, "rank": 2}})).model
    assert lora.is_adapted(coconut.base_causallm)
    with torch.no_grad():
        want = cot_model.base_causallm(input_ids=ids).logits
        got = coconut.base_causallm(input_ids=ids).logits[..., :want.shape[-1]]  # plus the three new tokens
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_peft
def test_a_lora_checkpoint_names_its_settings_when_it_cannot_be_merged(tmp_path, tiny_data):
    raw = _lora_raw(tmp_path, tiny_data, num_epochs=1)
    train(config_from_dict(raw), CPU)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((tmp_path / "runs" / "tiny" / "checkpoint_1" / "model.safetensors").read_bytes())
    from noblankslate.eval.setup import setup_run
    from noblankslate.model.weights import WeightsError

    with pytest.raises(WeightsError, match="holds LoRA adapters .* but no config.yaml with their lora settings"):
        setup_run(config_from_dict({**raw, "lora": {"enabled": False}, "only_eval": True, "load_model_path": str(bare)}))


@pytest.mark.slow
@needs_peft
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_on_two_processes_matches_one(tmp_path, tiny_data, parallel):
    """torchrun with two CPU processes (gloo) against one process with the same global batch."""
    raw = _lora_raw(tmp_path, tiny_data, parallel=parallel, lora={"enabled": True, "rank": 2})
    raw["model_config"] = {"arch": "gpt2" if parallel == "ddp" else "llama", "n_layer": 1, "n_embd": 32, "n_head": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_script(path, "name=two", "batch_size_training=4", processes=2)
    train(config_from_dict({**raw, "name": "one"}), CPU)
    losses = lambda d: [r["train_loss"] for r in read_metrics(tmp_path / "runs" / d) if r["event"] == "step"]
    assert len(losses("one")) == 12 and losses("two") == pytest.approx(losses("one"), rel=1e-5)
    two, one = _weights(tmp_path / "runs" / "two", 2), _weights(tmp_path / "runs" / "one", 2)
    assert has_adapters(two) and two.keys() == one.keys()
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    from noblankslate.eval.setup import setup_run

    loaded = setup_run(config_from_dict({**raw, "name": "eval", "only_eval": True,
                                         "load_model_path": str(tmp_path / "runs" / "two" / "checkpoint_2")})).model
    for key, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, one[key], rtol=1e-4, atol=1e-6, msg=key)
