"""Per-principle contrast as a prefix tree: the k+1 variants of a principle block share every token
before the toggled principle, so each variant block hangs from the base block and holds (and runs)
only its own tokens; values stay the full path's, and the byte bound still holds."""

from __future__ import annotations

import pytest
import torch

from principles.schema import Principle
from rm_core.prefix_cache import PrefixCache, PrefixEntry
from rm_core.scorers import load_zero_shot

PRINCIPLES = [Principle(name=f"p{i}", definition=f"The response follows rule number {i} of the style guide.",
                        negative_definition=f"The response breaks rule number {i} of the style guide.")
              for i in range(6)]
PROMPTS = ["Explain photosynthesis.", "What is 17 * 3? Show the steps."]
RESPONSES = ["Plants turn light into sugar.", "Ok.", " ".join(["very"] * 30) + " long answer"]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return load_zero_shot("contrastive", str(tiny_model_dir), contrast="per_principle", max_batch_tokens=512,
                          prefix_cache=PrefixCache(64 * 1024 * 1024))


def _seqs(scorer):
    return [s for p in PROMPTS for r in RESPONSES for s in scorer.prepare(PRINCIPLES, p, r).seqs]


def _shared(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _consistent(cache: PrefixCache) -> None:
    entries = cache.snapshot()
    assert cache.stats()["bytes"] == sum(e.nbytes for e in entries.values())
    for e in entries.values():
        assert e.parent_key is None or e.parent_key in entries


def test_variant_blocks_hang_from_the_base_and_hold_only_their_own_tokens(scorer):
    seqs = _seqs(scorer)
    systems = list(dict.fromkeys(s.system_ids for s in seqs))
    assert len(systems) == len(PRINCIPLES) + 1
    base = systems[0]
    cache = PrefixCache(64 * 1024 * 1024)
    blocks = scorer.block_entries(cache, systems)
    root = blocks[base][0]
    assert root.parent is None and root.length == len(base)
    for system in systems[1:]:
        entry, reused = blocks[system]
        shared = _shared(base, system)
        assert 0 < shared < len(system)
        assert entry.parent is root and entry.parent_length == shared == reused and entry.length == len(system)
        assert all(k.shape[2] == len(system) - shared for k, _ in entry.kv)
    # The blocks' bytes are the tree's unique tokens, well under k+1 whole blocks.
    per_token = sum(k.nbytes + v.nbytes for k, v in root.kv) / root.length
    unique = len(base) + sum(len(s) - _shared(base, s) for s in systems[1:])
    kv_bytes = sum(sum(k.nbytes + v.nbytes for k, v in blocks[s][0].kv) for s in systems)
    assert kv_bytes == pytest.approx(unique * per_token)
    assert cache.stats()["bytes"] < 0.75 * len(systems) * root.nbytes
    _consistent(cache)


def test_a_variant_blocks_keys_and_values_are_those_of_the_whole_block(scorer):
    """The cut: a variant's full keys/values equal a forward of its whole block from scratch."""
    seqs = _seqs(scorer)
    systems = list(dict.fromkeys(s.system_ids for s in seqs))
    blocks = scorer.block_entries(PrefixCache(64 * 1024 * 1024), systems)
    for system in systems[1:4]:
        alone = scorer.extend_prefix(None, system)
        tree = blocks[system][0]
        assert torch.allclose(tree.last_hidden, alone.last_hidden, atol=1e-4, rtol=1e-4)
        for (k, v), (k2, v2) in zip(tree.full_kv(), alone.full_kv(), strict=True):
            assert k.shape == k2.shape and torch.allclose(k, k2, atol=1e-4) and torch.allclose(v, v2, atol=1e-4)


def test_the_tree_runs_only_its_unique_tokens(scorer, monkeypatch):
    seqs = _seqs(scorer)
    systems = list(dict.fromkeys(s.system_ids for s in seqs))
    ran = []
    original = type(scorer).extend_prefix

    def counting(self, base, ids, *args, **kwargs):
        ran.append(len(ids))
        return original(self, base, ids, *args, **kwargs)

    monkeypatch.setattr(type(scorer), "extend_prefix", counting)
    scorer.cached_response_logprobs(seqs, PrefixCache(64 * 1024 * 1024))
    base = systems[0]
    block_tokens = len(base) + sum(len(s) - _shared(base, s) for s in systems[1:])
    prompt_tokens = sum(len(p) for p in {(s.system_ids, s.prompt_ids): s.prompt_ids for s in seqs}.values())
    assert sum(ran) == block_tokens + prompt_tokens


def test_tree_values_equal_the_full_path(scorer):
    seqs = _seqs(scorer)
    full = scorer.full_response_logprobs(seqs)
    cache = PrefixCache(64 * 1024 * 1024)
    cached, _ = scorer.cached_response_logprobs(seqs, cache)
    assert cached == pytest.approx(full, rel=1e-4, abs=1e-3)
    again, _ = scorer.cached_response_logprobs(seqs, cache)  # from the cache: the tree as it was kept
    assert again == pytest.approx(full, rel=1e-4, abs=1e-3)
    items = [(p, r) for p in PROMPTS for r in RESPONSES]
    plain = load_zero_shot("contrastive", scorer.base_model, contrast="per_principle", prefix_cache=None)
    assert scorer.score_items(PRINCIPLES, items) == pytest.approx(plain.score_items(PRINCIPLES, items), abs=1e-3)


def test_a_tight_bound_evicts_variants_with_their_base_and_stays_exact(scorer):
    seqs = _seqs(scorer)
    probe = PrefixCache(64 * 1024 * 1024)
    scorer.cached_response_logprobs(seqs, probe)
    root = max(e.nbytes for e in probe.snapshot().values() if e.parent is None)
    tight = PrefixCache(max_bytes=int(root * 1.5))
    full = scorer.full_response_logprobs(seqs)
    for _ in range(2):
        values, _ = scorer.cached_response_logprobs(seqs, tight)
        assert values == pytest.approx(full, rel=1e-4, abs=1e-3)
        assert tight.stats()["bytes"] <= tight.max_bytes
        _consistent(tight)
    assert tight.stats()["evictions"] > 0


def test_a_hit_keeps_every_ancestor_more_recent_than_its_users():
    def entry(n: int, parent=None, parent_key=None) -> PrefixEntry:
        kv = [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]
        return PrefixEntry(kv, torch.zeros(2), n + (parent.length if parent else 0), 32 * n, parent, parent_key,
                           parent.length if parent else None)

    from rm_core.prefix_cache import prefix_key

    cache = PrefixCache(max_bytes=10_000)
    root_ids, variant_ids, prompt_ids, other_ids = (1, 2, 3), (1, 2, 4), (1, 2, 4, 5), (9,)
    root = entry(3)
    cache.put("v", root_ids, root)
    variant = entry(1, root, prefix_key("v", root_ids))
    cache.put("v", variant_ids, variant)
    cache.put("v", prompt_ids, entry(1, variant, prefix_key("v", variant_ids)))
    cache.put("v", other_ids, entry(1))
    assert cache.get("v", prompt_ids) is not None
    order = list(cache.snapshot())
    assert order.index(prefix_key("v", root_ids)) > order.index(prefix_key("v", variant_ids)) > \
        order.index(prefix_key("v", prompt_ids)) > order.index(prefix_key("v", other_ids))
