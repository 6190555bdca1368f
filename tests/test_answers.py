"""How generated text is scored (noblankslate.eval.answers): the answer after the last '#', the chain before
the first, as the original scores them, and the chain's lines compared stripped."""

from __future__ import annotations

from noblankslate.eval.answers import extract_answer, extract_cot, normalize_answer, reference_cot


def test_the_answer_is_the_text_after_the_last_hash_without_commas():
    assert extract_answer("Tom is a wumpus.\n### Tom is a zumpus.") == "Tom is a zumpus."
    assert extract_answer("<<2*3=6>>\n### 1,200") == "1200"
    assert extract_answer("a # b ### c") == "c"
    assert extract_answer("no answer here") is None
    assert normalize_answer(" 1,200 ") == "1200"


def test_the_chain_is_the_text_before_the_first_hash():
    steps = ["Tom is a wumpus.", "Every wumpus is a zumpus."]
    assert extract_cot("Tom is a wumpus.\nEvery wumpus is a zumpus.\n### Tom is a zumpus.") == reference_cot(steps)
    assert extract_cot("Tom is a wumpus.\n### Tom is a zumpus.") != reference_cot(steps)


def test_steps_that_begin_with_a_space_match_their_generated_lines():
    """Symbolic steps (" 14") are generated after a newline as " 14"; the line-wise strip matches them."""
    assert extract_cot(" 14\n 24\n 15\n### 15") == reference_cot([" 14", " 24", " 15"]) == "14\n24\n15"
    assert extract_cot(" 14\n 15\n### 15") != reference_cot([" 14", " 24", " 15"])
