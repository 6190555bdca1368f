"""Speed of the Coconut model against plain causal-LM baselines and against the original's slow paths.

Prints one table per section, no assertions:

1. forward+backward per batch of
   (a) the fast Coconut forward with ``return_logits=False`` (LM head at labelled rows only, as training runs it),
   (b) the same with full logits,
   (c) a slow oracle: the whole sequence recomputed at every latent pass, no KV cache (loss-only head, like (a)),
   (d) a plain causal-LM forward+backward over the same tokens (``base(..., labels=...)``, full logits),
   (e) a plain causal LM with the LM head only at labelled rows (the honest baseline for (a));
2. generation: the batched, KV-cached ``Coconut.generate`` against a naive batch-1 loop without a cache
   (thoughts filled by the multi-pass forward, then the whole prefix recomputed for every new token, as
   the original ``coconut.py`` does, with logits at every position; and the same loop with the LM head
   at the last position only), all producing exactly the same tokens.

The model is a randomly initialised tiny GPT-2 (4 layers, width 128) with the full GPT-2 vocabulary plus
the three Coconut tokens. The LM head is as wide as the real one, so relative to this small body it
costs far more than in GPT-2 small: whatever runs the head at fewer positions wins big here.
Batches are ProsQA-shaped (long question, 6 thoughts, short answer) and GSM8K-shaped (short question,
6 thoughts, longer remaining text), laid out as the collator lays them out.

On a CPU with one thread the times are process CPU time (robust to other jobs on a shared machine; wall
time is printed beside them); elsewhere wall time.

Usage:
    python bench/bench_coconut.py                 # full run, CPU, 1 thread
    python bench/bench_coconut.py --quick         # fewer repeats
    python bench/bench_coconut.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import random
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from noblankslate.model.coconut import Coconut

IGNORE_INDEX = -100
GPT2_VOCAB = 50257
EOS = 50256  # GPT-2's <|endoftext|>, also the pad token, as in the original
START, END, LATENT = 50257, 50258, 50259  # the order add_latent_tokens gives them
VOCAB = GPT2_VOCAB + 3


@dataclass(frozen=True)
class Shape:
    """A batch shape: per-row lengths are drawn uniformly from the inclusive ranges."""

    name: str
    batch: int
    question: tuple[int, int]
    latents: int
    tail: tuple[int, int]


TRAIN_SHAPES = [
    Shape("prosqa", 8, (320, 380), 6, (8, 12)),
    Shape("prosqa", 32, (320, 380), 6, (8, 12)),
    Shape("gsm", 32, (50, 70), 6, (15, 25)),
]
GENERATE_SHAPES = [
    Shape("prosqa", 32, (320, 380), 6, (0, 0)),
    Shape("gsm", 32, (50, 70), 6, (0, 0)),
]


def tiny_gpt2(dtype: torch.dtype, device: torch.device, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=1024, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS,
    )
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype)


def make_rows(shape: Shape, seed: int, with_tail: bool) -> list[tuple[list[int], list[int]]]:
    """question + <start> + latents + <end> (+ remaining text + eos); labels only on the remaining text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(shape.batch):
        question = [rng.randrange(GPT2_VOCAB - 1) for _ in range(rng.randint(*shape.question))]
        markers = [START] + [LATENT] * shape.latents + [END]
        tail = [rng.randrange(GPT2_VOCAB - 1) for _ in range(rng.randint(*shape.tail))] + [EOS] if with_tail else []
        rows.append((question + markers + tail, [IGNORE_INDEX] * (len(question) + len(markers)) + tail))
    return rows


def project_collator():
    """The project's LatentCollator when it is importable, else None (the bench then uses its own)."""
    try:
        from noblankslate.data.collator import LatentCollator
    except ImportError:
        return None
    return LatentCollator(pad_token_id=EOS, latent_id=LATENT, label_pad_id=IGNORE_INDEX)


def collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Left-pad rows so the first latent column aligns, right-pad to the longest (LatentCollator's layout)."""
    collator = project_collator()
    if collator is not None:
        return collator([{"input_ids": ids, "labels": labels} for ids, labels in rows])
    firsts = [ids.index(LATENT) for ids, _ in rows]
    target = max(firsts)
    width = max(target - first + len(ids) for first, (ids, _) in zip(firsts, rows))
    out = {k: torch.full((len(rows), width), v) for k, v in
           {"input_ids": EOS, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}.items()}
    for b, (first, (ids, labels)) in enumerate(zip(firsts, rows)):
        left = target - first
        span = slice(left, left + len(ids))
        out["input_ids"][b, span] = torch.tensor(ids)
        out["labels"][b, span] = torch.tensor(labels)
        out["attention_mask"][b, span] = 1
        out["position_ids"][b, span] = torch.arange(len(ids))
    return out


def labelled_loss(base: GPT2LMHeadModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with the LM head run only at positions whose target is labelled."""
    targets = labels[:, 1:]  # (B, L-1)
    keep = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[:, :-1][keep])  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep])


def oracle_loss(base: GPT2LMHeadModel, input_ids, attention_mask, labels, position_ids) -> torch.Tensor:
    """The slow, obviously correct multi-pass forward: recompute every position at every latent pass.

    Pass i writes, at each row's i-th latent position, the last hidden state of the position before it
    (from a full no-cache forward over the embeddings filled so far). The final pass uses the same
    loss-only head as the fast model's training path, so (c)/(a) measures the cache alone.
    """
    embeds = base.get_input_embeddings()(input_ids)  # (B, L, D)
    is_latent = input_ids == LATENT  # (B, L)
    ordinal = is_latent.long().cumsum(dim=1) - 1  # (B, L) index of each latent within its row
    for i in range(int(is_latent.sum(dim=1).max())):
        hidden = base.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state  # (B, L, D)
        previous = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)  # (B, L, D) hidden state one column left
        embeds = torch.where((is_latent & (ordinal == i))[..., None], previous, embeds)
    hidden = base.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                             position_ids=position_ids).last_hidden_state
    return labelled_loss(base, hidden, labels)


def train_cases(model: Coconut) -> dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    base = model.base_causallm

    def plain_labelled(batch):
        hidden = base.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"]).last_hidden_state
        return labelled_loss(base, hidden, batch["labels"])

    return {
        "a coconut (loss-only head)": lambda b: model(**b, return_logits=False).loss,
        "b coconut (full logits)": lambda b: model(**b, return_logits=True).loss,
        "c oracle, no cache": lambda b: oracle_loss(base, **b),
        "d plain LM (full logits)": lambda b: base(**b).loss,
        "e plain LM (loss-only head)": plain_labelled,
    }


@dataclass
class Sample:
    wall: float
    cpu: float
    result: object = None


class Timer:
    """Timing with device synchronisation, and a rough peak-memory reading.

    On a CPU with one torch thread the primary clock is the process's CPU time: on a machine shared with
    other jobs, waiting for a core inflates wall time but not CPU time. Elsewhere it is wall time.
    """

    def __init__(self, device: torch.device, clock: str):
        self.device = device
        self.clock = clock

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        # ru_maxrss is KiB on Linux: the process's high-water mark so far, not this case's own peak.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run(self, fn: Callable[[], object]) -> Sample:
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.sync()
        return Sample(time.perf_counter() - wall, time.process_time() - cpu, result)

    def primary(self, sample: Sample) -> float:
        return sample.cpu if self.clock == "cpu" else sample.wall


def median(samples: list[Sample], clock: str) -> float:
    return statistics.median(s.cpu if clock == "cpu" else s.wall for s in samples)


@dataclass
class CaseResult:
    samples: list[Sample]
    loss: float = float("nan")
    memory: str = ""
    heavy: bool = False


def bench_train(model: Coconut, timer: Timer, args, device) -> None:
    """Forward+backward of every case, round-robin per shape so that load from other processes falls on
    all cases alike. Round 0 is the warm-up; a case whose warm-up took over ``--heavy-seconds`` keeps that
    run as its one sample and sits out the later rounds (the full-logits cases on one CPU thread)."""
    print("\n== forward+backward, ms per batch ==")
    print(f"median of {args.repeats} timed rounds after a warm-up round; '*' = one run only (warm-up took "
          f"> {args.heavy_seconds:g} s), first-call overhead included")
    if device.type == "cuda":
        print("memory: peak MiB allocated by torch during the warm-up run")
    else:
        print("memory: process max RSS in MiB after the warm-up run, a high-water mark over the whole run: a plain "
              "number is this case's own peak, '<=' means it stayed under an earlier peak")
    header = (f"{'shape':<14}{'tokens':>7}{'labelled':>9}  {'case':<29}{timer.clock + ' ms':>10} {'wall ms':>9}"
              f"{'memory':>10}{'loss':>10}")
    print(header)
    print("-" * len(header))
    summary = []
    for shape in TRAIN_SHAPES:
        batch = {k: v.to(device) for k, v in collate(make_rows(shape, seed=shape.batch, with_tail=True)).items()}
        real = int(batch["attention_mask"].sum())
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        cases = train_cases(model)
        results = {name: CaseResult(samples=[]) for name in cases}

        def step(loss_fn):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            loss.backward()
            return float(loss.detach())

        for round_index in range(args.repeats + 1):
            for name, loss_fn in cases.items():
                result = results[name]
                if result.heavy:
                    continue
                if round_index == 0:
                    before = timer.peak_mib()
                    timer.reset_peak()
                sample = timer.run(lambda: step(loss_fn))
                result.loss = sample.result
                if round_index == 0:
                    peak = timer.peak_mib()
                    result.memory = f"{peak:.0f}" if device.type == "cuda" or peak > before else f"<={peak:.0f}"
                    if timer.primary(sample) > args.heavy_seconds:
                        result.heavy = True
                        result.samples.append(sample)
                else:
                    result.samples.append(sample)

        tag = f"{shape.name} B={shape.batch}"
        for name, result in results.items():
            mark = "*" if result.heavy else " "
            print(f"{tag:<14}{real:>7}{labelled:>9}  {name:<29}{median(result.samples, timer.clock) * 1e3:>9.1f}{mark}"
                  f"{median(result.samples, 'wall') * 1e3:>9.1f}{result.memory:>10}{result.loss:>10.4f}")
        summary.append((tag, {name[0]: median(r.samples, timer.clock) for name, r in results.items()}))
        print()
    print(f"ratios of {timer.clock}-time medians (target: a/d <= 1.5; a/e compares like-for-like LM heads)")
    print(f"{'shape':<14}{'a/d':>8}{'a/e':>8}{'b/d':>8}{'c/a':>8}")
    for tag, r in summary:
        print(f"{tag:<14}{r['a'] / r['d']:>8.2f}{r['a'] / r['e']:>8.2f}{r['b'] / r['d']:>8.2f}{r['c'] / r['a']:>8.2f}")


@torch.no_grad()
def naive_generate(model: Coconut, row: list[int], max_new_tokens: int, device, full_logits: bool = True) -> list[int]:
    """The original's generation: batch 1, thoughts filled by the multi-pass forward, then the whole
    prefix recomputed for every new token, with logits at every position as the original computes them
    (``full_logits=False``: the LM head at the last position only, an honest lower bound for this
    approach). Generates exactly ``max_new_tokens`` tokens (eos is not checked: the bench makes it
    unreachable)."""
    base = model.base_causallm
    ids = torch.tensor([row], device=device)
    out = model(ids, torch.ones_like(ids), position_ids=torch.arange(len(row), device=device)[None])
    embeds = out.inputs_embeds  # (1, L, D) thoughts filled in
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens:
        step = model.embedding(torch.tensor([[tokens[-1]]], device=device))  # (1, 1, D)
        embeds = torch.cat([embeds, step], dim=1)
        if full_logits:
            logits = base(inputs_embeds=embeds).logits[0, -1]  # (V,) of (1, T, V)
        else:
            logits = base.lm_head(base.base_model(inputs_embeds=embeds).last_hidden_state[0, -1])  # (V,)
        tokens.append(int(logits.argmax()))
    return tokens


def unreachable_eos(model: Coconut, input_ids, attention_mask, max_new_tokens: int) -> int:
    """An eos id that greedy decoding of these prompts never produces, so every row runs to the limit."""
    eos = model.eos_token_id
    for _ in range(10):
        out = model.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens)
        if bool((out.lengths == max_new_tokens).all()):
            return eos
        seen = set(out.tokens.flatten().tolist()) | {eos}
        eos = next(t for t in range(GPT2_VOCAB - 1, -1, -1) if t not in seen)
        model.eos_token_id = eos
    raise RuntimeError("could not find an eos id that the model never produces")


def bench_generate(model: Coconut, timer: Timer, args, device) -> None:
    n = args.new_tokens
    print(f"\n== generation: exactly {n} new tokens per row, greedy; {timer.clock}-time ms per example ==")
    print(f"fast: one batch of 32 (median of {args.repeats} after a warm-up) / 32. naive: batch 1, no cache, median "
          "over its rows; 'all pos' computes logits at every position each step as the original does, 'last pos' "
          "only at the last (a lower bound for a no-cache loop). 'same tokens': naive rows equal their fast rows")
    header = (f"{'shape':<14}{'prompt':>8}{'fast':>8}{'naive all pos':>15}{'speed-up':>10}{'(wall)':>8}"
              f"{'naive last pos':>16}{'speed-up':>10}{'rows':>6}{'same tokens':>13}")
    print(header)
    print("-" * len(header))
    eos_before = model.eos_token_id
    for shape in GENERATE_SHAPES:
        rows = make_rows(shape, seed=100 + shape.batch, with_tail=False)
        batch = collate(rows)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        model.eos_token_id = unreachable_eos(model, ids, mask, n)

        def fast():
            return model.generate(ids, mask, max_new_tokens=n)

        timer.run(fast)
        fast_samples = [timer.run(fast) for _ in range(args.repeats)]
        out = fast_samples[-1].result
        naive_rows = [row for row, _ in rows[: args.naive_examples]]
        naive_all = [timer.run(lambda: naive_generate(model, row, n, device)) for row in naive_rows]
        naive_last = [timer.run(lambda: naive_generate(model, row, n, device, full_logits=False)) for row in naive_rows]
        same = all(a.result == b.result == fast_row for a, b, fast_row in zip(naive_all, naive_last, out.sequences()))
        fast_per = median(fast_samples, timer.clock) / shape.batch
        all_per, last_per = median(naive_all, timer.clock), median(naive_last, timer.clock)
        wall_speedup = median(naive_all, "wall") / (median(fast_samples, "wall") / shape.batch)
        prompt = f"{min(len(r) for r, _ in rows)}-{max(len(r) for r, _ in rows)}"
        print(f"{shape.name + ' B=' + str(shape.batch):<14}{prompt:>8}{fast_per * 1e3:>8.1f}{all_per * 1e3:>15.1f}"
              f"{all_per / fast_per:>9.1f}x{wall_speedup:>7.1f}x{last_per * 1e3:>16.1f}{last_per / fast_per:>9.1f}x"
              f"{len(naive_rows):>6}{'yes' if same else 'NO':>13}"
              + ("" if bool((out.lengths == n).all()) else "  (some rows stopped early)"))
    model.eos_token_id = eos_before
    print("target: speed-up over the original's loop ('all pos') >= 20x")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and naive examples")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3, quick 1)")
    parser.add_argument("--heavy-seconds", type=float, default=5.0,
                        help="a forward+backward case whose warm-up run takes longer is timed by that run alone")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--naive-examples", type=int, default=None, help="rows run by the naive generator (default 3, quick 2)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="primary clock: auto = process CPU time on a CPU with one thread, else wall time")
    parser.add_argument("--skip", choices=["train", "generate"], action="append", default=[], help="skip a section")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.naive_examples is None:
        args.naive_examples = 2 if args.quick else 3
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the plain LM's "loss_type=None" notice
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, clock {args.clock}")
    if device.type == "cuda":
        print("gpu:", torch.cuda.get_device_name(device))
    base = tiny_gpt2(dtype, device)
    n_params = sum(p.numel() for p in base.parameters())
    print("collate:", "noblankslate.data.collator.LatentCollator" if project_collator() else "the bench's own")
    print(f"model: GPT-2 4 layers x 128 wide, vocab {VOCAB}, {n_params / 1e6:.1f}M parameters (tied head), dropout 0")
    model = Coconut(base, LATENT, START, END, EOS)
    model.train()  # dropout is 0, so train mode changes nothing numerically; it is how training runs
    started = time.perf_counter()
    if "train" not in args.skip:
        bench_train(model, Timer(device, args.clock), args, device)
    if "generate" not in args.skip:
        model.eval()
        bench_generate(model, Timer(device, args.clock), args, device)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
