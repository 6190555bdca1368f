"""Generation's preallocated decoding cache: the same tokens as the growing cache, written in place."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import MODEL_FACTORIES, wrap
from test_generate import ROWS, pad, prompt
from transformers import DynamicCache

from noblankslate.model.coconut import (
    Sampling,
    _cache_keyword,
    _greedy,
    _merge_rows,
    _preallocate,
    _PreallocatedLayer,
    _select_rows,
)


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
def test_preallocated_decoding_gives_exactly_the_tokens_of_the_growing_cache(arch):
    model = wrap(MODEL_FACTORIES[arch]())
    rng = random.Random(5)
    ids, mask = pad([prompt(rng, q, n) for q, n in ROWS], "left")
    for sampling in (None, "seeded"):
        outs = []
        for preallocate in (True, False):
            draw = None if sampling is None else Sampling(temperature=1.5, top_k=20,
                                                          generator=torch.Generator().manual_seed(3))
            outs.append(model.generate(ids, mask, max_new_tokens=9, sampling=draw, preallocate=preallocate))
        fast, grown = outs
        assert torch.equal(fast.tokens, grown.tokens), sampling
        assert torch.equal(fast.lengths, grown.lengths) and torch.equal(fast.forward_passes, grown.forward_passes)


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
def test_every_base_decodes_into_preallocated_layers_written_in_place(arch):
    """If a base's cache were not converted (another layer kind), generation would silently stay slow."""
    base = MODEL_FACTORIES[arch]()
    keyword = _cache_keyword(base)
    cache, grown = DynamicCache(config=base.config), DynamicCache(config=base.config)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    base(input_ids=ids, use_cache=True, **{keyword: cache})
    base(input_ids=ids, use_cache=True, **{keyword: grown})
    fast = _preallocate(cache, extra=2)
    assert all(isinstance(layer, _PreallocatedLayer) for layer in fast.layers)
    buffers = [layer._key_buffer.data_ptr() for layer in fast.layers]
    positions = torch.tensor([[4], [4]])
    for step in range(3):  # two fit the buffers; the third grows past them as DynamicLayer would
        token = torch.tensor([[11 + step], [12 + step]])
        a = base(input_ids=token, position_ids=positions + step, use_cache=True, **{keyword: fast}).logits
        b = base(input_ids=token, position_ids=positions + step, use_cache=True, **{keyword: grown}).logits
        assert torch.equal(a, b), step
        for layer, reference in zip(fast.layers, grown.layers):
            assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
        if step < 2:
            assert [layer.keys.data_ptr() for layer in fast.layers] == buffers  # views of the buffers
    assert fast.get_seq_length() == 7


def test_greedy_takes_the_first_maximal_logit_like_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -0.5, -0.5]])
    assert _greedy(logits).tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 2]
    wide = torch.randn(16, 5000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_greedy(wide), wide.argmax(dim=-1))


def test_checking_for_the_end_less_often_changes_no_output():
    """Steps run after every row has finished (up to stop_check_every - 1 of them) leave every output as it was."""
    model = wrap(MODEL_FACTORIES["gpt2"]())
    rng = random.Random(1)
    rows = [prompt(rng, q, n) for q, n in ROWS]
    free = model.generate(*pad(rows, "right"), max_new_tokens=10).sequences()
    # an eos that several rows first produce at different steps (not the first); those rows make the batch
    first = {t: {b: row.index(t) for b, row in enumerate(free) if t in row and 1 <= row.index(t) < 9}
             for t in {t for row in free for t in row}}
    eos = max(first, key=lambda t: len(set(first[t].values())))
    assert len(set(first[eos].values())) >= 2, "rows should stop at different steps"
    model.eos_token_id = eos
    ids, mask = pad([rows[b] for b in first[eos]], "right")
    calls = []
    model.base_causallm.base_model.register_forward_hook(lambda *args: calls.append(1))
    runs = {}
    for every in (1, 4, 7):
        calls.clear()
        runs[every] = (model.generate(ids, mask, max_new_tokens=10, stop_check_every=every), len(calls))
    reference, forwards = runs[1]
    assert reference.lengths.tolist() == list(first[eos].values())  # each row stopped right before its eos
    for every, (out, count) in runs.items():
        assert torch.equal(out.tokens, reference.tokens) and torch.equal(out.lengths, reference.lengths)
        assert torch.equal(out.forward_passes, reference.forward_passes)
        assert forwards <= count < forwards + every
    assert runs[7][1] > forwards  # the check really came later
    synced = model.generate(ids, mask, max_new_tokens=10, sync_forward_passes=6 + 10, stop_check_every=4)
    assert torch.equal(synced.tokens, reference.tokens)
    with pytest.raises(ValueError, match="stop_check_every"):
        model.generate(ids, mask, stop_check_every=-1)


def _stop_rows(stop_after):
    """A controller that stops row b after stop_after[b] thoughts (-1: never)."""
    limits = torch.tensor(stop_after)
    return lambda step, thought, thinking: (thought, limits == step + 1)


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
def test_rows_that_exit_early_decode_the_same_with_the_merged_cache_preallocated(arch):
    """Rows leaving the thought passes at different steps are merged straight into the decoding buffers.

    Row 0 stops with fewer thoughts than row 4, so it has pads after its end: on GPT-2 (a learned position
    table) this once crashed, as closing the gap of skipped slots moved those pads to negative positions."""
    model = wrap(MODEL_FACTORIES[arch]())
    rng = random.Random(6)
    rows = [prompt(rng, q, n) for q, n in ROWS]
    ids, mask = pad(rows, "left")
    stops = [1, -1, 2, -1, 1]
    fast = model.generate(ids, mask, max_new_tokens=7, controller=_stop_rows(stops), preallocate=True)
    grown = model.generate(ids, mask, max_new_tokens=7, controller=_stop_rows(stops), preallocate=False)
    assert fast.thoughts_used.tolist() != [int(n) for n in fast.latent_counts]  # some rows did exit early
    assert torch.equal(fast.tokens, grown.tokens)
    assert torch.equal(fast.lengths, grown.lengths) and torch.equal(fast.forward_passes, grown.forward_passes)
    for b, ((question, _), row) in enumerate(zip(ROWS, rows)):  # each row as alone with the thoughts it used
        used, start = int(fast.thoughts_used[b]), question + 1
        alone = model.generate(torch.tensor([row[: start + used] + row[start + ROWS[b][1] :]]), max_new_tokens=7)
        assert fast.sequences()[b] == alone.sequences()[0], b


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
def test_merging_row_groups_with_decode_room_fills_preallocated_buffers_once(arch):
    base = MODEL_FACTORIES[arch]()
    cache = DynamicCache(config=base.config)
    base(input_ids=torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]]), use_cache=True, **{_cache_keyword(base): cache})
    first = torch.tensor([True, False, True])
    groups = [(torch.tensor([0, 2]), _select_rows(cache, first, base.config)),
              (torch.tensor([1]), _select_rows(cache, ~first, base.config))]
    plain = _merge_rows(groups, 3, base.config)
    roomy = _merge_rows(groups, 3, base.config, decode_room=4)
    for merged_layer, reference in zip(plain.layers, cache.layers):
        assert torch.equal(merged_layer.keys, reference.keys) and torch.equal(merged_layer.values, reference.values)
    for layer, reference in zip(roomy.layers, cache.layers):
        assert isinstance(layer, _PreallocatedLayer) and layer._key_buffer.shape[-2] == 3 + 4
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    assert _preallocate(roomy, 4) is roomy  # nothing left to copy
    assert roomy.get_seq_length() == 3


@pytest.mark.parametrize("decode_room", [None, 4])
def test_merging_a_shorter_row_group_fills_its_missing_positions_with_zeros(decode_room):
    """Rows that left the latent passes before their masked tail bring a shorter cache: the merge keeps
    their prefix and zeros the rest (uninitialised memory there could hold NaN, which a mask does not hide
    from the attention's weighted sum)."""
    base = MODEL_FACTORIES["llama"]()
    long, short = DynamicCache(config=base.config), DynamicCache(config=base.config)
    base(input_ids=torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]), use_cache=True, **{_cache_keyword(base): long})
    base(input_ids=torch.tensor([[11, 12]]), use_cache=True, **{_cache_keyword(base): short})
    merged = _merge_rows([(torch.tensor([0, 2]), long), (torch.tensor([1]), short)], 3, base.config,
                         decode_room=decode_room, length=4)
    assert merged.get_seq_length() == 4
    for layer, full, part in zip(merged.layers, long.layers, short.layers):
        assert torch.equal(layer.keys[[0, 2]], full.keys) and torch.equal(layer.values[[0, 2]], full.values)
        assert torch.equal(layer.keys[1, :, :2], part.keys[0]) and torch.equal(layer.values[1, :, :2], part.values[0])
        assert not layer.keys[1, :, 2:].any() and not layer.values[1, :, 2:].any()
