"""Scores of several sampled answers per question: pass@k (unbiased) and majority vote.

pass@k is the probability that at least one of k answers drawn without replacement from the n sampled
for a question is correct. With c correct among n, the unbiased estimator of Chen et al. (2021,
"Evaluating Large Language Models Trained on Code") is ``1 - C(n - c, k) / C(n, k)``; averaged over
questions it estimates pass@k for every k <= n from one set of n samples, with less variance than
drawing k samples per question.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with ``c`` correct among ``n`` samples (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)  # comb(m, k) = 0 for m < k: a correct answer is always drawn


def mean_pass_at_k(correct_counts: Sequence[int], n: int) -> dict[int, float]:
    """pass@k averaged over questions, for every k from 1 to ``n`` (``n`` samples per question)."""
    if not correct_counts:
        return {}
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in range(1, n + 1)}


def majority_vote(predictions: Sequence[str | None]) -> str | None:
    """The most frequent answer among a question's samples; a tie goes to the one sampled first.

    A sample without an answer (None: no ``#`` in its output) votes for "no answer", which is never correct.
    """
    if not predictions:
        raise ValueError("majority_vote needs at least one prediction")
    counts = Counter(predictions)
    best = max(counts.values())
    return next(p for p in predictions if counts[p] == best)
