"""The typed config: original files load unchanged; bad keys, types and flags fail before any work."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from noblankslate.config import Config, ConfigError, config_from_dict, load_config

# The original repository's args/prosqa_coconut.yaml, verbatim (including its fork-era keys).
ORIGINAL_PROSQA = """\
# need 4 gpus

project: coconut
save_path: prosqa_experiments
name: prosqa-coconut

only_eval: False

coconut: True
cot: False
no_thoughts: False
no_cot: False

c_thought: 1
epochs_per_stage: 5
max_latent_stage: 6
pad_latent_to_max: True

save_only_improve: False
uniform_prob: 0.0
model_id: openai-community/gpt2
load_model_path: None
seed: 0
resume: 0
bf16: False
train_path: data/prosqa_train.json
val_path: data/prosqa_valid.json
reset_optimizer: True
batch_size_training: 32
debug: False
gradient_accumulation_steps: 1
num_epochs: 50
lr: !!float "1e-4"
weight_decay: 0.01
"""


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_original_file_loads_with_its_meaning(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL_PROSQA))
    assert config.method == "coconut"
    assert config.load_model_path is None  # the string "None" means no path
    assert config.lr == 1e-4 and isinstance(config.lr, float)
    assert (config.c_thought, config.epochs_per_stage, config.max_latent_stage) == (1, 5, 6)
    assert config.pad_latent_to_max and config.reset_optimizer and not config.bf16
    assert config.run_dir.as_posix() == "prosqa_experiments/prosqa-coconut"
    assert config.resolved_max_new_tokens == 128


def test_bare_exponent_float_and_gsm_token_budget(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL_PROSQA.replace('!!float "1e-4"', "1e-4").replace("prosqa_valid", "gsm_valid")))
    assert config.lr == 1e-4
    assert config.resolved_max_new_tokens == 64


def test_fork_keys_are_accepted(tmp_path):
    text = ORIGINAL_PROSQA + "local: True\nlocal_path: /models/gpt2\nspecial_token: False\ngrpo: False\n"
    assert load_config(write(tmp_path, text)).model_id == "/models/gpt2"
    with pytest.raises(ConfigError, match="special_token: True is not supported"):
        load_config(write(tmp_path, ORIGINAL_PROSQA + "special_token: True\n"))


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: unknown config key 'epoch_per_stage'; did you mean 'epochs_per_stage'\?"):
        load_config(write(tmp_path, ORIGINAL_PROSQA.replace("epochs_per_stage", "epoch_per_stage")))


@pytest.mark.parametrize(
    "replace, message",
    [
        (("batch_size_training: 32", "batch_size_training: many"), "batch_size_training: expected an integer, got 'many'"),
        (("bf16: False", "bf16: 1"), "bf16: expected true or false, got 1"),
        (("lr: !!float \"1e-4\"", "lr: fast"), "lr: expected a number, got 'fast'"),
        (("uniform_prob: 0.0", "uniform_prob: 1.5"), r"uniform_prob must be in \[0, 1\], got 1.5"),
        (("num_epochs: 50", "num_epochs: 0"), "num_epochs must be > 0, got 0"),
        (("c_thought: 1", "c_thought: -1"), "c_thought must be >= 0, got -1"),
    ],
)
def test_wrong_type_or_value_names_the_key(tmp_path, replace, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, ORIGINAL_PROSQA.replace(*replace)))


def test_contradictory_or_missing_method_flags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="method flags coconut, cot are all true"):
        load_config(write(tmp_path, ORIGINAL_PROSQA.replace("\ncot: False", "\ncot: True")))
    with pytest.raises(ConfigError, match="no method chosen"):
        load_config(write(tmp_path, ORIGINAL_PROSQA.replace("coconut: True", "coconut: False")))


def test_only_eval_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="only_eval: true needs load_model_path"):
        load_config(write(tmp_path, ORIGINAL_PROSQA.replace("only_eval: False", "only_eval: True")))


def test_dotted_overrides(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL_PROSQA), ["lr=3e-4", "name=other", "load_model_path=ckpt/checkpoint_3"])
    assert config.lr == 3e-4 and config.name == "other" and config.load_model_path == "ckpt/checkpoint_3"
    with pytest.raises(ConfigError, match="unknown config key 'lrr'; did you mean 'lr'"):
        load_config(write(tmp_path, ORIGINAL_PROSQA), ["lrr=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(write(tmp_path, ORIGINAL_PROSQA), ["lr"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL_PROSQA), ["seed=7"])
    config.save(tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["seed"] == 7


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_defaults_need_a_method():
    assert config_from_dict({"cot": True}) == Config(cot=True)


def test_memory_sections_validate_and_take_dotted_overrides(tmp_path):
    text = ORIGINAL_PROSQA + "retrieval:\n  enabled: true\n  k: 4\n  metric: l2\n  sim_threshold: -0.5\nnudge:\n  alpha_max: 0.5\n  exit_threshold: 0.9\n"
    config = load_config(write(tmp_path, text), ["retrieval.k=8", "nudge.clip_radius=2.5", "index.path=/tmp/i.bin"])
    assert (config.retrieval.enabled, config.retrieval.k, config.retrieval.metric) == (True, 8, "l2")
    assert (config.nudge.alpha_max, config.nudge.exit_threshold, config.nudge.clip_radius) == (0.5, 0.9, 2.5)
    assert config.index.path == "/tmp/i.bin" and not config.training.nudge_contrastive
    assert Config(coconut=True).index.path == "data/index/faiss_index.bin"
    with pytest.raises(ConfigError, match="unknown config key 'retrieval.top_k'; did you mean 'retrieval.k'"):
        load_config(write(tmp_path, text), ["retrieval.top_k=3"])
    with pytest.raises(ConfigError, match="retrieval.metric: expected 'cosine', 'ip' or 'l2', got 'dot'"):
        load_config(write(tmp_path, text), ["retrieval.metric=dot"])
    with pytest.raises(ConfigError, match="nudge.calibration: expected none, temperature, platt or isotonic"):
        load_config(write(tmp_path, text), ["nudge.calibration=beta"])
    with pytest.raises(ConfigError, match="sim_threshold 0.5 is unreachable under metric 'l2'"):
        load_config(write(tmp_path, text), ["retrieval.sim_threshold=0.5"])
    with pytest.raises(ConfigError, match=r"sim_threshold 1.5 is outside \[-1, 1\]"):
        load_config(write(tmp_path, text), ["retrieval.metric=cosine", "retrieval.sim_threshold=1.5"])
    with pytest.raises(ConfigError, match="normalize_keys: false has no effect under metric 'cosine'"):
        load_config(write(tmp_path, text), ["retrieval.metric=cosine", "retrieval.sim_threshold=0.5",
                                            "retrieval.normalize_keys=false"])
    assert load_config(write(tmp_path, text), ["retrieval.metric=ip", "retrieval.sim_threshold=3",
                                               "retrieval.normalize_keys=false"]).retrieval.sim_threshold == 3.0
    with pytest.raises(ConfigError, match="retrieval: expected a mapping"):
        load_config(write(tmp_path, ORIGINAL_PROSQA + "retrieval: 3\n"))


def test_errors_inside_a_nested_section_name_the_key(tmp_path):
    base = "coconut: true\nmodel_config:\n  arch: gpt2\n"
    with pytest.raises(ConfigError, match="unknown config key 'model_config.n_layr'; did you mean 'model_config.n_layer'"):
        load_config(write(tmp_path, base), ["model_config.n_layr=2"])
    with pytest.raises(ConfigError, match="model_config.n_layer: expected an integer, got 'abc'"):
        load_config(write(tmp_path, base), ["model_config.n_layer=abc"])
    assert load_config(write(tmp_path, "coconut: true\nmodel_config: null\n")).model_config is None
