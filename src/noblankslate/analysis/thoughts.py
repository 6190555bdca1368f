"""Decoded thoughts: the LM head applied to every continuous thought, and the thoughts' norms.

A continuous thought is the last hidden state (after the final norm) that Coconut feeds back as the next
input, so the LM head applied to it is the next-token distribution the model would have sampled in
language space; the paper reads several next steps at once in it. Its norm is compared with the norms of
the token embeddings it replaces as an input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from noblankslate.model.coconut import Coconut


@dataclass
class Decoded:
    """LM-head readings of N thoughts (all items' thoughts stacked in order).

    Attributes:
        top_ids, top_probs: (N, k) the k most probable tokens and their probabilities.
        wanted: per thought, the probabilities of the requested token ids (for the latent search).
    """

    top_ids: np.ndarray
    top_probs: np.ndarray
    wanted: list[np.ndarray]


@torch.no_grad()
def decode(model: Coconut, thoughts: torch.Tensor, k: int, wanted: Sequence[Sequence[int]] | None = None,
           chunk: int = 256) -> Decoded:
    """Softmax of the LM head at every thought, ``chunk`` thoughts at a time (a (chunk, V) block).

    Args:
        thoughts: (N, D).
        wanted: per thought, token ids whose probabilities to return.
    """
    head = model.lm_head
    weight = head.weight
    top_ids, top_probs, picked = [], [], []
    for begin in range(0, thoughts.shape[0], chunk):
        block = thoughts[begin : begin + chunk].to(weight.device, weight.dtype)  # (c, D)
        probs = torch.softmax(head(block).float(), dim=-1)  # (c, V)
        p, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (c, k)
        top_ids.append(ids.cpu().numpy())
        top_probs.append(p.cpu().numpy())
        if wanted is not None:
            for row, tokens in enumerate(wanted[begin : begin + chunk]):
                picked.append(probs[row, list(tokens)].cpu().numpy() if tokens else np.zeros(0, np.float32))
    width = min(k, int(weight.shape[0]))
    return Decoded(np.concatenate(top_ids) if top_ids else np.zeros((0, width), np.int64),
                   np.concatenate(top_probs) if top_probs else np.zeros((0, width), np.float32), picked)


def stack_thoughts(records: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """All fed thoughts (N, D) and, for each, (item position, thought index)."""
    where = [(i, t) for i, r in enumerate(records) for t in range(len(r["thoughts"]))]
    if not where:
        return torch.zeros(0, 0), []
    stacked = np.concatenate([r["thoughts"] for r in records if len(r["thoughts"])], axis=0)
    return torch.from_numpy(stacked), where


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([int(token)])


def decoded_thoughts(model: Coconut, tokenizer, records: Sequence[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    """Top-k tokens of every thought with their probabilities, and norms against the token embeddings.

    Returns:
        ``{"items": [...], "per_step": [...], "embedding_norms": {...}}``: per item its thoughts' norms
        and top tokens; per thought index the mean norm, its ratio to the median embedding norm, the mean
        top-1 probability and the most frequent top-1 tokens.
    """
    thoughts, where = stack_thoughts(records)
    decoded = decode(model, thoughts, k)
    norms = thoughts.norm(dim=-1).numpy() if len(where) else np.zeros(0)
    embedding = model.embedding.weight.detach().float()
    embedding_norms = embedding.norm(dim=-1).cpu().numpy()  # (V,)
    median = float(np.median(embedding_norms))
    items: list[dict[str, Any]] = [{"idx": r["idx"], "thoughts": []} for r in records]
    steps: dict[int, list[int]] = {}
    for row, (i, t) in enumerate(where):
        items[i]["thoughts"].append({
            "t": t + 1, "norm": float(norms[row]),
            "top": [[token_text(tokenizer, tok), float(p)] for tok, p in zip(decoded.top_ids[row], decoded.top_probs[row])],
        })
        steps.setdefault(t, []).append(row)
    per_step = []
    for t, rows in sorted(steps.items()):
        top1 = Counter(token_text(tokenizer, decoded.top_ids[r, 0]) for r in rows)
        per_step.append({
            "t": t + 1, "n": len(rows), "mean_norm": float(norms[rows].mean()),
            "norm_over_median_embedding": float(norms[rows].mean() / median) if median else None,
            "mean_top1_probability": float(decoded.top_probs[rows, 0].mean()),
            "most_common_top1": [[text, count] for text, count in top1.most_common(10)],
        })
    return {
        "k": k, "items": items, "per_step": per_step,
        "embedding_norms": {"mean": float(embedding_norms.mean()), "median": median,
                            "min": float(embedding_norms.min()), "max": float(embedding_norms.max())},
    }
