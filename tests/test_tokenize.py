"""The word-level tokenizer and Coconut's tokenize-in-parts step."""

import pytest

from noblankslate.data.schema import Example, load_examples
from noblankslate.data.tokenize import (
    TokenizationMismatchError,
    TokenizedExample,
    full_text,
    tokenize_examples,
)
from noblankslate.model.tokenizer import (
    EOS_TOKEN,
    UNK_TOKEN,
    build_word_tokenizer,
    load_tokenizer,
)

ROUND_TRIP = [
    "Tom is a wumpus.\n",
    "### 42",
    "<<3*4=12>>",
    "Every terpus is a brimpus. Is Tom a lempus or scrompus?\n",
    "a  b\n\n c\n",
    "$1,000.50 (net) -- 3.5%!",
    "naïve café",
    "\n",
]


def parts(example: Example) -> list[str]:
    """The strings Coconut tokenizes, so a tokenizer built from them knows every piece."""
    return [example.question + "\n", *(s + "\n" for s in example.steps), "### " + example.answer]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(ROUND_TRIP)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_round_trip_of_known_words_in_new_positions(tok):
    # "42" was only seen after a space and "Tom" only at the start: both space variants are in the vocab.
    text = "42 Tom is 12.\n### Tom"
    assert tok.unk_token_id not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_pieces_are_gpt2_pre_tokens(tok):
    ids = tok.encode("Tom is a wumpus.\n")
    assert tok.convert_ids_to_tokens(ids) == ["Tom", "Ġis", "Ġa", "Ġwumpus", ".", "Ċ"]
    assert tok.convert_ids_to_tokens(tok.encode("<<3*4=12>>")) == ["<<", "3", "*", "4", "=", "12", ">>"]


def test_newline_is_its_own_token(tok):
    newline = tok.encode("\n")
    assert len(newline) == 1
    assert tok.encode("Tom\nTom") == tok.encode("Tom") + newline + tok.encode("Tom")
    assert tok.encode("\n\n### 42")[:2] == newline * 2


def test_special_tokens_like_gpt2(tok):
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.unk_token == UNK_TOKEN and tok.unk_token_id != tok.eos_token_id
    assert tok.encode("Tom is", add_special_tokens=True) == tok.encode("Tom is", add_special_tokens=False)
    assert tok.encode("Tom zorblax")[-1] == tok.unk_token_id
    assert tok.padding_side == "right"


def test_same_texts_same_ids():
    assert build_word_tokenizer(ROUND_TRIP).get_vocab() == build_word_tokenizer(list(ROUND_TRIP)).get_vocab()


def test_load_tokenizer_from_saved_folder(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eos_token_id
    assert loaded.encode(ROUND_TRIP[0]) == tok.encode(ROUND_TRIP[0])


EXAMPLE = Example(idx=7, question="Tom is a wumpus.", answer="Tom is a wumpus.", steps=("Tom is 12.", "Tom is 42."))


def test_tokenize_parts_exactly():
    tok = build_word_tokenizer(parts(EXAMPLE))
    [out] = tokenize_examples([EXAMPLE], tok)
    ids = tok.convert_tokens_to_ids
    assert out == TokenizedExample(
        idx=7,
        question_ids=tuple(ids(["Tom", "Ġis", "Ġa", "Ġwumpus", ".", "Ċ"])),
        step_ids=(tuple(ids(["Tom", "Ġis", "Ġ12", ".", "Ċ"])), tuple(ids(["Tom", "Ġis", "Ġ42", ".", "Ċ"]))),
        answer_ids=tuple(ids(["###", "ĠTom", "Ġis", "Ġa", "Ġwumpus", "."])) + (tok.eos_token_id,),
    )
    assert out.full_ids() == tok.encode(full_text(EXAMPLE)) + [tok.eos_token_id]


def test_empty_step_is_a_newline_and_no_steps_is_nothing():
    blank = Example(idx=0, question="Tom is 12.", answer="12", steps=("",))
    none = Example(idx=1, question="Tom is 42.", answer="42", steps=())
    tok = build_word_tokenizer(parts(blank) + parts(none))
    a, b = tokenize_examples([blank, none], tok, n_check=2)
    assert a.step_ids == (tuple(tok.encode("\n")),)
    assert b.step_ids == ()
    assert b.full_ids() == tok.encode("Tom is 42.\n### 42") + [tok.eos_token_id]


def test_batched_equals_per_example_encode(shared_data):
    examples = load_examples(shared_data / "gsm_valid.json", limit=60) + load_examples(
        shared_data / "prosqa_valid.json", limit=20
    )
    tok = build_word_tokenizer(text for e in examples for text in parts(e))
    out = tokenize_examples(examples, tok, n_check=len(examples))
    for example, t in zip(examples, out):
        assert t.idx == example.idx
        assert list(t.question_ids) == tok.encode(example.question + "\n", add_special_tokens=True)
        assert [list(s) for s in t.step_ids] == [tok.encode(s + "\n", add_special_tokens=False) for s in example.steps]
        assert list(t.answer_ids) == tok.encode("### " + example.answer, add_special_tokens=False) + [tok.eos_token_id]
        assert tok.unk_token_id not in t.full_ids()


def test_mismatch_is_named():
    # GPT-2's regex keeps " \n" together at the end of a text but splits it before a word, so a question
    # with a trailing space tokenizes differently alone than inside the whole text.
    example = Example(idx=3, question="Is Tom a wumpus? ", answer="yes", steps=("Tom is a wumpus.",))
    tok = build_word_tokenizer(parts(example))
    with pytest.raises(TokenizationMismatchError, match="example 3 differently.*token 5"):
        tokenize_examples([example], tok)


def test_every_example_is_checked_by_default():
    good = Example(idx=0, question="Tom is a wumpus.", answer="yes", steps=("Tom.",))
    bad = Example(idx=1, question="Is Tom a wumpus? ", answer="yes", steps=("Tom.",))
    worse = Example(idx=2, question="Is Tom a tumpus? ", answer="yes", steps=("Tom.",))
    tok = build_word_tokenizer(parts(good) + parts(bad) + parts(worse))
    with pytest.raises(TokenizationMismatchError, match=r"example 1 differently.*\(1 more records"):
        tokenize_examples([good, bad, worse], tok)
    assert len(tokenize_examples([good, bad], tok, n_check=1)) == 2  # the original's check of the first only
