"""Batched KV-cached generation: equal to each row alone and to a no-cache oracle; eos; pass counts."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import END, EOS, LATENT, MODEL_FACTORIES, START, WORDS, wrap
from test_coconut_oracle import oracle_forward


def prompt(rng: random.Random, question_len: int, n_latent: int) -> list[int]:
    return [rng.choice(WORDS) for _ in range(question_len)] + [START] + [LATENT] * n_latent + [END]


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [EOS] * (width - len(r))
        ids.append(r + fill if side == "right" else fill + r)
        mask.append([1] * len(r) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(r))
    return torch.tensor(ids), torch.tensor(mask)


def oracle_generate(base, row: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Batch size 1, no cache: recompute the whole sequence (thoughts filled) for every new token."""
    ids = torch.tensor([row])
    ones = torch.ones_like(ids)
    _, logits, embeds = oracle_forward(base, ids, ones, ids, torch.arange(len(row))[None])
    out = []
    token = int(logits[0, -1].argmax())
    while token != eos and len(out) < max_new_tokens:
        out.append(token)
        if len(out) == max_new_tokens:
            break
        embeds = torch.cat([embeds, base.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        token = int(base(inputs_embeds=embeds).logits[0, -1].argmax())
    return out


ROWS = [(7, 3), (12, 0), (4, 1), (9, 2), (5, 6)]  # (question length, latent count)


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_generation_equals_each_row_alone_and_the_oracle(arch, side):
    rng = random.Random(0)
    rows = [prompt(rng, q, n) for q, n in ROWS]
    model = wrap(MODEL_FACTORIES[arch]())
    ids, mask = pad(rows, side)
    batched = model.generate(ids, mask, max_new_tokens=12)
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=12)
        assert batched.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert batched.sequences()[b] == oracle_generate(model.base_causallm, row, 12, EOS), f"row {b}"
        assert batched.forward_passes[b] == alone.forward_passes[0]
    assert batched.latent_counts.tolist() == [n for _, n in ROWS]


def test_each_row_stops_at_eos_and_counts_its_own_passes():
    rng = random.Random(1)
    rows = [prompt(rng, q, n) for q, n in ROWS]
    base = MODEL_FACTORIES["gpt2"]()
    ids, mask = pad(rows, "right")
    free = wrap(base).generate(ids, mask, max_new_tokens=10).sequences()
    # Declare a token that row 0 first produces late to be eos: row 0 must stop right before it, the
    # other rows where they first produce it (or not at all).
    late = [t for t in set(free[0]) if free[0].index(t) >= 2]
    assert late, "the tiny model should produce at least three distinct tokens"
    eos = max(late, key=free[0].index)
    stopped = wrap(base)
    stopped.eos_token_id = eos
    out = stopped.generate(ids, mask, max_new_tokens=10)
    for b, (_, n_latent) in enumerate(ROWS):
        expected = free[b][: free[b].index(eos)] if eos in free[b] else free[b]
        assert out.sequences()[b] == expected
        # thoughts + the prompt pass + one pass per further token, eos included when it was produced
        extra = len(expected) if eos in free[b] else len(expected) - 1
        assert out.forward_passes[b] == n_latent + 1 + extra
    assert out.lengths[0] == free[0].index(eos) >= 2


def test_sync_forward_passes_runs_exactly_that_many_forwards():
    model = wrap(MODEL_FACTORIES["gpt2"]())
    calls = []
    model.base_causallm.base_model.register_forward_hook(lambda *args: calls.append(1))
    rng = random.Random(2)
    ids, mask = pad([prompt(rng, 5, 2), prompt(rng, 8, 0)], "right")
    plain = model.generate(ids, mask, max_new_tokens=6)
    calls.clear()
    synced = model.generate(ids, mask, max_new_tokens=6, sync_forward_passes=2 + 6 + 3)
    assert len(calls) == 2 + 6 + 3
    assert synced.sequences() == plain.sequences()
    with pytest.raises(ValueError, match="sync_forward_passes is .* short"):
        model.generate(ids, mask, max_new_tokens=6, sync_forward_passes=3)


def test_thoughts_are_returned_per_row():
    model = wrap(MODEL_FACTORIES["gpt2"]())
    rng = random.Random(3)
    rows = [prompt(rng, 6, 3), prompt(rng, 4, 1)]
    ids, mask = pad(rows, "left")
    out = model.generate(ids, mask, max_new_tokens=2, return_thoughts=True)
    assert out.thoughts.shape == (2, 3, 32)
    alone = model.generate(torch.tensor([rows[1]]), max_new_tokens=2, return_thoughts=True)
    torch.testing.assert_close(out.thoughts[1, :1], alone.thoughts[0], rtol=1e-4, atol=1e-5)
