"""The fast multi-pass forward against a slow, obviously correct one (float32, GPT-2 and Llama)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import LATENT, MODEL_FACTORIES, ragged_batch, wrap


def oracle_forward(base, input_ids, attention_mask, labels, position_ids):
    """Recompute the whole sequence at every pass, no cache; fill thought i of each row from the full
    hidden states. Returns (loss, logits, inputs_embeds)."""
    embeds = base.get_input_embeddings()(input_ids)
    positions = [(row == LATENT).nonzero().flatten().tolist() for row in input_ids]
    for i in range(max(len(p) for p in positions)):
        hidden = base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True).hidden_states[-1]
        filled = embeds.clone()
        for b, latent_positions in enumerate(positions):
            if len(latent_positions) > i:
                p = latent_positions[i]
                filled[b, p] = hidden[b, p - 1]
        embeds = filled
    logits = base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return loss, logits, embeds


# (question length, latent count, answer length) per row: different latent counts, different question
# lengths, a row without thoughts, a row whose question is the longest.
RAGGED = [(7, 3, 4), (12, 0, 6), (4, 1, 2), (9, 2, 5)]


def assert_close_scaled(actual, expected, name):
    """float32 equality up to summation order: tolerance relative to the tensor's own scale.

    Summation-order noise through four serial thought passes reaches 3.5e-5 of a gradient's scale on
    Qwen2 (its q/k/v biases), 1e-5 on Llama; a wrong thought or mask moves values by far more than 1e-4.
    """
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(scale, 1e-6), msg=name)


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
@pytest.mark.parametrize("shapes", [RAGGED, [(5, 4, 3)], [(6, 0, 3), (3, 0, 5)]], ids=["ragged", "single", "no-thoughts"])
def test_forward_matches_oracle(arch, shapes):
    base = MODEL_FACTORIES[arch]()
    reference = copy.deepcopy(base)
    batch = ragged_batch(seed=1, shapes=shapes)
    real = batch["attention_mask"].bool()

    fast = wrap(base)(**batch)
    fast.loss.backward()
    slow_loss, slow_logits, slow_embeds = oracle_forward(reference, **batch)
    slow_loss.backward()

    torch.testing.assert_close(fast.loss, slow_loss, rtol=1e-5, atol=1e-6)
    assert_close_scaled(fast.logits[real], slow_logits[real], "logits")
    assert_close_scaled(fast.inputs_embeds[real], slow_embeds[real], "inputs_embeds")
    fast_grads, slow_grads = _grads(base), _grads(reference)
    assert fast_grads.keys() == slow_grads.keys() and fast_grads
    for name in fast_grads:
        assert_close_scaled(fast_grads[name], slow_grads[name], name)


@pytest.mark.parametrize("arch", list(MODEL_FACTORIES))
def test_loss_only_path_matches_full_logits(arch):
    """return_logits=False runs the LM head only at labelled positions; loss and grads are unchanged."""
    base = MODEL_FACTORIES[arch]()
    other = copy.deepcopy(base)
    batch = ragged_batch(seed=2, shapes=RAGGED)
    lean = wrap(base)(**batch, return_logits=False)
    full = wrap(other)(**batch)
    assert lean.logits is None
    lean.loss.backward()
    full.loss.backward()
    torch.testing.assert_close(lean.loss, full.loss)
    for (name, p), (_, q) in zip(base.named_parameters(), other.named_parameters()):
        assert_close_scaled(p.grad, q.grad, name)


def test_thoughts_change_the_output():
    """Guards the oracle comparison itself: the latent positions really receive hidden states."""
    model = wrap(MODEL_FACTORIES["gpt2"]())
    batch = ragged_batch(seed=3, shapes=[(6, 3, 4)])
    out = model(**batch)
    token_embeds = model.embedding(batch["input_ids"])
    latent = batch["input_ids"] == LATENT
    assert not torch.allclose(out.inputs_embeds[latent], token_embeds[latent])
    torch.testing.assert_close(out.inputs_embeds[~latent], token_embeds[~latent])


def test_state_dict_keys_match_the_original_layout():
    model = wrap(MODEL_FACTORIES["gpt2"]())
    keys = list(model.state_dict())
    assert keys and all(key.startswith("base_causallm.") for key in keys)


def test_misaligned_batch_is_refused():
    batch = ragged_batch(seed=4, shapes=[(5, 2, 3), (7, 2, 3)])
    ids = batch["input_ids"].clone()
    row = ids[0].tolist()
    first = row.index(LATENT)
    ids[0, first], ids[0, first + 3] = ids[0, first + 3], ids[0, first]  # break contiguity
    with pytest.raises(ValueError, match="row 0: latent tokens must be contiguous"):
        wrap(MODEL_FACTORIES["gpt2"]())(ids, batch["attention_mask"], batch["labels"], batch["position_ids"])


@pytest.mark.parametrize("shapes", [RAGGED, [(6, 0, 3), (3, 0, 5)]], ids=["ragged", "no-thoughts"])
def test_extra_latent_passes_compute_the_same(shapes):
    """FSDP ranks run the same number of passes; extra single-column passes must not change anything."""
    model = wrap(MODEL_FACTORIES["llama"]())
    batch = ragged_batch(seed=5, shapes=shapes)
    real = batch["attention_mask"].bool()
    plain = model(**batch)
    padded = model(**batch, latent_passes=6)
    assert_close_scaled(padded.loss, plain.loss, "loss")
    assert_close_scaled(padded.logits[real], plain.logits[real], "logits")
    assert_close_scaled(padded.inputs_embeds[real], plain.inputs_embeds[real], "inputs_embeds")
    with pytest.raises(ValueError, match="fewer than the batch's"):
        model(**batch, latent_passes=0) if any(n for _, n, _ in shapes) else (_ for _ in ()).throw(ValueError("fewer than the batch's"))


def test_sum_reduction_is_the_token_sum():
    model = wrap(MODEL_FACTORIES["gpt2"]())
    batch = ragged_batch(seed=6, shapes=RAGGED)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    mean = model(**batch).loss
    for return_logits in (True, False):
        total = model(**batch, reduction="sum", return_logits=return_logits).loss
        assert_close_scaled(total, mean * n_tokens, "sum")
