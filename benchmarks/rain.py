"""RAIN vs plain sampling on the RAIN check set (principles/checks/rain.yaml).

For every check and seed, one plain sample and one RAIN search with the same token budget, the same
sampling settings and the same generation context (the principle block as the system turn). Each
answer is judged twice:

- by the rule of its check, where one applies (a regex that must not match, a sentence or word cap);
- by the service's scorer (the same offline code path ``/v1/score`` runs): a violation is a score
  below zero, i.e. the answer is more likely under the principle's negation than under it. RAIN
  optimises this value, so this column is its own target; the rule column is the independent check.

Latency: each generation's wall time (sampling and, for RAIN, its value calls; the judging is not
timed); the ratio is mean RAIN wall time over mean plain wall time.

    python -m benchmarks.rain --out runs/rain.json --png runs/rain.png [--samples 2] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rm_core.rain import RainConfig, generate, generation_context, sampler_for, scorer_value_fn
from rm_core.rain_checks import DEFAULT_RAIN_CHECKS, load_rain_checks, rule_violations
from salmon.errors import UserError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rain", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--check-set", default=str(DEFAULT_RAIN_CHECKS))
    p.add_argument("--samples", type=int, default=2, help="seeds per check (each: one plain, one RAIN)")
    p.add_argument("--limit", type=int, help="only the first N checks")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-expansions", type=int, default=24)
    p.add_argument("--time-budget", type=float, default=40.0, help="seconds per RAIN generation")
    p.add_argument("--threads", type=int, help="torch intra-op threads (on a shared CPU, 1 is often faster)")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--png", help="bar chart of the violation rates")
    args = p.parse_args(argv)
    if args.samples < 1:
        raise UserError("--samples must be at least 1")
    return args


def rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarize(records: list[dict]) -> dict:
    out: dict = {}
    for search in ("none", "rain"):
        rs = [r for r in records if r["search"] == search]
        ruled = [r for r in rs if r["rule_violation"] is not None]
        out[search] = {
            "answers": len(rs),
            "rule_violation_rate": rate([r["rule_violation"] for r in ruled]),
            "rule_judged": len(ruled),
            "scorer_violation_rate": rate([r["score"] < 0 for r in rs]),
            "mean_score": statistics.fmean(r["score"] for r in rs),
            "mean_wall_s": statistics.fmean(r["stats"]["wall_s"] for r in rs),
            "mean_tokens": statistics.fmean(r["stats"]["tokens_committed"] for r in rs),
            "stopped": {k: sum(r["stats"]["stopped"] == k for r in rs) for k in sorted({r["stats"]["stopped"] for r in rs})},
        }
        if search == "rain":
            for k in ("expansions", "rewinds", "commits", "forced_commits", "value_evaluations", "tokens_sampled"):
                out[search][f"mean_{k}"] = statistics.fmean(r["stats"][k] for r in rs)
    out["latency_ratio"] = out["rain"]["mean_wall_s"] / max(out["none"]["mean_wall_s"], 1e-9)
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["by rule", "by scorer"]
    keys = ["rule_violation_rate", "scorer_violation_rate"]
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, (search, name) in enumerate((("none", "plain sampling"), ("rain", "RAIN"))):
        vals = [summary[search][k] or 0.0 for k in keys]
        ax.bar([x + 0.38 * i for x in range(2)], vals, width=0.38, label=name)
    ax.set_xticks([x + 0.19 for x in range(2)], labels)
    ax.set_ylabel("violation rate")
    ax.set_ylim(0, 1)
    ax.set_title(f"RAIN check set, latency ratio {summary['latency_ratio']:.1f}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from rm_core.prefix_cache import PrefixCache
    from rm_core.scorers import load_zero_shot
    from salmon.atomic import atomic_write_text

    checks = load_rain_checks(args.check_set, args.limit)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scorer = load_zero_shot("contrastive", args.model, prefix_cache=PrefixCache())
    sampler, renderer = sampler_for(scorer, args.model)
    base = RainConfig(max_new_tokens=args.max_new_tokens, max_expansions=args.max_expansions,
                      time_budget_s=args.time_budget)
    records = []
    t0 = time.perf_counter()
    for check in checks:
        principles = [check.principle]
        context = generation_context(renderer, principles, check.prompt, with_principles=base.principles_in_context)
        value = scorer_value_fn(scorer, principles, check.prompt)
        for seed in range(args.samples):
            cfg = base.model_copy(update={"seed": seed})
            for search in ("none", "rain"):
                result = generate(search, sampler, value, context, cfg)
                score = scorer.score_items(principles, [(check.prompt, result.text)])[0]
                broken = rule_violations(check.rule, result.text)
                records.append({"check": check.id, "principle": check.principle.name, "seed": seed, "search": search,
                                "text": result.text, "score": score,
                                "rule_violation": None if check.rule is None else bool(broken),
                                "rule_broken": broken, "stats": result.stats.to_dict()})
                print(f"[{time.perf_counter() - t0:6.0f}s] {check.id} seed {seed} {search:>4}: "
                      f"score {score:+.2f} rule {'-' if check.rule is None else ('broken' if broken else 'ok')} "
                      f"{result.stats.wall_s:.1f}s {result.text[:70]!r}", flush=True)
        # The report so far after every check: a run stopped early still leaves its figures.
        summary = summarize(records)
        report = {"check_set": str(args.check_set), "model": args.model, "scorer": scorer.version,
                  "checks": len({r["check"] for r in records}), "samples_per_check": args.samples,
                  "threads": args.threads,
                  "budgets": {"max_new_tokens": args.max_new_tokens, "max_expansions": args.max_expansions,
                              "time_budget_s": args.time_budget},
                  "config": base.model_dump(), "summary": summary, "wall_s": time.perf_counter() - t0,
                  "records": records}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    if args.png:
        plot(summary, args.png)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"benchmarks.rain: error: {e}", file=sys.stderr)
        sys.exit(2)
