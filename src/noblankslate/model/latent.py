"""Tensor ops for the latent positions of a batch: where the thoughts sit, and re-aligning prompts.

Coconut's multi-pass forward is cheap only when the first latent token of every row sits in the same
column, so that one single-position pass per thought serves the whole batch from one KV cache. The
collator produces that layout for training; :func:`align_prompts` produces it for arbitrary padded
prompts at generation time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatentLayout:
    """Where the latent tokens of an aligned batch are.

    Attributes:
        counts: (B,) number of latent tokens per row (0 for rows without thoughts).
        start: column of the first latent token of every row that has one (0 if no row has one).
        max_count: the largest count in the batch; the forward needs ``max_count + 1`` passes.
    """

    counts: Tensor
    start: int
    max_count: int


def latent_layout(input_ids: Tensor, latent_id: int) -> LatentLayout:
    """Find the latent tokens of a batch and check the layout the multi-pass forward relies on.

    Every row's latent tokens must be contiguous and start in the same column (the collator's and
    :func:`align_prompts`' layout), and that column must be > 0 (a thought is the hidden state of the
    position before it). One host sync, whatever the batch size.

    Raises:
        ValueError: if the layout is not aligned, naming the offending row.
    """
    batch, length = input_ids.shape
    is_latent = input_ids == latent_id  # (B, L)
    counts = is_latent.sum(dim=1)  # (B,)
    has = counts > 0
    first = torch.where(has, is_latent.int().argmax(dim=1), length)  # (B,)
    last = torch.where(has, length - 1 - is_latent.flip(1).int().argmax(dim=1), -1)  # (B,)
    start = torch.where(has, first, length).min()
    misaligned = has & ((first != start) | (last - first + 1 != counts))
    max_count, start_value, bad_row = torch.stack(
        [counts.max(), start, torch.where(misaligned.any(), misaligned.int().argmax(), -1)]
    ).tolist()
    if bad_row >= 0:
        raise ValueError(
            f"row {bad_row}: latent tokens must be contiguous and start in the same column in every row "
            f"(use LatentCollator or align_prompts); this row's run starts at column {first[bad_row].item()}, "
            f"the batch's first at {start_value}"
        )
    if max_count == 0:
        return LatentLayout(counts=counts, start=0, max_count=0)
    if start_value == 0:
        raise ValueError("a latent token in column 0 has no preceding hidden state to receive")
    return LatentLayout(counts=counts, start=start_value, max_count=max_count)


@dataclass(frozen=True)
class AlignedPrompts:
    """Prompts re-laid out so the first latent column is shared (see :func:`align_prompts`).

    Attributes:
        input_ids, attention_mask, position_ids: (B, W) the aligned batch.
        lengths: (B,) real tokens per row.
        last_column: (B,) column of each row's last real token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths: Tensor
    last_column: Tensor


def align_prompts(input_ids: Tensor, attention_mask: Tensor, latent_id: int, pad_id: int) -> AlignedPrompts:
    """Re-lay out padded prompts (left or right padded) so that latent runs start in one column.

    Rows with thoughts are shifted right so their first latent token lands in the latest such column;
    rows without thoughts start at column 0. Every row's real tokens keep positions 0..len-1, pads get
    attention 0 and position 0, so each row computes exactly what it would alone.

    Args:
        input_ids, attention_mask: (B, L); the real tokens of a row must be contiguous.

    Returns:
        AlignedPrompts with tensors of shape (B, W).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    real = attention_mask.bool()
    lengths = real.sum(dim=1)  # (B,)
    starts = real.int().argmax(dim=1)  # (B,) first real column
    columns = torch.arange(length, device=device)[None, :]  # (1, L)
    contiguous = (real == ((columns >= starts[:, None]) & (columns < (starts + lengths)[:, None]))).all(dim=1)
    if not bool(contiguous.all()):
        row = int((~contiguous).int().argmax())
        raise ValueError(f"row {row}: the attention mask must mark one contiguous run of real tokens")

    is_latent = (input_ids == latent_id) & real  # (B, L)
    has = is_latent.any(dim=1)
    first_rel = torch.where(has, is_latent.int().argmax(dim=1) - starts, 0)  # (B,) within the row
    target = first_rel.max() if bool(has.any()) else first_rel.new_zeros(())
    offset = torch.where(has, target - first_rel, 0)  # (B,) left pad of each row
    width = int((offset + lengths).max())

    new_columns = torch.arange(width, device=device)[None, :]  # (1, W)
    rel = new_columns - offset[:, None]  # (B, W) position within the row
    valid = (rel >= 0) & (rel < lengths[:, None])
    source = (starts[:, None] + rel).clamp(0, length - 1)
    ids = torch.where(valid, input_ids.gather(1, source), pad_id)
    return AlignedPrompts(
        input_ids=ids,
        attention_mask=valid.long(),
        position_ids=torch.where(valid, rel, 0),
        lengths=lengths,
        last_column=offset + lengths - 1,
    )
