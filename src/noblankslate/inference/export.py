"""``nbs export``: a trained Coconut as a standard Hugging Face folder anyone can load.

The folder holds what ``save_pretrained`` writes for the base causal LM (``config.json``, safetensors
weights) and for the tokenizer (with ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>``), so
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load it with transformers
alone. Coconut adds no parameters, so these are all its weights; what it needs besides - the latent
token ids, thoughts per step, the thought count, the method - is in a small ``coconut.json`` that
:func:`noblankslate.inference.load` (and ``nbs generate``/``nbs eval``) read. ``README.md`` is a model
card with the run's config and its measured accuracy.

A base model with LoRA adapters (a peft model: it has ``merge_and_unload``) is merged before saving, so
the export is a plain model. The folder is written beside ``out`` and renamed into place, so a failed
export leaves nothing under that name.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from noblankslate.errors import NbsError
from noblankslate.inference.loading import EXPORT_FILE, EXPORT_FORMAT_VERSION
from noblankslate.inference.model import ThinkingModel

METRICS_FILE = "metrics.jsonl"


class ExportError(NbsError, RuntimeError):
    """The export folder cannot be written; the message names it."""

    label = "export error"


def coconut_info(thinking: ThinkingModel) -> dict[str, Any]:
    """The contents of ``coconut.json``."""
    model, spec = thinking.model, thinking.spec
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "method": thinking.method,
        "variant": thinking.variant,
        "latent_token_ids": {"start": model.start_latent_id, "end": model.end_latent_id, "latent": model.latent_token_id},
        "c_thought": spec.c_thought,
        "max_latent_stage": spec.max_latent_stage,
        "pad_latent_to_max": spec.pad_latent_to_max,
        "use_markers": spec.use_markers,
        "latent_slots": spec.latent_slots,
        "feed_thoughts": model.feed_thoughts,
        "stage": thinking.stage,
        "num_thoughts": thinking.num_thoughts,
        "max_new_tokens": thinking.max_new_tokens,
        "epoch": thinking.epoch,
        "step_separator": thinking.step_separator,
    }


def measured_accuracy(thinking: ThinkingModel) -> dict[str, Any] | None:
    """The checkpoint's epoch record in its run's ``metrics.jsonl`` (accuracy on the run's validation
    file), or None when the run folder has no such record."""
    metrics = thinking.source.parent / METRICS_FILE
    if thinking.epoch is None or not metrics.is_file():
        return None
    found = None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash; the others still count
        if isinstance(record, dict) and record.get("event") == "epoch" and record.get("epoch") == thinking.epoch:
            found = record
    return found


def model_card(thinking: ThinkingModel, info: dict[str, Any], accuracy: dict[str, Any] | None, folder: Path,
               base: str) -> str:
    """README.md of the export: what the model is (``base``: its class), how to load it, the config and the
    measured accuracy."""
    if accuracy is not None:
        measured = (f"Accuracy on the run's validation file (`{(thinking.config or {}).get('val_path')}`) at epoch "
                    f"{accuracy['epoch']} (stage {accuracy.get('stage')}): **{accuracy['accuracy']:.4f}** "
                    f"({accuracy.get('correct')}/{accuracy.get('total')}), {accuracy.get('mean_generated_tokens', 0):.1f} "
                    f"generated tokens and {accuracy.get('mean_forward_passes', 0):.1f} forward passes per question "
                    "(from the run's metrics.jsonl).")
    else:
        measured = "Not measured: the run folder has no metrics.jsonl record of this checkpoint's epoch."
    start, latent, end = (info["latent_token_ids"][k] for k in ("start", "latent", "end"))
    newline = f"`question + {json.dumps(thinking.step_separator)}`"
    if info["use_markers"]:
        layout = (f"{newline}, then `<|start-latent|>` (id {start}), one `<|latent|>` (id {latent}) per thought, "
                  f"`<|end-latent|>` (id {end})")
    elif info["latent_slots"]:
        layout = f"{newline}, then one `<|latent|>` (id {latent}) per thought, without markers"
    else:
        layout = f"{newline} alone (this method was trained without latent tokens)"
    config = (f"```yaml\n{yaml.safe_dump(thinking.config, sort_keys=False)}```" if thinking.config
              else "Not known (the source had no run config).")
    return f"""---
library_name: transformers
tags:
- coconut
- latent-reasoning
- noblankslate
---

# {info['variant']} ({base}), exported by noblankslate

A causal LM trained with the Coconut method ("Training Large Language Models to Reason in a Continuous
Latent Space", Hao et al. 2024): at `<|latent|>` positions it is fed its own last hidden state (a
continuous thought) instead of a token embedding. Method `{info['method']}`, {info['c_thought']} thought(s)
per step, {info['num_thoughts']} thought(s) per question at stage {info['stage']}; exported from
`{thinking.source}`.

## Use

The weights and tokenizer load with transformers alone
(`AutoModelForCausalLM.from_pretrained(folder)`, `AutoTokenizer.from_pretrained(folder)`), but plain
`generate()` does not feed the thoughts back; answer with noblankslate, which reads `coconut.json`:

```python
from noblankslate.inference import load
model = load("{folder}")
print(model.answer(["Is Tom a wumpus or a yumpus?"])[0].answer)
```

```bash
nbs generate {folder} --question "..." --thoughts-decoded
nbs eval {folder} --data valid.json
```

Prompt layout: {layout}; the answer follows `### `.

## Measured accuracy

{measured}

## Training config

{config}
"""


def export_model(thinking: ThinkingModel, out: str | Path) -> Path:
    """Write ``thinking`` as a Hugging Face folder at ``out`` (which must not exist or be empty).

    A peft base model is merged in place (``merge_and_unload``), so ``thinking`` holds the merged weights
    afterwards.

    Returns:
        The folder written.

    Raises:
        ExportError: ``out`` exists and is not an empty folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    base = thinking.model.base_causallm
    if hasattr(base, "merge_and_unload"):  # LoRA (peft): fold the adapters into the weights
        base = base.merge_and_unload()
    info = coconut_info(thinking)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        base.save_pretrained(str(tmp))
        thinking.tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(thinking, info, measured_accuracy(thinking), out, type(base).__name__),
                                       encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
