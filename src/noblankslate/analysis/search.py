"""Latent search on graph data: where the LM head at each thought puts its probability on the graph.

A ProsQA record carries its graph (``idx_to_symbol``, ``edges`` as ``[a, b]`` = "every a is a b",
``root``, ``target``). The paper reads thought ``t`` (1-based) as a step of a breadth-first search from the
root: its decoded distribution should sit on the frontier, the nodes reached after ``t`` hops. Precisely,
with ``F_0 = {root}`` and ``F_t`` the children of ``F_{t-1}`` (the nodes at the end of some path of exactly
``t`` edges from the root), the nodes of a graph are split, for thought ``t``, into four disjoint groups:

* ``frontier``: ``F_t``;
* ``earlier``: in some ``F_s`` with ``s < t`` and not in ``F_t`` (already expanded; the root for t >= 1);
* ``later``: reachable from the root, but only by paths longer than ``t``;
* ``unreachable``: not reachable from the root (the other people's concepts).

With ``c_thought`` thoughts per step, thought ``t`` stands for hop ``ceil(t / c_thought)``.

A node's *value* at a thought is the LM-head probability of its name's first token (both the
mid-sentence " name" form and, when it is a single token, the bare "name" form; the mass of a group
counts each distinct token once). Within the frontier the value is set against whether the node leads
to the target (the target is reachable from it, or it is the target) and against its height: the paper
defines height as the shortest distance to a leaf; the longest path down to a leaf is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from noblankslate.analysis.thoughts import decode, stack_thoughts
from noblankslate.data.schema import Example
from noblankslate.model.coconut import Coconut

SEARCH_KEYS = ("idx_to_symbol", "edges", "root", "target")
GROUPS = ("frontier", "earlier", "later", "unreachable")


def children_of(n: int, edges: Sequence[Sequence[int]]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        if b not in children[a]:
            children[a].append(b)
    return children


def hop_sets(n: int, edges: Sequence[Sequence[int]], root: int, hops: int) -> list[set[int]]:
    """``F_0 .. F_hops``: the nodes at the end of some path of exactly ``t`` edges from ``root``."""
    children = children_of(n, edges)
    sets = [{root}]
    for _ in range(hops):
        sets.append({c for v in sets[-1] for c in children[v]})
    return sets


def reachable_from(n: int, edges: Sequence[Sequence[int]], root: int) -> set[int]:
    children = children_of(n, edges)
    seen, stack = {root}, [root]
    while stack:
        for c in children[stack.pop()]:
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return seen


def node_groups(n: int, edges: Sequence[Sequence[int]], root: int, t: int) -> dict[str, set[int]]:
    """The four groups of the module docstring for thought ``t`` (1-based hops)."""
    sets = hop_sets(n, edges, root, t)
    frontier = sets[t]
    earlier = set().union(*sets[:t]) - frontier
    reachable = reachable_from(n, edges, root)
    later = reachable - frontier - earlier
    return {"frontier": frontier, "earlier": earlier, "later": later, "unreachable": set(range(n)) - reachable}


def leads_to(n: int, edges: Sequence[Sequence[int]], target: int) -> set[int]:
    """Nodes from which ``target`` is reachable (the target included)."""
    return reachable_from(n, [(b, a) for a, b in edges], target)


def heights(n: int, edges: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Per node, (shortest distance to a leaf, longest path to a leaf); a leaf has height 0.

    Raises:
        ValueError: if the graph has a cycle.
    """
    children = children_of(n, edges)
    shortest: list[int | None] = [None] * n
    longest: list[int | None] = [None] * n
    state = [0] * n  # 0 new, 1 on the stack, 2 done
    for start in range(n):
        if state[start]:
            continue
        stack = [(start, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
            if i < len(children[node]):
                stack.append((node, i + 1))
                child = children[node][i]
                if state[child] == 1:
                    raise ValueError(f"the graph has a cycle through node {child}")
                if state[child] == 0:
                    stack.append((child, 0))
                continue
            kids = children[node]
            shortest[node] = 0 if not kids else 1 + min(shortest[c] for c in kids)  # type: ignore[type-var]
            longest[node] = 0 if not kids else 1 + max(longest[c] for c in kids)  # type: ignore[type-var]
            state[node] = 2
    return shortest, longest  # type: ignore[return-value]


def name_tokens(tokenizer, name: str) -> tuple[int, ...]:
    """The first token of " name", and the token of "name" when the bare word is one token."""
    spaced = tokenizer.encode(" " + name, add_special_tokens=False)
    bare = tokenizer.encode(name, add_special_tokens=False)
    tokens = [spaced[0]] if spaced else []
    if len(bare) == 1 and bare[0] not in tokens:
        tokens.append(bare[0])
    return tuple(tokens)


def has_search_keys(example: Example) -> bool:
    return all(key in example.extra for key in SEARCH_KEYS)


def latent_search(model: Coconut, tokenizer, examples: Sequence[Example],
                  records: Sequence[dict[str, Any]], thoughts_per_step: int = 1) -> dict[str, Any]:
    """Group masses per thought and frontier values, per item and averaged over items.

    Args:
        examples: the analysed items; only those with every key of ``SEARCH_KEYS`` are used.
        records: the unperturbed run's records with their thoughts, aligned with ``examples``.
        thoughts_per_step: ``c_thought``: thought ``t`` (0-based) stands for hop ``t // c_thought + 1``.

    Returns:
        ``{"items_with_graph": n, "per_step": [...], "value_by_height": {...}, "items": [...]}``, or
        ``{"skipped": message}`` when no item has a graph.
    """
    chosen = [i for i, e in enumerate(examples) if has_search_keys(e)]
    if not chosen:
        return {"skipped": f"the data has no graph: its records lack the keys {', '.join(SEARCH_KEYS)} "
                           "(ProsQA and `nbs data prosqa` records carry them)"}
    graphs, token_sets, wanted = {}, {}, []
    for i in chosen:
        extra = examples[i].extra
        names = list(extra["idx_to_symbol"])
        graphs[i] = (len(names), [tuple(e) for e in extra["edges"]], int(extra["root"]), int(extra["target"]))
        token_sets[i] = [name_tokens(tokenizer, name) for name in names]
    subset = [records[i] for i in chosen]
    thoughts, where = stack_thoughts(subset)
    for local, _ in where:
        wanted.append(sorted({tok for tokens in token_sets[chosen[local]] for tok in tokens}))
    decoded = decode(model, thoughts, k=1, wanted=wanted)
    items: dict[int, dict[str, Any]] = {}
    collisions = 0
    for row, (local, t) in enumerate(where):
        i = chosen[local]
        n, edges, root, target = graphs[i]
        if i not in items:
            shortest, longest = heights(n, edges)
            flat = [tok for tokens in token_sets[i] for tok in tokens]
            collisions += len(flat) != len(set(flat))
            items[i] = {"idx": examples[i].idx, "shortest": shortest, "longest": longest,
                        "leads": leads_to(n, edges, target), "steps": []}
        item = items[i]
        probability = dict(zip(wanted[row], decoded.wanted[row].tolist()))
        value = [sum(probability[tok] for tok in tokens) for tokens in token_sets[i]]
        hop = t // thoughts_per_step + 1
        groups = node_groups(n, edges, root, hop)
        mass = {g: sum(probability[tok] for tok in {tok for v in nodes for tok in token_sets[i][v]})
                for g, nodes in groups.items()}
        item["steps"].append({
            "t": t + 1, "hop": hop, "mass": mass, "sizes": {g: len(nodes) for g, nodes in groups.items()},
            "target_value": value[target],
            "frontier": [{"node": v, "name": examples[i].extra["idx_to_symbol"][v], "value": value[v],
                          "leads_to_target": v in item["leads"], "height": item["shortest"][v],
                          "longest_path_below": item["longest"][v]} for v in sorted(groups["frontier"])],
        })
    table = [{"idx": item["idx"], "steps": item["steps"]} for _, item in sorted(items.items())]
    return {"items_with_graph": len(chosen), "items_without_graph": len(examples) - len(chosen),
            "items_with_shared_name_tokens": collisions, "per_step": _per_step(table),
            "value_by_height": _value_by_height(table, "height"),
            "value_by_longest_path_below": _value_by_height(table, "longest_path_below"), "items": table}


def _per_step(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean group mass (and mass per node, over items where the group is not empty) per thought."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for item in table:
        for step in item["steps"]:
            by_step.setdefault(step["t"], []).append(step)
    out = []
    for t, steps in sorted(by_step.items()):
        entry: dict[str, Any] = {"t": t, "n": len(steps), "mean_mass": {}, "mean_mass_per_node": {},
                                 "mean_target_value": float(np.mean([s["target_value"] for s in steps]))}
        for g in GROUPS:
            entry["mean_mass"][g] = float(np.mean([s["mass"][g] for s in steps]))
            per_node = [s["mass"][g] / s["sizes"][g] for s in steps if s["sizes"][g]]
            entry["mean_mass_per_node"][g] = float(np.mean(per_node)) if per_node else None
        frontier = [node for s in steps for node in s["frontier"]]
        for leads in (True, False):
            values = [node["value"] for node in frontier if node["leads_to_target"] is leads]
            entry["frontier_value_leads_to_target" if leads else "frontier_value_other"] = (
                {"mean": float(np.mean(values)), "n": len(values)} if values else None)
        out.append(entry)
    return out


def _value_by_height(table: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean frontier value per (thought, height), split by leading to the target."""
    cells: dict[tuple[int, int, bool], list[float]] = {}
    for item in table:
        for step in item["steps"]:
            for node in step["frontier"]:
                cells.setdefault((step["t"], node[key], node["leads_to_target"]), []).append(node["value"])
    return {"definition": key, "cells": [
        {"t": t, key: h, "leads_to_target": leads, "mean_value": float(np.mean(v)), "n": len(v)}
        for (t, h, leads), v in sorted(cells.items())]}
