"""What the No Blank Slate memory costs at inference: retrieval + nudge time against generation time.

A memory of N entries (default 100,000; random unit keys and trajectories, which cost the same to
search and gather as real ones) is attached to batched generation of a tiny GPT-2 on ProsQA-shaped
prompts. Early exit is off, so both runs make the same forward passes and the difference is the
memory's own work: one FAISS search per batch, the gather of the neighbours' trajectories, and a
nudge per thought. Prints the overhead and the bytes per entry.

    python bench/bench_memory.py [--entries 100000] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from noblankslate.config import NudgeConfig, RetrievalConfig
from noblankslate.memory import controller as controller_module
from noblankslate.memory.calibration import make_calibrator
from noblankslate.memory.controller import MemoryController, MemoryParts
from noblankslate.memory.projection import PCAProjection
from noblankslate.memory.store import LatentMemory
from noblankslate.model.coconut import Coconut

VOCAB = 50257 + 3
START, END, LATENT = 50257, 50258, 50259


def make_model(layers: int, width: int) -> Coconut:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(width // 32, 1), vocab_size=VOCAB, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Coconut(GPT2LMHeadModel(config).eval(), LATENT, START, END, eos_token_id=0)


def make_eos_unreachable(model: Coconut, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> None:
    """Set eos to an id greedy decoding never produces here, so every row generates all its tokens."""
    for _ in range(5):
        out = model.generate(ids, mask, max_new_tokens=new_tokens)
        if bool((out.lengths == new_tokens).all()):
            return
        seen = set(out.tokens.flatten().tolist()) | {model.eos_token_id}
        model.eos_token_id = next(t for t in range(50000) if t not in seen)
    raise RuntimeError("could not find an eos id the model never produces")


def make_prompts(batch: int, question: int, thoughts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        q = rng.integers(0, 50000, size=question + int(rng.integers(-20, 20))).tolist()
        rows.append(q + [START] + [LATENT] * thoughts + [END])
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def make_memory(entries: int, width: int, steps: int, key_dim: int, value_dim: int) -> MemoryParts:
    rng = np.random.default_rng(0)
    store = LatentMemory(key_dim=key_dim, steps=steps, value_dim=value_dim, metric="cosine", fingerprint="bench")
    chunk = 20_000
    for start in range(0, entries, chunk):
        n = min(chunk, entries - start)
        keys = rng.normal(size=(n, key_dim)).astype(np.float32)
        values = rng.normal(size=(n, steps, value_dim)).astype(np.float32)
        store.add(keys, values, [{"thoughts": steps, "exit_step": steps}] * n)
    fit_data = rng.normal(size=(max(4 * width, 512), width)).astype(np.float32)
    # as the builder makes them: keys reduced by PCA, or centred on the mean anchor (a product either way)
    key_map = PCAProjection.fit(fit_data, key_dim) if key_dim < width else PCAProjection.centering(fit_data)
    value_map = PCAProjection.fit(fit_data, value_dim if value_dim < width else None)
    confidence = make_calibrator("platt").fit(np.linspace(-1, 1, 50), np.arange(50) % 2)
    return MemoryParts(store=store, key_map=key_map.transform, value_inverse=value_map.inverse_transform, confidence=confidence)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--question", type=int, default=350)
    parser.add_argument("--thoughts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--key-dim", type=int, default=None, help="default: the width")
    parser.add_argument("--value-dim", type=int, default=None, help="default: the width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    key_dim, value_dim = args.key_dim or args.width, args.value_dim or args.width

    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    model = make_model(args.layers, args.width)
    ids, mask = make_prompts(args.batch, args.question, args.thoughts)
    with torch.no_grad():
        make_eos_unreachable(model, ids, mask, args.new_tokens)
    started = time.perf_counter()
    parts = make_memory(args.entries, args.width, args.thoughts, key_dim, value_dim)
    print(f"memory: {len(parts.store):,} entries, key_dim {key_dim}, {args.thoughts} steps x value_dim {value_dim} "
          f"(float16), built in {time.perf_counter() - started:.1f} s")
    controller = MemoryController(parts, RetrievalConfig(k=4, sim_threshold=-1.0), NudgeConfig(alpha_max=0.3, clip_radius=5.0))

    def blas_unlimited():
        """The controller as before 2026-12-04: numpy's BLAS on all its threads (the reference)."""
        limit = controller_module._BLAS.limit
        controller_module._BLAS.limit = lambda **_: contextlib.nullcontext()
        try:
            nudged()
        finally:
            controller_module._BLAS.limit = limit

    with torch.no_grad():
        plain = lambda: model.generate(ids, mask, max_new_tokens=args.new_tokens)
        nudged = lambda: model.generate(ids, mask, max_new_tokens=args.new_tokens, controller=controller)
        plain(), nudged()  # warm-up
        controller.seconds = 0.0
        off, on, unlimited = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifting load hits all alike
            off += timed(plain, 1)
            on += timed(nudged, 1)
            seconds = controller.seconds
            unlimited += timed(blas_unlimited, 1)
            controller.seconds = seconds  # the reference's controller time is not this run's
    t_off, t_on, t_unlimited = statistics.median(off), statistics.median(on), statistics.median(unlimited)
    memory_share = controller.seconds / args.repeats / t_off
    print(f"generation, batch {args.batch}, {args.thoughts} thoughts, {args.new_tokens} new tokens (median of {args.repeats}):")
    print(f"  without memory        {t_off * 1000:9.1f} ms")
    print(f"  with memory (nudge)   {t_on * 1000:9.1f} ms   wall-clock overhead {100 * (t_on - t_off) / t_off:+.2f}%")
    print(f"  same, BLAS unlimited  {t_unlimited * 1000:9.1f} ms   wall-clock overhead {100 * (t_unlimited - t_off) / t_off:+.2f}%"
          "   (numpy's BLAS on all threads: the controller before 2026-12-04)")
    print(f"  inside the controller {controller.seconds / args.repeats * 1000:9.1f} ms   = {100 * memory_share:.2f}% of generation "
          f"(search + gather + nudges; target <= 5%)")
    print(f"bytes per entry: {parts.store.bytes_per_entry():,} here; "
          f"{LatentMemory(768, 6, 768, 'cosine', 'x').bytes_per_entry():,} for GPT-2 (768 wide, 6 thoughts, float16 values, "
          f"keys 768); {LatentMemory(128, 6, 256, 'cosine', 'x').bytes_per_entry():,} with key_dim 128, value_dim 256")


if __name__ == "__main__":
    main()
