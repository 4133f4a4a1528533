"""The prefix-cache path must give the no-cache path's values, for varied lengths and padding."""

from __future__ import annotations

import pytest

from principles.schema import Principle
from rm_core.prefix_cache import PrefixCache
from rm_core.scorers import load_zero_shot

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
    cached, hits = scorer.cached_response_logprobs(seqs)
    assert cached == pytest.approx(full, rel=1e-4, abs=1e-3)
    assert sum(hits) > 0
    # A second pass is served from the LRU and still agrees.
    again, hits2 = scorer.cached_response_logprobs(seqs)
    assert again == pytest.approx(full, rel=1e-4, abs=1e-3)
    assert sum(hits2) > sum(hits)


def test_scores_are_the_same_with_and_without_cache(scorer, tiny_model_dir):
    plain = load_zero_shot("contrastive", str(tiny_model_dir), max_batch_tokens=512, prefix_cache=None)
    items = [(p, r) for p in PROMPTS for r in RESPONSES]
    assert scorer.score_items(PRINCIPLES, items) == pytest.approx(plain.score_items(PRINCIPLES, items), abs=1e-3)


def test_lru_is_bounded_by_bytes_and_invalidates_by_version(scorer):
    seqs = _seqs(scorer)
    big = PrefixCache(max_bytes=64 * 1024 * 1024)
    scorer.cached_response_logprobs(seqs, big)
    everything = big.stats()["bytes"]
    small = PrefixCache(max_bytes=everything // 2)
    scorer.cached_response_logprobs(seqs, small)
    st = small.stats()
    assert st["bytes"] <= everything // 2 and st["evictions"] > 0
    _consistent(small)
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


def _consistent(cache: PrefixCache) -> None:
    """The bytes counted are the bytes held: no cached entry leans on a block that is gone."""
    entries = cache.snapshot()
    assert cache.stats()["bytes"] == sum(e.nbytes for e in entries.values())
    for e in entries.values():
        assert e.parent_key is None or e.parent_key in entries


def test_prompt_entries_hold_only_their_own_tokens(scorer):
    cache = PrefixCache(64 * 1024 * 1024)
    scorer.cached_response_logprobs(_seqs(scorer), cache)
    entries = list(cache.snapshot().values())
    blocks = [e for e in entries if e.parent is None]
    prompts = [e for e in entries if e.parent is not None]
    assert blocks and prompts
    for e in prompts:
        own = e.length - e.parent_length  # what it adds to the parent's tokens it uses (a variant block: fewer than all)
        assert 0 < e.parent_length <= e.parent.length
        assert all(k.shape[2] == own and v.shape[2] == own for k, v in e.kv)
        assert all(k.shape[2] == e.length for k, _ in e.full_kv())
    _consistent(cache)


def test_a_tight_bound_never_leaves_a_prompt_without_its_block(scorer):
    seqs = _seqs(scorer)
    probe = PrefixCache(64 * 1024 * 1024)
    scorer.cached_response_logprobs(seqs, probe)
    block = max(e.nbytes for e in probe.snapshot().values() if e.parent is None)
    prompt = max(e.nbytes for e in probe.snapshot().values() if e.parent is not None)
    # Room for one block and a couple of prompts: the second block must push out the first one's prompts.
    tight = PrefixCache(max_bytes=block + 2 * prompt)
    full = scorer.full_response_logprobs(seqs)
    values, _ = scorer.cached_response_logprobs(seqs, tight)
    assert values == pytest.approx(full, rel=1e-4, abs=1e-3)
    assert tight.stats()["evictions"] > 0 and tight.stats()["bytes"] <= tight.max_bytes
    _consistent(tight)


def test_right_pad_keeps_each_row_at_its_own_positions():
    from rm_core.batching import right_pad

    ids, mask = right_pad([[5, 6, 7], [8], (9, 10)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_expanded_prefix_forward_equals_the_unshared_forward(scorer):
    """The shared-prefix forward the judge runs on a whole causal LM gives the full sequences' logits."""
    import torch

    from rm_core.prefix_attention import expanded_prefix_forward
    from salmon.modeling import returned_kv_cache

    model = scorer.model
    prefix, suffixes = [1, 2, 3, 4, 5], [[6, 7, 8], [9], [10, 11]]
    with torch.inference_mode():
        res = model(input_ids=torch.tensor([prefix]), use_cache=True)
        prefix_kv = [(layer.keys, layer.values) for layer in returned_kv_cache(res).layers]
        ids, mask = scorer.pad(suffixes)
        shared = expanded_prefix_forward(model, prefix_kv, ids, mask).logits
        for j, s in enumerate(suffixes):
            alone = model(input_ids=torch.tensor([prefix + s])).logits[0, len(prefix):]
            assert torch.allclose(shared[j, :len(s)], alone, atol=1e-4, rtol=1e-4)


def test_batches_split_by_budget_and_by_padding(scorer):
    lengths = [256, 240, 200, 170, 130, 100, 80, 64]
    order = list(range(len(lengths)))
    old = scorer.max_batch_tokens, scorer.max_padding
    try:
        scorer.max_batch_tokens, scorer.max_padding = 4096, 0.25
        chunks = scorer.chunks(order, lengths)
        assert sorted(i for c in chunks for i in c) == order
        for c in chunks:
            padded, real = lengths[c[0]] * len(c), sum(lengths[i] for i in c)
            assert padded <= 4096 and (len(c) == 1 or padded <= 1.25 * real)
        assert len(chunks) > 1
        scorer.max_padding = float("inf")  # only the token budget splits
        assert scorer.chunks(order, lengths) == [order]
        scorer.max_batch_tokens = 512
        assert all(lengths[c[0]] * len(c) <= 512 or len(c) == 1 for c in scorer.chunks(order, lengths))
    finally:
        scorer.max_batch_tokens, scorer.max_padding = old
    # Splitting changes how sequences are batched, never their values.
    seqs = _seqs(scorer)
    plain = load_zero_shot("contrastive", scorer.base_model, max_batch_tokens=512, max_padding=float("inf"))
    assert scorer.full_response_logprobs(seqs) == pytest.approx(plain.full_response_logprobs(seqs), rel=1e-4, abs=1e-3)


# -- the cascade attention of suffixes against one shared prefix ------------------------------------

def _reference_attention(q, k, v, pk, pv):
    """Plain softmax attention over [prefix, own causal] keys, kv heads repeated: what the cascade must equal."""
    import torch

    b, h, w, d = q.shape
    g = h // k.shape[1]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vals = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    p = pk.shape[2]
    allowed = torch.ones(w, p + w, dtype=torch.bool)
    allowed[:, p:] = torch.ones(w, w, dtype=torch.bool).tril()
    scores = (q @ keys.transpose(-1, -2)) / d ** 0.5
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vals
    return out.transpose(1, 2)  # [b, w, h, d], as attention functions return it


@pytest.mark.parametrize(("b", "heads", "kv_heads", "w", "p"), [(3, 4, 2, 7, 11), (1, 9, 3, 1, 5), (5, 6, 6, 16, 40)])
def test_cascade_attention_equals_softmax_over_prefix_and_causal_suffix(b, heads, kv_heads, w, p):
    import torch

    from rm_core import prefix_attention as pa

    g = torch.Generator().manual_seed(b * 100 + w)
    q = torch.randn(b, heads, w, 8, generator=g)
    k, v = torch.randn(b, kv_heads, w, 8, generator=g), torch.randn(b, kv_heads, w, 8, generator=g)
    # Prefix keys scaled ×3 in every head: large scores, so the merge must stay exact where the prefix part dominates.
    pk, pv = torch.randn(1, kv_heads, p, 8, generator=g) * 3, torch.randn(1, kv_heads, p, 8, generator=g)
    layer = torch.nn.Module()
    layer.layer_idx = 0
    out, _ = pa.prefix_cascade_forward(layer, q, k, v, None, scaling=8 ** -0.5, prefix_kv=[(pk, pv)])
    assert out.shape == (b, w, heads, 8)
    assert torch.allclose(out, _reference_attention(q, k, v, pk, pv), atol=1e-5, rtol=1e-4)


def test_suffix_path_takes_the_cascade_on_cpu_and_matches_the_expanded_path(scorer, monkeypatch):
    from transformers import AttentionInterface

    from rm_core import prefix_attention as pa

    calls = []
    original = pa.prefix_cascade_forward

    def spy(module, *args, prefix_kv=None, **kwargs):
        calls.append(prefix_kv is not None)
        return original(module, *args, prefix_kv=prefix_kv, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, pa.NAME, spy)
    seqs = _seqs(scorer)
    cascade = PrefixCache(64 * 1024 * 1024)
    expanded = PrefixCache(64 * 1024 * 1024, attention="expanded")
    assert scorer.uses_cascade(cascade.attention) and not scorer.uses_cascade(expanded.attention)
    values, _ = scorer.cached_response_logprobs(seqs, cascade)
    n_layers = scorer.model.config.num_hidden_layers
    assert calls and all(calls) and len(calls) % n_layers == 0  # every layer of every suffix batch
    calls.clear()
    reference, _ = scorer.cached_response_logprobs(seqs, expanded)
    assert calls == []
    assert values == pytest.approx(reference, rel=1e-4, abs=1e-3)
    assert values == pytest.approx(scorer.full_response_logprobs(seqs), rel=1e-4, abs=1e-3)
    assert scorer.model.config._attn_implementation != pa.NAME  # switched back after each forward


def test_cascade_is_refused_where_it_would_compute_something_else(scorer):
    import torch

    from rm_core.prefix_attention import cascade_available

    cfg = scorer.model.config
    assert cascade_available(scorer.model, torch.device("cpu"))
    assert not cascade_available(scorer.model, torch.device("cuda"))  # the fused kernel is CPU-only
    for attr, value in [("sliding_window", 16), ("attn_logit_softcapping", 30.0)]:
        old = getattr(cfg, attr, None)
        setattr(cfg, attr, value)
        try:
            assert not cascade_available(scorer.model, torch.device("cpu")), attr
        finally:
            setattr(cfg, attr, old)
