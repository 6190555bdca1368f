"""Paired comparison of two evaluations on the same items: discordant pairs, exact McNemar, interval.

Two methods scored on the same questions are compared through the items where they disagree: ``b``
items only the first gets right, ``c`` only the second. Under "no difference" each disagreement is a
fair coin, so the exact McNemar test is a two-sided binomial test of ``b`` out of ``b + c`` at 1/2.
The accuracy difference is ``(b - c) / n``; its 95% interval here is the Wald interval of a paired
difference (Agresti & Min), which is what papers usually print beside McNemar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none).

    The two-sided value doubles the smaller tail of Binomial(b + c, 1/2), capped at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """``first`` vs ``second`` on the same ``n`` items."""

    n: int
    first_correct: int
    second_correct: int
    only_first: int
    """b: items the first gets right and the second wrong."""
    only_second: int
    """c: items the second gets right and the first wrong."""
    difference: float
    """accuracy(first) - accuracy(second)."""
    ci95: tuple[float, float]
    p_value: float
    """Exact two-sided McNemar."""

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(first: Sequence[bool], second: Sequence[bool]) -> PairedComparison:
    """Compare two per-item correctness lists aligned on the same items.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(first) != len(second):
        raise ValueError(f"paired evaluations must score the same items: {len(first)} vs {len(second)}")
    n = len(first)
    if n == 0:
        raise ValueError("no items to compare")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    difference = (b - c) / n
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return PairedComparison(
        n=n, first_correct=sum(map(bool, first)), second_correct=sum(map(bool, second)), only_first=b,
        only_second=c, difference=difference, ci95=(difference - 1.96 * se, difference + 1.96 * se),
        p_value=mcnemar_exact_p(b, c),
    )
