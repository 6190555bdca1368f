"""The generation hook of the memory: nudged thoughts and early exit, batched = each row alone."""

from __future__ import annotations

import random

import pytest
import torch

from model_helpers import MODEL_FACTORIES, wrap
from test_generate import pad, prompt

ROWS = [(7, 3), (12, 0), (4, 1), (9, 2), (5, 6), (6, 4)]  # (question length, latent count)


class StopAfter:
    """Row b feeds at most stop_after[b] thoughts (a scripted exit policy)."""

    def __init__(self, stop_after):
        self.stop_after = torch.tensor(stop_after)
        self.calls = []

    def __call__(self, step, thought, thinking):
        self.calls.append((step, thinking.clone()))
        return thought, self.stop_after == step + 1


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
    # row 0 stops after 1 of 3 thoughts, row 4 after 2 of 6, row 5 after 1 of 4; -1 = never
    stop_after = [1, -1, -1, -1, 2, 1]
    controller = StopAfter(stop_after)
    out = model.generate(ids, mask, max_new_tokens=8, controller=controller)
    for b, ((q, n), stop) in enumerate(zip(ROWS, stop_after)):
        used = n if stop < 0 else stop
        shortened = rows[b][: q + 1] + rows[b][q + 1 : q + 1 + used] + rows[b][q + 1 + n :]  # keep `used` latents
        alone = model.generate(torch.tensor([shortened]), max_new_tokens=8)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert out.thoughts_used[b] == used
        # exactly the passes of the row alone with `used` thoughts: used + 1 for the prompt, then decoding
        assert out.forward_passes[b] == alone.forward_passes[0]
    # the controller is asked only about rows that still think, and the loop ends when none does:
    # after step 1 rows 0, 4 and 5 have fed their last thought and rows 1-3 have none left
    assert [step for step, _ in controller.calls] == [0, 1]
    assert controller.calls[0][1].tolist() == [True, False, True, True, True, True]
    assert controller.calls[1][1].tolist() == [False, False, False, True, True, False]


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
