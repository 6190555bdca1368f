"""tools/exit_score_study.py: the threshold rule, the labels, the features, cross-fitting and the study on
hand-made splits whose answers are known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "exit_score_study.py"
    spec = importlib.util.spec_from_file_location("exit_score_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_threshold_rule_allows_exactly_the_allowed_loss(tool):
    curve = [{"threshold": 0.9, "accuracy": 0.958, "mean_thoughts": 2.0},
             {"threshold": 0.95, "accuracy": 0.959, "mean_thoughts": 2.5},
             {"threshold": 0.99, "accuracy": 0.964, "mean_thoughts": 3.5},
             {"threshold": None, "accuracy": 0.964, "mean_thoughts": 4.0}]
    assert tool.choose_threshold(curve, 0.005) == 0.95  # 5 of 1,000 lost is allowed, 6 is not
    assert tool.choose_threshold(curve, 0.0) == 0.99
    assert tool.choose_threshold([curve[0], curve[-1]], 0.005) is None  # nothing qualifies: no exit


def test_agreement_labels_compare_with_the_full_length_answer_not_the_gold_one(tool):
    split = tool.Split(thoughts=[np.zeros((3, 2)), np.zeros((2, 2))],
                       right=[[False, True, False], [True, True]],
                       answers=[["a", "b", "a"], ["c", "c"]])
    assert split.labels("right") == [[False, True, False], [True, True]]
    assert split.labels("agree") == [[True, False, True], [True, True]]
    assert split.plain() == [False, True]
    assert tool.oracle_thoughts(split) == (2 + 1) / 2


def test_step_features_add_the_change_from_the_previous_thought_and_the_index(tool):
    thoughts = np.array([[1.0, 2.0], [4.0, 6.0], [4.0, 7.0]], dtype=np.float32)
    features = tool.features_of(thoughts, "thought+step")
    np.testing.assert_array_equal(features[:, :2], thoughts)
    np.testing.assert_array_equal(features[:, 2:4], [[0, 0], [3, 4], [0, 1]])
    np.testing.assert_array_equal(features[:, 4:], np.eye(3))
    readout = tool.features_of(thoughts, "thought+readout", readout=lambda t: t.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(readout[:, 2], [3, 10, 11])


def test_cross_fitting_calibrates_on_items_the_weights_never_saw(tool):
    """Features that name the item and a label that is a coin flip per item: the weights memorise the items,
    so logits of the items fitted on are extreme. Calibrated on the folds' held-out items (logit ~ the bias),
    the probabilities stay near the base rate. A fold that split an item's samples would let the weights
    see the held-out item and the calibration would be as extreme as the fit."""
    rng = np.random.default_rng(0)
    items, per_item = 60, 4
    owner = np.repeat(np.arange(items), per_item)
    x = np.eye(items, dtype=np.float32)[owner] + 0.01 * rng.standard_normal((items * per_item, items)).astype(np.float32)
    y = rng.integers(0, 2, items).astype(np.float32)[owner]
    probe = tool.cross_fitted(x, y, owner, extra=None, seed=0)
    p = probe.probability(torch.as_tensor(x), 0).numpy()
    assert np.all((p > 0.2) & (p < 0.8)), p.min()
    leaky = tool.fit_exit_probe(x, y, x, y, "platt")  # calibrated on the samples it was fitted on
    q = leaky.probability(torch.as_tensor(x), 0).numpy()
    assert q[y == 1].min() > 0.9 and q[y == 0].max() < 0.1


def _split(rng, items: int, thoughts: int = 4) -> tuple[list, list, list]:
    """Items right from a random thought count on (and wrong before it); thought j's first feature says
    whether thinking ending there is right, so a probe can exit exactly where the oracle does."""
    right, features, answers = [], [], []
    for _ in range(items):
        first = int(rng.integers(0, thoughts))
        ok = [j >= first for j in range(thoughts)]
        t = rng.standard_normal((thoughts, 3)).astype(np.float32) * 0.1
        t[:, 0] += np.array(ok, dtype=np.float32) * 4
        right.append(ok)
        features.append(t)
        answers.append(["x" if o else "y" for o in ok])
    return right, features, answers


def test_the_study_finds_the_oracles_exit_when_the_thought_says_it(tool):
    rng = np.random.default_rng(1)
    splits = {}
    for name, n in (("build", 200), ("calibration", 150), ("tune", 150), ("valid", 150)):
        right, thoughts, answers = _split(rng, n)
        splits[name] = tool.Split(thoughts, right, answers)
    results = tool.study(splits, readout=lambda t: t[:, :1], max_loss=0.005, seed=0)
    assert len(results) == len(tool.LABELS) * len(tool.FEATURES) * len(tool.FITS)
    oracle = 1 - tool.oracle_thoughts(splits["valid"]) / 4
    for r in results:
        assert r["chosen_on"] == "tune" and r["threshold"] is not None
        v = r["valid"]
        assert v["paired_vs_plain"]["difference"] == 0 and v["paired_vs_plain"]["n"] == 150
        assert v["thought_passes_saved"] == pytest.approx(oracle, abs=1e-9), (r["label"], r["features"], r["fitted_on"])
        assert r["valid_bound"]["thought_passes_saved"] == pytest.approx(oracle, abs=1e-9)
        assert v["ece"] < 0.05
