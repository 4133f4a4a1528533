"""The prefix-cache path must give the no-cache path's values, for varied lengths and padding."""

from __future__ import annotations

import pytest

from principles.schema import Principle
from rm_service.prefix_cache import PrefixCache
from rm_service.scorers import load_zero_shot

PRINCIPLES = [Principle(name=f"p{i}", definition=f"The response follows rule number {i} carefully.",
                        negative_definition=f"The response ignores rule number {i}.") for i in range(3)]
PROMPTS = ["Explain photosynthesis.", "What is 17 * 3? Show the steps.", "Write a haiku about rain."]
RESPONSES = ["Plants turn light into sugar.", "17 * 3 = 51 because 17 * 3 = 10 * 3 + 7 * 3 = 30 + 21.",
             "Soft rain on the roof / the street hums a grey song / puddles hold the sky", "Ok.",
             " ".join(["very"] * 40) + " long answer"]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return load_zero_shot("contrastive", str(tiny_model_dir), max_batch_tokens=512,
                          prefix_cache=PrefixCache(64 * 1024 * 1024))


def _seqs(scorer):
    items = [(p, r) for p in PROMPTS for r in RESPONSES]
    return [s for p, r in items for s in scorer.prepare(PRINCIPLES, p, r).seqs]


def test_cached_values_equal_full_sequence_values(scorer):
    seqs = _seqs(scorer)
    full = scorer.full_response_logprobs(seqs)
    cached, hits = scorer.prefix_cache.response_logprobs(scorer, seqs)
    assert cached == pytest.approx(full, rel=1e-4, abs=1e-3)
    assert sum(hits) > 0
    # A second pass is served from the LRU and still agrees.
    again, hits2 = scorer.prefix_cache.response_logprobs(scorer, seqs)
    assert again == pytest.approx(full, rel=1e-4, abs=1e-3)
    assert sum(hits2) > sum(hits)


def test_scores_are_the_same_with_and_without_cache(scorer, tiny_model_dir):
    plain = load_zero_shot("contrastive", str(tiny_model_dir), max_batch_tokens=512, prefix_cache=None)
    items = [(p, r) for p in PROMPTS for r in RESPONSES]
    assert scorer.score_items(PRINCIPLES, items) == pytest.approx(plain.score_items(PRINCIPLES, items), abs=1e-3)


def test_lru_is_bounded_by_bytes_and_invalidates_by_version(scorer):
    small = PrefixCache(max_bytes=300_000)
    seqs = _seqs(scorer)
    small.response_logprobs(scorer, seqs)
    st = small.stats()
    assert st["bytes"] <= 300_000 and st["evictions"] > 0
    big = PrefixCache(max_bytes=64 * 1024 * 1024)
    big.response_logprobs(scorer, seqs)
    entries = big.stats()["entries"]
    assert entries > 0
    assert big.invalidate("some-other-version") == 0 and big.stats()["entries"] == entries
    assert big.invalidate(scorer.version) == entries
    assert big.stats()["entries"] == 0 and big.stats()["bytes"] == 0


def test_disabled_cache_is_not_used(tiny_model_dir):
    off = load_zero_shot("contrastive", str(tiny_model_dir), prefix_cache=PrefixCache(enabled=False))
    seqs = off.prepare(PRINCIPLES, PROMPTS[0], RESPONSES[0]).seqs
    values, cached = off.compute(seqs)
    assert cached == [0] * len(seqs) and off.prefix_cache.stats()["entries"] == 0
