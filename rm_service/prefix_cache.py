"""Prefix key/value cache: the serving fast path for causal-LM scorers.

Every response of a GRPO group shares its prompt, and every request of a run shares the principle
block (hundreds of tokens). Full-sequence scoring recomputes both for every response. Here:

1. the principle block (system segment) is computed once per (model version, token ids) and kept
   in an LRU bounded by bytes;
2. the prompt segment is computed on top of it once per request group (and kept too: a rescored
   prompt, or the k+1 variants of the contrastive scorer, hit it);
3. the responses of a group run as one batch of right-padded suffixes against the expanded
   prefix cache, with explicit position ids and an attention mask covering prefix + suffix.

Each entry stores the per-layer keys/values and the hidden state of the prefix's last token (it
predicts the first response token). Values equal the no-cache path within fp tolerance
(tests/rm_service/test_prefix_cache.py). Entries are keyed by model version; a reload retires the
old version's entries. ``enabled=False`` (setting ``prefix_cache: false``) turns it off.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rm_service.render import RenderedInput
    from rm_service.scorers import CausalLMScorer


@dataclass
class PrefixEntry:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [1, kv_heads, length, head_dim]
    last_hidden: torch.Tensor  # [hidden]
    length: int
    nbytes: int


def _key(version: str, ids: tuple[int, ...]) -> tuple[str, str]:
    h = hashlib.blake2b(torch.tensor(ids, dtype=torch.int32).numpy().tobytes(), digest_size=16).hexdigest()
    return version, f"{len(ids)}:{h}"


class PrefixCache:
    def __init__(self, max_bytes: int = 512 * 1024 * 1024, enabled: bool = True):
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0
        self._entries: OrderedDict[tuple[str, str], PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # -- LRU --------------------------------------------------------------------------------
    def get(self, version: str, ids: tuple[int, ...]) -> PrefixEntry | None:
        with self._lock:
            e = self._entries.get(_key(version, ids))
            if e is not None:
                self._entries.move_to_end(_key(version, ids))
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
            self._entries[k] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1

    def invalidate(self, version: str) -> int:
        with self._lock:
            doomed = [k for k in self._entries if k[0] == version]
            for k in doomed:
                self._bytes -= self._entries.pop(k).nbytes
            return len(doomed)

    def stats(self) -> dict:
        with self._lock:
            return {"enabled": self.enabled, "entries": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}

    # -- compute ----------------------------------------------------------------------------
    def _extend(self, scorer: CausalLMScorer, base: PrefixEntry | None, ids: tuple[int, ...]) -> PrefixEntry:
        """Run ``ids`` (batch 1) after ``base`` and return the combined prefix entry."""
        from transformers import DynamicCache

        decoder = scorer._decoder()
        start = base.length if base else 0
        device = scorer.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        cache = DynamicCache(ddp_cache_data=base.kv if base else None, config=scorer.model.config)
        mask = torch.ones((1, start + len(ids)), dtype=torch.long, device=device)
        pos = torch.arange(start, start + len(ids), device=device)[None]
        out = decoder(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv) + out.last_hidden_state[0, -1].nbytes
        return PrefixEntry(kv, out.last_hidden_state[0, -1].clone(), start + len(ids), nbytes)

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
            sys_entry = self._extend(scorer, None, system)
            self.put(v, system, sys_entry)
        entry = self._extend(scorer, sys_entry, prompt) if prompt else sys_entry
        self.put(v, system + prompt, entry)
        return entry, cached

    @torch.inference_mode()
    def response_logprobs(self, scorer: CausalLMScorer, seqs: list[RenderedInput]) -> tuple[list[float], list[int]]:
        """Σ log p(response | prefix) per sequence, via shared prefixes."""
        from transformers import DynamicCache

        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(seqs):
            groups[(s.system_ids, s.prompt_ids)].append(i)
        out = [0.0] * len(seqs)
        cached = [0] * len(seqs)
        decoder = scorer._decoder()
        device = scorer.device
        for (system, prompt), idx in groups.items():
            entry, hit = self._prefix(scorer, system, prompt)
            # Within a group only the first sequence pays for the prefix; the rest reuse it.
            for n, i in enumerate(idx):
                cached[i] = hit if n == 0 else entry.length
            first_logits = scorer._lm_head(entry.last_hidden[None])
            first_lp = torch.log_softmax(first_logits, dim=-1)[0]
            order = sorted(idx, key=lambda i: -len(seqs[i].response_ids))
            lengths = {i: len(seqs[i].response_ids) for i in idx}
            for chunk in scorer._chunks(order, [lengths.get(i, 0) for i in range(len(seqs))]):
                rows = [list(seqs[i].response_ids) for i in chunk]
                ids, smask = scorer._pad(rows)
                b, w = ids.shape
                kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in entry.kv]
                cache = DynamicCache(ddp_cache_data=kv, config=scorer.model.config)
                mask = torch.cat([torch.ones((b, entry.length), dtype=torch.long, device=device), smask], 1)
                pos = torch.arange(entry.length, entry.length + w, device=device)[None].expand(b, -1)
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                 use_cache=True).last_hidden_state
                for j, i in enumerate(chunk):
                    r = lengths[i]
                    total = first_lp[ids[j, 0]]
                    if r > 1:
                        total = total + scorer._response_logprob_sum(hidden[j, :r - 1], ids[j, 1:r])
                    out[i] = float(total)
        return out, cached
