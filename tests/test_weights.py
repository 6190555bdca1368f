"""Weight loading: the original code's checkpoint files load strictly, and every misfit is named."""

from __future__ import annotations

import pytest
import torch
from helpers import MODEL_FACTORIES, VOCAB, tiny_gpt2, wrap

from noblankslate.config import Config
from noblankslate.model.weights import (
    WeightsError,
    checkpoint_kind,
    load_into,
    read_state_dict,
    save_state_dict,
)
from noblankslate.train.checkpoint import TrainState, save_checkpoint


class NotATensor:
    """Stands for any object a pickle may carry besides tensors."""


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def original_coconut_state(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the original run.py saved for a Coconut model: base_causallm.* plus embedding.weight."""
    state = dict(wrap(base).state_dict())
    state["embedding.weight"] = base.get_input_embeddings().weight
    return state


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_original_coconut_checkpoint_loads_into_coconut(tmp_path, arch):
    trained = MODEL_FACTORIES[arch](seed=1)
    file = tmp_path / "checkpoint_3"  # the original's extension-less torch.save file
    torch.save(original_coconut_state(trained), file)

    state = read_state_dict(file)
    assert checkpoint_kind(state) == "coconut"
    model = wrap(MODEL_FACTORIES[arch](seed=2))
    report = load_into(model, state, into="coconut")

    assert_same_weights(model.base_causallm, trained)
    assert "dropped duplicate embedding.weight" in report.upgrades
    assert report.kind == "coconut" and report.target == "Coconut"


def test_duplicate_embedding_that_differs_is_refused():
    state = original_coconut_state(tiny_gpt2(seed=1))
    state["embedding.weight"] = state["embedding.weight"] + 1
    with pytest.raises(WeightsError, match="embedding.weight differs"):
        load_into(wrap(tiny_gpt2(seed=2)), state, into="coconut")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cot_checkpoint_loads_into_base_of_coconut_run(tmp_path, arch):
    cot = MODEL_FACTORIES[arch](seed=1)
    file = tmp_path / "cot.pt"
    torch.save(cot.state_dict(), file)
    state = read_state_dict(file)
    assert checkpoint_kind(state) == "causallm"

    base = MODEL_FACTORIES[arch](seed=2)  # the recommended order: load, then add the latent tokens
    report = load_into(base, state, into="coconut")
    assert_same_weights(base, cot)
    assert report.kind == "causallm" and not report.grown


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cot_checkpoint_three_rows_short_grows_vocabulary(arch):
    cot = MODEL_FACTORIES[arch](seed=1)
    cot.resize_token_embeddings(VOCAB - 3, mean_resizing=False)  # saved before the latent tokens existed
    model = wrap(MODEL_FACTORIES[arch](seed=2))  # latent ids 61..63 are the three new rows
    before = {key: value.clone() for key, value in model.base_causallm.state_dict().items()}

    report = load_into(model, cot.state_dict(), into="coconut")

    loaded, saved = model.base_causallm.state_dict(), cot.state_dict()
    grown = {"gpt2": {"transformer.wte.weight"}, "llama": {"model.embed_tokens.weight", "lm_head.weight"}}[arch]
    assert set(report.grown) == grown  # a tied head grows with its input embeddings
    vocab_keys = grown | {"lm_head.weight"}
    for key, value in loaded.items():
        if key in vocab_keys:
            assert torch.equal(value[: VOCAB - 3], saved[key]), key
            assert torch.equal(value[VOCAB - 3 :], before[key][VOCAB - 3 :]), key
        else:
            assert torch.equal(value, saved[key]), key
    head, inputs = model.base_causallm.get_output_embeddings(), model.base_causallm.get_input_embeddings()
    assert (head.weight is inputs.weight) == (arch == "gpt2")


def test_other_vocabulary_mismatch_names_key_and_shapes():
    cot = tiny_gpt2(seed=1)
    cot.resize_token_embeddings(VOCAB - 4, mean_resizing=False)
    with pytest.raises(WeightsError, match=r"transformer\.wte\.weight: checkpoint \(60, 32\), model \(64, 32\)"):
        load_into(wrap(tiny_gpt2(seed=2)), cot.state_dict(), into="coconut")


def test_coconut_checkpoint_before_latent_tokens_are_added_says_the_order():
    state = original_coconut_state(tiny_gpt2(seed=1))
    base = tiny_gpt2(seed=2)
    base.resize_token_embeddings(VOCAB - 3, mean_resizing=False)  # the tokens are not added yet
    with pytest.raises(WeightsError, match=r"\(64, 32\), model \(61, 32\).*a Coconut checkpoint after"):
        load_into(base, state, into="coconut")


def test_missing_key_is_named():
    state = tiny_gpt2(seed=1).state_dict()
    del state["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\): transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_into(tiny_gpt2(seed=2), state, into="causallm")


def test_missing_key_of_coconut_checkpoint_is_named_with_prefix():
    state = original_coconut_state(tiny_gpt2(seed=1))
    del state["base_causallm.transformer.ln_f.bias"]
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\): base_causallm\.transformer\.ln_f\.bias"):
        load_into(wrap(tiny_gpt2(seed=2)), state, into="coconut")


def test_unexpected_key_is_named():
    state = dict(tiny_gpt2(seed=1).state_dict())
    state["transformer.h.7.attn.c_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(WeightsError, match=r"unexpected 1 key\(s\): transformer\.h\.7\.attn\.c_proj\.weight"):
        load_into(tiny_gpt2(seed=2), state, into="causallm")


def test_many_missing_keys_show_a_few_and_the_count():
    with pytest.raises(WeightsError, match=r"missing 28 key\(s\): .* and 23 more"):
        load_into(tiny_gpt2(seed=2), {}, into="causallm")


def test_coconut_checkpoint_into_non_coconut_run_is_refused():
    state = original_coconut_state(tiny_gpt2(seed=1))
    with pytest.raises(WeightsError, match="not a Coconut run"):
        load_into(tiny_gpt2(seed=2), state, into="causallm")


def test_non_coconut_run_may_hold_its_model_in_the_wrapper():
    trained = tiny_gpt2(seed=1)
    model = wrap(tiny_gpt2(seed=2))
    with pytest.raises(WeightsError, match="not a Coconut run"):
        load_into(model, original_coconut_state(trained), into="causallm")
    load_into(model, trained.state_dict(), into="causallm")
    assert_same_weights(model.base_causallm, trained)


def test_pickled_object_is_refused_by_weights_only(tmp_path):
    file = tmp_path / "checkpoint_1"
    torch.save({"transformer.wte.weight": torch.zeros(2), "extra": NotATensor()}, file)
    with pytest.raises(WeightsError, match=r"checkpoint_1: refused by torch.load\(weights_only=True\).*NotATensor"):
        read_state_dict(file)


def test_non_tensor_entries_are_refused(tmp_path):
    file = tmp_path / "full.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, file)
    with pytest.raises(WeightsError, match="not a state dict of tensors"):
        read_state_dict(file)


def test_missing_and_damaged_files_name_the_path(tmp_path):
    with pytest.raises(WeightsError, match="nope.pt: no such file"):
        read_state_dict(tmp_path / "nope.pt")
    file = tmp_path / "checkpoint_2"
    torch.save(tiny_gpt2().state_dict(), file)
    file.write_bytes(file.read_bytes()[:500])
    with pytest.raises(WeightsError, match="checkpoint_2: cannot read with torch.load"):
        read_state_dict(file)
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        read_state_dict(tmp_path)


def test_our_checkpoint_folder_loads(tmp_path):
    trained = wrap(tiny_gpt2(seed=1))
    folder = save_checkpoint(tmp_path, 1, model_state=trained.state_dict(), optimizer_state=None, rng_state=None,
                             train_state=TrainState(epoch=1, stage=0, global_step=0), config=Config(coconut=True))
    model = wrap(tiny_gpt2(seed=2))
    report = load_into(model, read_state_dict(folder), into="coconut")
    assert_same_weights(model, trained)
    assert report.upgrades == ()
    assert model.base_causallm.lm_head.weight is model.base_causallm.transformer.wte.weight


def test_bare_safetensors_file_loads_and_is_sniffed_without_extension(tmp_path):
    trained = tiny_gpt2(seed=1)
    for name in ("weights.safetensors", "weights_no_extension"):
        save_state_dict(trained.state_dict(), tmp_path / name)
        model = tiny_gpt2(seed=2)
        load_into(model, read_state_dict(tmp_path / name), into="causallm")
        assert_same_weights(model, trained)


def test_wrapper_prefixes_and_stale_buffers_are_upgraded():
    trained = tiny_gpt2(seed=1)
    state = {f"module._orig_mod.{key}": value for key, value in trained.state_dict().items()}
    state["module._orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # old GPT-2 causal mask
    state["module._orig_mod.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    model = tiny_gpt2(seed=2)
    report = load_into(model, state, into="causallm")
    assert_same_weights(model, trained)
    assert report.upgrades == ("stripped FSDP/DDP/compile prefixes", "dropped 2 stale buffer(s)")


def test_tied_head_absent_is_fine_and_unequal_is_refused():
    trained = tiny_gpt2(seed=1)
    state = {key: value.clone() for key, value in trained.state_dict().items() if key != "lm_head.weight"}
    model = tiny_gpt2(seed=2)
    load_into(model, state, into="causallm")
    assert_same_weights(model, trained)

    state["lm_head.weight"] = state["transformer.wte.weight"] + 1
    with pytest.raises(WeightsError, match="lm_head.weight differs from transformer.wte.weight"):
        load_into(tiny_gpt2(seed=2), state, into="causallm")


def test_untied_head_is_required():
    state = MODEL_FACTORIES["llama"](seed=1).state_dict()
    del state["lm_head.weight"]
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\): lm_head\.weight"):
        load_into(MODEL_FACTORIES["llama"](seed=2), state, into="causallm")


def test_bf16_checkpoint_is_cast_on_load():
    trained = tiny_gpt2(seed=1)
    state = {key: value.to(torch.bfloat16) for key, value in trained.state_dict().items()}
    model = tiny_gpt2(seed=2)
    load_into(model, state, into="causallm")
    assert model.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(model.transformer.wte.weight, state["transformer.wte.weight"].float())
