"""The generation hook of the memory: nudged thoughts and early exit, batched = each row alone."""

from __future__ import annotations

import random

import pytest
import torch

from model_helpers import MODEL_FACTORIES, wrap
from test_generate import pad, prompt

ROWS = [(7, 3), (12, 0), (4, 1), (9, 2), (5, 6), (6, 4)]  # (question length, latent count)


class StopAt:
    """Stops row b once it has fed stop_steps[b] thoughts (a scripted exit policy)."""

    def __init__(self, stop_steps):
        self.stop_steps = torch.tensor(stop_steps)
        self.calls = []

    def __call__(self, step, thought, thinking):
        self.calls.append((step, thinking.clone()))
        return thought, self.stop_steps == step


class Nudge:
    """A per-row function of the thought only, so a row gets the same nudge batched or alone."""

    def __call__(self, step, thought, thinking):
        return thought + 0.5 * torch.tanh(thought) * (step + 1), torch.zeros_like(thinking)


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    rows = [prompt(rng, q, n) for q, n in ROWS]
    return wrap(MODEL_FACTORIES["llama"]()), rows


def test_a_controller_that_does_nothing_changes_nothing(setup):
    model, rows = setup
    ids, mask = pad(rows, "right")
    plain = model.generate(ids, mask, max_new_tokens=8)
    watched = model.generate(ids, mask, max_new_tokens=8, controller=lambda i, t, th: (t, torch.zeros_like(th)))
    assert watched.sequences() == plain.sequences()
    assert watched.forward_passes.tolist() == plain.forward_passes.tolist()
    assert watched.thoughts_used.tolist() == [n for _, n in ROWS]


def test_a_row_that_stops_early_equals_the_row_alone_with_fewer_thoughts(setup):
    model, rows = setup
    ids, mask = pad(rows, "left")
    # row 0 stops after 1 of 3 thoughts, row 4 after 2 of 6, row 5 at once (0 of 4); -1 = never
    stop_steps = [1, -1, -1, -1, 2, 0]
    controller = StopAt(stop_steps)
    out = model.generate(ids, mask, max_new_tokens=8, controller=controller)
    for b, ((q, n), stop) in enumerate(zip(ROWS, stop_steps)):
        used = n if stop < 0 else stop
        shortened = rows[b][: q + 1] + rows[b][q + 1 : q + 1 + used] + rows[b][q + 1 + n :]  # keep `used` latents
        alone = model.generate(torch.tensor([shortened]), max_new_tokens=8)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert out.thoughts_used[b] == used
        # as if alone: stopping after j < n thoughts costs one pass more than a prompt with j thoughts
        # (each thought is checked before the next is fed), so j + 2 prompt passes; running all n, n + 1
        assert out.forward_passes[b] == alone.forward_passes[0] + (1 if used < n else 0)
    # the controller is asked only about rows that still think, and the loop ends when none does:
    # after step 2 rows 0, 4 and 5 have stopped and rows 1-3 have no thought left
    assert [step for step, _ in controller.calls] == [0, 1, 2]
    assert controller.calls[0][1].tolist() == [True, False, True, True, True, True]
    assert controller.calls[2][1].tolist() == [False, False, False, False, True, False]


def test_nudged_thoughts_batched_equal_each_row_alone(setup):
    model, rows = setup
    ids, mask = pad(rows, "right")
    out = model.generate(ids, mask, max_new_tokens=8, controller=Nudge(), return_thoughts=True)
    plain = model.generate(ids, mask, max_new_tokens=8)
    assert out.sequences() != plain.sequences()  # the nudge is strong enough to matter
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=8, controller=Nudge(), return_thoughts=True)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"
        n = ROWS[b][1]
        scale = float(alone.thoughts[0, :n].abs().max()) if n else 1.0
        torch.testing.assert_close(out.thoughts[b, :n], alone.thoughts[0, :n], rtol=1e-3, atol=1e-5 * scale)
