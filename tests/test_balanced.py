"""The balanced ProsQA task: valid records, and no shortcut that looks fewer hops away than the distance."""

import pytest

from noblankslate.data.balanced import (
    BalancedConfig,
    generate_balanced,
    rule_accuracy,
    shortcut_accuracies,
)
from noblankslate.data.prosqa import ProsQAConfig, check_prosqa_example, generate_prosqa


@pytest.mark.parametrize("branches,distance", [((2, 2), (3, 4)), ((1, 3), (1, 5)), ((3, 3), (4, 4))])
def test_examples_pass_the_prosqa_checker(branches, distance):
    examples = generate_balanced(300, seed=5, config=BalancedConfig(branches=branches, distance=distance))
    for ex in examples:
        assert check_prosqa_example(ex, min_distance=distance[0], max_distance=distance[1]) == []
        assert len(ex["steps"]) in range(distance[0], distance[1] + 1)
    assert {len(ex["steps"]) for ex in examples} == set(range(distance[0], distance[1] + 1))


def test_both_sides_have_the_same_shape():
    for ex in generate_balanced(200, seed=1, config=BalancedConfig(branches=(2, 3), distance=(2, 4))):
        children = {}
        for a, b in ex["edges"]:
            children.setdefault(a, []).append(b)
        def depths(person):
            leaves, frontier, depth = [], [person], 0
            while frontier:
                nxt = [c for v in frontier for c in children.get(v, [])]
                leaves += [depth] * sum(1 for v in frontier if v not in children)
                frontier, depth = nxt, depth + 1
            return sorted(leaves)
        assert depths(0) == depths(1) == [len(ex["steps"])] * len(children[0])


def test_one_hop_rules_score_chance_on_balanced_data():
    examples = generate_balanced(3000, seed=2)
    found = shortcut_accuracies(examples)
    assert len(found["one_hop"]) >= 20
    for name, accuracy in found["one_hop"].items():
        assert abs(accuracy - 0.5) < 0.04, (name, accuracy)  # 3000 items: 2 standard errors ~ 0.018
    # Looking h hops up decides only the examples whose distance is at most h.
    share_3 = sum(len(e["steps"]) == 3 for e in examples) / len(examples)
    assert found["within_hops"][2] == 0.5
    assert found["within_hops"][3] == pytest.approx(0.5 + share_3 / 2)
    assert found["within_hops"][4] == 1.0


def test_the_same_rules_find_the_shortcut_of_the_demo_task():
    # Control: the rule set is able to see a shortcut where there is one (docs/demo.md: 88.75%).
    demo = generate_prosqa(1000, seed=1, config=ProsQAConfig.small(concepts=(3, 5), distance=(2, 2)))
    found = shortcut_accuracies(demo, max_hops=2)
    assert found["best_one_hop"]["accuracy"] > 0.8
    assert found["within_hops"][2] == 1.0


def test_ties_count_half():
    examples = generate_balanced(10, seed=0)
    assert rule_accuracy(examples, lambda ex, option: 0.0) == 0.5
    assert rule_accuracy(examples, lambda ex, option: float(option == ex["target"])) == 1.0


def test_seed_determinism_and_exclusion():
    a, b = generate_balanced(50, seed=7), generate_balanced(50, seed=7)
    assert a == b
    assert generate_balanced(50, seed=8) != a
    held_out = generate_balanced(50, seed=7, exclude_questions={e["question"] for e in a[:25]})
    assert not {e["question"] for e in held_out} & {e["question"] for e in a[:25]}
    assert len({e["question"] for e in a}) == 50


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="branches"):
        BalancedConfig(branches=(0, 2))
    with pytest.raises(ValueError, match="concept names"):
        BalancedConfig(branches=(5, 5), distance=(4, 4))
