"""ProsQA graphs written as symbol tokens: one token per node, each fact two adjacent tokens.

The text form of a ProsQA fact, "Every wumpus is a zumpus.", puts two words between a fact's subject and
its object, and the question asks after "Every wumpus is a" for the object, so a lookup must match the
word two back of the query against the word three back of each fact's object. Models trained from
scratch on a CPU never learn that lookup in the budgets tried (docs/table1.md, P13-P31). The follow-up
paper of Coconut's authors that trains 2-layer transformers from scratch on ProsQA (Zhu, Hao et al. 2025,
"Reasoning by Superposition") writes the same graphs as symbols instead: node ids as tokens, a fact as
"a b", facts separated by "|", then "[Q]" with the two options and "[R]" with the root. There a fact's
object is the token right after its subject, the one-step lookup of an induction head.

:func:`symbolic_example` renders one record of the ProsQA format (any of them: published, ``nbs data
prosqa``, ``nbs data balanced``) that way, keeping its graph, so every tool that reads the graph fields
(the shortcut rules, ``nbs data stats``) works on the result unchanged:

* every node gets a symbol "0" .. "N-1" of a pool of ``symbols`` (a random one per record, so that ids
  carry nothing: in ProsQA the ids are a topological order); ``idx_to_symbol`` holds them;
* ``question``: the edges "a b" in random order, joined by " | ", then " [Q] o1 o2 [R] root" with the
  options in random order;
* ``steps``, by ``steps="facts"``: the facts of the path, one per step, as the question writes them
  ("18 25"; ProsQA's steps are the path's facts too), each after a space; by ``steps="nodes"``: the
  path's nodes after the root, one per step (" 25"), as Zhu et al. write the chain of thought. The
  record's own steps name the path; they are read, not searched for, so a record with several shortest
  paths keeps its own. With facts, a written hop copies the last object as the next subject and then
  looks up its object; with nodes, every step is the lookup itself (the child of the node before), so a
  thought that replaces a step has one node set to carry, the next frontier (docs/table1.md, P36).
  The space matters: a word-level or BPE
  tokenizer reads " 7" and "7" as two unrelated tokens, and a step follows a newline, so without it the
  steps would name every node by another token than the question and the answer do ("### " + answer
  gives " 7");
* ``answer``: the target's symbol.
"""

from __future__ import annotations

import random
import re
from typing import Any

from noblankslate.errors import InvalidValue

STEP = re.compile(r"^(?:Every )?(\S+) is an? (\S+?)\.?$")
"""A ProsQA step: "Tom is a wumpus." or "Every wumpus is a zumpus."; groups subject and object."""


STEP_FORMS = ("facts", "nodes")
"""What a step writes: the path's fact " a b", or the node it reaches " b"."""


def symbolic_example(example: dict[str, Any], rng: random.Random, symbols: int = 32,
                     where: str = "record", steps: str = "facts") -> dict[str, Any]:
    """``example`` (ProsQA format with its graph) written as symbols; see the module docstring.

    Args:
        example: a record with ``idx_to_symbol``, ``edges``, ``root``, ``target``, ``neg_target`` and
            ``steps`` naming the path from the root to the target.
        rng: the only randomness (the symbols drawn, the order of facts and of the options).
        symbols: the size of the symbol pool; a graph with more nodes is refused.
        where: how an error names the record (for example "train.json, record 12").
        steps: one of :data:`STEP_FORMS`.
    """
    if steps not in STEP_FORMS:
        raise InvalidValue(f"steps: {steps!r} is not one of {', '.join(STEP_FORMS)}")
    for field in ("idx_to_symbol", "edges", "root", "target", "neg_target", "steps"):
        if field not in example:
            raise InvalidValue(f"{where}: no field '{field}' (a ProsQA record with its graph is needed)")
    names: list[str] = example["idx_to_symbol"]
    if len(names) > symbols:
        raise InvalidValue(f"{where}: field 'idx_to_symbol': {len(names)} nodes, more than the {symbols} "
                           "symbols (raise --symbols)")
    index = {name: i for i, name in enumerate(names)}
    edges = {tuple(edge) for edge in example["edges"]}
    path = [example["root"]]
    for number, step in enumerate(example["steps"]):
        match = STEP.match(step.strip())
        if match is None or match[1] not in index or match[2] not in index:
            raise InvalidValue(f"{where}: field 'steps', step {number}: {step!r} is not a fact of this graph")
        subject, obj = index[match[1]], index[match[2]]
        if subject != path[-1] or (subject, obj) not in edges:
            raise InvalidValue(f"{where}: field 'steps', step {number}: {step!r} does not continue the path "
                               "from the root along an edge")
        path.append(obj)
    if path[-1] != example["target"]:
        raise InvalidValue(f"{where}: field 'steps': the path ends at node {path[-1]}, not at the target "
                           f"{example['target']}")

    symbol = [str(s) for s in rng.sample(range(symbols), len(names))]
    facts = [f"{symbol[a]} {symbol[b]}" for a, b in example["edges"]]
    rng.shuffle(facts)
    options = [symbol[example["target"]], symbol[example["neg_target"]]]
    rng.shuffle(options)
    return {
        **example,
        "question": " | ".join(facts) + f" [Q] {options[0]} {options[1]} [R] {symbol[example['root']]}",
        "steps": ([f" {symbol[a]} {symbol[b]}" for a, b in zip(path, path[1:])] if steps == "facts"
                  else [f" {symbol[b]}" for b in path[1:]]),
        "answer": symbol[example["target"]],
        "idx_to_symbol": symbol,
    }


def symbolic_examples(examples: list[dict[str, Any]], seed: int, symbols: int = 32,
                      source: str = "input", steps: str = "facts") -> list[dict[str, Any]]:
    """Every record of ``examples`` written as symbols, reproducibly under ``seed`` (the same draws
    whatever ``steps`` is, so the two step forms of a file have the same questions)."""
    if symbols < 2:
        raise InvalidValue(f"symbols: need at least 2, got {symbols}")
    if steps not in STEP_FORMS:
        raise InvalidValue(f"steps: {steps!r} is not one of {', '.join(STEP_FORMS)}")
    rng = random.Random(seed)
    return [symbolic_example(example, rng, symbols, where=f"{source}, record {i}", steps=steps)
            for i, example in enumerate(examples)]
