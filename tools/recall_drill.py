"""The fact-recall drill of docs/table1.md (pilots P13-P21): does a small model learn the one-fact lookup?

Every question of the balanced task needs lookups ("which concept is X?"). The drill makes that lookup the
whole task: the answer lists facts of the question, so each object after "Every X is a" must be found in
the question. ``probe`` measures it with teacher forcing on a checkpoint:

    python tools/recall_drill.py make data/balanced/train.json /tmp/drill_train.json --seed 0 --with-replacement
    python tools/recall_drill.py make data/balanced/valid.json /tmp/drill_valid.json --seed 1 --with-replacement
    nbs train CONFIG no_cot=true train_path=/tmp/drill_train.json val_path=/tmp/drill_valid.json
    python tools/recall_drill.py probe runs/.../checkpoint_4 /tmp/drill_valid.json --limit 100

"every" is the share of concept facts whose unique parent the model predicts; "person" the same after
"Person is a", where two answers are right and the first-listed one is scored.

Without ``--with-replacement`` the answer re-lists every fact once, shuffled (pilots P13-P19). Then a
model can score without any lookup by naming an object that has not been listed yet, and more so late in
the answer, where few remain: ``probe`` prints that strategy's expected score ("elimination") and that of
naming any object of the question ("any object") beside the model's, and the model's score on the first
four lookups of each answer, where elimination helps least. ``--with-replacement`` draws the answer's
facts with replacement, so that listing gives nothing away.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
from collections import Counter
from typing import NamedTuple

import torch

FACT = re.compile(r"[^.?]+\.")
FACT_PARTS = re.compile(r"(\w+) is a (\w+)\.")
SYMBOLIC_QUERY = " [Q] "
"""Marks a question of ``nbs data symbolic`` ("a b | c d | ... [Q] o1 o2 [R] root")."""


def make_drill(sources: str | list[str], out: str, seed: int, with_replacement: bool = False) -> int:
    """Write the records of ``sources`` with the answer replaced by the question's facts, no steps: each
    fact once, shuffled, or as many facts drawn with replacement. Several sources (for example easy graphs
    with fewer facts beside the task's own, P23) are concatenated and their records shuffled together.
    Symbolic records (``nbs data symbolic``) get "a b | c d | ..." drawn with replacement always."""
    rng = random.Random(seed)
    sources = [sources] if isinstance(sources, str) else sources
    records = [record for source in sources for record in json.load(open(source, encoding="utf-8"))]
    if len(sources) > 1:
        rng.shuffle(records)
    for record in records:
        symbolic = SYMBOLIC_QUERY in record["question"]
        facts = (record["question"].split(SYMBOLIC_QUERY)[0].split(" | ") if symbolic else
                 [f.strip() for f in FACT.findall(record["question"]) if not f.strip().startswith("Is ")])
        if with_replacement or symbolic:
            facts = [rng.choice(facts) for _ in facts]
        else:
            rng.shuffle(facts)
        record["steps"], record["answer"] = [], (" | " if symbolic else " ").join(facts)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return len(records)


class Lookup(NamedTuple):
    """One scored object position of a drill answer."""

    kind: str  # "every" or "person"
    position: int  # index of the answer's token that is the object
    index: int  # how many facts of the answer come before it
    elimination: float  # expected score of naming a random object of the question not yet listed
    any_object: float  # expected score of naming a random object of the question


def lookups(words: list[str], start: int, question: str) -> list[Lookup]:
    """The scored object positions of a drill answer whose words (one per token) begin at ``start``."""
    objects = Counter(match[1] for match in FACT_PARTS.findall(question))
    listed: Counter[str] = Counter()
    found = []
    for i in range(start, len(words)):
        if words[i - 1] == "a" and words[i - 2] == "is":
            kind = "every" if words[i - 4].lower() == "every" else "person"
            remaining = objects - listed
            found.append(Lookup(kind, i, sum(listed.values()), remaining[words[i]] / max(sum(remaining.values()), 1),
                                objects[words[i]] / max(sum(objects.values()), 1)))
            listed[words[i]] += 1
    return found


def symbolic_lookups(words: list[str], start: int, question: str) -> list[Lookup]:
    """The scored positions of a symbolic drill answer ("a b | c d | ..."): each fact's object whose subject
    has one child in the question (the others have two right answers). Kind "every"; ``any_object`` is
    naming a random node of the question other than two (a balanced graph's two people, never an object),
    ``elimination`` the same (with replacement it gains nothing)."""
    facts = [fact.split() for fact in question.split(SYMBOLIC_QUERY)[0].split(" | ")]
    children = Counter(subject for subject, _ in facts)
    chance = 1 / max(len({node for fact in facts for node in fact}) - 2, 1)
    objects = [i for i in range(max(start, 1), len(words)) if words[i].isdigit() and words[i - 1].isdigit()]
    return [Lookup("every", i, index, chance, chance) for index, i in enumerate(objects)
            if children[words[i - 1]] == 1]


def _load(checkpoint: str):
    """The checkpoint's transformer (no Coconut wrapper: the drill has no thoughts), in eval mode, and its
    tokenizer."""
    from noblankslate.inference import load

    loaded = load(checkpoint)
    return loaded.model.base_causallm.eval(), loaded.tokenizer


def _sequences(tokenizer, data: str, limit: int):
    """(record, token ids (1, T), one word per token, index of the answer's first token) for the first
    ``limit`` records of ``data``, tokenized as the drill's runs saw them (question, "\\n### ", answer)."""
    records = json.load(open(data, encoding="utf-8"))[:limit]
    if not records:
        raise SystemExit(f"{data}: no records to probe")
    for record in records:
        prefix = record["question"] + "\n### "
        ids = tokenizer(prefix + record["answer"], return_tensors="pt").input_ids
        yield record, ids, [tokenizer.decode([t]).strip() for t in ids[0]], len(tokenizer(prefix).input_ids)


@torch.no_grad()
def probe(checkpoint: str, data: str, limit: int) -> dict[str, dict[str, float]]:
    """Per kind: the model's score, the two strategies' expected scores, the score on the first four
    lookups of each answer, and the number of lookups."""
    model, tokenizer = _load(checkpoint)
    sums: dict[str, Counter[str]] = {"every": Counter(), "person": Counter()}
    for record, ids, words, start in _sequences(tokenizer, data, limit):
        predicted = model(input_ids=ids).logits.argmax(-1)[0]
        find = symbolic_lookups if SYMBOLIC_QUERY in record["question"] else lookups
        for lookup in find(words, start, record["question"]):
            right = int(predicted[lookup.position - 1] == ids[0, lookup.position])
            total = sums[lookup.kind]
            total.update(model=right, elimination=lookup.elimination, any_object=lookup.any_object, lookups=1)
            if lookup.index < 4:
                total.update(first_four=right, first_lookups=1)
    return {kind: {"model": t["model"] / max(t["lookups"], 1), "elimination": t["elimination"] / max(t["lookups"], 1),
                   "any object": t["any_object"] / max(t["lookups"], 1),
                   "first four": t["first_four"] / max(t["first_lookups"], 1), "lookups": t["lookups"]}
            for kind, t in sums.items()}


OFFSETS = 6
"""attention_profile measures the mass each head puts 1..OFFSETS tokens back."""


def attention_profile(attentions: torch.Tensor, words: list[str], start: int, question: str) -> dict[str, torch.Tensor]:
    """Where each head of one drill sequence looks, summed over the answer's positions (not averaged, so
    that sequences add up; ``positions`` and ``lookups`` are the divisors).

    ``attentions``: (layers, heads, T, T), the attention weights of the sequence ``words``. Returned:
    ``offset`` (layers, heads, OFFSETS), the mass at 1..OFFSETS tokens back from every answer position (a
    head that copies the subject of a fact forward shows a peak at 2 or 3); at the query of every "every"
    lookup whose subject has one fact in the question (the "a" before the object), ``right`` the mass on
    that fact's object in the question, ``same_kind`` the mean mass on each object of the question's other
    "Every" facts and ``other_kind`` the mean on each object of a person's fact. A lookup head has
    ``right`` far above ``same_kind``; a head that finds the objects of "Every" facts, whichever subject
    they belong to, has ``right`` equal to ``same_kind`` and both above ``other_kind``. (One mean over all
    other objects hides that second head: with two "Every" facts and two person facts it reads as right 0.5
    against 0.17, P28.) Only lookups with objects of both kinds to compare are counted.
    """
    layers, heads, length, _ = attentions.shape
    queries = torch.arange(start, length)
    offset = torch.stack([attentions[:, :, queries, queries - k].sum(-1) for k in range(1, OFFSETS + 1)], dim=-1)
    objects: dict[str, list[int]] = {}  # subject -> positions of its objects in the question
    every_fact_objects = set()
    for i in range(3, start):
        if words[i - 1] == "a" and words[i - 2] == "is":
            objects.setdefault(words[i - 3], []).append(i)
            if i >= 4 and words[i - 4].lower() == "every":
                every_fact_objects.add(i)
    every_object = [position for positions in objects.values() for position in positions]
    right, same_kind, other_kind = (torch.zeros(layers, heads) for _ in range(3))
    counted = 0
    for lookup in lookups(words, start, question):
        found = objects.get(words[lookup.position - 3], [])
        if lookup.kind != "every" or len(found) != 1:
            continue
        same = [p for p in every_object if p != found[0] and p in every_fact_objects]
        other = [p for p in every_object if p not in every_fact_objects]
        if not same or not other:
            continue
        query = lookup.position - 1
        right += attentions[:, :, query, found[0]]
        same_kind += attentions[:, :, query, same].sum(-1) / len(same)
        other_kind += attentions[:, :, query, other].sum(-1) / len(other)
        counted += 1
    return {"offset": offset, "positions": torch.tensor(len(queries)), "right": right, "same_kind": same_kind,
            "other_kind": other_kind, "lookups": torch.tensor(counted)}


@torch.no_grad()
def attention(checkpoint: str, data: str, limit: int) -> dict[str, torch.Tensor]:
    """:func:`attention_profile` of a checkpoint, averaged over the first ``limit`` records of ``data``."""
    model, tokenizer = _load(checkpoint)
    model.set_attn_implementation("eager")  # the fused kernels return no weights
    total: dict[str, torch.Tensor] = {}
    for record, ids, words, start in _sequences(tokenizer, data, limit):
        weights = torch.stack(model(input_ids=ids, output_attentions=True).attentions)[:, 0]  # (layers, heads, T, T)
        for key, value in attention_profile(weights, words, start, record["question"]).items():
            total[key] = total.get(key, 0) + value
    if not int(total["lookups"]):
        raise SystemExit(f"{data}: no 'Every X is a' lookup with a single fact (and objects of both kinds "
                         f"to compare) in the first {limit} records")
    return {"offset": total["offset"] / total["positions"], "lookups": total["lookups"],
            **{key: total[key] / total["lookups"] for key in ("right", "same_kind", "other_kind")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the drill's data from a balanced data file")
    m.add_argument("sources", nargs="+", metavar="source", help="balanced data files (several are mixed)")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--with-replacement", action="store_true", help="draw the answer's facts with replacement")
    p = sub.add_parser("probe", help="lookup accuracy of a checkpoint with teacher forcing")
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--limit", type=int, default=100)
    a = sub.add_parser("attention", help="where each head looks: back-offsets, and right against wrong objects")
    a.add_argument("checkpoint")
    a.add_argument("data")
    a.add_argument("--limit", type=int, default=60)
    args = parser.parse_args()
    if args.command == "make":
        print(f"{args.out}: {make_drill(args.sources, args.out, args.seed, args.with_replacement)} records")
        return
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `probe ... | head` ends quietly, not with BrokenPipeError
    torch.set_num_threads(1)
    if args.command == "attention":
        found = attention(args.checkpoint, args.data, args.limit)
        print(f"head  mass 1..{OFFSETS} tokens back (answer positions) | at the query of {int(found['lookups'])} "
              "'every' lookups: right object, each other 'Every' fact's object, each person fact's object")
        for layer in range(found["right"].shape[0]):
            for head in range(found["right"].shape[1]):
                back = " ".join(f"{x:.2f}" for x in found["offset"][layer, head].tolist())
                masses = " ".join(f"{found[key][layer, head]:.3f}" for key in ("right", "same_kind", "other_kind"))
                print(f"L{layer}H{head}  {back} | {masses}")
    else:
        for kind, scores in probe(args.checkpoint, args.data, args.limit).items():
            print(f"{kind}: {scores['model']:.3f} of {scores['lookups']} lookups (elimination {scores['elimination']:.3f}, "
                  f"any object {scores['any object']:.3f}; first four of each answer {scores['first four']:.3f})")


if __name__ == "__main__":
    main()
