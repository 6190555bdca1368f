"""The fact-recall drill of docs/table1.md (pilots P13, P14): does a small model learn the one-fact lookup?

Every question of the balanced task needs lookups ("which concept is X?"). The drill makes that lookup the
whole task: the answer re-lists the question's facts in a random order, so each object after "Every X is a"
must be found in the question. ``probe`` measures it with teacher forcing on a checkpoint:

    python tools/recall_drill.py make data/balanced/train.json /tmp/drill_train.json --seed 0
    python tools/recall_drill.py make data/balanced/valid.json /tmp/drill_valid.json --seed 1
    nbs train CONFIG no_cot=true train_path=/tmp/drill_train.json val_path=/tmp/drill_valid.json
    python tools/recall_drill.py probe runs/.../checkpoint_4 /tmp/drill_valid.json --limit 100

"every" is the share of concept facts whose unique parent the model predicts; "person" the same after
"Person is a", where two answers are right and the first-listed one is scored.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal

import torch

FACT = re.compile(r"[^.?]+\.")


def make_drill(source: str, out: str, seed: int) -> int:
    """Write ``source``'s records with the answer replaced by the question's facts, shuffled; no steps."""
    rng = random.Random(seed)
    records = json.load(open(source, encoding="utf-8"))
    for record in records:
        facts = [f.strip() for f in FACT.findall(record["question"]) if not f.strip().startswith("Is ")]
        rng.shuffle(facts)
        record["steps"], record["answer"] = [], " ".join(facts)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return len(records)


@torch.no_grad()
def probe(checkpoint: str, data: str, limit: int) -> dict[str, tuple[float, int]]:
    from noblankslate.inference import load

    loaded = load(checkpoint)
    model, tokenizer = loaded.model.base_causallm.eval(), loaded.tokenizer
    hits = {"every": [0, 0], "person": [0, 0]}
    for record in json.load(open(data, encoding="utf-8"))[:limit]:
        prefix = record["question"] + "\n### "
        ids = tokenizer(prefix + record["answer"], return_tensors="pt").input_ids
        start = len(tokenizer(prefix).input_ids)
        predicted = model(input_ids=ids).logits.argmax(-1)[0]
        words = [tokenizer.decode([t]).strip() for t in ids[0]]
        for i in range(start, ids.shape[1]):
            if words[i - 1] == "a" and words[i - 2] == "is":  # i is an object position
                kind = "every" if words[i - 4].lower() == "every" else "person"
                hits[kind][0] += int(predicted[i - 1] == ids[0, i])
                hits[kind][1] += 1
    return {kind: (right / max(total, 1), total) for kind, (right, total) in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the drill's data from a balanced data file")
    m.add_argument("source")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("probe", help="lookup accuracy of a checkpoint with teacher forcing")
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    if args.command == "make":
        print(f"{args.out}: {make_drill(args.source, args.out, args.seed)} records")
    else:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `probe ... | head` ends quietly, not with BrokenPipeError
        torch.set_num_threads(1)
        for kind, (accuracy, total) in probe(args.checkpoint, args.data, args.limit).items():
            print(f"{kind}: {accuracy:.3f} of {total} lookups")


if __name__ == "__main__":
    main()
