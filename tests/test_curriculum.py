"""Every branch of the curriculum, against sequences written out by hand."""

import dataclasses

import pytest

from noblankslate.config import Config
from noblankslate.data.curriculum import (
    CurriculumSpec,
    draw_stages,
    prompt_view,
    stage_for_epoch,
    training_features,
    training_view,
    validation_loss_view,
)
from noblankslate.data.tokenize import TokenizedExample

S, E, L = 100, 101, 102  # <|start-latent|>, <|end-latent|>, <|latent|>
X = -100
IDS = type("Ids", (), {"start_id": S, "end_id": E, "latent_id": L})()

# question (1, 2); steps (3, 4), (5,), (6, 7); answer (8, eos=0)
THREE = TokenizedExample(idx=5, question_ids=(1, 2), step_ids=((3, 4), (5,), (6, 7)), answer_ids=(8, 0))
ONE = TokenizedExample(idx=6, question_ids=(1,), step_ids=((3, 4),), answer_ids=(8, 0))


def spec(**changes) -> CurriculumSpec:
    base = CurriculumSpec(
        c_thought=1, max_latent_stage=3, pad_latent_to_max=False, uniform_prob=0.0, no_cot=False,
        use_markers=True, start_id=S, end_id=E, latent_id=L,
    )
    return dataclasses.replace(base, **changes)


def features(example, stage, s):
    f = training_features(example, stage, s)
    assert len(f["labels"]) == len(f["input_ids"])
    assert f["attention_mask"] == [1] * len(f["input_ids"])
    assert f["position_ids"] == list(range(len(f["input_ids"])))
    assert f["idx"] == example.idx
    return f["input_ids"], f["labels"]


def test_stage_0_keeps_every_step_between_empty_markers():
    assert features(THREE, 0, spec()) == (
        [1, 2, S, E, 3, 4, 5, 6, 7, 8, 0],
        [X, X, X, X, 3, 4, 5, 6, 7, 8, 0],
    )


def test_stage_within_range_replaces_leading_steps():
    assert features(THREE, 2, spec()) == (
        [1, 2, S, L, L, E, 6, 7, 8, 0],
        [X, X, X, X, X, X, 6, 7, 8, 0],
    )


def test_stage_past_the_steps_but_within_max_adds_stage_thoughts():
    # The original removes min(stage, n_steps) steps but still adds `stage` thoughts.
    assert features(ONE, 3, spec(max_latent_stage=4)) == (
        [1, S, L, L, L, E, 8, 0],
        [X, X, X, X, X, X, 8, 0],
    )


def test_past_max_stage_removes_all_steps_capped_by_chain_length():
    assert features(THREE, 4, spec(max_latent_stage=2)) == ([1, 2, S, L, L, E, 8, 0], [X, X, X, X, X, X, 8, 0])
    assert features(ONE, 3, spec(max_latent_stage=2)) == ([1, S, L, E, 8, 0], [X, X, X, X, 8, 0])


def test_past_max_stage_with_pad_latent_to_max():
    assert features(ONE, 3, spec(max_latent_stage=2, pad_latent_to_max=True)) == (
        [1, S, L, L, E, 8, 0],
        [X, X, X, X, X, 8, 0],
    )


def test_c_thought_2_doubles_the_thoughts():
    assert features(THREE, 1, spec(c_thought=2)) == (
        [1, 2, S, L, L, E, 5, 6, 7, 8, 0],
        [X, X, X, X, X, X, 5, 6, 7, 8, 0],
    )


def test_no_cot_answers_directly_at_any_stage():
    s = CurriculumSpec.from_config(Config(no_cot=True, max_latent_stage=3), IDS)
    assert (s.no_cot, s.use_markers) == (True, False)
    for stage in (0, 2, 5):
        assert features(THREE, stage, s) == ([1, 2, 8, 0], [X, X, 8, 0])


def test_no_thoughts_removes_steps_without_thoughts_or_markers():
    s = CurriculumSpec.from_config(Config(no_thoughts=True, c_thought=2, max_latent_stage=3), IDS)
    assert (s.c_thought, s.use_markers, s.no_cot) == (0, False, False)
    assert features(THREE, 2, s) == ([1, 2, 6, 7, 8, 0], [X, X, 6, 7, 8, 0])
    assert stage_for_epoch(5, 2, "no_thoughts") == 2


def test_cot_is_stage_0_without_markers():
    s = CurriculumSpec.from_config(Config(cot=True, max_latent_stage=3), IDS)
    assert s.use_markers is False
    stage = stage_for_epoch(7, 1, "cot")
    assert stage == 0
    assert features(THREE, stage, s) == ([1, 2, 3, 4, 5, 6, 7, 8, 0], [X, X, 3, 4, 5, 6, 7, 8, 0])


def test_coconut_spec_and_schedule():
    config = Config(coconut=True, c_thought=2, max_latent_stage=3, pad_latent_to_max=True, uniform_prob=0.3)
    assert CurriculumSpec.from_config(config, IDS) == spec(c_thought=2, pad_latent_to_max=True, uniform_prob=0.3)
    assert [stage_for_epoch(e, 2, "coconut") for e in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert [stage_for_epoch(e, 2, "no_cot") for e in range(3)] == [0, 0, 0]


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="uniform_prob"):
        spec(uniform_prob=1.5)
    with pytest.raises(ValueError, match="markers without latent slots"):
        spec(latent_slots=False)


def test_coconut_without_markers_puts_the_thoughts_right_after_the_question():
    s = CurriculumSpec.from_config(Config(coconut=True, max_latent_stage=3, latent_markers=False), IDS)
    assert (s.use_markers, s.latent_slots) == (False, True)
    assert features(THREE, 0, s) == ([1, 2, 3, 4, 5, 6, 7, 8, 0], [X, X, 3, 4, 5, 6, 7, 8, 0])
    assert features(THREE, 2, s) == ([1, 2, L, L, 6, 7, 8, 0], [X, X, X, X, 6, 7, 8, 0])
    assert prompt(THREE, 2, s) == [1, 2, L, L] and prompt(THREE, 0, s) == [1, 2]
    cot = CurriculumSpec.from_config(Config(cot=True, latent_markers=False), IDS)
    assert (cot.use_markers, cot.latent_slots) == (False, False)
    assert CurriculumSpec.from_config(Config(coconut=True), IDS).latent_slots is True


MANY = [THREE, ONE] * 30


def test_uniform_prob_is_reproducible_per_seed_and_epoch():
    s = spec(uniform_prob=0.5)
    assert training_view(MANY, 1, s, seed=0, epoch=3) == training_view(MANY, 1, s, seed=0, epoch=3)
    counts = [e.n_steps for e in MANY]
    assert draw_stages(counts, 1, 0.5, seed=0, epoch=3) != draw_stages(counts, 1, 0.5, seed=0, epoch=4)
    assert draw_stages(counts, 1, 0.5, seed=0, epoch=3) != draw_stages(counts, 1, 0.5, seed=1, epoch=3)


def test_uniform_prob_view_matches_its_drawn_stages():
    s = spec(uniform_prob=0.5)
    stages = draw_stages([e.n_steps for e in MANY], 1, 0.5, seed=2, epoch=0)
    assert 1 in stages and set(stages) != {1}
    assert training_view(MANY, 1, s, seed=2, epoch=0) == [training_features(e, t, s) for e, t in zip(MANY, stages)]


def test_uniform_prob_1_draws_every_stage_in_range():
    stages = draw_stages([e.n_steps for e in MANY], 9, 1.0, seed=0, epoch=0)
    assert set(stages[0::2]) == {0, 1, 2, 3}  # THREE: range(3 + 1)
    assert set(stages[1::2]) == {0, 1}  # ONE: range(1 + 1)


def test_uniform_prob_0_is_the_scheduled_stage():
    assert draw_stages([3, 1, 0], 2, 0.0, seed=0, epoch=0) == [2, 2, 2]
    assert training_view([THREE], 2, spec(), seed=0, epoch=0) == [training_features(THREE, 2, spec())]


def test_validation_loss_view_mixes_stages_with_its_own_draws():
    s = spec(uniform_prob=1.0)
    train = training_view(MANY, 0, s, seed=0, epoch=0)
    valid = validation_loss_view(MANY, 0, s, seed=0, epoch=0)
    assert valid != train
    assert valid == validation_loss_view(MANY, 0, s, seed=0, epoch=0)
    assert validation_loss_view(MANY, 2, spec(), seed=0, epoch=0) == training_view(MANY, 2, spec(), seed=0, epoch=0)


def prompt(example, stage, s):
    [f] = prompt_view([example], stage, s)
    assert "labels" not in f
    assert f["attention_mask"] == [1] * len(f["input_ids"])
    assert f["position_ids"] == list(range(len(f["input_ids"])))
    assert f["idx"] == example.idx
    return f["input_ids"]


def test_prompts_end_after_end_latent():
    assert prompt(THREE, 0, spec()) == [1, 2, S, E]
    assert prompt(THREE, 2, spec()) == [1, 2, S, L, L, E]
    assert prompt(THREE, 2, spec(c_thought=2)) == [1, 2, S, L, L, L, L, E]


def test_prompt_thoughts_capped_by_steps_unless_padded():
    assert prompt(THREE, 5, spec(max_latent_stage=6)) == [1, 2, S, L, L, L, E]
    assert prompt(THREE, 5, spec(max_latent_stage=6, pad_latent_to_max=True)) == [1, 2, S] + [L] * 5 + [E]
    assert prompt(THREE, 5, spec(max_latent_stage=2)) == [1, 2, S, L, L, E]
    assert prompt(ONE, 3, spec(max_latent_stage=2, pad_latent_to_max=True)) == [1, S, L, L, E]
    assert prompt(ONE, 3, spec(max_latent_stage=2)) == [1, S, L, E]


def test_prompts_without_markers_are_the_question():
    s = CurriculumSpec.from_config(Config(cot=True), IDS)
    assert prompt(THREE, 0, s) == [1, 2]
    s = CurriculumSpec.from_config(Config(no_thoughts=True, max_latent_stage=3), IDS)
    assert prompt(THREE, 2, s) == [1, 2]
