"""Balanced ProsQA: graphs on which no shortcut answers the question, sized for a CPU.

On ProsQA-style graphs drawn by :mod:`noblankslate.data.prosqa` a local rule often gives the answer
away: on the demo's small graphs "the option that is not directly below some person" is right 88.75% of
the time, so an answer-only model needs no reasoning. This generator makes the two sides of every graph
the same shape, so that everything a rule can see near an option is the same for both options:

* the root and the other person each have ``b`` children (the same ``b`` for both), and each child
  starts a branch that is a chain of exactly ``d`` "is a" facts from the person down to a leaf;
  ``b`` and ``d`` are drawn per graph;
* the target is the leaf of one of the root's branches, the negative target the leaf of one of the
  other person's branches: both are leaves, at the same depth below a person, with parents of the same
  shape; the other ``b - 1`` branches of each side are distractors of the same depth as the true path;
* facts are shuffled and the two options are in random order.

So the only way to tell the options apart is to follow ``d`` facts from the root down (or from an
option up). ``shortcut_accuracies`` measures what rules that look fewer hops away score (chance);
``docs/table1.md`` reports them. Records have the published format (``question``, ``answer``,
``steps``, ``idx_to_symbol``, ``edges``, ``root``, ``target``, ``neg_target``) and pass
:func:`noblankslate.data.prosqa.check_prosqa_example` with the chosen distance range.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from noblankslate.data.prosqa import CONCEPTS, PEOPLE
from noblankslate.errors import GenerationError, InvalidValue


@dataclass(frozen=True)
class BalancedConfig:
    """The knobs of the balanced task. Both people get the same branch count and depth per graph."""

    branches: tuple[int, int] = (2, 3)
    """Inclusive range of children per person (= branches per side), drawn uniformly per graph."""
    distance: tuple[int, int] = (3, 4)
    """Inclusive range of the branch length d (= root -> target distance = steps), drawn per graph."""

    def __post_init__(self) -> None:
        for name in ("branches", "distance"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise InvalidValue(f"{name}: need 1 <= lowest <= highest, got {low}, {high}")
        if 2 * self.branches[1] * self.distance[1] > len(CONCEPTS):
            raise InvalidValue(
                f"branches {self.branches[1]} x distance {self.distance[1]} x 2 sides needs "
                f"{2 * self.branches[1] * self.distance[1]} concept names; only {len(CONCEPTS)} exist")


def _one_example(rng: random.Random, cfg: BalancedConfig) -> dict[str, Any]:
    b = rng.randint(*cfg.branches)
    d = rng.randint(*cfg.distance)
    # Nodes in creation order: 0 and 1 are the people; each side's branches are chains of d concepts.
    parents: list[list[int]] = [[], []]
    leaves: tuple[list[int], list[int]] = ([], [])
    for side in (0, 1):
        for _ in range(b):
            above = side
            for _ in range(d):
                parents.append([above])
                above = len(parents) - 1
            leaves[side].append(above)
    n = len(parents)

    # Ids: a uniformly random topological order with the two people first, as in ProsQA.
    children: list[list[int]] = [[] for _ in range(n)]
    for v, ps in enumerate(parents):
        for u in ps:
            children[u].append(v)
    order = [0, 1]
    available = list(children[0]) + list(children[1])
    while available:
        u = available.pop(rng.randrange(len(available)))
        order.append(u)
        available.extend(children[u])
    new_id = {u: i for i, u in enumerate(order)}

    root_side = rng.randrange(2)
    target = rng.choice(leaves[root_side])
    neg_target = rng.choice(leaves[1 - root_side])
    path = [target]
    while parents[path[-1]]:
        path.append(parents[path[-1]][0])
    path.reverse()  # root side's person ... target

    names = [""] * n
    people = rng.sample(PEOPLE, 2)
    concepts = iter(rng.sample(CONCEPTS, n - 2))
    for u in range(n):
        names[new_id[u]] = people[u] if u < 2 else next(concepts)

    def fact(a: int, b_: int) -> str:
        return f"{names[new_id[a]]} is a {names[new_id[b_]]}." if a < 2 else \
            f"Every {names[new_id[a]]} is a {names[new_id[b_]]}."

    edges = sorted(([new_id[u], new_id[v]] for v, ps in enumerate(parents) for u in ps), key=lambda e: (e[1], e[0]))
    sentences = [fact(u, v) for v, ps in enumerate(parents) for u in ps]
    rng.shuffle(sentences)
    options = [names[new_id[target]], names[new_id[neg_target]]]
    rng.shuffle(options)
    root_name = names[new_id[root_side]]
    return {
        "question": " ".join(sentences) + f" Is {root_name} a {options[0]} or {options[1]}?",
        "answer": f"{root_name} is a {names[new_id[target]]}.",
        "steps": [fact(a, v) for a, v in zip(path, path[1:])],
        "idx_to_symbol": names,
        "edges": edges,
        "root": new_id[root_side],
        "target": new_id[target],
        "neg_target": new_id[neg_target],
    }


def generate_balanced(num: int, seed: int, exclude_questions: Iterable[str] = (),
                      config: BalancedConfig | None = None) -> list[dict[str, Any]]:
    """Generate ``num`` distinct balanced examples in the ProsQA format.

    Args:
        num: number of examples.
        seed: the only source of randomness; the same seed and config give the same examples.
        exclude_questions: questions never to produce (pass the training questions when generating a
            held-out split).
        config: branch and depth ranges; ``BalancedConfig()`` by default.
    """
    if num < 0:
        raise InvalidValue(f"num must be >= 0, got {num}")
    cfg = config or BalancedConfig()
    rng = random.Random(seed)
    seen = set(exclude_questions)
    examples: list[dict[str, Any]] = []
    repeats = 0
    while len(examples) < num:
        example = _one_example(rng, cfg)
        if example["question"] in seen:
            repeats += 1
            if repeats > 1000 + 10 * num:
                raise GenerationError(f"{repeats} repeated questions after {len(examples)} distinct ones")
            continue
        seen.add(example["question"])
        examples.append(example)
    return examples


# --- Shortcut rules -----------------------------------------------------------------------------------
# A rule sees the graph and the two options and scores each option; the higher score is its answer and a
# tie counts as half right (a coin flip). Rules that look at fewer hops than the root -> target distance
# should score 50% on this task; on ProsQA-style graphs some of them do much better.

def _graph(ex: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    n = len(ex["idx_to_symbol"])
    parents: list[list[int]] = [[] for _ in range(n)]
    children: list[list[int]] = [[] for _ in range(n)]
    for a, b in ex["edges"]:
        parents[b].append(a)
        children[a].append(b)
    return parents, children


def _ancestors_within(parents: list[list[int]], node: int, hops: int) -> set[int]:
    frontier, seen = {node}, set()
    for _ in range(hops):
        frontier = {p for v in frontier for p in parents[v]} - seen
        seen |= frontier
    return seen


def _rule_within_hops(hops: int) -> Callable[[dict[str, Any], int], float]:
    def rule(ex: dict[str, Any], option: int) -> float:
        parents, _ = _graph(ex)
        return float(ex["root"] in _ancestors_within(parents, option, hops))
    return rule


def _one_hop_rules() -> dict[str, Callable[[dict[str, Any], int], float]]:
    def in_degree(ex, o):
        return float(len(_graph(ex)[0][o]))

    def out_degree(ex, o):
        return float(len(_graph(ex)[1][o]))

    def parent_is_person(ex, o):
        parents, _ = _graph(ex)
        return float(any(not parents[p] for p in parents[o]))

    def not_below_person(ex, o):
        return -parent_is_person(ex, o)

    def parent_out_degree(ex, o):
        parents, children = _graph(ex)
        return float(sum(len(children[p]) for p in parents[o]))

    def parent_in_degree(ex, o):
        parents, _ = _graph(ex)
        return float(sum(len(parents[p]) for p in parents[o]))

    def sibling_is_leaf(ex, o):
        parents, children = _graph(ex)
        return float(sum(1 for p in parents[o] for s in children[p] if s != o and not children[s]))

    def named_first(ex, o):
        # The option named first in "Is X a A or B?" (the order is shuffled).
        tail = ex["question"].rsplit(" Is ", 1)[-1]
        return -float(tail.find(f" {ex['idx_to_symbol'][o]} "))

    def first_mention(ex, o):
        return -float(ex["question"].find(f" {ex['idx_to_symbol'][o]}."))

    def larger_id(ex, o):
        return float(o)

    rules = {"in_degree": in_degree, "out_degree": out_degree, "parent_is_person": parent_is_person,
             "not_below_person": not_below_person, "parent_out_degree": parent_out_degree,
             "parent_in_degree": parent_in_degree, "sibling_is_leaf": sibling_is_leaf,
             "named_first": named_first, "fact_mentioned_first": first_mention, "larger_id": larger_id}
    # Each rule also in reverse: prefer the lower score.
    return {**rules, **{f"-{name}": _reversed(rule) for name, rule in rules.items()}}


def _reversed(rule: Callable[[dict[str, Any], int], float]) -> Callable[[dict[str, Any], int], float]:
    return lambda ex, option: -rule(ex, option)


def rule_accuracy(examples: list[dict[str, Any]], rule: Callable[[dict[str, Any], int], float]) -> float:
    """Accuracy of answering with the option the rule scores higher (ties count as half right)."""
    if not examples:
        raise ValueError("no examples")
    right = 0.0
    for ex in examples:
        good, bad = rule(ex, ex["target"]), rule(ex, ex["neg_target"])
        right += 1.0 if good > bad else 0.5 if good == bad else 0.0
    return right / len(examples)


def shortcut_accuracies(examples: list[dict[str, Any]], max_hops: int = 6) -> dict[str, Any]:
    """What shortcut rules score on ``examples``.

    Returns:
        ``one_hop``: every one-hop rule's accuracy (each also reversed), ``best_one_hop`` (name,
        accuracy), and ``within_hops``: the accuracy of "the option with the root among its ancestors
        within h hops", for h = 1 .. max_hops: 50% until h reaches the distance, 100% from there.
    """
    one_hop = {name: rule_accuracy(examples, rule) for name, rule in _one_hop_rules().items()}
    best = max(one_hop, key=one_hop.get)
    return {
        "one_hop": one_hop,
        "best_one_hop": {"rule": best, "accuracy": one_hop[best]},
        "within_hops": {h: rule_accuracy(examples, _rule_within_hops(h)) for h in range(1, max_hops + 1)},
    }
