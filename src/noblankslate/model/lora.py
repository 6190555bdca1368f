"""LoRA adapters on the run's causal LM, through the ``peft`` library (the ``lora`` config section).

The adapted model is peft's :class:`~peft.LoraModel` (the tuner), not the :class:`~peft.PeftModel` that
``get_peft_model`` returns around it. Coconut runs the transformer body, ``base_causallm.base_model``, to
read the last hidden states it feeds back as thoughts; on a ``PeftModel`` that attribute is the tuner,
whose forward runs the whole causal LM and returns logits. The tuner forwards every attribute it lacks
to the model it adapts, so on it ``base_model`` is the body with its adapted layers, ``config`` and
``get_input_embeddings()`` are the model's, and calling it is calling the causal LM: Coconut uses it as
it uses any causal LM, and the thoughts are the hidden states of the adapted model. It also has
``merge_and_unload()``, which returns the plain causal LM with the adapters merged (``nbs export``
calls it).

What trains: the adapters (B starts at zero, so the adapted model computes exactly what the base did),
and, when the vocabulary grew, the rows of the three latent tokens (peft's trainable tokens:
``trainable_token_indices``). Those rows have no pretrained values (they start as copies of ``<<``),
and ``<|start-latent|>``/``<|end-latent|>`` (and the learned pause of the pause baselines) are inputs
the model must learn to read; training the whole embedding matrix instead would put a vocabulary x
hidden matrix (a fifth of SmolLM2-135M) back into the optimizer. With tied embeddings the LM head
shares the trained rows; an untied head keeps its rows of the new tokens as initialised (they are never
labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from noblankslate.config import ConfigError
from noblankslate.config import LoraConfig as LoraSettings

ADAPTER_NAME = "default"
"""peft's adapter name; it appears in the state-dict keys (``lora_A.default.weight``)."""

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}
"""Every linear layer of the decoder blocks (attention and MLP), per ``config.model_type``: adapting all
of them, not only q and v, is what QLoRA found to match full fine-tuning."""

_ADAPTER_KEY_PARTS = (".lora_A.", ".lora_B.", ".trainable_tokens_delta.")


def _require_peft():
    try:
        import peft
    except ModuleNotFoundError:
        raise ConfigError("lora: LoRA needs the peft package: pip install -e '.[lora]' (or pip install peft)") from None
    return peft


def has_adapters(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a state dict comes from a LoRA run (holds adapter weights)."""
    return any(part in key for key in state_dict for part in _ADAPTER_KEY_PARTS)


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM with LoRA adapters (what :func:`apply_lora` returns)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def resolve_targets(settings: LoraSettings, model: PreTrainedModel) -> list[str]:
    """The layer names to adapt: the configured ones, else the architecture's default.

    Raises:
        ConfigError: naming ``lora.target_modules`` when a name matches no layer of the model, or when the
            architecture has no default; the message lists the model's linear layers.
    """
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, (nn.Linear, Conv1D))})
    model_type = model.config.model_type
    if settings.target_modules is None:
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"lora.target_modules: no default for model type {model_type!r}; name the layers to "
                              f"adapt, e.g. some of its linear layers: {', '.join(linear)}")
        return list(DEFAULT_TARGETS[model_type])
    names = [name for name, _ in model.named_modules()]
    for target in settings.target_modules:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ConfigError(f"lora.target_modules: {target!r} matches no layer of {type(model).__name__}; its "
                              f"linear layers are: {', '.join(linear)}")
    return list(settings.target_modules)


def apply_lora(model: PreTrainedModel, settings: LoraSettings, trainable_token_ids: Sequence[int] = ()) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters (and trainable rows for ``trainable_token_ids``).

    Args:
        model: the causal LM, already resized to the run's vocabulary.
        settings: the ``lora`` section.
        trainable_token_ids: token ids whose input-embedding rows train (the latent tokens, when the
            vocabulary grew); none for runs that add no tokens.

    Returns:
        peft's ``LoraModel`` around ``model`` (see the module docstring for why not a ``PeftModel``). At
        this point it computes exactly what ``model`` did.
    """
    peft = _require_peft()
    targets = resolve_targets(settings, model)
    conv1d = any(isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
                 for name, module in model.named_modules())
    peft_config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight as (in, out)
        trainable_token_indices=list(trainable_token_ids) or None,
    )
    return peft.LoraModel(model, peft_config, ADAPTER_NAME)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should see: with LoRA only the adapters and the new token rows."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def describe(model: nn.Module) -> str:
    """One line for the run log: what the adapters are and how much of the model trains."""
    settings = model.peft_config[ADAPTER_NAME]
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    tokens = settings.trainable_token_indices
    rows = f" and the embedding rows of tokens {sorted(tokens)}" if tokens else ""
    return (f"LoRA: rank {settings.r}, alpha {settings.lora_alpha:g} on {', '.join(sorted(settings.target_modules))}"
            f"{rows}; {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
