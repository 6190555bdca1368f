"""Decoding speed of ``Coconut.generate`` against Hugging Face ``generate()`` of the same plain LM, in one run.

Both decode greedily the same prompts (ProsQA-shaped: a question of 320 to 380 tokens, then
``<start> <latent> x 6 <end>``), at the same batch, for exactly the same number of new tokens: the eos id
of each is one that its greedy decoding of these prompts never produces, so every row runs to the limit.
Hugging Face sees the prompts as plain tokens (the latent tokens are ordinary ids to it), left-padded as
its ``generate()`` requires; Coconut sees them laid out by the project's collator and runs its six serial
thought passes first. The plain LM and the Coconut model share one randomly initialised GPT-2.

Cases, timed round-robin so that load from other jobs falls on all alike:

* ``hf``: ``base.generate(..., do_sample=False)`` with its default (dynamic) KV cache;
* ``coconut``: ``Coconut.generate`` as it runs by default (preallocated decoding cache);
* ``coconut dynamic``: ``Coconut.generate(..., preallocate=False)``, the growing ``DynamicCache`` it used
  before (one ``torch.cat`` of every layer's keys and values per token);
* ``coconut compiled`` (with ``--compile``): ``Coconut.generate(..., compile=True)``.

On a CPU with one thread the primary clock is process CPU time (robust to other jobs on a shared machine);
wall time is printed beside it. Elsewhere it is wall time.

Usage:
    python bench/bench_decode.py                          # GPT-2 4 x 128, batch 32, 64 tokens, 1 thread
    python bench/bench_decode.py --layers 12 --width 768  # GPT-2 small's shape
    python bench/bench_decode.py --device cuda --compile
    python bench/bench_decode.py --quick                  # tiny, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys

import torch
import transformers
from bench_coconut import (
    END,
    EOS,
    GPT2_VOCAB,
    LATENT,
    START,
    VOCAB,
    Shape,
    Timer,
    collate,
    make_rows,
)
from transformers import GPT2Config, GPT2LMHeadModel

from noblankslate.model.coconut import Coconut


def gpt2(layers: int, width: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LM's prompts: the same ids, left-padded to the longest (what HF ``generate()`` expects)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def unused_id(generated: torch.Tensor, avoid: int) -> int:
    seen = set(generated.flatten().tolist()) | {avoid}
    return next(t for t in range(GPT2_VOCAB - 1, -1, -1) if t not in seen)


def hf_eos(base, ids, mask, n: int) -> int:
    """An eos id that HF's greedy decoding of these prompts never produces within ``n`` tokens."""
    out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=EOS)
    return unused_id(out[:, ids.shape[1]:], EOS)


def coconut_eos(model: Coconut, ids, mask, n: int) -> int:
    for _ in range(10):
        out = model.generate(ids, mask, max_new_tokens=n)
        if bool((out.lengths == n).all()):
            return model.eos_token_id
        model.eos_token_id = unused_id(out.tokens, model.eos_token_id)
    raise RuntimeError("could not find an eos id that the model never produces")


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--thoughts", type=int, default=6)
    parser.add_argument("--question", type=int, nargs=2, default=(320, 380), help="question length range")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up round")
    parser.add_argument("--compile", action="store_true", help="also time Coconut.generate(compile=True)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks that it runs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.batch, args.new_tokens, args.question, args.repeats = 2, 64, 4, 8, (20, 30), 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    timer = Timer(device, clock)
    base = gpt2(args.layers, args.width, device, dtype)
    params = sum(p.numel() for p in base.parameters())
    model = Coconut(base, LATENT, START, END, EOS).eval()
    shape = Shape("prosqa", args.batch, tuple(args.question), args.thoughts, (0, 0))
    rows = [ids for ids, _ in make_rows(shape, seed=100 + args.batch, with_tail=False)]
    batch = collate([(row, [-100] * len(row)) for row in rows])
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    plain_ids, plain_mask = left_padded(rows, EOS, device)
    n = args.new_tokens
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({cpu_name()})")
          + f", dtype {args.dtype}, threads {torch.get_num_threads()}, clock {clock}")
    print(f"model: GPT-2 {args.layers} layers x {args.width} wide, vocab {VOCAB}, {params / 1e6:.1f}M parameters "
          f"(tied head); batch {args.batch}, prompts {min(map(len, rows))}-{max(map(len, rows))} tokens with "
          f"{args.thoughts} thoughts, exactly {n} new tokens, greedy")

    model.eos_token_id = coconut_eos(model, ids, mask, n)
    plain_eos = hf_eos(base, plain_ids, plain_mask, n)
    cases = {
        "hf generate()": lambda: base.generate(input_ids=plain_ids, attention_mask=plain_mask, max_new_tokens=n,
                                               do_sample=False, eos_token_id=plain_eos, pad_token_id=EOS),
        "coconut": lambda: model.generate(ids, mask, max_new_tokens=n),
        "coconut dynamic": lambda: model.generate(ids, mask, max_new_tokens=n, preallocate=False),
    }
    if args.compile:
        cases["coconut compiled"] = lambda: model.generate(ids, mask, max_new_tokens=n, compile=True)
    samples: dict[str, list] = {name: [] for name in cases}
    for round_index in range(args.repeats + 1):
        for name, fn in cases.items():
            sample = timer.run(fn)
            if round_index > 0:
                samples[name].append(sample)
    reference = samples["coconut dynamic"][-1].result
    hf_tokens = samples["hf generate()"][-1].result[:, plain_ids.shape[1]:]
    checks = {"hf rows ran to the limit": hf_tokens.shape[1] == n and not bool((hf_tokens == plain_eos).any())}
    for name in cases:
        if name.startswith("coconut"):
            out = samples[name][-1].result
            checks[f"{name}: every row {n} tokens"] = bool((out.lengths == n).all())
            checks[f"{name}: same tokens as dynamic"] = torch.equal(out.tokens, reference.tokens)
    hf_primary = statistics.median(getattr(s, clock) for s in samples["hf generate()"])
    hf_wall = statistics.median(s.wall for s in samples["hf generate()"])
    print(f"\nmedian of {args.repeats} rounds after a warm-up round; ms per example (batch time / {args.batch})")
    header = f"{'case':<20}{clock + ' ms':>10}{'wall ms':>10}{'/ hf (' + clock + ')':>14}{'/ hf (wall)':>13}"
    print(header)
    print("-" * len(header))
    results = {}
    for name, taken in samples.items():
        primary = statistics.median(getattr(s, clock) for s in taken)
        wall = statistics.median(s.wall for s in taken)
        results[name] = {"ms_per_example": primary / args.batch * 1e3, "wall_ms_per_example": wall / args.batch * 1e3,
                         "ratio_to_hf": primary / hf_primary, "wall_ratio_to_hf": wall / hf_wall}
        print(f"{name:<20}{primary / args.batch * 1e3:>10.2f}{wall / args.batch * 1e3:>10.2f}"
              f"{primary / hf_primary:>14.3f}{wall / hf_wall:>13.3f}")
    for check, ok in checks.items():
        print(f"check: {check}: {'yes' if ok else 'NO'}")
    print("target: coconut / hf <= 0.95 on a CPU")
    report = {"device": str(device), "cpu": cpu_name(), "clock": clock, "threads": torch.get_num_threads(),
              "model": f"GPT-2 {args.layers}x{args.width}", "parameters": params, "batch": args.batch,
              "new_tokens": n, "thoughts": args.thoughts, "results": results, "checks": checks}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
