"""The thinking-budget curve: the same items answered after exactly j = 0, 1, ... latent tokens.

Each item gets a prompt with ``j`` latent tokens (``<|start-latent|>`` and ``<|end-latent|>`` kept, also
at ``j = 0``), built as the curriculum builds its prompts, for ``j`` from 0 to the largest count of the
ordinary evaluation ``T`` plus ``extra`` (beyond ``T`` as far as the model's positions allow). Every
budget is compared with the ordinary evaluation on the same items (exact McNemar): at ``j = T`` the
prompts are the evaluation's own, so the two runs are the same computation and must agree exactly.

The exit oracle is the early-stopping test: an item whose answer is already right after ``j < T``
thoughts could have stopped there; an oracle exit that stops at the first right budget reaches the
oracle accuracy (right at some ``j <= T``).
"""

from __future__ import annotations

from typing import Any

from noblankslate.analysis.subject import Subject, generate, summary
from noblankslate.data.curriculum import prompt_with_latents
from noblankslate.eval.paired import paired_comparison


def budget_curve(subject: Subject, ordinary: list[dict[str, Any]], extra: int = 2) -> dict[str, Any]:
    """Accuracy, tokens and forward passes at every budget j, paired with the ordinary evaluation.

    Args:
        ordinary: the records of the ordinary evaluation of ``subject`` (its items, in order).
        extra: budgets beyond the largest ``T`` to try.

    Returns:
        ``{"T": ..., "budgets": [...], "items": [...], "exit_oracle": {...}, "skipped": [...]}``; each
        budget has its summary and the paired comparison with the ordinary run, each item its
        correctness per budget.
    """
    counts = subject.latent_counts()
    largest = max(counts, default=0)
    limit = subject.position_limit
    budgets, skipped, per_budget = [], [], {}
    ordinary_correct = [bool(r["correct"]) for r in ordinary]
    for j in range(largest + extra + 1):
        prompts = [prompt_with_latents(t, j, subject.spec) for t in subject.tokens]
        longest = max(len(p["input_ids"]) for p in prompts)
        if limit is not None and longest + subject.max_new_tokens > limit:
            skipped.append(f"j={j}: a prompt of {longest} tokens + max_new_tokens {subject.max_new_tokens} exceeds "
                           f"the model's {limit} positions")
            break
        records = generate(subject, prompts)
        per_budget[j] = records
        correct = [bool(r["correct"]) for r in records]
        budgets.append({"j": j, **summary(records),
                        "vs_ordinary": paired_comparison(correct, ordinary_correct).to_dict()})
    items = []
    for i, example in enumerate(subject.examples):
        right = {j: bool(records[i]["correct"]) for j, records in per_budget.items()}
        before = [j for j in range(counts[i]) if right.get(j)]
        items.append({"idx": example.idx, "T": counts[i], "ordinary_correct": ordinary_correct[i],
                      "correct_at": [right[j] for j in sorted(right)],
                      "predictions_at": [per_budget[j][i]["prediction"] for j in sorted(per_budget)],
                      "first_right_j": min((j for j, ok in right.items() if ok), default=None),
                      "right_before_T": bool(before)})
    n = len(items)
    oracle = {
        "share_right_before_T": sum(item["right_before_T"] for item in items) / n if n else 0.0,
        "share_right_before_T_among_right_at_T": (
            sum(item["right_before_T"] for item in items if item["ordinary_correct"])
            / max(1, sum(item["ordinary_correct"] for item in items))),
        "oracle_accuracy": sum(item["right_before_T"] or item["ordinary_correct"] for item in items) / n if n else 0.0,
        "share_right_at_j": {b["j"]: b["accuracy"] for b in budgets if b["j"] < largest},
    }
    uniform = len(set(counts)) <= 1
    at_T = per_budget.get(largest)
    matches = (None if not uniform or at_T is None
               else all(a["output"] == b["output"] for a, b in zip(at_T, ordinary)))
    return {"T": largest, "T_per_item_uniform": uniform, "j_T_matches_ordinary": matches, "budgets": budgets, "items": items,
            "exit_oracle": oracle, "skipped": skipped}
