"""Sampling in Coconut.generate: greedy unchanged, reproducible under a seed, the right distribution."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import MODEL_FACTORIES, wrap
from test_generate import pad, prompt

from noblankslate.model.coconut import Sampling

ROWS = [(7, 3), (12, 0), (4, 1), (9, 2)]  # (question length, latent count)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    return pad([prompt(rng, q, n) for q, n in ROWS], "left")


def seeded(seed: int, **settings) -> Sampling:
    return Sampling(generator=torch.Generator().manual_seed(seed), **settings)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_near_zero_temperature_or_top_k_1_is_greedy(arch):
    model = wrap(MODEL_FACTORIES[arch]())
    ids, mask = batch()
    greedy = model.generate(ids, mask, max_new_tokens=10)
    for settings in ({"temperature": 1e-6}, {"top_k": 1}, {"top_p": 1e-9, "temperature": 2.0}):
        sampled = model.generate(ids, mask, max_new_tokens=10, sampling=seeded(0, **settings))
        assert sampled.sequences() == greedy.sequences(), settings
        assert torch.equal(sampled.forward_passes, greedy.forward_passes)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_is_reproducible_under_a_seed_and_differs_across_seeds(arch):
    model = wrap(MODEL_FACTORIES[arch]())
    ids, mask = batch()
    first = model.generate(ids, mask, max_new_tokens=10, sampling=seeded(7)).sequences()
    again = model.generate(ids, mask, max_new_tokens=10, sampling=seeded(7)).sequences()
    others = {str(model.generate(ids, mask, max_new_tokens=10, sampling=seeded(s)).sequences()) for s in range(4)}
    assert first == again
    assert len(others) > 1
    assert first != model.generate(ids, mask, max_new_tokens=10).sequences()  # temperature 1 on a random model


def test_thoughts_stay_deterministic_and_repeated_rows_sample_apart():
    """Only the token decoding samples: the continuous thoughts of a repeated row are the greedy ones."""
    model = wrap(MODEL_FACTORIES["gpt2"]())
    rng = random.Random(3)
    row = prompt(rng, 6, 3)
    ids = torch.tensor([row] * 8)
    greedy = model.generate(ids, max_new_tokens=8, return_thoughts=True)
    sampled = model.generate(ids, max_new_tokens=8, return_thoughts=True, sampling=seeded(1))
    assert torch.equal(sampled.thoughts, greedy.thoughts)
    assert len({tuple(s) for s in greedy.sequences()}) == 1
    assert len({tuple(s) for s in sampled.sequences()}) > 1


def _filtered_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The distribution written out plainly: softmax(logits / T), top-k, then the nucleus, renormalised."""
    import math

    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k else order)
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    nucleus, mass = set(), 0.0
    for i in order:
        if i in keep and mass < top_p:
            nucleus.add(i)
            mass += probs[i]
    z = sum(probs[i] for i in nucleus)
    return [probs[i] / z if i in nucleus else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.9)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 1.0, -2.0])
    expected = _filtered_probs(logits.tolist(), temperature, top_k, top_p)
    draws = seeded(0, temperature=temperature, top_k=top_k, top_p=top_p).draw(logits.expand(40000, -1))
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    assert freq.tolist() == pytest.approx(expected, abs=0.01)
    assert all(freq[i] == 0 for i, p in enumerate(expected) if p == 0)


def test_bad_sampling_settings_are_refused():
    for settings, message in (({"temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
                              ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=message):
            Sampling(**settings)
    model = wrap(MODEL_FACTORIES["gpt2"]())
    with pytest.raises(ValueError, match="sampling=Sampling"):
        model.generate(*batch(), do_sample=True)
