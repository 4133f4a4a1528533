"""Scorers behind one interface: prepare (render → token sequences) then compute (model) then combine.

- :class:`ContrastiveScorer` (default, zero-shot): per principle i,
  ``log p(y | x, P) − log p(y | x, P with principle i toggled)``, summed over the principles that
  can be toggled (those with a negative definition); a plain principle (no negative definition) is
  contrasted with the mean over generic instructions put in its place (render.REFERENCE_INSTRUCTIONS).
  ``whole_set`` contrast toggles the negatable ones all at once (fewer passes; less accurate, see the
  README's scorer table).
- :class:`ProbeScorer` (zero-shot): ``logit("Yes") − logit("No")`` after asking whether the
  response follows the principles.
- :class:`TrainedScorer`: a registry version — backbone + LoRA + scalar head on the last token,
  normalised with the manifest's reward mean/std; with the prefix cache, [principle block + prompt]
  runs once and a group's responses run against it as a batch, like the causal-LM scorers.
- :class:`RuleScorer`: no model; regex matches minus a length penalty (smoke runs, rule rewards).

A request item becomes a :class:`Prepared`: the token sequences the model must see and how their
values combine into one score. The batcher runs many requests' sequences together; the scorer
object is captured at prepare time, so a reload never changes the version mid-request.

``score_items`` is the offline entry point (check set, data_synth's label source, tests): the same
prepare/compute/combine path the service runs, without HTTP.

The pieces of a scorer's forward are public: the prefix forward (:meth:`~LMScorer.extend_prefix`) and
the suffix forward against a cached prefix (:class:`LMScorer`, shared by every model scorer), the
response log-probabilities of a prefix's suffixes and of full padded sequences
(:class:`CausalLMScorer`), the head values of both (:class:`TrainedScorer`). The service's cached path and
the no-cache path are built from them, and so are the benchmark's limit and baseline.
"""

from __future__ import annotations

import logging
import re
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from principles.schema import Principle
from rm_core.batching import right_pad
from rm_core.prefix_attention import cascade_available, cascade_prefix_forward, expanded_prefix_forward
from rm_core.prefix_cache import PrefixAttention, PrefixCache, PrefixEntry, PrefixKey, prefix_key
from rm_core.render import (
    PROMPT_FORMAT_VERSION,
    REFERENCE_INSTRUCTIONS,
    Prompt,
    RenderedInput,
    Renderer,
    principle_block,
)
from salmon.modeling import (
    ModelOptions,
    kv_cache_kwargs,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    returned_kv_cache,
)

log = logging.getLogger(__name__)

LOGIT_CHUNK = 512  # positions per lm_head call: bounds the [N, vocab] logits tensor (~100 MB fp32)


@dataclass
class Prepared:
    """One item, ready for the model: its sequences and how their values become one score."""

    scorer: Scorer
    seqs: list[RenderedInput]
    combine: Callable[[list[float]], float]
    truncated: bool = False
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(len(s) for s in self.seqs)


def _shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _toggle(negated: frozenset[str], name: str) -> frozenset[str]:
    return negated - {name} if name in negated else negated | {name}


def combine_values(items: Sequence[Prepared], values: Sequence[float]) -> list[float]:
    """Each item's score from ``values``, the flat per-sequence values of all items' seqs in order."""
    out, i = [], 0
    for p in items:
        out.append(float(p.combine(values[i:i + len(p.seqs)])))
        i += len(p.seqs)
    return out


class Scorer(ABC):
    kind: str = "abstract"

    def __init__(self, version: str, base_model: str):
        self.version = version
        self.base_model = base_model

    @abstractmethod
    def prepare(self, principles: Sequence[Principle], prompt: Prompt, response: str,
                negate: Collection[str] = (), truncate: bool = True) -> Prepared: ...

    @abstractmethod
    def compute(self, seqs: list[RenderedInput]) -> tuple[list[float], list[int]]:
        """Values for each sequence, and how many of each one's tokens came from the prefix cache."""

    def score_prepared(self, items: list[Prepared]) -> list[float]:
        flat = [s for p in items for s in p.seqs]
        values, _ = self.compute(flat) if flat else ([], [])
        return combine_values(items, values)

    def score_items(self, principles: Sequence[Principle], items: Sequence[tuple[Prompt, str]],
                    negate: Collection[str] = (), truncate: bool = True) -> list[float]:
        """Offline scoring of (prompt, response) pairs; the service runs exactly this path."""
        prepared = [self.prepare(principles, p, r, negate, truncate) for p, r in items]
        return self.score_prepared(prepared)


class RuleScorer(Scorer):
    kind = "rule"

    def __init__(self, pattern: str, length_penalty: float = 0.0):
        super().__init__(version=f"rule:{pattern}", base_model="none")
        self.pattern = re.compile(pattern, re.IGNORECASE)
        self.length_penalty = length_penalty

    def prepare(self, principles, prompt, response, negate=(), truncate=True) -> Prepared:
        value = len(self.pattern.findall(response)) - self.length_penalty * len(response)
        return Prepared(self, [], lambda _v, value=value: value)

    def compute(self, seqs):
        return [], []


class LMScorer(Scorer):
    """Shared machinery of the scorers that run a transformer over rendered sequences: length-sorted
    padded batches, and the prefix forward every scorer with a cached-prefix path builds on (the
    principle block and the prompt run once, kept in a :class:`PrefixCache` under the scorer's
    version, then a group's responses run as suffixes against them)."""

    def __init__(self, model, tokenizer, version: str, base_model: str, max_batch_tokens: int = 4096,
                 max_prompt_tokens: int = 1024, max_response_tokens: int = 1024,
                 prefix_cache: PrefixCache | None = None, max_padding: float = 0.25):
        super().__init__(version, base_model)
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer, max_prompt_tokens, max_response_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.prefix_cache = prefix_cache
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()  # one forward at a time per model: the worker and offline callers

    # -- batching helpers ---------------------------------------------------------------------
    def chunks(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """Split indices (sorted by length, longest first) so padded tokens fit the budget and padding
        stays under ``max_padding`` of the real tokens.

        Why the second rule: a pad token costs a real token's FLOPs. GRPO responses vary 4x in length,
        so one chunk of a group's suffixes padded to its longest is ~60% padding; on a CPU, where a
        forward is compute-bound, splitting by length is nearly free and buys that back.
        """
        chunks, cur, cur_max, cur_real = [], [], 0, 0
        for i in order:
            new_max = max(cur_max, lengths[i])
            padded = new_max * (len(cur) + 1)
            if cur and (padded > self.max_batch_tokens or padded > (1 + self.max_padding) * (cur_real + lengths[i])):
                chunks.append(cur)
                cur, new_max, cur_real = [], lengths[i], 0
            cur.append(i)
            cur_max, cur_real = new_max, cur_real + lengths[i]
        if cur:
            chunks.append(cur)
        return chunks

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(ids, mask)`` of ``rows`` on the model's device, with the tokenizer's pad id."""
        return right_pad(rows, self.tokenizer.pad_token_id, self.device)

    def _batched(self, seqs: list[RenderedInput],
                 fn: Callable[[torch.Tensor, torch.Tensor, list[RenderedInput]], list[float]]) -> list[float]:
        """Run ``fn(ids, mask, rows)`` over length-sorted, budget-sized, right-padded chunks."""
        lengths = [len(s) for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: -lengths[i])
        out = [0.0] * len(seqs)
        for chunk in self.chunks(order, lengths):
            rows = [seqs[i] for i in chunk]
            ids, mask = self.pad([r.input_ids for r in rows])
            for i, v in zip(chunk, fn(ids, mask, rows), strict=True):
                out[i] = float(v)
        return out

    # -- prefix reuse ---------------------------------------------------------------------------
    @property
    def decoder(self) -> torch.nn.Module:
        """The model without its output head (lm_head or score head): what returns the last hidden states."""
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model

    def uses_cascade(self, attention: PrefixAttention) -> bool:
        """Whether suffixes attend to a cached prefix through the cascade (else the expanded cache)."""
        return attention == "auto" and cascade_available(self.model, self.device)

    @torch.inference_mode()
    def extend_prefix(self, base: PrefixEntry | None, ids: tuple[int, ...],
                      base_key: PrefixKey | None = None, base_length: int | None = None) -> PrefixEntry:
        """Run ``ids`` (batch 1) after ``base`` (its first ``base_length`` tokens; default all of them);
        the entry keeps only the new tokens' keys/values. ``base_key`` is ``base``'s key in a
        :class:`PrefixCache`, for an entry that will be put there."""
        from transformers import DynamicCache

        decoder = self.decoder
        start = (base.length if base_length is None else base_length) if base else 0
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        base_kv = [(k[:, :, :start], v[:, :, :start]) for k, v in base.full_kv()] if base else None
        cache = DynamicCache(ddp_cache_data=base_kv, config=self.model.config)
        mask = torch.ones((1, start + len(ids)), dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        out = decoder(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True,
                      **kv_cache_kwargs(decoder, cache))
        # A slice is a view of the whole [base + new] tensor; clone so the entry holds only its own part.
        kv = [(layer.keys[:, :, start:].clone(), layer.values[:, :, start:].clone())
              for layer in returned_kv_cache(out).layers]
        last = out.last_hidden_state[0, -1].clone()
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv) + last.nbytes
        return PrefixEntry(kv, last, start + len(ids), nbytes, parent=base, parent_key=base_key,
                           parent_length=start if base else None)

    def suffix_hidden_states(self, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor,
                             suffix_mask: torch.Tensor, cascade: bool) -> torch.Tensor:
        """Last hidden states of right-padded suffixes ``ids`` [b, w] that all follow one cached prefix.

        ``prefix_kv``: per layer [1, kv_heads, prefix tokens, head_dim].
        """
        if cascade:
            return cascade_prefix_forward(self.decoder, prefix_kv, ids).last_hidden_state
        return expanded_prefix_forward(self.decoder, prefix_kv, ids, suffix_mask,
                                       config=self.model.config).last_hidden_state

    def block_entries(self, cache: PrefixCache, systems: Sequence[tuple[int, ...]]
                      ) -> dict[tuple[int, ...], tuple[PrefixEntry, int]]:
        """Each principle block of ``systems`` (in order) as a cache entry, and how many of its tokens
        were reused rather than run.

        Blocks of one call are variants of one another (the contrastive scorer's k+1 blocks toggle one
        principle each, and the first is the base): a block that is not cached hangs from the block
        of this call that shares the longest token prefix with it, if that one is a whole block (not
        a variant itself, so chains stay two deep), and runs only the tokens after the shared ones.
        The k+1 blocks then cost the tree's unique tokens, in time and in cache bytes, instead of k+1
        whole blocks. (Blocks of unrelated sets in one call share only the header; one hung from
        another keeps that other cached for as long as it is itself: the cache evicts no parent first.)
        """
        v = self.version
        out: dict[tuple[int, ...], tuple[PrefixEntry, int]] = {}
        for system in systems:
            if system in out:
                continue
            entry = cache.get(v, system)
            if entry is not None:
                out[system] = (entry, entry.length)
                continue
            parent, shared = None, 0
            for other, (e, _) in out.items():
                if e.parent is None:
                    n = _shared_prefix_length(other, system)
                    if n > shared:
                        parent, shared = other, n
            shared = min(shared, len(system) - 1)  # a block runs at least one token: its last hidden state
            if parent is None or shared < 1:
                entry, reused = self.extend_prefix(None, system), 0
            else:
                entry = self.extend_prefix(out[parent][0], system[shared:], prefix_key(v, parent), shared)
                reused = shared
            cache.put(v, system, entry)
            out[system] = (entry, reused)
        return out

    def _cached_prefix(self, cache: PrefixCache, system: tuple[int, ...], prompt: tuple[int, ...],
                       block: tuple[PrefixEntry, int] | None = None) -> tuple[PrefixEntry, int]:
        """The (system + prompt) entry, and how many of its tokens came from ``cache`` (``block``: the
        system's entry from :meth:`block_entries`, when the caller has it)."""
        v = self.version
        full = cache.get(v, system + prompt)
        if full is not None:
            return full, full.length
        sys_entry, cached = block if block is not None else self.block_entries(cache, [system])[system]
        entry = self.extend_prefix(sys_entry, prompt, prefix_key(v, system)) if prompt else sys_entry
        cache.put(v, system + prompt, entry)
        return entry, cached

    @torch.inference_mode()
    def over_cached_prefixes(self, seqs: Sequence[RenderedInput],
                             per_prefix: Callable[[PrefixEntry, list[tuple[int, ...]], bool], list[float]],
                             cache: PrefixCache | None = None) -> tuple[list[float], list[int]]:
        """``per_prefix(entry, responses, cascade)`` for each (principle block, prompt) group of ``seqs``,
        its prefix taken from ``cache`` (default: the scorer's own) or computed once and put there; the
        values in ``seqs``' order, and how many of each sequence's tokens came from the cache."""
        cache = self.prefix_cache if cache is None else cache
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(seqs):
            groups[(s.system_ids, s.prompt_ids)].append(i)
        out = [0.0] * len(seqs)
        cached = [0] * len(seqs)
        cascade = self.uses_cascade(cache.attention)
        # Every block of the call at once, so that variant blocks hang from their base.
        blocks = self.block_entries(cache, [system for system, _ in groups])
        for (system, prompt), idx in groups.items():
            entry, hit = self._cached_prefix(cache, system, prompt, blocks[system])
            # Within a group only the first sequence pays for the prefix; the rest reuse it.
            for n, i in enumerate(idx):
                cached[i] = hit if n == 0 else entry.length
            values = per_prefix(entry, [seqs[i].response_ids for i in idx], cascade)
            for i, v in zip(idx, values, strict=True):
                out[i] = v
        return out, cached


class CausalLMScorer(LMScorer):
    """Scorers whose value comes from a causal LM's next-token distribution.

    The forward's pieces are public so that every path to Σ log p(response | prefix) is built from the
    same code: no cache (:meth:`padded_response_logprobs` per length-sorted chunk), the prefix cache
    (:meth:`cached_response_logprobs`), and callers that keep prefixes themselves
    (:meth:`extend_prefix` then :meth:`prefix_response_logprobs`). None of them takes the scorer's lock;
    :meth:`Scorer.compute` does, so concurrent callers go through it.
    """

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 next-token logits [rows, vocab] from hidden states [rows, hidden]."""
        return self.model.get_output_embeddings()(hidden).float()

    def response_logprob_sum(self, hidden_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ log p(target | hidden) over rows, computed in chunks to bound the logits tensor."""
        total = torch.zeros((), dtype=torch.float32, device=hidden_rows.device)
        for s in range(0, hidden_rows.shape[0], LOGIT_CHUNK):
            logits = self.lm_logits(hidden_rows[s:s + LOGIT_CHUNK])
            # log_softmax then gather, not logit − logsumexp: on CPU torch's logsumexp is the slower of the
            # two (measured on [200, 49152] fp32 logits: 176 ms vs 334 ms including the lm_head matmul).
            lp = torch.log_softmax(logits, dim=-1)
            total = total + lp.gather(1, targets[s:s + LOGIT_CHUNK, None]).sum()
        return total

    @torch.inference_mode()
    def padded_response_logprobs(self, seqs: Sequence[RenderedInput]) -> list[float]:
        """Σ log p(response | prefix) per sequence: ONE forward over the full sequences, right-padded together."""
        ids, mask = self.pad([s.input_ids for s in seqs])
        return self._padded_logprobs(ids, mask, seqs)

    def _padded_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, seqs: Sequence[RenderedInput]) -> list[float]:
        hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out = []
        for j, s in enumerate(seqs):
            p, n = len(s.prefix_ids), len(s.response_ids)
            out.append(float(self.response_logprob_sum(hidden[j, p - 1:p + n - 1], ids[j, p:p + n])))
        return out

    @torch.inference_mode()
    def prefix_response_logprobs(self, entry: PrefixEntry, responses: Sequence[Sequence[int]],
                                 cascade: bool) -> list[float]:
        """Σ log p(response | prefix) for ``responses`` that all follow the prefix ``entry``: length-sorted
        chunks of right-padded suffixes against its keys/values, the first token from its last hidden state."""
        prefix_kv = entry.full_kv()
        first_lp = torch.log_softmax(self.lm_logits(entry.last_hidden[None]), dim=-1)[0]
        lengths = [len(r) for r in responses]
        order = sorted(range(len(responses)), key=lambda i: -lengths[i])
        out = [0.0] * len(responses)
        for chunk in self.chunks(order, lengths):
            ids, smask = self.pad([list(responses[i]) for i in chunk])
            hidden = self.suffix_hidden_states(prefix_kv, ids, smask, cascade)
            for j, i in enumerate(chunk):
                r = lengths[i]
                total = first_lp[ids[j, 0]]
                if r > 1:
                    total = total + self.response_logprob_sum(hidden[j, :r - 1], ids[j, 1:r])
                out[i] = float(total)
        return out

    @torch.inference_mode()
    def cached_response_logprobs(self, seqs: list[RenderedInput], cache: PrefixCache | None = None
                                 ) -> tuple[list[float], list[int]]:
        """Σ log p(response | prefix) per sequence via shared prefixes kept in ``cache`` (default: the
        scorer's own), and how many of each sequence's tokens came from the cache.

        1. the principle block (system segment) is computed once per (model version, token ids) and kept;
        2. the prompt segment is computed on top of it once per request group (and kept too: a rescored
           prompt, or the k+1 variants of the contrastive scorer, hit it);
        3. the responses of a group run as batches of right-padded suffixes with explicit position ids,
           attending to the prefix through rm_core/prefix_attention.py's cascade (the prefix's keys and
           values used as cached, never copied per row) where torch's fused CPU kernel exists, else
           through a key/value cache expanded to the batch (``cache.attention == "expanded"``).

        Values equal the no-cache path within fp tolerance (tests/rm_core/test_prefix_cache.py).
        """
        return self.over_cached_prefixes(seqs, self.prefix_response_logprobs, cache)


class ContrastiveScorer(CausalLMScorer):
    kind = "contrastive"

    def __init__(self, *args, contrast: str = "per_principle", **kwargs):
        super().__init__(*args, **kwargs)
        if contrast not in {"per_principle", "whole_set"}:
            raise ValueError("contrast must be 'per_principle' or 'whole_set'")
        self.contrast = contrast

    def prepare(self, principles, prompt, response, negate=(), truncate=True) -> Prepared:
        base_neg = frozenset(negate)
        togglable = [p.name for p in principles if p.negative_definition or p.name in base_neg]
        plain = [i for i, p in enumerate(principles) if p.name not in togglable]
        # Each contrast term is (pass 0) minus the mean of its reference passes: a togglable principle's
        # reference is the same block with it toggled; a plain one's is the block with it replaced by
        # each generic instruction of REFERENCE_INSTRUCTIONS (see that constant for why not "removed").
        if self.contrast == "whole_set":
            terms = [[principle_block(principles, _toggle_all(base_neg, togglable))]] if togglable else []
        else:
            terms = [[principle_block(principles, _toggle(base_neg, n))] for n in togglable]
        terms += [[principle_block(_replaced(principles, i, text), base_neg) for text in REFERENCE_INSTRUCTIONS]
                  for i in plain]
        first = self.renderer.render(principle_block(principles, base_neg), prompt, response, truncate)
        seqs = [first] + [self.renderer.render(b, prompt, response, truncate) for refs in terms for b in refs]
        sizes = tuple(len(refs) for refs in terms)
        return Prepared(self, seqs, lambda v, sizes=sizes: _contrast(v, sizes), truncated=first.truncated)

    @torch.inference_mode()
    def compute(self, seqs: list[RenderedInput]) -> tuple[list[float], list[int]]:
        with self._lock:
            if self.prefix_cache is not None and self.prefix_cache.enabled:
                return self.cached_response_logprobs(seqs)
            return self.full_response_logprobs(seqs), [0] * len(seqs)

    @torch.inference_mode()
    def full_response_logprobs(self, seqs: list[RenderedInput]) -> list[float]:
        """The no-cache path: every sequence in full, right-padded, batched by token budget."""
        return self._batched(seqs, self._padded_logprobs)


def _replaced(principles: Sequence[Principle], i: int, text: str) -> list[Principle]:
    out = list(principles)
    out[i] = Principle(name=principles[i].name, definition=text)
    return out


def _contrast(values: Sequence[float], sizes: Sequence[int]) -> float:
    """Σ over terms of (values[0] − the mean of that term's reference values, which follow in order)."""
    total, j = 0.0, 1
    for n in sizes:
        total += values[0] - sum(values[j:j + n]) / n
        j += n
    return total


def _toggle_all(negated: frozenset[str], names: list[str]) -> frozenset[str]:
    out = negated
    for n in names:
        out = _toggle(out, n)
    return out


class ProbeScorer(CausalLMScorer):
    kind = "probe"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        enc = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        self.yes_id, self.no_id = enc("Yes"), enc("No")

    def prepare(self, principles, prompt, response, negate=(), truncate=True) -> Prepared:
        seq = self.renderer.render(principle_block(principles, negate), prompt, response, truncate, probe=True)
        return Prepared(self, [seq], lambda v: v[0], truncated=seq.truncated)

    @torch.inference_mode()
    def compute(self, seqs):
        def run(ids, mask, rows):
            hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = self.lm_logits(hidden[torch.arange(len(rows)), mask.sum(1) - 1])
            return (logits[:, self.yes_id] - logits[:, self.no_id]).tolist()

        with self._lock:
            return self._batched(seqs, run), [0] * len(seqs)


class TrainedScorer(LMScorer):
    """A principle-following reward model from the registry: scalar head on the last token.

    The model is a sequence classifier (backbone + merged LoRA + a ``score`` head): its value is the
    head at the sequence's last non-pad token, the token transformers' own forward reads. With the
    prefix cache on, :meth:`cached_head_values` computes [principle block + prompt] once per model
    version (a reload retires the old version's entries), runs a group's responses against it as a
    batch and reads the head at each response's last token; :meth:`full_head_values` is the
    no-cache path, every sequence in full. Both give the same values within fp tolerance
    (tests/rm_core/test_trained_prefix.py).
    """

    kind = "trained"

    def __init__(self, *args, reward_mean: float = 0.0, reward_std: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_mean = reward_mean
        self.reward_std = reward_std if reward_std > 1e-8 else 1.0

    def prepare(self, principles, prompt, response, negate=(), truncate=True) -> Prepared:
        seq = self.renderer.render(principle_block(principles, negate), prompt, response, truncate)
        m, s = self.reward_mean, self.reward_std
        return Prepared(self, [seq], lambda v, m=m, s=s: (v[0] - m) / s, truncated=seq.truncated)

    @property
    def head(self) -> torch.nn.Module | None:
        """The scalar head over the backbone's last hidden states (None: a model without one, which
        has no prefix path and always runs in full)."""
        head = getattr(self.model, "score", None)
        return head if isinstance(head, torch.nn.Module) else None

    @property
    def value_pad_id(self) -> int | None:
        """The id the model's forward skips when it looks for a sequence's last token (None: it reads the last)."""
        return self.model.config.get_text_config().pad_token_id

    def last_value_index(self, ids: Sequence[int]) -> int:
        """Where in ``ids`` the full forward reads the value: the last token that is not the pad id
        (-1 when there is none). Rendered sequences end in the chat template's closing text, so this is
        their last token; the rule is transformers' own, so both paths read the same position."""
        pad = self.value_pad_id
        if pad is None:
            return len(ids) - 1
        for j in range(len(ids) - 1, -1, -1):
            if ids[j] != pad:
                return j
        return -1

    def head_values(self, hidden: torch.Tensor) -> list[float]:
        """fp32 head values of hidden states [rows, hidden]."""
        return self.head(hidden).float()[:, 0].tolist()

    @torch.inference_mode()
    def padded_head_values(self, seqs: Sequence[RenderedInput]) -> list[float]:
        """Head values per sequence: ONE forward of the whole model over the full sequences, right-padded together."""
        ids, mask = self.pad([s.input_ids for s in seqs])
        return self._padded_values(ids, mask, seqs)

    def _padded_values(self, ids: torch.Tensor, mask: torch.Tensor, rows: Sequence[RenderedInput]) -> list[float]:
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()

    @torch.inference_mode()
    def full_head_values(self, seqs: list[RenderedInput]) -> list[float]:
        """The no-cache path: every sequence in full, right-padded, batched by token budget."""
        return self._batched(seqs, self._padded_values)

    @torch.inference_mode()
    def prefix_head_values(self, entry: PrefixEntry, responses: Sequence[Sequence[int]], cascade: bool) -> list[float]:
        """Head values of ``responses`` that all follow the prefix ``entry``: length-sorted chunks of
        right-padded suffixes against its keys/values, the head read at each response's last token.
        A response with no token to read at (all pad ids) is read at the prefix's last token, which
        ``entry`` holds (where the full forward reads too unless that token is a pad id:
        :meth:`cached_head_values` runs that case in full)."""
        prefix_kv = entry.full_kv()
        lengths = [len(r) for r in responses]
        at = [self.last_value_index(r) for r in responses]
        out = [0.0] * len(responses)
        empty = [i for i in range(len(responses)) if at[i] < 0]
        if empty:
            first = self.head_values(entry.last_hidden[None])[0]
            for i in empty:
                out[i] = first
        readable = [i for i in sorted(range(len(responses)), key=lambda i: -lengths[i]) if at[i] >= 0]
        for chunk in self.chunks(readable, lengths) if readable else []:
            ids, smask = self.pad([list(responses[i]) for i in chunk])
            # Only each row's last real token is read: later tokens (padding) cannot change it, earlier
            # ones only through attention, so one row per response goes through the head.
            width = max(at[i] for i in chunk) + 1
            hidden = self.suffix_hidden_states(prefix_kv, ids[:, :width], smask[:, :width], cascade)
            rows = hidden[torch.arange(len(chunk), device=hidden.device), torch.tensor([at[i] for i in chunk], device=hidden.device)]
            for i, v in zip(chunk, self.head_values(rows), strict=True):
                out[i] = v
        return out

    @torch.inference_mode()
    def cached_head_values(self, seqs: list[RenderedInput], cache: PrefixCache | None = None
                           ) -> tuple[list[float], list[int]]:
        """Head values per sequence via shared prefixes kept in ``cache`` (default: the scorer's own), and
        how many of each sequence's tokens came from the cache.

        Sequences whose value the full forward reads inside the prefix (a response of pad ids after a
        prefix that ends in one, which no chat template renders) run in full, so every value is the
        full path's.
        """
        prefix_readable = [i for i, s in enumerate(seqs)
                           if self.last_value_index(s.response_ids) >= 0
                           or self.last_value_index(s.prefix_ids) == len(s.prefix_ids) - 1]
        if len(prefix_readable) == len(seqs):
            return self.over_cached_prefixes(seqs, self.prefix_head_values, cache)
        out, cached = [0.0] * len(seqs), [0] * len(seqs)
        keep = set(prefix_readable)
        if prefix_readable:
            vals, hits = self.over_cached_prefixes([seqs[i] for i in prefix_readable], self.prefix_head_values, cache)
            for i, v, h in zip(prefix_readable, vals, hits, strict=True):
                out[i], cached[i] = v, h
        rest = [i for i in range(len(seqs)) if i not in keep]
        for i, v in zip(rest, self.full_head_values([seqs[i] for i in rest]), strict=True):
            out[i] = v
        return out, cached

    @torch.inference_mode()
    def compute(self, seqs):
        with self._lock:
            if self.prefix_cache is not None and self.prefix_cache.enabled and self.head is not None:
                return self.cached_head_values(seqs)
            return self.full_head_values(seqs), [0] * len(seqs)


# -- construction ------------------------------------------------------------------------------

def load_zero_shot(kind: str, model_source: str = "embedded", options: ModelOptions | None = None,
                   adapter: str | Path | None = None, **kwargs) -> CausalLMScorer:
    """A contrastive or probe scorer over any causal LM; ``adapter``: a `salmon contrast-tune`
    output directory whose LoRA is merged into the LM after its files are verified."""
    tok = load_tokenizer(model_source)
    model = load_causal_lm(model_source, options)
    cls = {"contrastive": ContrastiveScorer, "probe": ProbeScorer}[kind]
    version = f"{kind}:{Path(str(model_source)).name}"
    if adapter is not None:
        from peft import PeftModel

        from rm_core.registry import verified_contrast_adapter

        adapter_dir, tag = verified_contrast_adapter(adapter, str(model_source))
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
        version = f"{version}+{tag}"
    return cls(model, tok, version=version, base_model=str(model_source), **kwargs)


def load_trained(registry_root: str | Path, version: str | None = None, options: ModelOptions | None = None,
                 **kwargs) -> TrainedScorer:
    """Load a registry version (CURRENT when ``version`` is None); the files are verified first."""
    from peft import PeftModel

    from rm_core.registry import Registry, RegistryError

    reg = Registry(registry_root)
    version = version or reg.current()
    if not version:
        raise RegistryError(f"registry {reg.root} has no CURRENT version yet")
    manifest = reg.manifest(version, verify=True)
    if manifest.prompt_format_version != PROMPT_FORMAT_VERSION:
        raise RegistryError(
            f"version {version} was trained with prompt format {manifest.prompt_format_version!r}; "
            f"this service renders {PROMPT_FORMAT_VERSION!r}")
    tok = load_tokenizer(manifest.base_model)
    model = load_sequence_classifier(manifest.base_model, options)
    if manifest.adapter:
        model = PeftModel.from_pretrained(model, reg.path(version) / manifest.adapter).merge_and_unload()
    model.eval()
    return TrainedScorer(model, tok, version=version, base_model=manifest.base_model,
                         reward_mean=manifest.reward_mean, reward_std=manifest.reward_std, **kwargs)


def load_shipped(options: ModelOptions | None = None, **kwargs) -> LMScorer:
    """The RM shipped with the package (rm_core/shipped), verified like any registry version; its
    model_version is ``shipped:vNNNN`` so that it never collides with a user registry's names.

    The shipped RM is either a one-pass reward model (a registry version: backbone + LoRA + head) or
    a contrast adapter (`salmon contrast-tune --ship`: a LoRA merged into the contrastive scorer's LM);
    its manifest's ``kind`` says which.
    """
    from rm_core.registry import (
        CONTRAST_ADAPTER_KIND,
        SHIPPED_PREFIX,
        SHIPPED_REGISTRY,
        Registry,
        RegistryError,
    )

    reg = Registry(SHIPPED_REGISTRY)
    version = reg.current()
    if not version:
        raise RegistryError(f"salmon ships no reward model in this installation ({reg.root} has no CURRENT); "
                            "build one with `salmon contrast-tune --ship` or `salmon rm-pretrain --ship`")
    manifest = reg.manifest(version, verify=False)
    if manifest.kind == CONTRAST_ADAPTER_KIND:
        scorer = load_zero_shot("contrastive", manifest.base_model, options, adapter=reg.path(version), **kwargs)
        scorer.version = SHIPPED_PREFIX + version
        return scorer
    scorer = load_trained(SHIPPED_REGISTRY, None, options, **kwargs)
    scorer.version = SHIPPED_PREFIX + scorer.version
    return scorer
