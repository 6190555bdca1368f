"""Model weight files: read any checkpoint ``load_model_path`` may name, write ours, load strictly.

Three kinds of file hold weights:

* our checkpoint folders ``checkpoint_N/`` (``model.safetensors`` inside) and bare ``.safetensors`` files;
* the original code's checkpoints: ``torch.save(model.state_dict(), save_dir / f"checkpoint_{epoch}")``,
  extension-less pickles (``.pt`` / ``.bin`` are read the same way). They are read with
  ``torch.load(weights_only=True)`` only, so a file that needs arbitrary objects unpickled is refused.

The original loaded with ``load_state_dict(strict=False)`` and printed the result, so a checkpoint that
missed half the model loaded "successfully". :func:`load_into` is strict instead: known differences of
old files are upgraded by small named functions (``_strip_wrapper_prefixes``,
``_drop_duplicate_embedding``, ``_drop_stale_buffers``), each reported, and anything else missing,
unexpected or of another shape is an error that names the keys.

Order of loading, as in the original run.py. A Coconut run that starts from a CoT checkpoint loads it
into the freshly built causal LM *before* the latent tokens are added, so the new rows are then
initialised from the CoT-tuned ``<<`` row (and the original's CoT runs never resized their vocabulary,
so the shapes match). A Coconut checkpoint (``base_causallm.*`` keys) is loaded *after* the tokens are
added and the model wrapped. For the reverse order, a CoT checkpoint exactly ``len(new_token_ids)`` rows
short of the resized model loads too: the rows it has are copied and the new rows keep their current
values (logged), which then come from the pretrained model rather than the CoT-tuned one.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from noblankslate.errors import NbsError
from noblankslate.files import give_plain_mode
from noblankslate.model.coconut import Coconut

logger = logging.getLogger(__name__)

COCONUT_PREFIX = "base_causallm."
MODEL_FILE = "model.safetensors"
ALIASES_METADATA = "noblankslate.aliases"
"""safetensors metadata key: JSON ``{dropped_key: kept_key}`` for tensors that shared storage (tied weights)."""

# Wrapper modules insert these path components: FSDP and activation checkpointing anywhere in a key,
# torch.compile at the wrapped module, DDP only at the top.
_WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_TOP_WRAPPER = "module."

# Buffers that older transformers versions saved with the weights and newer ones no longer have (GPT-2's
# causal mask and masked-attention constant, Llama's rotary frequencies). They hold no learned values.
_STALE_BUFFER = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")

_ZIP_MAGIC = b"PK\x03\x04"
_SHOWN_KEYS = 5

RunKind = Literal["coconut", "causallm"]


class WeightsError(NbsError, ValueError):
    """A weights file cannot be read, or does not fit the model; the message names the file or keys."""

    label = "weights error"


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_into` did.

    Attributes:
        kind: "coconut" (``base_causallm.*`` keys) or "causallm" (plain keys) - the checkpoint's kind.
        target: class name of the module the weights went into.
        tensors: number of tensors copied.
        upgrades: the upgrade steps applied to the file's state dict, in order.
        grown: keys whose vocabulary rows were extended (new rows kept as initialised).
    """

    kind: str
    target: str
    tensors: int
    upgrades: tuple[str, ...] = ()
    grown: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for the run log."""
        text = f"loaded {self.tensors} tensors of a {self.kind} checkpoint into {self.target}"
        if self.upgrades:
            text += "; upgrades: " + ", ".join(self.upgrades)
        if self.grown:
            text += "; new vocabulary rows kept as initialised in: " + ", ".join(self.grown)
        return text


def _name_keys(keys: Sequence[str] | set[str], prefix: str = "") -> str:
    ordered = sorted(keys)
    shown = ", ".join(prefix + key for key in ordered[:_SHOWN_KEYS])
    more = f" and {len(ordered) - _SHOWN_KEYS} more" if len(ordered) > _SHOWN_KEYS else ""
    return f"{len(ordered)} key(s): {shown}{more}"


def _check_tensor_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [str(key) for key, value in obj.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise WeightsError(
            f"{path}: not a state dict of tensors; entries that are not tensors: {_name_keys(bad)}"
            " (a training checkpoint with model and optimizer? pass the model weights only)"
        )
    return dict(obj)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise WeightsError(f"{path}: cannot read as safetensors (truncated or damaged?): {error}") from None
    aliases = json.loads(metadata.get(ALIASES_METADATA, "{}"))
    for dropped, kept in aliases.items():
        if kept not in state:
            raise WeightsError(f"{path}: alias {dropped!r} points at {kept!r}, which the file does not hold")
        state[dropped] = state[kept]  # the same tensor, as in the state dict that was saved
    return state


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        detail = f"it needs {refused.group(1)}" if refused else str(error).strip().splitlines()[-1]
        raise WeightsError(
            f"{path}: refused by torch.load(weights_only=True): the file holds objects other than tensors "
            f"and plain containers ({detail}). Arbitrary objects are never unpickled here; if you trust the file, "
            "load it yourself with weights_only=False and re-save only its tensors (torch.save of a dict of tensors)"
        ) from None
    except Exception as error:
        raise WeightsError(f"{path}: cannot read with torch.load (truncated or not a checkpoint?): {error}") from None
    return _check_tensor_dict(obj, path)


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte header length and then the JSON header's ``{``."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and not head.startswith(_ZIP_MAGIC) and head[8:9] == b"{"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the weights named by ``load_model_path``, on the CPU.

    Args:
        path: a checkpoint folder holding ``model.safetensors``, a ``.safetensors`` file, or a
            ``torch.save``-d state dict (the original's extension-less ``checkpoint_N``, ``.pt``, ``.bin``).

    Returns:
        The state dict as saved; tensors that were tied when saved are again one tensor under both names.

    Raises:
        WeightsError: naming the path, when it is missing, unreadable, damaged, or needs unpickling of
            arbitrary objects.
    """
    path = Path(path)
    if path.is_dir():
        file = path / MODEL_FILE
        if not file.is_file():
            raise WeightsError(f"{path}: folder has no {MODEL_FILE} (expected a checkpoint_N folder)")
        return _read_safetensors(file)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    try:
        is_safetensors = path.suffix == ".safetensors" or _looks_like_safetensors(path)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read: {error}") from None
    return _read_safetensors(path) if is_safetensors else _read_torch(path)


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors, keeping tied weights tied.

    safetensors refuses tensors that share storage. A tensor that is exactly another one (same storage,
    offset, shape, strides and dtype: a tied LM head) is stored once and its name recorded as an alias in
    the file's metadata, so :func:`read_state_dict` gives back one tensor under both names, as
    ``model.state_dict()`` had it. A tensor that only overlaps another (a different view) is copied.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise WeightsError(f"{key}: expected a tensor in the model state dict, got {type(tensor).__name__}")
        tensor = tensor.detach()
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tensor.stride(), tensor.dtype, tensor.device)
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        storage = tensor.untyped_storage().data_ptr()
        shared = storage in storages and tensor.numel() > 0
        storages.add(storage)
        tensors[key] = tensor.clone().contiguous().cpu() if shared else tensor.contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt", ALIASES_METADATA: json.dumps(aliases)})
    give_plain_mode(path)  # safetensors writes 0600


def checkpoint_kind(state_dict: Mapping[str, Tensor]) -> RunKind:
    """"coconut" when the dict holds the wrapper's ``base_causallm.*`` keys, else "causallm" (as the original)."""
    keys = _strip_wrapper_prefixes(dict(state_dict))[0]
    return "coconut" if any(key.startswith(COCONUT_PREFIX) for key in keys) else "causallm"


def _strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Remove FSDP / activation-checkpointing / torch.compile path components and DDP's leading ``module.``."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        new = ".".join(part for part in key.split(".") if part not in _WRAPPER_COMPONENTS)
        if new.startswith(_TOP_WRAPPER):
            new = new[len(_TOP_WRAPPER):]
        if new in out:
            raise WeightsError(f"two keys become {new!r} once wrapper prefixes are removed")
        out[new] = tensor
    return out, list(out) != list(state_dict)


def _drop_duplicate_embedding(state_dict: dict[str, Tensor], embedding_key: str) -> tuple[dict[str, Tensor], bool]:
    """Drop the original Coconut's ``embedding.weight``, a second name for the input embeddings.

    The original stored the input embedding module as ``self.embedding`` as well, so its state dict has
    the same tensor twice. It is dropped only when it equals ``embedding_key`` in the same dict; when that
    key is absent it is left alone, so the strict check names both.
    """
    duplicate = state_dict.get("embedding.weight")
    original = state_dict.get(embedding_key)
    if duplicate is None or original is None:
        return state_dict, False
    if duplicate.shape != original.shape or not torch.equal(duplicate, original):
        raise WeightsError(
            f"embedding.weight differs from {embedding_key} in the checkpoint; the original Coconut stored the "
            "same tensor under both names, so this file is not one of its checkpoints"
        )
    return {key: value for key, value in state_dict.items() if key != "embedding.weight"}, True


def _drop_stale_buffers(
    state_dict: dict[str, Tensor], expected: set[str], non_persistent: set[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Drop buffers older transformers versions saved and the model does not keep in its state dict."""
    dropped = [
        key for key in state_dict
        if key not in expected and (key in non_persistent or _STALE_BUFFER.search(key))
    ]
    return {key: value for key, value in state_dict.items() if key not in dropped}, dropped


def _names_of(model: nn.Module, parameter: Tensor | None) -> list[str]:
    if parameter is None:
        return []
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p is parameter]


def _tied_names(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every further name of a parameter that has several."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return tied


def _stored_layer(module: nn.Module | None) -> nn.Module | None:
    """The layer that holds an embedding's weight: under LoRA with trainable token rows, peft wraps the
    embeddings (and a tied head), and the wrapper's ``weight`` is a merged copy, not the stored parameter."""
    adapter = getattr(module, "token_adapter", None)
    return adapter.base_layer if adapter is not None else module


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    return {
        f"{module_name}.{buffer}" if module_name else buffer
        for module_name, module in model.named_modules()
        for buffer in module._non_persistent_buffers_set
    }


def _grow_vocabulary(
    key: str, saved: Tensor, current: Tensor, new_token_ids: Sequence[int], prefix: str
) -> Tensor | None:
    """``current`` with its first rows taken from ``saved``, when ``saved`` lacks exactly the new tokens' rows."""
    old_rows, new_rows = saved.shape[0], current.shape[0]
    if saved.shape[1:] != current.shape[1:] or sorted(new_token_ids) != list(range(old_rows, new_rows)):
        return None
    logger.info(
        "%s%s: checkpoint has %d rows, model %d; copied the %d saved rows, kept rows %s as initialised",
        prefix, key, old_rows, new_rows, old_rows, list(range(old_rows, new_rows)),
    )
    grown = current.detach().clone()
    grown[:old_rows] = saved.to(grown.dtype)
    return grown


@torch.no_grad()
def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    into: RunKind,
    new_token_ids: Sequence[int] | None = None,
) -> LoadReport:
    """Load a checkpoint's weights into a model, strictly, following the original's rules.

    The original's four cases: a Coconut run loads a plain causal-LM checkpoint into the base causal LM
    (starting Coconut from CoT) and a Coconut checkpoint into the wrapper; a non-Coconut run loads a
    plain checkpoint into its model and refuses a Coconut one. As the wrapper owns no parameters, both
    Coconut cases load into the base causal LM; ``model`` may be the wrapper or, before wrapping, the
    causal LM itself.

    Allowed differences: an absent ``lm_head.weight`` when the model ties it to the input embeddings (a
    present one must equal them), non-persistent and stale buffers in old files, wrapper prefixes, the
    original's duplicate ``embedding.weight``, other dtypes (cast on copy), and vocabulary growth by
    exactly ``new_token_ids`` (see the module docstring).

    Args:
        model: a :class:`Coconut` wrapper or a Hugging Face causal LM, whichever the run has now; the
            weights go into the causal LM either way.
        state_dict: from :func:`read_state_dict`.
        into: the run's kind: "coconut" for Coconut runs, "causallm" for cot / no_cot / no_thoughts.
        new_token_ids: rows the model has beyond an older checkpoint's vocabulary; defaults to the
            wrapper's three latent-token ids for a :class:`Coconut`, else none.

    Returns:
        A :class:`LoadReport` (its ``summary()`` is also logged).

    Raises:
        WeightsError: naming the missing, unexpected or mis-shaped keys, or the refused combination.
    """
    if into not in ("coconut", "causallm"):
        raise ValueError(f"into must be 'coconut' or 'causallm', got {into!r}")
    is_wrapper = isinstance(model, Coconut)
    base = model.base_causallm if is_wrapper else model
    if new_token_ids is None:
        new_token_ids = (model.start_latent_id, model.end_latent_id, model.latent_token_id) if is_wrapper else ()

    state = _check_tensor_dict(state_dict, Path("<state dict>"))
    upgrades: list[str] = []
    state, stripped = _strip_wrapper_prefixes(state)
    if stripped:
        upgrades.append("stripped FSDP/DDP/compile prefixes")

    input_weight = _stored_layer(base.get_input_embeddings()).weight
    output = _stored_layer(base.get_output_embeddings())
    embedding_key = _names_of(base, input_weight)[0]
    kind: RunKind = "coconut" if any(key.startswith(COCONUT_PREFIX) for key in state) else "causallm"
    if kind == "coconut":
        if into == "causallm":
            raise WeightsError(
                "this is a Coconut checkpoint (base_causallm.* keys) and the run is not a Coconut run; as in the "
                "original, Coconut weights cannot be loaded into a plain causal LM"
            )
        state, dropped = _drop_duplicate_embedding(state, COCONUT_PREFIX + embedding_key)
        if dropped:
            upgrades.append("dropped duplicate embedding.weight")
        prefix = COCONUT_PREFIX
        stray = {key for key in state if not key.startswith(COCONUT_PREFIX)}  # reported as unexpected below
        state = {key.removeprefix(COCONUT_PREFIX): value for key, value in state.items() if key not in stray}
    else:
        prefix, stray = "", set()

    expected_state = base.state_dict()
    expected = set(expected_state)
    state, stale = _drop_stale_buffers(state, expected, _non_persistent_buffers(base))
    if stale:
        upgrades.append(f"dropped {len(stale)} stale buffer(s)")

    # Parameters reachable under several names (a tied LM head; under LoRA also the tied head's trainable
    # token rows): the first name loads them, the others may be absent (FSDP's state dicts name each once).
    tied_to = _tied_names(base)
    tied_keys = set(tied_to)
    for key in tied_keys & set(state):
        first = tied_to[key]
        if first in state and not torch.equal(state[key], state[first]):
            raise WeightsError(
                f"{prefix}{key} differs from {prefix}{first}, but the model ties them; the checkpoint "
                "comes from an untied model"
            )
        if first not in state:
            state[first] = state[key]
        del state[key]  # loading the first name sets the tied ones too

    missing = expected - set(state) - tied_keys
    unexpected = {prefix + key for key in state if key not in expected} | stray
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_name_keys(missing, prefix)}")
        if unexpected:
            parts.append(f"unexpected {_name_keys(unexpected)}")
        raise WeightsError(f"checkpoint does not fit {type(base).__name__}: " + "; ".join(parts))


    vocab_keys = set(_names_of(base, input_weight))
    if output is not None:
        vocab_keys |= set(_names_of(base, output.weight)) | set(_names_of(base, getattr(output, "bias", None)))
    grown: list[str] = []
    mismatched: list[str] = []
    for key, tensor in state.items():
        current = expected_state[key]
        if tensor.shape == current.shape:
            continue
        if key in vocab_keys and new_token_ids and tensor.shape[0] < current.shape[0]:
            replacement = _grow_vocabulary(key, tensor, current, new_token_ids, prefix)
            if replacement is not None:
                state[key] = replacement
                grown.append(prefix + key)
                continue
        mismatched.append(f"{prefix}{key}: checkpoint {tuple(tensor.shape)}, model {tuple(current.shape)}")
    if mismatched:
        hint = ""
        if any(name.split(":")[0].removeprefix(prefix) in vocab_keys for name in mismatched):
            hint = (" (vocabulary size differs: load a CoT checkpoint before adding the latent tokens, a Coconut "
                    "checkpoint after)")
        raise WeightsError("shape mismatch for " + "; ".join(mismatched[:_SHOWN_KEYS])
                           + (f" and {len(mismatched) - _SHOWN_KEYS} more" if len(mismatched) > _SHOWN_KEYS else "")
                           + hint)

    result = base.load_state_dict(state, strict=False)
    leftover = set(result.missing_keys) - tied_keys
    if leftover or result.unexpected_keys:  # guards the checks above; cannot happen if they are right
        raise WeightsError(f"load_state_dict disagreed: missing {leftover}, unexpected {result.unexpected_keys}")

    report = LoadReport(kind=kind, target=type(model).__name__, tensors=len(state), upgrades=tuple(upgrades),
                        grown=tuple(grown))
    logger.info(report.summary())
    return report
