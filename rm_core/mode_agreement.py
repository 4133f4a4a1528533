"""How often rubric and listwise scoring agree with pointwise scoring, on the labelled check set.

    python -m rm_core.mode_agreement --limit 28 --out runs/mode_agreement   # embedded model, contrastive

For every flip pair (principles/checks/flip_pairs.jsonl, spread evenly by ``--limit``) and both
polarities (the principle, then its negation), each mode says which of response a and b it prefers:

- pointwise: the scorer's score of each response;
- rubric: the rating on ``--scale`` (1-10 as I-SHEEP, or 1-6 as DNO) with generic anchors
  (rm_core.modes; the anchors below);
- listwise: the rank of each in the list [a, b], scored with both shown.

The report gives, per mode, its agreement with pointwise (share of pair x polarity decisions that
are the same), its accuracy against the label (a under P, b under not-P) and its flip rate (both
right on a pair), each with a 95% bootstrap interval over pairs. Writes ``mode_agreement.json``
and ``.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from principles.schema import RubricScale
from rm_core.checkset import DEFAULT_CHECK_SET, flip_pair_principle, load_pairs
from rm_core.modes import offline_prepare, plan_listwise, plan_rubric, run_offline
from rm_core.scorers import Scorer
from salmon.atomic import atomic_write_bytes, atomic_write_json

SCALES = {
    10: RubricScale(scale=(1, 10), anchors={
        1: "The response does not follow the principle at all.",
        5: "The response follows the principle only in part.",
        10: "The response follows the principle fully."}),
    6: RubricScale(scale=(1, 6), anchors={
        1: "The response does not follow the principle at all.",
        6: "The response follows the principle fully."}),
}
MODES = ("pointwise", "rubric", "listwise")


def pair_preferences(scorer: Scorer, pair: dict, scale: RubricScale) -> dict[str, list[float]]:
    """Per mode, [score(a) - score(b) under P, the same under not-P]."""
    p = flip_pair_principle(pair)
    items = [(pair["prompt"], pair["response_a"]), (pair["prompt"], pair["response_b"])]
    out: dict[str, list[float]] = {m: [] for m in MODES}
    for negate in ((), (p.name,)):
        point = scorer.score_items([p], items, negate=negate)
        rub = run_offline(scorer, plan_rubric(offline_prepare(scorer), [p], scale, items, negate)).scores
        lst = run_offline(scorer, plan_listwise(offline_prepare(scorer, negate), [p], items)).scores
        for m, s in zip(MODES, (point, rub, lst), strict=True):
            out[m].append(s[0] - s[1])
    return out


def _interval(values: list[float], rng: random.Random, n: int = 1000) -> list[float]:
    if not values:
        return [float("nan"), float("nan")]
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n))
    return [means[int(0.025 * n)], means[int(0.975 * n) - 1]]


def summarize(prefs: list[dict[str, list[float]]], seed: int = 0) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    table = {}
    for m in MODES:
        # per pair: agreement with pointwise over its 2 decisions, accuracy over 2, flip 0/1
        agree = [sum((d > 0) == (q > 0) for d, q in zip(x[m], x["pointwise"], strict=True)) / 2 for x in prefs]
        acc = [((x[m][0] > 0) + (x[m][1] < 0)) / 2 for x in prefs]
        flip = [float(x[m][0] > 0 and x[m][1] < 0) for x in prefs]
        table[m] = {"agreement_with_pointwise": sum(agree) / len(agree), "agreement_ci95": _interval(agree, rng),
                    "accuracy": sum(acc) / len(acc), "accuracy_ci95": _interval(acc, rng),
                    "flip_rate": sum(flip) / len(flip), "flip_rate_ci95": _interval(flip, rng)}
    return table


def _figure(report: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["modes"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for j, (key, label) in enumerate((("agreement_with_pointwise", "agreement with pointwise"),
                                      ("accuracy", "accuracy"), ("flip_rate", "flip rate"))):
        xs = [i + (j - 1) * width for i in range(len(MODES))]
        vals = [t[m][key] for m in MODES]
        ci = [t[m][key.replace("_with_pointwise", "") + "_ci95"] for m in MODES]
        err = [[v - c[0] for v, c in zip(vals, ci, strict=True)], [c[1] - v for v, c in zip(vals, ci, strict=True)]]
        ax.bar(xs, vals, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(MODES)), MODES)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['scorer']} on {report['pairs']} check pairs (rubric 1-{report['scale'][1]})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def measure(scorer: Scorer, pairs: list[dict], scale: RubricScale) -> dict[str, Any]:
    t0 = time.perf_counter()
    prefs = [pair_preferences(scorer, p, scale) for p in tqdm(pairs, desc="mode agreement")]
    return {"scorer": scorer.version, "pairs": len(pairs), "scale": list(scale.scale),
            "anchors": {str(k): v for k, v in scale.anchors.items()}, "modes": summarize(prefs),
            "per_pair": [{"id": p.get("id"), **x} for p, x in zip(pairs, prefs, strict=True)],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rm_core.mode_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--check-set", type=Path, default=DEFAULT_CHECK_SET)
    ap.add_argument("--limit", type=int, default=None, help="pairs, spread evenly over the principles")
    ap.add_argument("--scale", type=int, choices=sorted(SCALES), default=10, help="rubric scale: 1-10 or 1-6")
    ap.add_argument("--out", type=Path, default=Path("runs/mode_agreement"))
    a = ap.parse_args(argv)
    from rm_core.prefix_cache import PrefixCache
    from rm_core.scorers import load_zero_shot

    scorer = load_zero_shot("contrastive", a.model, prefix_cache=PrefixCache())
    report = {"check_set": str(a.check_set), "model": a.model,
              **measure(scorer, load_pairs(a.check_set, a.limit, evenly_spaced=True), SCALES[a.scale])}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "mode_agreement.json", report)
    atomic_write_bytes(a.out / "mode_agreement.png", _figure(report))
    for m, r in report["modes"].items():
        print(f"{m:>9}: agreement with pointwise {r['agreement_with_pointwise']:.1%} "
              f"[{r['agreement_ci95'][0]:.0%}, {r['agreement_ci95'][1]:.0%}], accuracy {r['accuracy']:.1%}, "
              f"flip {r['flip_rate']:.1%} [{r['flip_rate_ci95'][0]:.0%}, {r['flip_rate_ci95'][1]:.0%}]")
    print(f"{report['pairs']} pairs in {report['seconds']} s; report: {a.out / 'mode_agreement.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
