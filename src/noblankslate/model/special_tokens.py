"""Coconut's three marker tokens, added to the tokenizer and given embeddings in the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

START_LATENT = "<|start-latent|>"
END_LATENT = "<|end-latent|>"
LATENT = "<|latent|>"
INIT_SOURCE_TOKEN = "<<"
"""The original copies the embedding of GPT-2's ``<<`` (the opening of GSM8K's ``<<3*4=12>>``) into the
new tokens; any existing row would do, a known one keeps the new rows in distribution."""


@dataclass(frozen=True)
class LatentTokenIds:
    """Ids of ``<|start-latent|>``, ``<|end-latent|>`` and ``<|latent|>`` in the run's tokenizer."""

    start_id: int
    end_id: int
    latent_id: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.start_id, self.end_id, self.latent_id)


def add_latent_tokens(tokenizer: PreTrainedTokenizerBase) -> LatentTokenIds:
    """Add the three markers as the original does (one ``add_tokens`` each, in this order).

    The order fixes the ids (start = n, end = n + 1, latent = n + 2 for a tokenizer of length n), so
    checkpoints trained with the original code line up. Calling it again adds nothing and returns the
    same ids.
    """
    for token in (START_LATENT, END_LATENT, LATENT):
        tokenizer.add_tokens(token)
    ids = LatentTokenIds(
        start_id=tokenizer.convert_tokens_to_ids(START_LATENT),
        end_id=tokenizer.convert_tokens_to_ids(END_LATENT),
        latent_id=tokenizer.convert_tokens_to_ids(LATENT),
    )
    if len(set(ids.as_tuple())) != 3 or tokenizer.unk_token_id in ids.as_tuple():
        raise ValueError(f"the tokenizer did not give the latent markers distinct ids: {ids}")
    return ids


def _init_rows(weight: torch.Tensor, new_ids: list[int], source_id: int | None) -> None:
    """Set ``weight[new_ids]`` to ``weight[source_id]``, or to the mean of the other rows."""
    if source_id is not None:
        weight[new_ids] = weight[source_id].clone()  # (D,), a view of weight itself otherwise
        return
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[new_ids] = False
    weight[new_ids] = weight[keep].float().mean(dim=0).to(weight.dtype)  # (D,)


@torch.no_grad()
def init_latent_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: LatentTokenIds) -> None:
    """Resize the model to the tokenizer and initialise the three marker rows, as the original.

    The rows of the input embeddings, and of the LM head when it is a separate tensor (Llama with
    ``tie_word_embeddings=False``), are copied from the token ``<<``. The original also writes the LM
    head rows, which for tied GPT-2 is the same write twice.

    Without a ``<<`` token (a word-level tokenizer, another vocabulary), each new row is the mean of the
    other rows of its matrix: like the original's choice it is a stable start, an in-distribution vector
    of typical norm, where a random row or a zero row would give the first latent passes and the markers'
    logits an unusual scale.

    Note ``resize_token_embeddings(len(tokenizer))`` also shrinks a matrix larger than the tokenizer
    (Qwen pads its vocabulary), exactly as the original.
    """
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set below
    source_id = tokenizer.convert_tokens_to_ids(INIT_SOURCE_TOKEN)
    if source_id is None or source_id == tokenizer.unk_token_id or source_id in ids.as_tuple():
        source_id = None
    new_ids = list(ids.as_tuple())
    inputs = model.get_input_embeddings().weight  # (V, D)
    _init_rows(inputs, new_ids, source_id)
    outputs = model.get_output_embeddings()
    if outputs is not None and outputs.weight is not inputs and outputs.weight.data_ptr() != inputs.data_ptr():
        _init_rows(outputs.weight, new_ids, source_id)  # (V, D), untied head
