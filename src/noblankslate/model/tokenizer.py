"""Tokenizers: the pretrained one of a run, and a small word-level one built from texts.

The word-level tokenizer exists for tests and for from-scratch demo models, where no hub is reachable.
It pre-tokenizes exactly like GPT-2 (byte-level alphabet, GPT-2's split regex, a leading space kept on
the word it precedes) but maps each whole piece to one id instead of running BPE. That makes it
reversible (decoding concatenates the pieces and undoes the byte-level mapping) and makes Coconut's
tokenize-the-parts-separately check hold for the same texts as it does for GPT-2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"

_SPACE = "\u0120"  # byte-level alphabet: " " -> "Ġ"
_NEWLINE = "\u010a"  # byte-level alphabet: "\n" -> "Ċ"


def _pre_tokenizer() -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _space_variant(piece: str) -> str | None:
    """The same word with the leading space toggled, so "42" in a text also yields " 42" ("### 42")."""
    if piece.startswith(_SPACE):
        rest = piece[len(_SPACE):]
        return rest if rest and not rest.isspace() else None
    return _SPACE + piece


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every GPT-2 pre-token piece of ``texts``.

    Every piece is also added with its leading space toggled, because Coconut tokenizes answers as
    ``"### " + answer`` and steps after a newline, so a word seen in one position is needed in the other.
    ``"\\n"`` and ``" "`` are always in the vocabulary. Ids are ordered by descending frequency, ties by
    the piece, so the same texts always give the same ids.

    Like GPT-2: ``<|endoftext|>`` is the eos token (and the pad token, as the original sets pad = eos),
    and ``add_special_tokens=True`` adds nothing. Unlike GPT-2 there is an unk token: a piece absent from
    ``texts`` encodes to ``<unk>``, so ``decode(encode(t)) == t`` holds for texts made of known pieces.

    Args:
        texts: the corpus; each string is pre-tokenized once.

    Returns:
        A fast tokenizer with ``padding_side="right"``.
    """
    splitter = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    for piece in list(counts):
        if not piece.replace(_SPACE, "").replace(_NEWLINE, "").strip():
            continue  # whitespace-only pieces need no variant
        variant = _space_variant(piece)
        if variant is not None and variant not in counts:
            counts[variant] = 0
    for piece in (_NEWLINE, _SPACE):
        counts.setdefault(piece, 0)

    specials = [EOS_TOKEN, UNK_TOKEN]
    ordered = sorted((p for p in counts if p not in specials), key=lambda p: (-counts[p], p))
    vocab = {token: i for i, token in enumerate(specials + ordered)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
    )
    return tokenizer


def load_tokenizer(model_id_or_dir: str | Path) -> PreTrainedTokenizerBase:
    """The run's tokenizer, with pad = eos as the original (GPT-2 and Llama have no pad token).

    The original's collator only right-pads, so ``padding_side`` is forced to ``"right"``.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(model_id_or_dir))
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer of {model_id_or_dir} has no eos token; Coconut ends every answer with eos")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
