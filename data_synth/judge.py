"""Stage ``judge``: principle-conditioned preference scores for each pair, from one of two label sources.

**A/B judge** (SALMON's): the judge LM reads the instruction, Output (a), Output (b) and one principle;
the assistant turn is prefilled so that the next token is the choice, and the score is
``logit("a") - logit("b")`` from one forward pass. Every pair is judged in both orders to cancel
position bias; both scores are stored oriented the same way (positive = response_a is better):
``score_ab`` with a shown first, ``score_ba`` with b shown first (its raw a-minus-b, sign flipped).

Layout: unlike SALMON's prompt we put the principle LAST, after the instruction and both outputs.
The instruction + outputs are then a token prefix shared by all principles of a pair and order (most
of the tokens), so the local backend runs that prefix once, expands its key/value cache to the
number of principles and runs only the short per-principle suffixes against it. Prefix and suffix
are tokenized separately and concatenated, so the ids are identical with and without reuse.

The OpenAI-compatible backend sends the same text to ``{base_url}/completions`` with ``logprobs``
(how a 70B judge runs on vLLM, whose prefix caching gives the same saving server-side);
``logprob(a) - logprob(b)`` equals the logit difference because both share the softmax normaliser.

**Contrastive source**: the service's zero-shot scorer, pointwise, so there is no position bias:
a pair's score under a principle is ``s(a) - s(b)`` with
``s(y) = log p(y | x, principle) - log p(y | x, negated principle)``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from principles.schema import Principle, PrincipleSet, load_principle_set
from rm_core.batching import right_pad
from rm_core.prefix_attention import expanded_prefix_forward
from rm_core.render import defuse, special_token_strings
from salmon.atomic import file_sha256
from salmon.errors import UserError
from salmon.modeling import returned_kv_cache

from .config import JudgeConfig
from .shards import ShardedStage, counters_total, iter_stage, stable_hash, write_summary

if TYPE_CHECKING:
    from .stages import StageContext

JUDGE_FORMAT_VERSION = "salmon-judge-v1"
JUDGE_INTRO = ("You are a careful reviewer. Read the user's instruction and two candidate outputs, "
               "then decide which output follows the principle given at the end better.")
JUDGE_QUESTION = "Which output follows this principle better, Output (a) or Output (b)?"
PREFILL = "Judged by the principle, the better output is Output ("
CHOICES = ("a", "b")


def instruction_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


class JudgeLayout:
    """Judge prompt text and token ids: shared part (instruction + outputs) first, principle last."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._specials = special_token_strings(tokenizer)
        self.choice_ids = []
        for c in CHOICES:
            ids = tokenizer.encode(c, add_special_tokens=False)
            if len(ids) != 1:
                raise UserError(f"the judge tokenizer splits {c!r} into {len(ids)} tokens; an A/B judge needs one each")
            self.choice_ids.append(ids[0])

    def texts(self, prompt: Any, first: str, second: str, principle: Principle) -> tuple[str, str]:
        # Outputs are data: a special-token string inside them must not close the judge's turn.
        instruction, first, second = (defuse(t, self._specials) for t in (instruction_text(prompt), first, second))
        shared = (f"{JUDGE_INTRO}\n\n## Instruction\n{instruction}\n\n"
                  f"## Output (a)\n{first}\n\n## Output (b)\n{second}\n\n")
        tail = f"## Principle\n{principle.definition}\n\n{JUDGE_QUESTION}"
        marker = "\x00SPLIT\x00"
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": shared + marker + tail}], tokenize=False, add_generation_prompt=True
        ) + PREFILL
        prefix, suffix = full.split(marker)
        return prefix, suffix

    def ids(self, prompt: Any, first: str, second: str, principles: Sequence[Principle]
            ) -> tuple[list[int], list[list[int]]]:
        prefix_text = None
        suffixes = []
        for p in principles:
            pre, suf = self.texts(prompt, first, second, p)
            prefix_text = pre
            suffixes.append(self.tokenizer.encode(suf, add_special_tokens=False))
        prefix = self.tokenizer.encode(prefix_text, add_special_tokens=False)
        return prefix, suffixes


class PairJudge(Protocol):
    name: str
    source: str
    stats: dict[str, int]

    def judge_pair(self, prompt: Any, a: str, b: str, principles: Sequence[Principle]
                   ) -> list[tuple[float, float]]: ...


class _ABJudge:
    source = "ab"

    def order_scores(self, prompt: Any, first: str, second: str, principles: Sequence[Principle]) -> list[float]:
        raise NotImplementedError

    def judge_pair(self, prompt: Any, a: str, b: str, principles: Sequence[Principle]
                   ) -> list[tuple[float, float]]:
        ab = self.order_scores(prompt, a, b, principles)
        ba = self.order_scores(prompt, b, a, principles)
        # In the swapped order "Output (a)" is response b, so flip the sign to keep a-vs-b orientation.
        return [(s1, -s2) for s1, s2 in zip(ab, ba, strict=True)]


class LocalABJudge(_ABJudge):
    """A/B judge on a local transformers causal LM, with or without shared-prefix KV reuse."""

    def __init__(self, model, tokenizer, prefix_reuse: bool = True, batch_size: int = 16, name: str = "local"):
        self.model, self.tokenizer = model, tokenizer
        self.layout = JudgeLayout(tokenizer)
        self.prefix_reuse, self.batch_size, self.name = prefix_reuse, batch_size, name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = {"forward_calls": 0, "sequences": 0, "tokens": 0}

    def _pad_right(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = right_pad(rows, self.pad_id)
        return ids, mask, torch.tensor([len(r) for r in rows])

    def _choice_diff(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[float]:
        last = logits[torch.arange(len(lengths)), lengths - 1].float()
        a, b = self.layout.choice_ids
        return (last[:, a] - last[:, b]).tolist()

    @torch.no_grad()
    def order_scores(self, prompt: Any, first: str, second: str, principles: Sequence[Principle]) -> list[float]:
        prefix, suffixes = self.layout.ids(prompt, first, second, principles)
        dev = self.model.device
        out: list[float] = []
        if self.prefix_reuse:
            res = self.model(input_ids=torch.tensor([prefix], device=dev), use_cache=True)
            prefix_kv = [(layer.keys, layer.values) for layer in returned_kv_cache(res).layers]
            self._count(1, len(prefix))
        for i in range(0, len(suffixes), self.batch_size):
            chunk = suffixes[i:i + self.batch_size]
            if self.prefix_reuse:
                ids, mask, lengths = self._pad_right(chunk)
                # Each row attends to the whole shared prefix (views, not copies), then to its own suffix.
                logits = expanded_prefix_forward(self.model, prefix_kv, ids.to(dev), mask.to(dev)).logits
                self._count(len(chunk), int(lengths.sum()))
            else:
                ids, mask, lengths = self._pad_right([prefix + s for s in chunk])
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
                self._count(len(chunk), int(lengths.sum()))
            out.extend(self._choice_diff(logits.cpu(), lengths))
        return out

    def _count(self, sequences: int, tokens: int) -> None:
        self.stats["forward_calls"] += 1
        self.stats["sequences"] += sequences
        self.stats["tokens"] += tokens


class OpenAIABJudge(_ABJudge):
    """A/B judge behind an OpenAI-compatible ``/completions`` endpoint that returns top logprobs."""

    def __init__(self, endpoint, tokenizer, client=None):
        import httpx

        self.ep = endpoint
        self.layout = JudgeLayout(tokenizer)
        self.url = endpoint.base_url.rstrip("/") + "/completions"
        self.name = f"{endpoint.model}@{endpoint.base_url}"
        headers = {}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise UserError(f"judge endpoint: env var {endpoint.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = client or httpx.Client(timeout=endpoint.timeout_s, headers=headers)
        self.stats = {"requests": 0, "prompts": 0, "missing_choice": 0}

    def _post(self, prompts: list[str]) -> list[dict[str, float]]:
        import httpx

        body = {"model": self.ep.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "logprobs": self.ep.top_logprobs}
        last_err = ""
        for attempt in range(self.ep.max_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                r = self.client.post(self.url, json=body)
            except httpx.HTTPError as e:
                last_err = f"unreachable ({type(e).__name__}: {e})"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last_err = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                raise UserError(f"judge endpoint {self.url}: HTTP {r.status_code}: {r.text[:200]}")
            try:
                choices = sorted(r.json()["choices"], key=lambda c: c.get("index", 0))
                tops = [c["logprobs"]["top_logprobs"][0] for c in choices]
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"judge endpoint {self.url}: response has no choices[].logprobs.top_logprobs; "
                               "is it an OpenAI-compatible completions server with logprobs?") from None
            if len(tops) != len(prompts):
                raise UserError(f"judge endpoint {self.url}: sent {len(prompts)} prompts, got {len(tops)} choices")
            self.stats["requests"] += 1
            self.stats["prompts"] += len(prompts)
            return tops
        raise UserError(f"judge endpoint {self.url}: {last_err} after {self.ep.max_retries + 1} attempts")

    def _logprob(self, top: dict[str, float], choice: str) -> float:
        hits = [lp for tok, lp in top.items() if tok.strip() == choice]
        if hits:
            return max(hits)
        # Not in the top-k: its logprob is at most the smallest one returned; use that bound.
        self.stats["missing_choice"] += 1
        return min(top.values()) if top else -100.0

    def order_scores(self, prompt: Any, first: str, second: str, principles: Sequence[Principle]) -> list[float]:
        texts = [pre + suf for pre, suf in (self.layout.texts(prompt, first, second, p) for p in principles)]
        tops = self._post(texts)
        return [self._logprob(t, "a") - self._logprob(t, "b") for t in tops]


class ContrastiveSource:
    """Pointwise label source: the service's contrastive scorer, one principle at a time."""

    source = "contrastive"

    def __init__(self, model, tokenizer, name: str = "local", cache_bytes: int = 256 * 1024 * 1024):
        # The one implementation lives in rm_service; its prefix cache shares the principle block and
        # the prompt between the two responses of a pair (and the negated variants).
        from rm_core.prefix_cache import PrefixCache
        from rm_core.scorers import ContrastiveScorer

        self.scorer = ContrastiveScorer(model, tokenizer, version=f"judge-contrastive:{name}", base_model=name,
                                        prefix_cache=PrefixCache(max_bytes=cache_bytes))
        self.name = name
        self.stats = {"score_calls": 0, "items": 0}

    def _pair_scores(self, prompt: Any, a: str, b: str, principles: Sequence[Principle],
                     negate: bool = False) -> list[float]:
        prepared = [self.scorer.prepare([p], prompt, y, negate=[p.name] if negate else ())
                    for p in principles for y in (a, b)]
        vals = self.scorer.score_prepared(prepared)  # one batched compute for the whole pair
        self.stats["score_calls"] += 1
        self.stats["items"] += len(prepared)
        return [vals[2 * i] - vals[2 * i + 1] for i in range(len(principles))]

    def judge_pair(self, prompt: Any, a: str, b: str, principles: Sequence[Principle]
                   ) -> list[tuple[float, float]]:
        # Pointwise: order cannot matter, so both "orders" carry the same number.
        return [(d, d) for d in self._pair_scores(prompt, a, b, principles)]

    def negated_pair(self, prompt: Any, a: str, b: str, p: Principle) -> float:
        return self._pair_scores(prompt, a, b, [p], negate=True)[0]


# -- construction ------------------------------------------------------------------------------
def select_principles(cfg: JudgeConfig) -> tuple[PrincipleSet, list[Principle]]:
    from principles.schema import PrincipleSetError

    try:
        pset = load_principle_set(cfg.principle_set)
    except PrincipleSetError as e:
        raise UserError(str(e)) from None
    if not cfg.principles:
        return pset, list(pset.principles)
    unknown = [n for n in cfg.principles if n not in pset.names()]
    if unknown:
        raise UserError(f"judge.principles: unknown principle {unknown[0]!r} in set {pset.name} "
                       f"(known: {', '.join(pset.names())})")
    return pset, [pset.get(n) for n in cfg.principles]


def build_judge(cfg: JudgeConfig, source: str | None = None, model_cache: dict | None = None) -> PairJudge:
    """The judge for ``source`` ('ab' or 'contrastive'; default: cfg.source resolved by the check set)."""
    from salmon.modeling import ModelOptions, load_causal_lm, load_tokenizer

    source = source or resolve_source(cfg)
    cache = model_cache if model_cache is not None else {}

    def local():
        if "model" not in cache:
            cache["tok"] = load_tokenizer(cfg.model)
            cache["model"] = load_causal_lm(cfg.model, ModelOptions(dtype=cfg.dtype, device=cfg.device))
        return cache["model"], cache["tok"]

    if source == "contrastive":
        model, tok = local()
        return ContrastiveSource(model, tok, name=cfg.model)
    if cfg.backend == "openai":
        return OpenAIABJudge(cfg.endpoint, load_tokenizer(cfg.endpoint.tokenizer))
    model, tok = local()
    return LocalABJudge(model, tok, prefix_reuse=cfg.prefix_reuse, batch_size=cfg.batch_size, name=cfg.model)


# -- the labelled check set: which source to trust ----------------------------------------------
def check_set_path(cfg: JudgeConfig) -> Path:
    from rm_core.checkset import DEFAULT_CHECK_SET

    return cfg.check_set or DEFAULT_CHECK_SET


def evaluate_source(judge: PairJudge, checks: Sequence[dict]) -> dict[str, Any]:
    """Accuracy on labelled flip pairs (``rm_core.checkset.load_pairs`` records): a better under the
    principle, b better under its negation."""
    pos_ok = neg_ok = agree = both = 0
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    from rm_core.checkset import flip_pair_principle

    for c in tqdm(checks, desc=f"check set ({judge.source})", unit="pair", dynamic_ncols=True):
        p = flip_pair_principle(c)
        a, b = c["response_a"], c["response_b"]
        (s_ab, s_ba), = judge.judge_pair(c["prompt"], a, b, [p])
        s_pos = (s_ab + s_ba) / 2
        agree += (s_ab > 0) == (s_ba > 0)
        if isinstance(judge, ContrastiveSource):
            s_neg = judge.negated_pair(c["prompt"], a, b, p)
        else:
            neg = Principle(name=p.name, definition=p.negative_definition or p.definition)
            (n_ab, n_ba), = judge.judge_pair(c["prompt"], a, b, [neg])
            s_neg = (n_ab + n_ba) / 2
        pos_ok += s_pos > 0
        neg_ok += s_neg < 0
        both += (s_pos > 0) and (s_neg < 0)
    n = max(len(checks), 1)
    return {"source": judge.source, "judge": judge.name, "n": len(checks),
            "accuracy": (pos_ok + neg_ok) / (2 * n), "accuracy_positive": pos_ok / n,
            "accuracy_negated": neg_ok / n, "flip_both": both / n, "order_agreement": agree / n,
            "time_s": round(time.monotonic() - t0, 2)}


def compare_sources(cfg: JudgeConfig, model_cache: dict | None = None) -> dict[str, Any]:
    """Both label sources on the check set (the contrastive one needs rm_core.scorers)."""
    from rm_core.checkset import load_pairs

    path = check_set_path(cfg)
    checks = load_pairs(path, cfg.check_limit, evenly_spaced=True)
    cache = model_cache if model_cache is not None else {}
    results: dict[str, Any] = {"check_set": str(path), "check_set_sha256": file_sha256(path)}
    for source in ("ab", "contrastive"):
        try:
            results[source] = evaluate_source(build_judge(cfg, source, cache), checks)
        except ImportError as e:
            results[source] = {"unavailable": str(e)}
    ok = {s: r["accuracy"] for s, r in results.items() if isinstance(r, dict) and "accuracy" in r}
    results["best"] = max(ok, key=lambda s: (ok[s], s == "ab")) if ok else "ab"
    return results


def _check_cache_path(cfg: JudgeConfig) -> Path:
    from salmon.modeling import cache_dir

    judge_id = cfg.endpoint.model_dump(mode="json") if cfg.backend == "openai" else cfg.model
    key = stable_hash({"judge": judge_id, "backend": cfg.backend, "check": file_sha256(check_set_path(cfg)),
                       "limit": cfg.check_limit, "v": JUDGE_FORMAT_VERSION})
    return cache_dir() / "judge-check" / f"{key}.json"


def store_check(cfg: JudgeConfig, res: dict[str, Any]) -> bool:
    """Cache a complete comparison for source=auto; one with a missing source is not cached."""
    from salmon.atomic import atomic_write_json

    if any("unavailable" in r for r in (res.get("ab"), res.get("contrastive")) if isinstance(r, dict)):
        return False
    atomic_write_json(_check_cache_path(cfg), res)
    return True


def resolve_source(cfg: JudgeConfig, model_cache: dict | None = None) -> str:
    """cfg.source, or for 'auto' the better source on the check set (measured once, cached)."""
    if cfg.source != "auto":
        return cfg.source
    cached = _check_cache_path(cfg)
    if cached.is_file():
        return json.loads(cached.read_text())["best"]
    res = compare_sources(cfg, model_cache)
    store_check(cfg, res)
    return res["best"]


# -- the stage ----------------------------------------------------------------------------------
def judge_records(judge: PairJudge, pair: dict, principles: Sequence[Principle], pset: PrincipleSet
                  ) -> list[dict]:
    scores = judge.judge_pair(pair["prompt"], pair["response_a"], pair["response_b"], principles)
    return [{"pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"], "principle": p.name,
             "score_ab": ab, "score_ba": ba, "source": judge.source, "judge": judge.name,
             "principle_set": pset.ref, "prompt_format_version": JUDGE_FORMAT_VERSION}
            for p, (ab, ba) in zip(principles, scores, strict=True)]


def run_judge(pairs: list[dict], out_dir: str | Path, cfg: JudgeConfig) -> dict[str, Any]:
    """Judge every pair under every selected principle into ``out_dir`` (resumable)."""
    t0 = time.monotonic()
    pset, principles = select_principles(cfg)
    source = resolve_source(cfg)
    fingerprint = {"config": cfg.model_dump(mode="json"), "source": source, "principles": pset.hash,
                   "pairs": stable_hash(pairs), "v": JUDGE_FORMAT_VERSION}
    stage = ShardedStage(out_dir, "judge", fingerprint)
    state: dict[str, Any] = {}

    def shard(index: int, chunk: Sequence[dict]) -> tuple[list[dict], dict[str, int]]:
        if "judge" not in state:
            state["judge"] = build_judge(cfg, source)
        judge = state["judge"]
        before = dict(judge.stats)
        records = [r for pair in chunk for r in judge_records(judge, pair, principles, pset)]
        counters = {k: v - before.get(k, 0) for k, v in judge.stats.items()}
        counters["pairs"] = len(chunk)
        counters["judgments"] = len(records)
        counters["orders_agree"] = sum((r["score_ab"] > 0) == (r["score_ba"] > 0) for r in records)
        return records, counters

    manifest = stage.run(pairs, cfg.shard_size, shard, desc=f"judge ({source})", unit_name="pair")
    totals = counters_total(manifest)
    summary = {"stage": "judge", "source": source, "backend": cfg.backend, "judge": cfg.model,
               "principle_set": pset.ref, "principles": [p.name for p in principles],
               "prefix_reuse": cfg.prefix_reuse, **totals,
               "order_agreement": (totals.get("orders_agree", 0) / totals["judgments"]
                                   if totals.get("judgments") else None),
               "time_s": round(time.monotonic() - t0, 2)}
    write_summary(out_dir, summary)
    return summary


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Stage ``judge``: ``pairs`` -> ``judgments`` (the finished stage directory's records)."""
    out = ctx.dir("judge")
    summary = run_judge(ctx.data["pairs"], out, ctx.config.judge)
    ctx.data["judgments"] = list(iter_stage(out))
    return summary
