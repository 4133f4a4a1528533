"""Prefix key/value cache: the serving fast path for causal-LM scorers.

Every response of a GRPO group shares its prompt, and every request of a run shares the principle
block (hundreds of tokens). Full-sequence scoring recomputes both for every response. Here:

1. the principle block (system segment) is computed once per (model version, token ids) and kept
   in an LRU bounded by bytes;
2. the prompt segment is computed on top of it once per request group (and kept too: a rescored
   prompt, or the k+1 variants of the contrastive scorer, hit it);
3. the responses of a group run as batches of right-padded suffixes with explicit position ids,
   attending to the prefix through rm_core/prefix_attention.py's cascade (the prefix's keys and
   values used as cached, never copied per row) where torch's fused CPU kernel exists, else through a
   key/value cache expanded to the batch with a mask over prefix + suffix (``attention="expanded"``).

Each entry stores the per-layer keys/values of ITS OWN tokens and the hidden state of the prefix's
last token (it predicts the first response token). A prompt entry points at its principle-block
entry instead of holding a copy of the block: with a 621-token block (~29 MB of fp32 KV on the
embedded model) a prompt entry costs only its prompt's few hundred KB, so the byte bound holds
hundreds of prompts rather than a dozen. A block is never evicted while an entry built on it is
cached (hits touch both; evicting a block takes its dependents with it), so the bytes counted are
the bytes held. Values equal the no-cache path within fp tolerance
(tests/rm_core/test_prefix_cache.py). Entries are keyed by model version; a reload retires the
old version's entries. ``enabled=False`` (setting ``prefix_cache: false``) turns it off.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from rm_core.prefix_attention import cascade_attention, cascade_available
from salmon.modeling import kv_cache_kwargs, returned_kv_cache

if TYPE_CHECKING:
    from rm_core.render import RenderedInput
    from rm_core.scorers import CausalLMScorer


@dataclass
class PrefixEntry:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [1, kv_heads, own tokens, head_dim]
    last_hidden: torch.Tensor  # [hidden]
    length: int  # tokens of the whole prefix: the parent's and its own
    nbytes: int  # own tensors only
    parent: PrefixEntry | None = None
    parent_key: tuple[str, str] | None = None

    def full_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values of the whole prefix (a fresh tensor when there is a parent)."""
        if self.parent is None:
            return self.kv
        return [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
                for (pk, pv), (k, v) in zip(self.parent.full_kv(), self.kv, strict=True)]


def _key(version: str, ids: tuple[int, ...]) -> tuple[str, str]:
    h = hashlib.blake2b(torch.tensor(ids, dtype=torch.int32).numpy().tobytes(), digest_size=16).hexdigest()
    return version, f"{len(ids)}:{h}"


def extend_prefix(scorer: CausalLMScorer, base: PrefixEntry | None, ids: tuple[int, ...],
                  base_key: tuple[str, str] | None = None) -> PrefixEntry:
    """Run ``ids`` (batch 1) after ``base``; the entry keeps only the new tokens' keys/values."""
    from transformers import DynamicCache

    decoder = scorer._decoder()
    start = base.length if base else 0
    device = scorer.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    cache = DynamicCache(ddp_cache_data=base.full_kv() if base else None, config=scorer.model.config)
    mask = torch.ones((1, start + len(ids)), dtype=torch.long, device=device)
    pos = torch.arange(start, start + len(ids), device=device)[None]
    out = decoder(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True,
                  **kv_cache_kwargs(decoder, cache))
    # A slice is a view of the whole [base + new] tensor; clone so the entry holds only its own part.
    kv = [(layer.keys[:, :, start:].clone(), layer.values[:, :, start:].clone())
          for layer in returned_kv_cache(out).layers]
    last = out.last_hidden_state[0, -1].clone()
    nbytes = sum(k.nbytes + v.nbytes for k, v in kv) + last.nbytes
    return PrefixEntry(kv, last, start + len(ids), nbytes, parent=base, parent_key=base_key)


PrefixAttention = Literal["auto", "expanded"]


def suffix_hidden_states(scorer: CausalLMScorer, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
                         prefix_len: int, ids: torch.Tensor, suffix_mask: torch.Tensor,
                         cascade: bool) -> torch.Tensor:
    """Last hidden states of right-padded suffixes ``ids`` [b, w] that all follow one cached prefix.

    ``prefix_kv``: per layer [1, kv_heads, prefix_len, head_dim]. The caller holds the scorer's lock.
    """
    from transformers import DynamicCache

    decoder = scorer._decoder()
    b, w = ids.shape
    pos = torch.arange(prefix_len, prefix_len + w, device=ids.device)[None].expand(b, -1)
    if cascade:
        with cascade_attention(decoder.config):
            return decoder(input_ids=ids, position_ids=pos, use_cache=False, prefix_kv=prefix_kv).last_hidden_state
    kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv]
    cache = DynamicCache(ddp_cache_data=kv, config=scorer.model.config)
    mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long, device=ids.device), suffix_mask], 1)
    return decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   **kv_cache_kwargs(decoder, cache)).last_hidden_state


class PrefixCache:
    def __init__(self, max_bytes: int = 512 * 1024 * 1024, enabled: bool = True,
                 attention: PrefixAttention = "auto"):
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0
        self.attention = attention
        self._entries: OrderedDict[tuple[str, str], PrefixEntry] = OrderedDict()
        self._children: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # -- LRU --------------------------------------------------------------------------------
    def get(self, version: str, ids: tuple[int, ...]) -> PrefixEntry | None:
        k = _key(version, ids)
        with self._lock:
            e = self._entries.get(k)
            if e is not None:
                self._entries.move_to_end(k)
                if e.parent_key in self._entries:  # the block stays at least as recent as its users
                    self._entries.move_to_end(e.parent_key)
                self.hits += 1
            else:
                self.misses += 1
            return e

    def put(self, version: str, ids: tuple[int, ...], entry: PrefixEntry) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole budget: compute it, never keep it
        with self._lock:
            k = _key(version, ids)
            if k in self._entries:
                return
            if entry.parent_key is not None and entry.parent_key not in self._entries:
                return  # its block was not kept (or just evicted): its bytes would go uncounted
            self._entries[k] = entry
            self._bytes += entry.nbytes
            if entry.parent_key is not None:
                self._children[entry.parent_key].add(k)
            while self._bytes > self.max_bytes and self._entries:
                self.evictions += self._evict(next(iter(self._entries)))

    def _evict(self, k: tuple[str, str]) -> int:
        """Drop ``k`` and every entry built on it; returns how many went. Holds the lock."""
        e = self._entries.pop(k, None)
        if e is None:
            return 0
        self._bytes -= e.nbytes
        if e.parent_key is not None:
            self._children.get(e.parent_key, set()).discard(k)
        return 1 + sum(self._evict(c) for c in self._children.pop(k, set()))

    def invalidate(self, version: str) -> int:
        with self._lock:
            return sum(self._evict(k) for k in [k for k in self._entries if k[0] == version])

    def uses_cascade(self, scorer: CausalLMScorer) -> bool:
        return self.attention == "auto" and cascade_available(scorer.model, scorer.device)

    def stats(self) -> dict:
        with self._lock:
            return {"enabled": self.enabled, "attention": self.attention,
                    "entries": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}

    # -- compute ----------------------------------------------------------------------------
    def _prefix(self, scorer: CausalLMScorer, system: tuple[int, ...], prompt: tuple[int, ...]
                ) -> tuple[PrefixEntry, int]:
        """The (system + prompt) entry, and how many of its tokens came from the cache."""
        v = scorer.version
        full = self.get(v, system + prompt)
        if full is not None:
            return full, full.length
        sys_entry = self.get(v, system)
        cached = sys_entry.length if sys_entry else 0
        if sys_entry is None:
            sys_entry = extend_prefix(scorer, None, system)
            self.put(v, system, sys_entry)
        entry = extend_prefix(scorer, sys_entry, prompt, _key(v, system)) if prompt else sys_entry
        self.put(v, system + prompt, entry)
        return entry, cached

    @torch.inference_mode()
    def response_logprobs(self, scorer: CausalLMScorer, seqs: list[RenderedInput]) -> tuple[list[float], list[int]]:
        """Σ log p(response | prefix) per sequence, via shared prefixes."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(seqs):
            groups[(s.system_ids, s.prompt_ids)].append(i)
        out = [0.0] * len(seqs)
        cached = [0] * len(seqs)
        cascade = self.uses_cascade(scorer)
        for (system, prompt), idx in groups.items():
            entry, hit = self._prefix(scorer, system, prompt)
            # Within a group only the first sequence pays for the prefix; the rest reuse it.
            for n, i in enumerate(idx):
                cached[i] = hit if n == 0 else entry.length
            prefix_kv = entry.full_kv()
            first_logits = scorer._lm_head(entry.last_hidden[None])
            first_lp = torch.log_softmax(first_logits, dim=-1)[0]
            order = sorted(idx, key=lambda i: -len(seqs[i].response_ids))
            lengths = {i: len(seqs[i].response_ids) for i in idx}
            for chunk in scorer._chunks(order, [lengths.get(i, 0) for i in range(len(seqs))]):
                ids, smask = scorer._pad([list(seqs[i].response_ids) for i in chunk])
                hidden = suffix_hidden_states(scorer, prefix_kv, entry.length, ids, smask, cascade)
                for j, i in enumerate(chunk):
                    r = lengths[i]
                    total = first_lp[ids[j, 0]]
                    if r > 1:
                        total = total + scorer._response_logprob_sum(hidden[j, :r - 1], ids[j, 1:r])
                    out[i] = float(total)
        return out, cached
