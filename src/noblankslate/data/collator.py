"""Batching with the first latent token of every row in one column (the original ``MyCollator``).

Coconut's forward runs the model once per latent token, each pass ending just before the next latent
position. Left-padding rows so their first latent tokens line up makes those cut points the same column
for the whole batch, so each pass extends the previous pass's KV cache over one shared prefix::

    xxxxxxxxxx<latent><latent>xxxxx--
    -----xxxxx<latent>xxxxxxxx-------
    ---xxxxxxx<latent><latent>xxxxxxx

("x" a token, "-" padding). Rows without latent tokens are not left-padded. Everything is then
right-padded to the longest row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentCollator:
    """Collate curriculum features (lists of ints) into a batch of ``torch.long`` tensors.

    Left padding (before a row's first latent token is aligned) has ``input_ids = pad_token_id``,
    ``attention_mask = 0``, ``labels = label_pad_id`` and ``position_ids = 0``; the row's own positions
    then count from 0, so padding does not shift them. Right padding uses the same values.

    ``position_ids`` are always produced as ``[0] * left_pad + range(len(input_ids))`` (the curriculum's
    features carry exactly that); ``labels`` and ``idx`` are passed through when the features have them.
    The input features are not modified.
    """

    pad_token_id: int
    latent_id: int
    label_pad_id: int = -100

    def left_padding(self, rows: Sequence[Sequence[int]]) -> list[int]:
        """Per row, the pad count that puts its first latent token at the latest first-latent column."""
        first = [list(row).index(self.latent_id) if self.latent_id in row else None for row in rows]
        present = [f for f in first if f is not None]
        if not present:
            return [0] * len(rows)
        column = max(present)
        return [0 if f is None else column - f for f in first]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = [f["input_ids"] for f in features]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
        left = torch.tensor(self.left_padding(rows), dtype=torch.long)  # (B,)
        width = int((left + lengths).max())
        batch_size = len(rows)

        # Scatter every row's tokens into its span [left, left + length) of a padded (B, T) grid.
        row_of = torch.repeat_interleave(torch.arange(batch_size), lengths)  # (N,) N = total tokens
        starts = torch.cumsum(lengths, 0) - lengths  # (B,) offset of each row in the flat list
        within = torch.arange(int(lengths.sum())) - starts[row_of]  # (N,) position inside the row
        col = left[row_of] + within  # (N,)

        def grid(values: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full((batch_size, width), fill, dtype=torch.long)
            out[row_of, col] = values
            return out  # (B, T)

        flat_ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)  # (N,)
        batch = {
            "input_ids": grid(flat_ids, self.pad_token_id),
            "attention_mask": grid(torch.ones_like(flat_ids), 0),
            "position_ids": grid(within, 0),
        }
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            if [len(x) for x in labels] != lengths.tolist():
                raise ValueError("labels and input_ids differ in length in some row")
            batch["labels"] = grid(torch.tensor([t for x in labels for t in x], dtype=torch.long), self.label_pad_id)
        if "idx" in features[0]:
            batch["idx"] = torch.tensor([f["idx"] for f in features], dtype=torch.long)  # (B,)
        return batch
