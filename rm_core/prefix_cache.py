"""Prefix key/value cache: a byte-bounded LRU of prefix entries, keyed by (model version, token ids).

Every response of a GRPO group shares its prompt, and every request of a run shares the principle
block (hundreds of tokens). Full-sequence scoring recomputes both for every response. The model
scorers (rm_core/scorers.py: ``LMScorer.over_cached_prefixes``, under the causal-LM scorers' log-probs
and the trained scorer's head values) compute the principle block (system segment) once per (model
version, token ids), the prompt segment on top of it once per request group, and keep both here; the
responses then run as suffixes against them. This module holds only
the entries and their bookkeeping: it runs no model and knows nothing of scorers.

Each entry stores the per-layer keys/values of ITS OWN tokens and the hidden state of the prefix's
last token (it predicts the first response token). A prompt entry points at its principle-block
entry instead of holding a copy of the block: with a 621-token block (~29 MB of fp32 KV on the
embedded model) a prompt entry costs only its prompt's few hundred KB, so the byte bound holds
hundreds of prompts rather than a dozen. The same holds between blocks: the contrastive scorer's
per-principle variants of a block share every token before the toggled principle, so a variant
entry points at the base block and holds only the tokens from the first one that differs (the
block's entries form a prefix tree, ``LMScorer.block_entries``). An entry is never evicted while an
entry built on it is cached (hits touch it and every ancestor; evicting an entry takes its
dependents with it), so the bytes counted are the bytes held. Entries are keyed by model version; a reload retires the old version's entries.
``enabled=False`` (setting ``prefix_cache: false``) turns it off; ``attention`` is the service's
``prefix_attention`` setting, carried here for the scorers that use these entries and reported in
:meth:`PrefixCache.stats`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

PrefixKey = tuple[str, str]  # (model version, length and hash of the token ids)
PrefixAttention = Literal["auto", "expanded"]


@dataclass
class PrefixEntry:
    """One cached prefix: its own tokens' keys/values, built on the first ``parent_length`` tokens of
    ``parent`` (a principle block, or for a variant block its base block) or on nothing."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [1, kv_heads, own tokens, head_dim]
    last_hidden: torch.Tensor  # [hidden]
    length: int  # tokens of the whole prefix: the parent's that it uses and its own
    nbytes: int  # own tensors only
    parent: PrefixEntry | None = None
    parent_key: PrefixKey | None = None
    parent_length: int | None = None  # how many of the parent's tokens precede its own; None: all

    def full_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values of the whole prefix (a fresh tensor when there is a parent)."""
        if self.parent is None:
            return self.kv
        used = self.length - self.kv[0][0].shape[2]
        # A causal model's keys/values at a position depend only on the tokens before it, so the first
        # ``used`` of the parent's are this prefix's own, whatever the parent has after them.
        return [(torch.cat([pk[:, :, :used], k], dim=2), torch.cat([pv[:, :, :used], v], dim=2))
                for (pk, pv), (k, v) in zip(self.parent.full_kv(), self.kv, strict=True)]


def prefix_key(version: str, ids: tuple[int, ...]) -> PrefixKey:
    """The cache key of the prefix ``ids`` under model ``version`` (what :attr:`PrefixEntry.parent_key` holds)."""
    h = hashlib.blake2b(torch.tensor(ids, dtype=torch.int32).numpy().tobytes(), digest_size=16).hexdigest()
    return version, f"{len(ids)}:{h}"


class PrefixCache:
    """LRU of :class:`PrefixEntry` bounded by their bytes; an entry's parent outlives it (see the module docstring)."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, enabled: bool = True,
                 attention: PrefixAttention = "auto"):
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0
        self.attention = attention
        self._entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()
        self._children: dict[PrefixKey, set[PrefixKey]] = defaultdict(set)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # -- LRU --------------------------------------------------------------------------------
    def get(self, version: str, ids: tuple[int, ...]) -> PrefixEntry | None:
        k = prefix_key(version, ids)
        with self._lock:
            e = self._entries.get(k)
            if e is not None:
                self._entries.move_to_end(k)
                ancestor = e
                while ancestor.parent_key in self._entries:  # blocks stay at least as recent as their users
                    self._entries.move_to_end(ancestor.parent_key)
                    ancestor = self._entries[ancestor.parent_key]
                self.hits += 1
            else:
                self.misses += 1
            return e

    def put(self, version: str, ids: tuple[int, ...], entry: PrefixEntry) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole budget: compute it, never keep it
        with self._lock:
            k = prefix_key(version, ids)
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

    def _evict(self, k: PrefixKey) -> int:
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

    def snapshot(self) -> dict[PrefixKey, PrefixEntry]:
        """The entries held now, least recently used first (a copy: for checks and reports)."""
        with self._lock:
            return dict(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"enabled": self.enabled, "attention": self.attention,
                    "entries": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}
