"""The trained scorer's cached-prefix path must give its full-sequence values: varied lengths, padding,
several responses per prompt, a reload to another version, and the service with the cache on and off."""

from __future__ import annotations

import httpx
import pytest

from principles.schema import Principle
from rm_core.prefix_cache import PrefixCache
from rm_core.registry import Registry
from rm_core.render import RenderedInput
from rm_core.scorers import load_trained
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.rm_service.helpers import publish_tiny_version

TOL = 1e-4
PRINCIPLES = [Principle(name=f"p{i}", definition=f"The response follows rule number {i} carefully.",
                        negative_definition=f"The response ignores rule number {i}.") for i in range(3)]
PROMPTS = ["Explain photosynthesis.", "What is 17 * 3? Show the steps.",
           [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Name a colour."}]]
RESPONSES = ["Plants turn light into sugar.", "17 * 3 = 51 because 17 * 3 = 10 * 3 + 7 * 3 = 30 + 21.",
             "Soft rain on the roof / the street hums a grey song / puddles hold the sky", "Ok.", "",
             " ".join(["very"] * 60) + " long answer"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("trained-prefix")
    reg = tmp / "registry"
    v1 = publish_tiny_version(reg, tiny_model_dir, seed=11, tmp=tmp)
    v2 = publish_tiny_version(reg, tiny_model_dir, seed=12, tmp=tmp, mean=0.25, std=2.0)
    Registry(reg).set_current(v1)
    return reg, v1, v2


@pytest.fixture(scope="module")
def scorer(registry):
    reg, v1, _ = registry
    return load_trained(reg, v1, max_batch_tokens=512, prefix_cache=PrefixCache(64 * 1024 * 1024))


def _items() -> list:
    return [(p, r) for p in PROMPTS for r in RESPONSES]


def _seqs(scorer, negate=()) -> list[RenderedInput]:
    return [s for p, r in _items() for s in scorer.prepare(PRINCIPLES, p, r, negate).seqs]


def _max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_cached_head_values_equal_the_full_path(scorer):
    seqs = _seqs(scorer) + _seqs(scorer, negate=["p1"])
    assert len({len(s.response_ids) for s in seqs}) >= 5  # varied lengths, one group padded unevenly
    full = scorer.full_head_values(seqs)
    assert len({round(v, 3) for v in full}) > len(full) // 2  # the head really reads different tokens
    cache = PrefixCache(64 * 1024 * 1024)
    cached, hits = scorer.cached_head_values(seqs, cache)
    assert _max_diff(cached, full) <= TOL
    # Each group's first sequence computes its prompt, the rest reuse it; blocks repeat across prompts.
    assert sum(hits) > 0 and cache.stats()["entries"] >= 2 * len(PROMPTS)
    # A second pass is served from the cache and still agrees.
    again, hits2 = scorer.cached_head_values(seqs, cache)
    assert _max_diff(again, full) <= TOL and sum(hits2) > sum(hits)
    assert all(h == len(s.prefix_ids) for h, s in zip(hits2, seqs, strict=True))


def test_expanded_attention_gives_the_same_values(scorer):
    seqs = _seqs(scorer)
    cascade, expanded = PrefixCache(64 * 1024 * 1024), PrefixCache(64 * 1024 * 1024, attention="expanded")
    assert scorer.uses_cascade(cascade.attention) and not scorer.uses_cascade(expanded.attention)
    a, _ = scorer.cached_head_values(seqs, cascade)
    b, _ = scorer.cached_head_values(seqs, expanded)
    assert _max_diff(a, b) <= TOL and _max_diff(a, scorer.full_head_values(seqs)) <= TOL


@pytest.mark.parametrize(("max_batch_tokens", "max_padding"), [(64, 0.0), (512, 0.25), (8192, float("inf"))])
def test_padding_and_batch_splits_never_change_a_value(scorer, max_batch_tokens, max_padding):
    """One response alone, or padded in a batch with responses several times longer, reads the same value."""
    seqs = _seqs(scorer)
    alone = [scorer.cached_head_values([s], PrefixCache(64 * 1024 * 1024))[0][0] for s in seqs[:len(RESPONSES)]]
    old = scorer.max_batch_tokens, scorer.max_padding
    try:
        scorer.max_batch_tokens, scorer.max_padding = max_batch_tokens, max_padding
        together, _ = scorer.cached_head_values(seqs, PrefixCache(64 * 1024 * 1024))
        full = scorer.full_head_values(seqs)
    finally:
        scorer.max_batch_tokens, scorer.max_padding = old
    assert _max_diff(together[:len(RESPONSES)], alone) <= TOL
    assert _max_diff(together, full) <= TOL


def test_compute_takes_the_cache_and_scores_match_a_scorer_without_one(scorer, registry):
    reg, v1, _ = registry
    plain = load_trained(reg, v1, max_batch_tokens=512, prefix_cache=None)
    off = load_trained(reg, v1, max_batch_tokens=512, prefix_cache=PrefixCache(enabled=False))
    items = _items()
    with_cache = scorer.score_items(PRINCIPLES, items)
    assert _max_diff(with_cache, plain.score_items(PRINCIPLES, items)) <= TOL
    assert _max_diff(with_cache, off.score_items(PRINCIPLES, items)) <= TOL
    seqs = _seqs(scorer)[:3]
    _, cached = scorer.compute(seqs)
    assert sum(cached) > 0
    _, cached_off = off.compute(seqs)
    assert cached_off == [0] * 3 and off.prefix_cache.stats()["entries"] == 0


def test_a_reloaded_version_never_reads_the_old_versions_entries(registry):
    """Two versions over the same backbone and tokens: the prefixes are the same token ids, but their
    keys/values differ, so the new version must compute its own."""
    reg, v1, v2 = registry
    cache = PrefixCache(64 * 1024 * 1024)
    old = load_trained(reg, v1, max_batch_tokens=512, prefix_cache=cache)
    seqs = _seqs(old)
    old.cached_head_values(seqs)
    entries = cache.stats()["entries"]
    new = load_trained(reg, v2, max_batch_tokens=512, prefix_cache=cache)
    values, cached = new.cached_head_values(seqs)
    st = cache.stats()
    assert cached[0] == 0  # its first group found nothing of v1's, though the token ids are the same
    assert {k[0] for k in cache.snapshot()} == {v1, v2} and st["entries"] == 2 * entries
    full_new = new.full_head_values(seqs)
    assert _max_diff(values, full_new) <= TOL
    assert _max_diff(full_new, old.full_head_values(seqs)) > 1e-2  # the versions really differ
    # What the service does on reload: retire the old version's entries, keep the new one's.
    assert cache.invalidate(v1) == entries and {k[0] for k in cache.snapshot()} == {v2}
    again, _ = new.cached_head_values(seqs)
    assert _max_diff(again, full_new) <= TOL


def test_the_value_is_read_where_the_full_forward_reads_it(scorer):
    """transformers reads a sequence classifier at the last token that is not the pad id; responses
    that end in pad ids (or are nothing but) are read at the same token on both paths."""
    pad = scorer.value_pad_id
    assert pad is not None
    base = scorer.prepare(PRINCIPLES, PROMPTS[0], RESPONSES[0]).seqs[0]
    assert base.prefix_ids[-1] != pad
    r = base.response_ids
    seqs = [RenderedInput(base.system_ids, base.prompt_ids, r),
            RenderedInput(base.system_ids, base.prompt_ids, r[:5] + (pad, pad)),
            RenderedInput(base.system_ids, base.prompt_ids, (pad,)),
            RenderedInput(base.system_ids, base.prompt_ids, ()),
            # A prefix ending in the pad id with nothing readable after it: read inside the prompt.
            RenderedInput(base.system_ids, base.prompt_ids + (pad,), (pad, pad))]
    assert [scorer.last_value_index(s.response_ids) for s in seqs] == [len(r) - 1, 4, -1, -1, -1]
    full = [scorer.full_head_values([s])[0] for s in seqs]
    cached, _ = scorer.cached_head_values(seqs, PrefixCache(64 * 1024 * 1024))
    assert _max_diff(cached, full) <= TOL
    assert abs(cached[1] - cached[0]) > 1e-4  # the padded one was read at its 5th token, not its last


def _score(url: str, items: list, principles: list[str]) -> dict:
    r = httpx.post(url + "/v1/score", json={"items": items, "principles": principles}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_service_gives_the_same_scores_with_the_cache_on_and_off(registry):
    reg, v1, v2 = registry
    Registry(reg).set_current(v1)
    principles = [p.definition for p in PRINCIPLES]
    items = [{"prompt": p, "response": r} for p in PROMPTS for r in RESPONSES]
    results = {}
    for on in (True, False):
        st = ServiceSettings(port=0, registry=reg, watch_registry=False, prefix_cache=on, max_batch_tokens=512)
        with ServerThread(st) as srv:
            first = _score(srv.url, items, principles)
            second = _score(srv.url, items, principles)
            assert first["scorer"] == "trained" and first["model_version"] == v1
            assert _max_diff(first["scores"], second["scores"]) <= TOL
            assert (second["usage"]["cached_tokens"] > first["usage"]["cached_tokens"]) is on
            r = httpx.post(srv.url + "/v1/admin/reload", json={"version": v2}, timeout=60).json()
            assert r["reloaded"] and r["model_version"] == v2
            after = _score(srv.url, items, principles)
            assert after["model_version"] == v2
            if on:
                stats = httpx.get(srv.url + "/v1/model", timeout=30).json()["prefix_cache"]
                assert stats["entries"] > 0
            results[on] = (first["scores"], after["scores"])
    assert _max_diff(results[True][0], results[False][0]) <= TOL
    assert _max_diff(results[True][1], results[False][1]) <= TOL
    assert _max_diff(results[True][0], results[True][1]) > 1e-2  # v2 was served, not v1's cached prefixes
    offline = load_trained(reg, v2).score_items(PRINCIPLES, [(i["prompt"], i["response"]) for i in items])
    assert _max_diff(results[True][1], offline) <= TOL
