"""``load(path)``: a trained Coconut from a run folder, a checkpoint folder or an exported folder.

What each kind of path holds and how it is read:

* a run folder (``save_path/name``): its latest complete checkpoint, as below;
* a checkpoint folder (``checkpoint_N``, written by training): its files are checked against the
  ``COMPLETE`` marker (sizes and SHA-256) first; then the model is built from its ``config.yaml`` and
  ``tokenizer/`` and its weights loaded strictly, through the same builder training uses;
* an exported folder (``nbs export``): a Hugging Face model and tokenizer, and ``coconut.json``;
* a weights file of the original Coconut code (a torch state dict of its wrapper) with ``config=``, the
  run config it was trained with; the tokenizer is built as the config says.

Nothing of the trainer is needed: no optimizer, no data unless an original checkpoint's config builds a
word-level tokenizer from its training file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from noblankslate.config import (
    METHOD_FLAGS,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
)
from noblankslate.data.curriculum import CurriculumSpec
from noblankslate.inference.model import ThinkingModel
from noblankslate.model.checkpoint_files import (
    CHECKPOINT_NAME,
    COMPLETE_FILE,
    CONFIG_FILE,
    CheckpointError,
    evaluated_position,
    latest_checkpoint,
    verify_checkpoint_files,
)
from noblankslate.model.weights import MODEL_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from noblankslate.model.coconut import Coconut

EXPORT_FILE = "coconut.json"
"""What an exported folder adds to a Hugging Face model folder (see :mod:`noblankslate.inference.export`)."""
EXPORT_FORMAT_VERSION = 1


def resolve(path: str | Path) -> tuple[str, Path]:
    """What ``path`` is: ("export" | "checkpoint" | "weights", the folder or file to read).

    Raises:
        CheckpointError: naming the path, when it is none of a run folder with a complete checkpoint, a
            checkpoint folder, an exported folder or a file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder, checkpoint or exported model")
    if path.is_file():
        return "weights", path
    if (path / EXPORT_FILE).is_file():
        return "export", path
    if (path / COMPLETE_FILE).is_file() or (path / MODEL_FILE).is_file() or CHECKPOINT_NAME.fullmatch(path.name):
        return "checkpoint", path  # (a run folder has a config.yaml too, but no weights)
    latest = latest_checkpoint(path)
    if latest is not None:
        return "checkpoint", latest
    partial = sorted(p.name for p in path.iterdir() if CHECKPOINT_NAME.fullmatch(p.name))
    detail = (f"its checkpoint folders ({', '.join(partial)}) are incomplete (no {COMPLETE_FILE} marker)"
              if partial else f"it holds no checkpoint_N folder, no {MODEL_FILE} and no {EXPORT_FILE}")
    raise CheckpointError(f"{path}: not a run folder, checkpoint or exported model: {detail}")


def load(
    path: str | Path,
    *,
    config: str | Path | Config | None = None,
    device: str | torch.device = "cpu",
) -> ThinkingModel:
    """Load a trained model to answer questions with (see the module docstring for what ``path`` may be).

    Args:
        path: run folder, checkpoint folder, exported folder, or an original-code weights file.
        config: the run config (YAML path or :class:`Config`); needed only for an original-code weights file.
        device: where the model runs.

    Returns:
        A :class:`ThinkingModel` in eval mode: ``.model``, ``.tokenizer``, ``.num_thoughts``, ``.answer()``.

    Raises:
        CheckpointError: the path is not a model, or a checkpoint's files are incomplete or changed.
        WeightsError, ConfigError: the weights do not fit the config, or the config is invalid.
    """
    kind, where = resolve(path)
    if kind == "export":
        if config is not None:
            raise CheckpointError(f"{where}: an exported folder carries its settings in {EXPORT_FILE}; drop config")
        thinking = _load_export(where)
    elif kind == "checkpoint":
        if config is not None:
            raise CheckpointError(f"{where}: a checkpoint carries its own {CONFIG_FILE}; drop config")
        thinking = _load_checkpoint(where)
    else:
        if config is None:
            raise CheckpointError(f"{where}: a file is read as weights of the original Coconut code, which need the run "
                                  "config they were trained with (config=..., or --config on the command line)")
        thinking = _load_weights_file(where, config if isinstance(config, Config) else load_config(config))
    thinking.model.to(device).eval()
    return thinking


def _build(config: Config, weights: Path, tokenizer_texts) -> tuple[Coconut, PreTrainedTokenizerBase]:
    """Tokenizer and model built as training builds them, with ``weights`` loaded strictly."""
    from noblankslate.model.build import build_model, build_tokenizer

    config = replace(config, load_model_path=str(weights))
    tokenizer = build_tokenizer(config, tokenizer_texts)
    built = build_model(config, tokenizer)
    return built.model, built.tokenizer


def _thinking(model: Coconut, tokenizer: PreTrainedTokenizerBase, config: Config, stage: int, source: Path, epoch: int | None,
              raw: dict[str, Any]) -> ThinkingModel:
    from noblankslate.model.special_tokens import LatentTokenIds

    ids = LatentTokenIds(start_id=model.start_latent_id, end_id=model.end_latent_id, latent_id=model.latent_token_id)
    return ThinkingModel(
        model=model, tokenizer=tokenizer, spec=CurriculumSpec.from_config(config, ids), stage=stage,
        method=config.method, variant=config.variant, max_new_tokens=config.resolved_max_new_tokens,
        source=source, epoch=epoch, config=raw, step_separator=config.step_separator,
    )


def _load_checkpoint(folder: Path) -> ThinkingModel:
    verify_checkpoint_files(folder)
    try:
        raw = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: cannot parse: {error}") from None
    try:
        config = config_from_dict(raw)
    except ConfigError as error:
        raise ConfigError(f"{folder / CONFIG_FILE}: {error}") from None
    position = evaluated_position(folder, config)

    def no_texts():
        raise CheckpointError(f"{folder}: no tokenizer/ folder; the checkpoint cannot be read without its tokenizer")

    model, tokenizer = _build(config, folder, no_texts)
    return _thinking(model, tokenizer, config, position.stage, folder, position.epoch, raw)


def _load_weights_file(file: Path, config: Config) -> ThinkingModel:
    """An original-code checkpoint ``checkpoint_N`` (or any weights file) with the config it was trained by."""
    position = evaluated_position(file, config)

    def training_texts():
        from noblankslate.data.schema import load_examples
        from noblankslate.eval.setup import coconut_texts

        if config.train_path is None:
            raise CheckpointError(f"{file}: the config builds a word-level tokenizer from train_path, which it does not set")
        return coconut_texts(load_examples(config.train_path), config.step_separator)

    model, tokenizer = _build(config, file, training_texts)
    return _thinking(model, tokenizer, config, position.stage, file, position.epoch, config.to_dict())


def _load_export(folder: Path) -> ThinkingModel:
    from transformers import AutoModelForCausalLM

    from noblankslate.model.coconut import Coconut
    from noblankslate.model.tokenizer import load_tokenizer

    try:
        info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
        version = info["format_version"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / EXPORT_FILE}: not a noblankslate export file: {error}") from None
    if version != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{folder / EXPORT_FILE}: format_version {version}; this version reads {EXPORT_FORMAT_VERSION}")
    if info.get("method") not in METHOD_FLAGS:
        raise CheckpointError(f"{folder / EXPORT_FILE}: unknown method {info.get('method')!r}; expected one of "
                              f"{', '.join(METHOD_FLAGS)}")
    try:
        ids = info["latent_token_ids"]
        start, end, latent = ids["start"], ids["end"], ids["latent"]
        spec = CurriculumSpec(
            c_thought=info["c_thought"], max_latent_stage=info["max_latent_stage"],
            pad_latent_to_max=info["pad_latent_to_max"], uniform_prob=0.0, no_cot=info["method"] == "no_cot",
            use_markers=info["use_markers"], start_id=start, end_id=end, latent_id=latent,
            latent_slots=info.get("latent_slots", info["use_markers"]),
        )
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = load_tokenizer(folder)
        model = Coconut(base, latent, start, end, tokenizer.eos_token_id, feed_thoughts=info["feed_thoughts"])
        return ThinkingModel(model=model, tokenizer=tokenizer, spec=spec, stage=info["stage"], method=info["method"],
                             variant=info["variant"], max_new_tokens=info["max_new_tokens"], source=folder,
                             epoch=info.get("epoch"), config=info.get("config"),
                             step_separator=info.get("step_separator", "\n"))
    except KeyError as error:
        raise CheckpointError(f"{folder / EXPORT_FILE}: missing field {error}") from None
