"""Stage ``aggregate``: judgments -> a reward-model training set, SALMON's way.

1. Per-principle scale normalisation: each principle's scores (both orders, all pairs) are divided by
   their variance (SALMON's choice; ``std`` and ``none`` are options), so a principle the judge
   answers with large logits does not dominate every draw.
2. A (pair, principle) score counts only where both orders agree in sign; its value is the mean.
3. Several passes over the pairs; each pass draws k ~ Geometric(p) (k <= max_k) principles per pair in
   a shuffled order and negates each with probability ``negate_prob`` (its negative definition is
   rendered, and its score's sign flips: what is better under a principle is worse under its negation).
4. The label comes from the dominant principle (largest |score| among the drawn ones with a counted
   score); a draw whose top |score| is shared by principles that disagree, or is zero, is skipped.
5. Optional, off by default: rule-based overrides and label noise.

Output rows are TRL RewardTrainer columns (``prompt``, ``chosen``, ``rejected``) plus ``principles``
(the drawn principles, full definitions, in render order) and ``negated`` (names), split by prompt
into train/eval so that no held-out prompt was trained on.
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from principles.schema import Principle, PrincipleSet
from salmon.atomic import atomic_write_jsonl, remove_stale_temps
from salmon.errors import UserError

from .config import AggregateConfig
from .shards import derive_seed, write_summary

if TYPE_CHECKING:
    from .stages import StageContext

AI_DISCLAIMER = "as an ai language model"


def normalisers(judgments: Iterable[dict], mode: str) -> dict[str, float]:
    """Per-principle divisor: the variance (or std) of its scores over both orders."""
    values: dict[str, list[float]] = defaultdict(list)
    for j in judgments:
        values[j["principle"]].extend((j["score_ab"], j["score_ba"]))
    out = {}
    for name, vs in values.items():
        var = float(np.var(vs)) if len(vs) > 1 else 0.0
        if mode == "none" or var <= 1e-12:
            out[name] = 1.0  # a constant principle carries no scale to normalise
        else:
            out[name] = var if mode == "variance" else math.sqrt(var)
    return out


def counted_score(score_ab: float, score_ba: float, require_agreement: bool) -> float | None:
    """Mean of the two orders, or None when they disagree in sign (position bias, not preference)."""
    if require_agreement and not ((score_ab > 0 and score_ba > 0) or (score_ab < 0 and score_ba < 0)):
        return None
    return (score_ab + score_ba) / 2


def draw_principles(rng: np.random.Generator, principles: Sequence[Principle], cfg: AggregateConfig
                    ) -> list[tuple[Principle, bool]]:
    """k ~ Geometric(p) (support 1, 2, ...; capped) principles in a shuffled order, each maybe negated."""
    k = int(min(rng.geometric(cfg.geometric_p), cfg.max_k, len(principles)))
    order = rng.permutation(len(principles))[:k]
    draw = []
    for i in order:
        p = principles[int(i)]
        neg = bool(rng.random() < cfg.negate_prob)
        draw.append((p, neg and p.negative_definition is not None))
    return draw


def dominant_label(scores: dict[str, float | None], draw: Sequence[tuple[Principle, bool]]
                   ) -> tuple[int | None, str | None, float, str]:
    """(+1: a wins / -1: b wins / None, dominant principle, its effective score, skip reason)."""
    eff = [(p.name, -s if neg else s) for p, neg in draw if (s := scores.get(p.name)) is not None]
    if not eff:
        return None, None, 0.0, "no_counted_score"
    top = max(abs(s) for _, s in eff)
    if top == 0:
        return None, None, 0.0, "zero_score"
    leaders = [(n, s) for n, s in eff if math.isclose(abs(s), top, rel_tol=1e-9, abs_tol=1e-12)]
    if len({s > 0 for _, s in leaders}) > 1:
        return None, None, top, "tie"
    name, s = leaders[0]
    return (1 if s > 0 else -1), name, s, ""


def dominant_script(text: str) -> str | None:
    """The Unicode script most of ``text``'s letters belong to ('LATIN', 'CJK', 'CYRILLIC', …)."""
    counts: Counter = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            counts["CJK" if name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")) else name.split(" ")[0]] += 1
    return counts.most_common(1)[0][0] if counts else None


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(m.get("content", "") for m in prompt if m.get("role") == "user")


def rule_label(a: str, b: str, prompt: Any = None) -> int | None:
    """SALMON's rule-based overrides (+1: a wins, -1: b wins, None: no rule fires).

    - A response that hides behind 'As an AI language model' loses to one that does not.
    - A response in another script than the prompt loses to one in the prompt's script (a 135M policy
      drifts into other languages; a small judge does not notice).
    """
    da, db = AI_DISCLAIMER in a.lower(), AI_DISCLAIMER in b.lower()
    if da != db:
        return -1 if da else 1
    want = dominant_script(_text(prompt)) if prompt is not None else None
    if want is not None:
        ma, mb = dominant_script(a) == want, dominant_script(b) == want
        if ma != mb:
            return 1 if ma else -1
    return None


def split_prompts(prompt_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """Held-out prompt ids: a seeded hash order, so the split is stable and prompt-disjoint."""
    ids = sorted(set(prompt_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(ranked[:n])


def aggregate(pairs: Sequence[dict], judgments: Sequence[dict], pset: PrincipleSet, cfg: AggregateConfig
              ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train rows, eval rows, counters)."""
    by_pair: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for j in judgments:
        if j["principle"] not in pset.names():
            raise UserError(f"judgment for pair {j['pair_id']!r} names principle {j['principle']!r}, "
                           f"which is not in the principle set {pset.ref} ({', '.join(pset.names())})")
        by_pair[j["pair_id"]][j["principle"]] = (j["score_ab"], j["score_ba"])
    norm = normalisers(judgments, cfg.normalize)
    counters: Counter = Counter()
    counters["judgments"] = len(judgments)
    rows: list[dict] = []
    seen: set[tuple] = set()
    for pair in pairs:
        judged = by_pair.get(pair["pair_id"])
        if not judged:
            counters["pairs_unjudged"] += 1
            continue
        counters["pairs"] += 1
        scores: dict[str, float | None] = {}
        for name, (ab, ba) in judged.items():
            s = counted_score(ab / norm[name], ba / norm[name], cfg.require_order_agreement)
            scores[name] = s
            counters["scores_counted" if s is not None else "scores_orders_disagree"] += 1
        available = [p for p in pset.principles if p.name in judged]
        for n_pass in range(cfg.passes):
            rng = np.random.default_rng(derive_seed(cfg.seed, n_pass, pair["pair_id"]))
            draw = draw_principles(rng, available, cfg)
            label, dominant, score, reason = dominant_label(scores, draw)
            source = "judge"
            if cfg.rule_overrides and (rl := rule_label(pair["response_a"], pair["response_b"], pair["prompt"])) is not None:
                label, source, reason = rl, "rule", ""
                counters["rule_overrides"] += 1
            if label is None:
                counters[f"skipped_{reason}"] += 1
                continue
            if cfg.label_noise and rng.random() < cfg.label_noise:
                label = -label
                counters["noise_flipped"] += 1
            key = (pair["pair_id"], tuple((p.name, neg) for p, neg in draw), label)
            if key in seen:  # the same draw twice would only weight this pair double
                counters["skipped_duplicate_draw"] += 1
                continue
            seen.add(key)
            a, b = pair["response_a"], pair["response_b"]
            chosen, rejected = (a, b) if label > 0 else (b, a)
            rows.append({
                "id": f"{pair['pair_id']}/pass{n_pass}", "pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"],
                "prompt": pair["prompt"], "chosen": chosen, "rejected": rejected,
                "principles": [p.model_dump(mode="json", include={"name", "definition", "negative_definition"})
                               for p, _ in draw],
                "negated": [p.name for p, neg in draw if neg],
                "dominant": dominant, "dominant_score": score, "label_source": source,
                "chosen_is_a": label > 0, "pass": n_pass, "principle_set": pset.ref,
            })
    held = split_prompts((r["prompt_id"] for r in rows), cfg.eval_fraction, cfg.seed)
    train = [r for r in rows if r["prompt_id"] not in held]
    evals = [r for r in rows if r["prompt_id"] in held]
    counters["rows"] = len(rows)
    return train, evals, dict(counters)


def run_aggregate(pairs: Sequence[dict], judgments: Sequence[dict], pset: PrincipleSet, out_dir: str | Path,
                  cfg: AggregateConfig) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``summary.json`` under ``out_dir`` (atomically)."""
    t0 = time.monotonic()
    train, evals, counters = aggregate(pairs, judgments, pset, cfg)
    if not train:
        raise UserError("aggregation produced no training pairs (every draw was skipped: see the judge "
                       "summary's order_agreement; try more prompts or require_order_agreement: false)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # a killed earlier run's half-written temp files; the stage rewrites every file
    atomic_write_jsonl(out / "train.jsonl", train)
    atomic_write_jsonl(out / "eval.jsonl", evals)
    rows = train + evals
    summary = {
        "stage": "aggregate", **counters, "train": len(train), "eval": len(evals),
        "eval_prompts": len({r["prompt_id"] for r in evals}),
        "label_balance_chosen_is_a": sum(r["chosen_is_a"] for r in rows) / len(rows),
        "negated_share": sum(len(r["negated"]) for r in rows) / max(sum(len(r["principles"]) for r in rows), 1),
        "mean_k": sum(len(r["principles"]) for r in rows) / len(rows),
        "dominant": dict(Counter(r["dominant"] for r in rows if r["dominant"]).most_common()),
        "config": cfg.model_dump(mode="json"), "time_s": round(time.monotonic() - t0, 3),
    }
    write_summary(out, summary)
    return summary


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Stage ``aggregate``: ``pairs`` + ``judgments`` -> ``dataset`` (the directory of train/eval JSONL)."""
    from .judge import select_principles

    out = ctx.dir("aggregate")
    pset, _ = select_principles(ctx.config.judge)
    summary = run_aggregate(ctx.data["pairs"], ctx.data["judgments"], pset, out, ctx.config.aggregate)
    ctx.data["dataset"] = out
    return summary
