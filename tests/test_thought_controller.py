"""The generation hook of the memory: nudged thoughts and early exit, batched = each row alone."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import LATENT, MODEL_FACTORIES, wrap
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


def _record_calls(model):
    """(rows, columns) of every transformer call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    handle = model.base_causallm.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


def test_rows_that_stop_leave_the_remaining_passes(setup):
    model, _ = setup
    rng = random.Random(4)
    rows = [prompt(rng, 6, 4) for _ in range(5)]
    ids, mask = pad(rows, "right")
    calls, handle = _record_calls(model)
    try:
        out = model.generate(ids, mask, max_new_tokens=3, controller=StopAfter([1, -1, 1, -1, -1]))
    finally:
        handle.remove()
    prompt_calls = calls[: len(calls) - 2]  # the last two calls are decoding steps, all 5 rows
    # the prefix (5 rows, 7 columns); pass 0: all 5 feed thought 0, and rows 0 and 2 leave (their skipped
    # slots are masked: never computed); thoughts 1 and 2 on the three others; their last thought runs with
    # the end marker, and rows 0 and 2 join that call for their end marker: no call of their own
    assert prompt_calls == [(5, 7), (5, 1), (3, 1), (3, 1), (5, 2)]
    assert calls[-2:] == [(5, 1), (5, 1)]
    assert out.thoughts_used.tolist() == [1, 4, 1, 4, 4]
    for b, row in enumerate(rows):
        used = int(out.thoughts_used[b])
        alone = model.generate(torch.tensor([row[:7] + row[7 : 7 + used] + row[11:]]), max_new_tokens=3)
        assert out.sequences()[b] == alone.sequences()[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_without_markers_rows_that_stop_ride_the_pass_of_the_rows_that_go_on(setup, side):
    """``latent_markers: false``: after a row's last used slot its prompt holds only masked columns (skipped
    slots, padding), so it feeds its last thought in the same call as the rows that go on thinking, and
    stopping costs no transformer call of its own."""
    from test_generate import WORDS

    model, _ = setup
    rng = random.Random(5)
    shapes = [(6, 4), (6, 4), (6, 4), (6, 4), (6, 2)]  # (question length, latent count)
    rows = [[rng.choice(WORDS) for _ in range(q)] + [LATENT] * n for q, n in shapes]
    ids, mask = pad(rows, side)
    calls, handle = _record_calls(model)
    try:
        out = model.generate(ids, mask, max_new_tokens=3, controller=StopAfter([1, -1, 1, -1, -1]))
        plain = model.generate(ids, mask, max_new_tokens=3)
    finally:
        handle.remove()
    exit_calls, plain_calls = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    # the prefix; pass 0: rows 0 and 2 feed their only thought beside the three that go on; pass 1: row 4
    # (2 thoughts, padding after them on the right) feeds its last beside rows 1 and 3; passes 2 and 3:
    # rows 1 and 3 only, the last of them with nothing after it; then two decoding steps of all 5 rows
    assert exit_calls == [(5, 6), (5, 1), (3, 1), (2, 1), (2, 1), (5, 1), (5, 1)]
    assert len(exit_calls) == len(plain_calls)  # the exit added no call
    assert plain.thoughts_used.tolist() == [4, 4, 4, 4, 2]
    assert out.thoughts_used.tolist() == [1, 4, 1, 4, 2]
    for b, ((q, n), row) in enumerate(zip(shapes, rows)):
        used = int(out.thoughts_used[b])
        alone = model.generate(torch.tensor([row[: q + used]]), max_new_tokens=3)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert out.forward_passes[b] == alone.forward_passes[0]


def test_a_row_whose_prompt_goes_on_before_the_last_pass_gets_a_call_for_its_rest(setup):
    """Latent counts 1, 4, 2, 4 with end markers: the 1- and 2-thought rows have their end marker (and, left
    padded, nothing after) before the last pass's column, so each runs its rest from that marker on, in a
    call of its own; every row still equals itself alone."""
    model, _ = setup
    rng = random.Random(6)
    shapes = [(6, 1), (6, 4), (6, 2), (6, 4)]
    rows = [prompt(rng, q, n) for q, n in shapes]
    ids, mask = pad(rows, "right")
    calls, handle = _record_calls(model)
    try:
        out = model.generate(ids, mask, max_new_tokens=3, controller=StopAfter([-1, -1, -1, 3]))
    finally:
        handle.remove()
    # prefix; pass 0 (all 4); pass 1 (rows 1-3; row 2's last); pass 2 (rows 1 and 3; row 3 stops after it);
    # rows 0 and 2 their end marker each (padding after it is never computed); then the last pass with
    # row 1's end marker, which row 3 joins (its end marker is after the last column)
    prompt_calls = calls[: len(calls) - 2]
    assert sorted(prompt_calls) == sorted([(4, 7), (4, 1), (3, 1), (2, 1), (1, 1), (1, 1), (2, 2)])
    assert out.thoughts_used.tolist() == [1, 4, 2, 3]
    for b, ((q, n), row) in enumerate(zip(shapes, rows)):
        used = int(out.thoughts_used[b])
        alone = model.generate(torch.tensor([row[: q + 1 + used] + row[q + 1 + n :]]), max_new_tokens=3)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert out.forward_passes[b] == alone.forward_passes[0]


def test_when_every_row_stops_early_its_skipped_slots_are_not_computed(setup):
    """Every row stops after its first of 4 thoughts: the last pass is not merged with the end marker (that
    call would compute the 3 masked slots between them); the end markers run in one call of their own."""
    model, _ = setup
    rng = random.Random(8)
    rows = [prompt(rng, 6, 4) for _ in range(5)]
    ids, mask = pad(rows, "left")
    calls, handle = _record_calls(model)
    try:
        out = model.generate(ids, mask, max_new_tokens=3, controller=StopAfter([1] * 5))
    finally:
        handle.remove()
    assert calls[: len(calls) - 2] == [(5, 7), (5, 1), (5, 1)]  # prefix, thought 0, the end marker
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row[:8] + row[11:]]), max_new_tokens=3)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"


def test_compacted_passes_equal_the_masked_lockstep_passes(setup):
    model, rows = setup
    ids, mask = pad(rows, "left")
    stop_after = [1, -1, -1, 1, 2, 3]
    compact = model.generate(ids, mask, max_new_tokens=8, controller=StopAfter(stop_after), return_thoughts=True)
    lockstep = model.generate(ids, mask, max_new_tokens=8, controller=StopAfter(stop_after), return_thoughts=True,
                              sync_forward_passes=6 + 8 + 1)
    assert compact.sequences() == lockstep.sequences()
    assert compact.forward_passes.tolist() == lockstep.forward_passes.tolist()
    assert compact.thoughts_used.tolist() == lockstep.thoughts_used.tolist()
    for b, used in enumerate(compact.thoughts_used.tolist()):
        torch.testing.assert_close(compact.thoughts[b, :used], lockstep.thoughts[b, :used], rtol=1e-4, atol=1e-5)


def test_forward_takes_the_same_controller_and_feeds_what_generation_feeds(setup):
    model, rows = setup
    ids, mask = pad(rows, "right")
    from noblankslate.model.latent import align_prompts

    generated = model.generate(ids, mask, max_new_tokens=2, controller=Nudge(), return_thoughts=True)
    aligned = align_prompts(ids, mask, model.latent_token_id, model.eos_token_id)  # the forward's layout
    ids, positions = aligned.input_ids, aligned.position_ids
    mask = aligned.attention_mask
    plain = model(ids, mask.clone(), position_ids=positions.clone())
    out = model(ids, mask.clone(), position_ids=positions.clone(), controller=Nudge())
    latent = ids == model.latent_token_id
    assert not torch.allclose(out.inputs_embeds[latent], plain.inputs_embeds[latent])
    for b, (_, n) in enumerate(ROWS):
        fed = out.inputs_embeds[b][latent[b]]  # (n, D) the thoughts the forward fed
        torch.testing.assert_close(fed, generated.thoughts[b, :n], rtol=1e-4, atol=1e-5)
    # gradients reach the parameters through the controller's output
    weight = torch.nn.Parameter(torch.tensor(0.5))
    out = model(ids, mask.clone(), position_ids=positions.clone(),
                controller=lambda i, t, th: (t * weight, torch.zeros_like(th)))
    out.logits.sum().backward()
    assert weight.grad is not None and weight.grad != 0


@pytest.mark.parametrize("markers", [False, True])
def test_forward_of_a_row_that_stops_scores_its_answer_as_the_row_alone(setup, markers):
    """The forward with a stopping controller: each row's loss on its answer (the tokens after its slots)
    equals the loss of the row alone with the thoughts it used. Without latent markers the first answer
    token is predicted at the last used slot, not at the skipped last slot (whose output is noise)."""
    from test_generate import END, START, WORDS

    model, _ = setup
    rng = random.Random(9)
    shapes = [(5, 4), (5, 4), (5, 3)]  # (question length, latent count): the slots start in one column
    stop_after = [2, -1, 1]
    before, after = ([START], [END]) if markers else ([], [])
    questions = [[rng.choice(WORDS) for _ in range(q)] for q, _ in shapes]
    answers = [[rng.choice(WORDS) for _ in range(3)] for _ in shapes]
    rows = [qs + before + [LATENT] * n + after + ans for qs, (_, n), ans in zip(questions, shapes, answers)]
    ids, mask = pad(rows, "right")
    labels = torch.full_like(ids, -100)
    for b, row in enumerate(rows):
        labels[b, len(row) - 3 : len(row)] = ids[b, len(row) - 3 : len(row)]
    with torch.no_grad():
        out = model(ids, mask.clone(), labels=labels, controller=StopAfter(stop_after), reduction="sum")
        total = 0.0
        for b, ((q, n), stop) in enumerate(zip(shapes, stop_after)):
            used = n if stop < 0 else stop
            alone = questions[b] + before + [LATENT] * used + after + answers[b]
            alone_labels = torch.full((1, len(alone)), -100)
            alone_labels[0, -3:] = torch.tensor(answers[b])
            total += float(model(torch.tensor([alone]), torch.ones(1, len(alone), dtype=torch.long),
                                 labels=alone_labels, reduction="sum").loss)
    assert float(out.loss) == pytest.approx(total, rel=1e-4)


def test_evaluation_reads_a_record_only_from_controllers_that_keep_one():
    from types import SimpleNamespace

    from noblankslate.eval.evaluate import take_batch_record

    def plain(step, thought, thinking):  # an intervention: no record attribute at all
        return thought, torch.zeros_like(thinking)

    assert take_batch_record(plain) is None and take_batch_record(None) is None
    recorder = SimpleNamespace(record=SimpleNamespace(rows=lambda: [{"hit": True}, {"hit": False}]))
    assert take_batch_record(recorder) == [{"hit": True}, {"hit": False}]
    assert recorder.record is None  # cleared for the next batch
    assert take_batch_record(recorder) is None


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lockstep", [False, True])
def test_without_markers_a_row_that_stops_answers_from_its_last_thought(setup, side, lockstep):
    """``latent_markers: false``: the prompt ends with its latent slots, so a row that stops early must read
    its first answer token at its last *used* slot, as the row alone with fewer thoughts does (the last
    column of its prompt is then a skipped slot, whose output is noise)."""
    model, _ = setup
    rng = random.Random(7)
    shapes = [(7, 4), (5, 4), (9, 2), (6, 4), (8, 3)]  # (question length, latent count)
    from test_generate import WORDS

    rows = [[rng.choice(WORDS) for _ in range(q)] + [LATENT] * n for q, n in shapes]
    ids, mask = pad(rows, side)
    stop_after = [1, 2, -1, 3, 1]  # rows 0, 1, 3 and 4 stop before their last thought
    extra = {"sync_forward_passes": 4 + 8 + 1} if lockstep else {}
    out = model.generate(ids, mask, max_new_tokens=8, controller=StopAfter(stop_after), **extra)
    stopped_at_full = model.generate(ids, mask, max_new_tokens=8, **extra)
    for b, ((q, n), stop) in enumerate(zip(shapes, stop_after)):
        used = n if stop < 0 else stop
        assert out.thoughts_used[b] == used
        alone = model.generate(torch.tensor([rows[b][: q + used]]), max_new_tokens=8)
        assert out.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert out.forward_passes[b] == alone.forward_passes[0]
    assert out.sequences()[2] == stopped_at_full.sequences()[2]  # the row that did not stop is unchanged
