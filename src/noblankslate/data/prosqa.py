"""A ProsQA generator and checker.

The paper's 17,886-example ProsQA train set is not published, only the validation and test sets. This
module generates examples that are statistically like the published ones (graph size, in-degree,
people per graph, root -> target distance, number of shortest paths, question length), so that a model
trained on generated data can be judged on the published sets. ``docs/prosqa-generator.md`` explains the
random process and compares its statistics with ``prosqa_valid.json``; ``check_prosqa_example`` checks
every invariant that the published data holds.

An example asks whether a person is one of two concepts, given a random DAG of "is a" facts. Node ids
are a topological order; nodes 0 and 1 are the two people the question is about ("sides"), other people
(in-degree 0) are distractors. The question is about the side whose deepest exclusive leaf is deeper.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from noblankslate.errors import GenerationError, InvalidValue

PEOPLE = (
    "Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly", "Rex",
    "Sally", "Sam", "Stella", "Tom", "Wren",
)
CONCEPTS = (
    "bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus", "grimpus",
    "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus", "numpus", "quimpus",
    "rempus", "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus", "terpus", "timpus", "tumpus",
    "vumpus", "worpus", "wumpus", "yerpus", "yimpus", "yumpus", "zhorpus", "zumpus",
)

# Concept nodes per graph: the published validation histogram (15-25), with thin tails down to 11, the
# smallest count seen in the published test set.
PUBLISHED_CONCEPT_WEIGHTS = {
    11: 1, 12: 1, 13: 1, 14: 2, 15: 6, 16: 6, 17: 18, 18: 25, 19: 40, 20: 56, 21: 61, 22: 38, 23: 32,
    24: 12, 25: 3,
}


@dataclass(frozen=True)
class ProsQAConfig:
    """The knobs of the random process; the defaults reproduce the published statistics.

    Weights are relative (they need not sum to 1). ``docs/prosqa-generator.md`` says how each default
    was fitted.
    """

    concept_weights: dict[int, float] = field(default_factory=lambda: dict(PUBLISHED_CONCEPT_WEIGHTS))
    """Number of concept nodes per graph -> weight. Kept exactly: rejected graphs are redrawn at the same size."""
    extra_people_weights: dict[int, float] = field(
        default_factory=lambda: {0: 0.600, 1: 0.310, 2: 0.070, 3: 0.017, 4: 0.003})
    """Number of distractor people (beyond nodes 0 and 1) -> weight; the published {2: 58%, 3: 32%, ...}."""
    extra_children_weights: dict[int, float] = field(default_factory=lambda: {1: 0.87, 2: 0.12, 3: 0.01})
    """Children of each distractor person -> weight (published: exactly one in 87%)."""
    own_child_prob: float = 0.22
    """Chance that a distractor's child is a fresh concept with the distractor as its only parent
    (reachable from neither side); otherwise the distractor becomes one more parent of an existing concept."""
    indegree_weights: dict[int, float] = field(
        default_factory=lambda: {1: 0.46, 2: 0.30, 3: 0.16, 4: 0.055, 5: 0.02, 6: 0.005})
    """In-degree of a new concept (before distractor parents are added) -> weight."""
    side_one_prob: float = 0.575
    """Chance that a new concept joins person 1's side. Above 0.5 because person 1 is the root in 64%
    of published examples: the published process favours node 1's side."""
    cross_prob: float = 0.06
    """Chance that a new concept has parents on both sides (reachable from both people)."""
    recency: float = 0.77
    """How a concept's first parent is picked among its side's nodes: the newest has weight 1, the one
    before ``recency``, then ``recency**2`` and so on (times the node's fitness). Below 1 makes chains,
    and so depth: this sets the root -> target distance."""
    extra_recency: float = 0.9
    """The same decay for the other parents. Flatter than ``recency``, so that extra parents land at
    other depths: published graphs have few equal-length alternative paths (1.6 shortest paths)."""
    fitness_shape: float = 1.5
    """Each concept gets a fitness ~ Gamma(shape, 1) that multiplies its weight as a parent: some concepts
    gather many sub-concepts and many get none, as in the published out-degrees (and leaf count, 7.4).
    0 gives every concept fitness 1."""
    person_weight: float = 0.35
    """The fitness of people 0 and 1. Below the mean concept fitness, as published people have about
    3 direct children each."""
    min_distance: int = 3
    """Shortest root -> target distance, least (published: 3)."""
    max_distance: int = 6
    """Shortest root -> target distance, most (published: 6)."""
    max_tries: int = 10_000
    """Graphs drawn for one example before giving up (the configuration cannot reach the distance range)."""

    def __post_init__(self) -> None:
        def check_weights(name: str, weights: dict[int, float], low: int) -> None:
            if not weights or any(not isinstance(k, int) or k < low for k in weights):
                raise InvalidValue(f"{name}: keys must be integers >= {low}, got {sorted(weights)}")
            if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise InvalidValue(f"{name}: weights must be >= 0 with a positive sum")

        check_weights("concept_weights", self.concept_weights, 2)
        check_weights("extra_people_weights", self.extra_people_weights, 0)
        check_weights("extra_children_weights", self.extra_children_weights, 1)
        check_weights("indegree_weights", self.indegree_weights, 1)
        if max(self.concept_weights) > len(CONCEPTS):
            raise InvalidValue(f"concept_weights: at most {len(CONCEPTS)} concept names exist")
        if max(self.extra_people_weights) + 2 > len(PEOPLE):
            raise InvalidValue(f"extra_people_weights: at most {len(PEOPLE) - 2} distractor people")
        for name in ("own_child_prob", "side_one_prob", "cross_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidValue(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("recency", "extra_recency"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise InvalidValue(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.fitness_shape < 0 or self.person_weight <= 0:
            raise InvalidValue("need fitness_shape >= 0 and person_weight > 0")
        if not 1 <= self.min_distance <= self.max_distance:
            raise InvalidValue(f"need 1 <= min_distance <= max_distance, got {self.min_distance}, {self.max_distance}")
        if self.max_tries < 1:
            raise InvalidValue("max_tries must be >= 1")

    @classmethod
    def small(cls, concepts: tuple[int, int] = (6, 9), distance: tuple[int, int] = (2, 3)) -> ProsQAConfig:
        """The same process on small graphs, for CPU demos (tiny models, short sequences).

        Args:
            concepts: inclusive range of concept nodes per graph, drawn uniformly.
            distance: inclusive range of the root -> target distance.
        """
        return cls().with_ranges(concepts, distance)

    def with_ranges(self, concepts: tuple[int, int] | None = None,
                    distance: tuple[int, int] | None = None) -> ProsQAConfig:
        """This config with concept counts drawn uniformly from an inclusive range and/or another
        root -> target distance range."""
        changes: dict[str, Any] = {}
        if concepts is not None:
            low, high = concepts
            if not 2 <= low <= high:
                raise InvalidValue(f"need 2 <= lowest <= highest concept count, got {low}, {high}")
            changes["concept_weights"] = {m: 1.0 for m in range(low, high + 1)}
        if distance is not None:
            changes["min_distance"], changes["max_distance"] = distance
        return replace(self, **changes)


def _draw(rng: random.Random, weights: dict[int, float]) -> int:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _distances(children: list[list[int]], source: int) -> dict[int, int]:
    """Shortest distance (in edges) from ``source`` to every node it reaches, itself included."""
    dist = {source: 0}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


@dataclass
class _Graph:
    """A graph in creation order: node 0 and 1 are the two sides' people; parents precede children."""

    parents: list[list[int]]
    people: set[int]

    @property
    def size(self) -> int:
        return len(self.parents)

    def children(self) -> list[list[int]]:
        children: list[list[int]] = [[] for _ in self.parents]
        for v, ps in enumerate(self.parents):
            for u in ps:
                children[u].append(v)
        return children


def _grow(rng: random.Random, num_concepts: int, num_extra: int, cfg: ProsQAConfig) -> _Graph:
    """Grow the two sides concept by concept, then attach the distractor people.

    Each concept joins one side and takes its parents from that side's nodes (its person and the
    concepts that joined it), preferring recent ones; a few concepts take parents from both sides. The
    two sides stay almost disjoint, which is what makes "exclusive" leaves plentiful in the published data.
    """
    extra_children = [_draw(rng, cfg.extra_children_weights) for _ in range(num_extra)]
    own_children = []
    budget = num_concepts - 2  # keep at least two concepts for the sides
    for count in extra_children:
        own = min(sum(rng.random() < cfg.own_child_prob for _ in range(count)), budget)
        own_children.append(own)
        budget -= own
    num_side_concepts = num_concepts - sum(own_children)
    parents: list[list[int]] = [[], []]
    pools: tuple[list[int], list[int]] = ([0], [1])
    fitness = [cfg.person_weight, cfg.person_weight] + [
        rng.gammavariate(cfg.fitness_shape, 1.0) if cfg.fitness_shape else 1.0 for _ in range(num_side_concepts)]

    def pick(pool: list[int], k: int) -> list[int]:
        # Without replacement; the newest node of the pool is last. The first parent favours recent
        # nodes (depth), the others are weighted by ``extra_recency`` (shortcuts across depths).
        candidates = list(pool)
        chosen: list[int] = []
        for decay in [cfg.recency] + [cfg.extra_recency] * (min(k, len(pool)) - 1):
            weights = [decay ** (len(candidates) - 1 - i) * fitness[u] for i, u in enumerate(candidates)]
            i = rng.choices(range(len(candidates)), weights=weights)[0]
            chosen.append(candidates.pop(i))
        return chosen

    for _ in range(num_side_concepts):
        side = 1 if rng.random() < cfg.side_one_prob else 0
        k = _draw(rng, cfg.indegree_weights)
        v = len(parents)
        if rng.random() < cfg.cross_prob:
            # Reachable from both people: one parent from the other side, the rest from its own.
            parents.append(pick(pools[1 - side], 1) + pick(pools[side], max(k - 1, 1)))
        else:
            parents.append(pick(pools[side], k))
            pools[side].append(v)

    people = {0, 1}
    concepts = list(range(2, len(parents)))
    for count, own in zip(extra_children, own_children):
        x = len(parents)
        parents.append([])
        people.add(x)
        for _ in range(own):
            parents.append([x])
        for v in rng.sample(concepts, min(count - own, len(concepts))):
            parents[v].append(x)
    return _Graph(parents, people)


@dataclass(frozen=True)
class _Question:
    root: int
    target: int
    neg_target: int


def _choose_question(rng: random.Random, graph: _Graph, cfg: ProsQAConfig) -> _Question | None:
    """Root, target and negative target by the published rules, or None if the graph does not qualify."""
    children = graph.children()
    dist = (_distances(children, 0), _distances(children, 1))
    leaves: list[list[int]] = []
    for side in (0, 1):
        exclusive = [v for v in dist[side] if v not in dist[1 - side] and v != side]
        leaves.append([v for v in exclusive if not children[v]])
    if not leaves[0] or not leaves[1]:
        return None
    depth = [max(dist[s][v] for v in leaves[s]) for s in (0, 1)]
    root = rng.randrange(2) if depth[0] == depth[1] else int(depth[1] > depth[0])
    if not cfg.min_distance <= depth[root] <= cfg.max_distance:
        return None
    target = rng.choice([v for v in leaves[root] if dist[root][v] == depth[root]])
    return _Question(root, target, rng.choice(leaves[1 - root]))


def _topological_relabel(rng: random.Random, graph: _Graph) -> list[int]:
    """A uniformly random available-node-first topological order, nodes 0 and 1 first.

    Returns ``new_id[old_id]``. Published ids look like such an order: distractor people (available from
    the start) get small ids, and the two sides interleave.
    """
    children = graph.children()
    missing = [len(ps) for ps in graph.parents]
    order = [0, 1]
    available = [v for v in range(2, graph.size) if missing[v] == 0]
    for u in (0, 1):
        for v in children[u]:
            missing[v] -= 1
            if missing[v] == 0:
                available.append(v)
    while available:
        i = rng.randrange(len(available))
        available[i], available[-1] = available[-1], available[i]
        u = available.pop()
        order.append(u)
        for v in children[u]:
            missing[v] -= 1
            if missing[v] == 0:
                available.append(v)
    new_id = [0] * graph.size
    for i, u in enumerate(order):
        new_id[u] = i
    return new_id


def _shortest_path(rng: random.Random, parents: list[list[int]], dist: dict[int, int], target: int) -> list[int]:
    """One shortest path from the root (distance 0) to ``target``, uniform over all shortest paths."""
    count: dict[int, int] = {}
    for v in sorted(dist, key=dist.get):
        count[v] = 1 if dist[v] == 0 else sum(count[u] for u in parents[v] if dist.get(u) == dist[v] - 1)
    path = [target]
    while dist[path[-1]] > 0:
        v = path[-1]
        options = [u for u in parents[v] if dist.get(u) == dist[v] - 1]
        path.append(rng.choices(options, weights=[count[u] for u in options])[0])
    return path[::-1]


def _fact(names: list[str], is_person: list[bool], a: int, b: int) -> str:
    """The sentence of edge a -> b: a person "is a", a concept "Every ... is a" (always "a", never "an")."""
    return f"{names[a]} is a {names[b]}." if is_person[a] else f"Every {names[a]} is a {names[b]}."


def _one_example(rng: random.Random, cfg: ProsQAConfig, num_concepts: int, num_extra: int) -> dict[str, Any]:
    for _ in range(cfg.max_tries):
        graph = _grow(rng, num_concepts, num_extra, cfg)
        question = _choose_question(rng, graph, cfg)
        if question is not None:
            break
    else:
        raise GenerationError(
            f"no graph with {num_concepts} concepts reached a root -> target distance in "
            f"[{cfg.min_distance}, {cfg.max_distance}] in {cfg.max_tries} tries; widen the ranges")

    new_id = _topological_relabel(rng, graph)
    n = graph.size
    parents: list[list[int]] = [[] for _ in range(n)]
    for v, ps in enumerate(graph.parents):
        parents[new_id[v]] = [new_id[u] for u in ps]
    for ps in parents:
        rng.shuffle(ps)
    is_person = [False] * n
    for p in graph.people:
        is_person[new_id[p]] = True
    root, target, neg_target = (new_id[question.root], new_id[question.target], new_id[question.neg_target])

    people_names = iter(rng.sample(PEOPLE, sum(is_person)))
    concept_names = iter(rng.sample(CONCEPTS, n - sum(is_person)))
    names = [next(people_names) if is_person[v] else next(concept_names) for v in range(n)]
    edges = [[u, v] for v in range(n) for u in parents[v]]

    sentences = [_fact(names, is_person, a, b) for a, b in edges]
    rng.shuffle(sentences)
    options = [names[target], names[neg_target]]
    rng.shuffle(options)
    children: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        children[a].append(b)
    path = _shortest_path(rng, parents, _distances(children, root), target)
    return {
        "question": " ".join(sentences) + f" Is {names[root]} a {options[0]} or {options[1]}?",
        "answer": f"{names[root]} is a {names[target]}.",
        "steps": [_fact(names, is_person, a, b) for a, b in zip(path, path[1:])],
        "idx_to_symbol": names,
        "edges": edges,
        "root": root,
        "target": target,
        "neg_target": neg_target,
    }


def generate_prosqa(num: int, seed: int, exclude_questions: Iterable[str] = (),
                    config: ProsQAConfig | None = None) -> list[dict[str, Any]]:
    """Generate ProsQA examples in the published format.

    Args:
        num: number of examples.
        seed: the only source of randomness; the same seed and config give the same examples.
        exclude_questions: questions never to produce (pass the published validation and test
            questions, so that generated training data never contains an evaluation question).
            Generated questions are also distinct from each other.
        config: the random process; ``ProsQAConfig()`` (published-like) by default.

    Returns:
        ``num`` dicts with ``question``, ``answer``, ``steps``, ``idx_to_symbol``, ``edges``, ``root``,
        ``target``, ``neg_target``; each passes ``check_prosqa_example``.
    """
    if num < 0:
        raise InvalidValue(f"num must be >= 0, got {num}")
    cfg = config or ProsQAConfig()
    rng = random.Random(seed)
    seen = set(exclude_questions)
    examples: list[dict[str, Any]] = []
    repeats = 0
    while len(examples) < num:
        # Sizes are drawn once per example and kept through rejections, so their histograms are exact.
        num_concepts = _draw(rng, cfg.concept_weights)
        num_extra = _draw(rng, cfg.extra_people_weights)
        example = _one_example(rng, cfg, num_concepts, num_extra)
        if example["question"] not in seen:
            seen.add(example["question"])
            examples.append(example)
            continue
        repeats += 1
        if repeats > 1000 + 10 * num:
            raise GenerationError(f"{repeats} repeated questions after {len(examples)} distinct ones: the "
                               f"configuration's graphs are too small for {num} distinct questions")
    return examples


_PERSON_FACT = re.compile(r"([A-Z][a-z]+) is a ([a-z]+)\.")
_CONCEPT_FACT = re.compile(r"Every ([a-z]+) is a ([a-z]+)\.")
_FINAL = re.compile(r" Is ([A-Z][a-z]+) a ([a-z]+) or ([a-z]+)\?")


def _check_types(ex: Any) -> list[str]:
    if not isinstance(ex, dict):
        return [f"expected a dict, got {type(ex).__name__}"]
    problems = []
    expected: dict[str, type] = {"question": str, "answer": str, "steps": list, "idx_to_symbol": list,
                                 "edges": list, "root": int, "target": int, "neg_target": int}
    for key, kind in expected.items():
        if key not in ex:
            problems.append(f"missing field '{key}'")
        elif not isinstance(ex[key], kind) or isinstance(ex[key], bool):
            problems.append(f"field '{key}' should be {kind.__name__}, got {type(ex[key]).__name__}")
    if problems:
        return problems
    n = len(ex["idx_to_symbol"])
    if not all(isinstance(s, str) for s in ex["idx_to_symbol"]):
        problems.append("idx_to_symbol holds a non-string")
    if not all(isinstance(s, str) for s in ex["steps"]):
        problems.append("steps holds a non-string")
    for e in ex["edges"]:
        if not (isinstance(e, list) and len(e) == 2 and all(type(x) is int and 0 <= x < n for x in e)):
            problems.append(f"edge {e!r} is not a pair of node ids in [0, {n})")
            break
    for key in ("root", "target", "neg_target"):
        if not 0 <= ex[key] < n:
            problems.append(f"{key} {ex[key]} is not a node id in [0, {n})")
    return problems


def check_prosqa_example(ex: Any, min_distance: int = 3, max_distance: int = 6) -> list[str]:
    """Every invariant of the published ProsQA data that ``ex`` violates (empty: valid).

    Args:
        ex: one record.
        min_distance, max_distance: the allowed shortest root -> target distance (3-6 in the
            published data; pass the small-graph range for small-graph data).

    Returns:
        One message per violated invariant, in a fixed order.
    """
    problems = _check_types(ex)
    if problems:
        return problems
    names: list[str] = ex["idx_to_symbol"]
    edges = [tuple(e) for e in ex["edges"]]
    n = len(names)
    root, target, neg = ex["root"], ex["target"], ex["neg_target"]

    if any(a >= b for a, b in edges):
        problems.append("edge with a >= b: node ids are not a topological order")
    if len(set(edges)) != len(edges):
        problems.append("duplicate edges")
    if [b for _, b in edges] != sorted(b for _, b in edges):
        problems.append("edges are not sorted by destination")
    if len(set(names)) != n:
        problems.append("repeated names in idx_to_symbol")

    parents: list[list[int]] = [[] for _ in range(n)]
    children: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        parents[b].append(a)
        children[a].append(b)
    people = {v for v in range(n) if not parents[v]}
    if any(names[v] not in PEOPLE for v in people):
        problems.append("a node with in-degree 0 is not named after a person")
    if any(names[v] not in CONCEPTS for v in range(n) if v not in people):
        problems.append("a node with parents is not named after a concept")
    if not {0, 1} <= people:
        problems.append("nodes 0 and 1 are not both people")
    if any(not children[v] for v in people):
        problems.append("a person has no children")
    if root not in (0, 1):
        problems.append(f"root {root} is not 0 or 1")
        return problems

    other = 1 - root
    dist_root, dist_other = _distances(children, root), _distances(children, other)

    def exclusive_leaves(dist: dict[int, int], opposite: dict[int, int], person: int) -> list[int]:
        return [v for v in dist if v != person and v not in opposite and not children[v]]

    root_leaves = exclusive_leaves(dist_root, dist_other, root)
    other_leaves = exclusive_leaves(dist_other, dist_root, other)
    deepest = max((dist_root[v] for v in root_leaves), default=None)
    if target not in root_leaves:
        problems.append("target is not a leaf reachable only from the root")
    elif dist_root[target] != deepest:
        problems.append(f"target is at distance {dist_root[target]}, but the deepest root-exclusive leaf is at {deepest}")
    if neg not in other_leaves:
        problems.append("neg_target is not a leaf reachable only from the other person")
    if other_leaves and deepest is not None and max(dist_other[v] for v in other_leaves) > deepest:
        problems.append("the other person's deepest exclusive leaf is deeper than the target")
    distance = dist_root.get(target)
    if distance is None or not min_distance <= distance <= max_distance:
        problems.append(f"root -> target distance {distance} is not in [{min_distance}, {max_distance}]")

    def fact(a: int, b: int) -> str:
        return f"{names[a]} is a {names[b]}." if a in people else f"Every {names[a]} is a {names[b]}."

    question: str = ex["question"]
    final = _FINAL.search(question)
    if final is None or final.end() != len(question):
        problems.append("question does not end with ' Is {root} a {X} or {Y}?'")
        body = question
    else:
        body = question[:final.start()]
        if final.group(1) != names[root]:
            problems.append("the final question does not name the root")
        if sorted(final.group(2, 3)) != sorted((names[target], names[neg])):
            problems.append("the final question does not name target and neg_target")
    expected_facts = sorted(fact(a, b) for a, b in edges)
    sentences = re.split(r"(?<=\.) ", body)
    if sorted(sentences) != expected_facts:
        problems.append("question sentences are not exactly one fact per edge, joined by single spaces")

    if ex["answer"] != f"{names[root]} is a {names[target]}.":
        problems.append("answer is not '{root} is a {target}.'")
    problems.extend(_check_steps(ex["steps"], names, root, target, distance, set(expected_facts), fact))
    return problems


def _check_steps(steps: list[str], names: list[str], root: int, target: int, distance: int | None,
                 facts: set[str], fact: Any) -> list[str]:
    """The steps must be a shortest root -> target path, one stated fact per step."""
    if distance is not None and len(steps) != distance:
        return [f"{len(steps)} steps, but the shortest root -> target distance is {distance}"]
    if not steps:
        return ["no steps"]
    chain = [names[root]]
    for i, step in enumerate(steps):
        match = (_PERSON_FACT if i == 0 else _CONCEPT_FACT).fullmatch(step)
        if match is None or match.group(1) != chain[-1]:
            return [f"step {i} is not '... {chain[-1]} is a X.' continuing the path"]
        if step not in facts:
            return [f"step {i} ('{step}') is not a fact of the question"]
        chain.append(match.group(2))
    if chain[-1] != names[target]:
        return ["steps do not end at the target"]
    return []
