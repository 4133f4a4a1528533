"""Attention of a batch of suffixes against ONE shared prefix, without copying the prefix per row.

The plain way to run B suffixes after a cached prefix of P tokens hands the model a key/value cache
expanded to B rows: every layer then concatenates the prefix onto each row's keys/values (B copies),
repeats the key/value heads up to the query heads (GQA: 3× more copies on SmolLM2), and runs masked
attention over [B, heads, w, P + w]. On a CPU that is most of the suffix forward's non-matmul time.

The cascade here splits each layer's attention in two and merges them exactly (the log-sum-exp rule
of "cascade"/"shared-prefix" attention, as vLLM and FlashInfer do on GPU):

1. the prefix part: every suffix token sees every prefix token, so there is no mask at all, and the
   B suffixes × query-heads-per-key-head fold into the sequence axis of one call per key/value head,
   against the prefix's keys/values as they are cached (no expand, no repeat, no concat);
2. the suffix part: each row's own keys/values, causal, a short [w, w] attention;
3. out = (o₁·e^(l₁−m) + o₂·e^(l₂−m)) / (e^(l₁−m) + e^(l₂−m)), with lᵢ the log-sum-exp of each part.

Rows are right-padded, so a real token's causal window holds no pad; pad rows' outputs are ignored.
Both parts use torch's fused CPU flash-attention kernel, the one that also returns the log-sum-exp
(``aten._scaled_dot_product_flash_attention_for_cpu``); where it is missing (older torch, another
device) :func:`cascade_available` is False and callers keep the expanded-cache path. Equal to that
path within fp tolerance (tests/rm_core/test_prefix_cache.py).

The function is registered with transformers' AttentionInterface; it is switched on only for the
suffix forward (:func:`cascade_attention`), under the scorer's lock, and for any call without
``prefix_kv`` it is plain SDPA, mask and all.

The two suffix forwards live here once, for every caller that runs suffixes after a shared prefix
(the causal-LM scorers, the A/B judge): :func:`cascade_prefix_forward` and
:func:`expanded_prefix_forward`, the plain way above, which works on any device and model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from salmon.modeling import kv_cache_kwargs

NAME = "salmon_prefix_cascade"
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

KV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def prefix_cascade_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           prefix_kv: KV | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, h, w, d]; key/value [b, hkv, w, d] (the suffixes' own); prefix_kv[layer] [1, hkv, P, d]."""
    if prefix_kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    pk, pv = prefix_kv[module.layer_idx]
    b, h, w, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    # (1) prefix: no mask, so (row, query head of this kv head, position) all become query positions.
    q_folded = query.reshape(b, hkv, g * w, d).transpose(0, 1).reshape(1, hkv, b * g * w, d)
    o1, l1 = _flash_cpu(q_folded, pk, pv, 0.0, False, scale=scaling)[:2]
    o1 = o1.reshape(hkv, b, g * w, d).transpose(0, 1)
    l1 = l1.reshape(hkv, b, g * w).transpose(0, 1)[..., None].to(o1.dtype)
    # (2) the suffixes' own tokens, causal; w is short, so repeating kv heads here is cheap.
    k2 = key[:, :, None].expand(b, hkv, g, w, d).reshape(b, h, w, d)
    v2 = value[:, :, None].expand(b, hkv, g, w, d).reshape(b, h, w, d)
    o2, l2 = _flash_cpu(query, k2, v2, 0.0, True, scale=scaling)[:2]
    o2 = o2.reshape(b, hkv, g * w, d)
    l2 = l2.reshape(b, hkv, g * w)[..., None].to(o2.dtype)
    # (3) exact merge of the two softmax partitions.
    m = torch.maximum(l1, l2)
    a1, a2 = (l1 - m).exp_(), (l2 - m).exp_()
    out = (o1 * a1).add_(o2 * a2).div_(a1 + a2)
    # transformers expects [b, w, h, d].
    return out.reshape(b, hkv, g, w, d).permute(0, 3, 1, 2, 4).reshape(b, w, h, d), None


AttentionInterface.register(NAME, prefix_cascade_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # any other call sees exactly SDPA's masks


def cascade_available(model: torch.nn.Module, device: torch.device) -> bool:
    """True where the fused kernel exists for ``device``, the model's attention layers know their index,
    and attention is plain softmax over all earlier tokens (no sliding window, no logit soft-capping:
    the cascade implements neither)."""
    if _flash_cpu is None or device.type != "cpu":
        return False
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if getattr(cfg, "attn_logit_softcapping", None):
        return False
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    return bool(attn) and all(hasattr(m, "layer_idx") for m in attn)


@contextmanager
def cascade_attention(config) -> Iterator[None]:
    """Route this model's attention through :func:`prefix_cascade_forward` for one forward.

    Callers hold the scorer's lock, so no other forward runs on the model meanwhile (and one that did
    would still get SDPA with SDPA's masks: the function only cascades when given ``prefix_kv``).
    """
    old = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = old


def _suffix_positions(prefix_kv: KV, ids: torch.Tensor) -> torch.Tensor:
    """Position ids of right-padded suffixes: every row continues right after the prefix."""
    prefix_len = prefix_kv[0][0].shape[2]
    b, w = ids.shape
    return torch.arange(prefix_len, prefix_len + w, device=ids.device)[None].expand(b, -1)


def cascade_prefix_forward(model: torch.nn.Module, prefix_kv: KV, ids: torch.Tensor):
    """Run right-padded suffixes ``ids`` [b, w] after one shared prefix through the cascade.

    ``prefix_kv``: per layer [1, kv_heads, prefix tokens, head_dim], used as it is. ``model`` is a
    transformers decoder or causal LM for which :func:`cascade_available` holds; its output is returned.
    The caller holds the model's lock (see :func:`cascade_attention`).
    """
    with cascade_attention(model.config):
        return model(input_ids=ids, position_ids=_suffix_positions(prefix_kv, ids), use_cache=False,
                     prefix_kv=prefix_kv)


def expanded_prefix_forward(model: torch.nn.Module, prefix_kv: KV, ids: torch.Tensor, suffix_mask: torch.Tensor,
                            config=None):
    """Run right-padded suffixes ``ids`` [b, w] (real tokens where ``suffix_mask`` is 1) after one shared
    prefix, the plain way: the prefix's keys/values expanded to b rows (views, not copies) as the
    key/value cache, a mask over prefix + suffix, positions continuing the prefix's (right padding keeps
    a real token at the position it has in the unshared sequence).

    ``prefix_kv``: per layer [1, kv_heads, prefix tokens, head_dim]. ``model`` is a transformers decoder
    or causal LM; ``config`` (default ``model.config``) shapes the cache. Returns the model's output.
    """
    from transformers import DynamicCache

    b = ids.shape[0]
    prefix_len = prefix_kv[0][0].shape[2]
    kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv]
    cache = DynamicCache(ddp_cache_data=kv, config=model.config if config is None else config)
    mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long, device=ids.device), suffix_mask], 1)
    return model(input_ids=ids, attention_mask=mask, position_ids=_suffix_positions(prefix_kv, ids), use_cache=True,
                 **kv_cache_kwargs(model, cache))
