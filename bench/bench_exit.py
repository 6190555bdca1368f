"""Does an early exit save wall-clock in batched generation? Scripted exits, measured against the ideal.

A scripted controller stops a chosen share of the rows after their first thought (no memory, so the
controller itself costs nothing). With T thoughts per row, the ideal saving of stopping a share s of the
rows is s x (the thought passes' time), and the thought passes' time is measured as the difference
between no row stopping and every row stopping. Printed for the compacted passes that generation uses
(rows that stop leave the later passes) and for the masked lockstep passes (every row stays in every pass,
as FSDP generation and the previous code did), at batch 1 and at a large batch.

    python bench/bench_exit.py [--layers 6 --width 768 --batch 64 --thoughts 12 --question 30 --threads 1] [--no-markers]

On a CPU, glibc hands large freed blocks back to the system, so the KV cache's many fresh allocations
page-fault anew on every call, which adds 10-20% of noise to the large-batch rows (runs that differ only
in that swing by more than the saving measured). ``MALLOC_MMAP_THRESHOLD_=4000000000
MALLOC_TRIM_THRESHOLD_=4000000000`` in the environment keeps the memory in the process; the header says
whether it is set (bench/README.md gives both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from noblankslate.model.coconut import Coconut

START, END, LATENT = 50257, 50258, 50259


class StopFirst:
    """Rows with ``stop[b]`` feed only their first thought."""

    def __init__(self, stop: torch.Tensor):
        self.stop = stop

    def __call__(self, step: int, thought: torch.Tensor, thinking: torch.Tensor):
        return thought, self.stop & (step == 0)


def make_model(layers: int, width: int) -> Coconut:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(width // 64, 1), vocab_size=50260, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Coconut(GPT2LMHeadModel(config).eval(), LATENT, START, END, eos_token_id=0)


def make_prompts(batch: int, question: int, thoughts: int, markers: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of ``question`` random tokens and ``thoughts`` latent slots; with ``markers`` the slots sit
    between the start and end markers, without (``latent_markers: false``) the prompt ends with them."""
    rng = np.random.default_rng(0)
    before, after = ([START], [END]) if markers else ([], [])
    rows = [rng.integers(1, 50000, size=question).tolist() + before + [LATENT] * thoughts + after for _ in range(batch)]
    return torch.tensor(rows), torch.ones(batch, len(rows[0]), dtype=torch.long)


def time_passes(model: Coconut, ids, mask, stops: dict[str, torch.Tensor], compacted: bool, repeats: int) -> dict[str, float]:
    """Median seconds of the prompt's passes (the thoughts and the rest of the prompt, cache kept) for each
    scripted stop pattern of ``stops``, the patterns interleaved in every repeat so that a drift of the
    machine's speed (allocator, clocks) falls on all of them alike.

    Decoding after the prompt is the same batched loop for both kinds of passes, so it is left out.
    """
    layout = model._layout(ids)
    embeds = model.embedding(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    times: dict[str, list[float]] = {name: [] for name in stops}
    for repeat in range(repeats + 1):
        for name, stop in stops.items():
            controller = StopFirst(stop)
            attention, position_ids = mask.clone(), positions.clone()
            started = time.perf_counter()
            if compacted:
                model._compacted_passes(embeds, attention, position_ids, layout, controller=controller)
            else:
                model._latent_passes(embeds, attention, position_ids, layout, keep_cache=True, controller=controller)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--thoughts", type=int, default=12)
    parser.add_argument("--question", type=int, default=30, help="question tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-markers", action="store_true",
                        help="prompts end with their latent slots (latent_markers: false, as the chain task)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = make_model(args.layers, args.width).to(device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"GPT-2 {args.layers}x{args.width}, {args.thoughts} thoughts, {args.question}-token questions, "
          f"median of {args.repeats}" + (", no latent markers" if args.no_markers else "")
          + (", glibc keeps freed memory" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else ", default glibc allocator"))
    print(f"{'batch':>6} {'passes':<10} {'no exit':>10} {'half stop':>10} {'all stop':>10} {'saved':>9} {'ideal':>9} {'saved/ideal':>12}")
    with torch.no_grad():
        for batch in sorted({1, args.batch}):
            ids, mask = (t.to(device) for t in make_prompts(batch, args.question, args.thoughts, not args.no_markers))
            half = torch.arange(batch, device=device) % 2 == 0 if batch > 1 else torch.ones(1, dtype=torch.bool, device=device)
            share = float(half.float().mean())
            none, everyone = torch.zeros_like(half), torch.ones_like(half)
            for lockstep in (False, True):
                t = time_passes(model, ids, mask, {"none": none, "half": half, "all": everyone}, not lockstep, args.repeats)
                saved, ideal = t["none"] - t["half"], share * (t["none"] - t["all"])
                label = "masked" if lockstep else "compacted"
                print(f"{batch:>6} {label:<10} {1000 * t['none']:>8.1f}ms {1000 * t['half']:>8.1f}ms {1000 * t['all']:>8.1f}ms "
                      f"{1000 * saved:>7.1f}ms {1000 * ideal:>7.1f}ms {saved / ideal if ideal > 0 else float('nan'):>12.2f}")
    print("Times are the prompt's passes (thoughts + the rest of the prompt); decoding is the same for both. half stop: "
          "every other row stops after its first thought (batch 1: the one row does); ideal = that share x (no exit - all "
          "stop). masked: every row stays in every pass (FSDP lockstep generation, and all generation before compaction).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
