"""`salmon bench --sweep`: how the trained scorer's cost grows with the group size and the principle block.

One axis at a time, the other held at its single-run value: G over ``--sweep-generations`` at
``--prefix-tokens``, then the block over ``--sweep-prefix-tokens`` at ``--generations`` (a point on both
axes runs once). Each point is one ordinary run (benchmarks/cli.py's ``run_once``, limit and service
by default, ``--configs`` for more) on its own workload. Reported per point: time per item of every
configuration, the service's ratio to its limit, the tokens scored and the unique tokens.

Why these: with the prefix cache the service's work per item is the response plus its share of the
prompt, whatever the block's length, so its time per item should stay flat along the block axis and
fall along G (the prompt is shared by more items); its ratio to the limit should stay flat on both.
A cost that grew with items × prefix would show as time per item rising with the block. The PNG puts
both axes side by side; the table and the JSON hold the figures.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from benchmarks.report import CONFIGS, LABELS, environment, targets_for


def sweep_points(args: argparse.Namespace) -> list[dict]:
    """The (generations, prefix_tokens) points of the sweep and the axes each one lies on, in run order."""
    points: dict[tuple[int, int], dict] = {}
    for g in args.sweep_generations:
        points.setdefault((g, args.prefix_tokens), {"generations": g, "prefix_tokens": args.prefix_tokens,
                                                    "axes": []})["axes"].append("generations")
    for t in args.sweep_prefix_tokens:
        points.setdefault((args.generations, t), {"generations": args.generations, "prefix_tokens": t,
                                                  "axes": []})["axes"].append("prefix_tokens")
    return list(points.values())


def point_row(point: dict, report: dict) -> dict:
    """One point's figures from its run's report."""
    wl, s = report["workload"], report["summary"]
    rows = s["configurations"]
    items = wl["prompts"] * wl["generations"] * wl["rounds"]
    lim = rows.get("limit", {})
    return {
        "axes": point["axes"], "generations": wl["generations"], "prefix_tokens": wl["prefix_tokens"],
        "prefix_tokens_actual": wl["prefix_tokens_actual"], "items": items, "tokens": s["tokens"],
        "unique_tokens": lim.get("unique_tokens"),
        "ms_per_item": {name: r["wall_s"] / items * 1000 for name, r in rows.items()},
        "service_vs_limit_time": s["ratios"]["service_vs_limit_time"],
        "speedup_vs_no_cache": s["ratios"]["speedup_vs_no_cache"],
        "max_abs_score_diff_vs_limit": max((r["max_abs_score_diff_vs_limit"] or 0.0 for n, r in rows.items()
                                            if n != "limit"), default=None),
    }


def sweep_table(rows: list[dict], configs: list[str]) -> str:
    """The sweep's figures as a markdown table, one line per point."""
    head = ["axis", "G", "block tokens", "items", "tokens", "unique tokens"]
    head += [f"{LABELS[c].split(' ', 1)[0]} ms/item" for c in configs] + ["(2)/(1) time", "max |Δscore|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [", ".join("G" if a == "generations" else "block" for a in r["axes"]), str(r["generations"]),
                 str(r["prefix_tokens_actual"]), str(r["items"]), f"{r['tokens']:,}",
                 f"{r['unique_tokens']:,}" if r["unique_tokens"] is not None else "–"]
        cells += [f"{r['ms_per_item'][c]:,.1f}" if c in r["ms_per_item"] else "–" for c in configs]
        ratio, diff = r["service_vs_limit_time"], r["max_abs_score_diff_vs_limit"]
        cells += [f"{ratio:.2f}×" if ratio else "–", f"{diff:.1e}" if diff is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], configs: list[str], bound: float, path: Path) -> None:
    """Time per item (top) and the service's ratio to its limit (bottom) against G (left) and the block (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for col, (axis, key, xlabel) in enumerate((("generations", "generations", "responses per prompt (G)"),
                                               ("prefix_tokens", "prefix_tokens_actual", "principle block (tokens)"))):
        pts = sorted((r for r in rows if axis in r["axes"]), key=lambda r: r[key])
        xs = [r[key] for r in pts]
        for c in configs:
            axes[0][col].plot(xs, [r["ms_per_item"].get(c) for r in pts], marker="o", label=LABELS[c])
        axes[0][col].set_xlabel(xlabel)
        axes[1][col].plot(xs, [r["service_vs_limit_time"] for r in pts], marker="o", color="C1",
                          label="(2) service / (1) limit")
        axes[1][col].axhline(bound, color="grey", linestyle="--", label=f"target ≤ {bound:g}")
        axes[1][col].axhline(1.0, color="grey", linewidth=0.5)
        axes[1][col].set_xlabel(xlabel)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("time per item (ms)")
    axes[1][0].set_ylabel("time ratio to the limit")
    axes[0][0].set_ylim(bottom=0)
    axes[1][0].set_ylim(bottom=0)
    axes[0][1].legend(fontsize=8)
    axes[1][1].legend(fontsize=8)
    fig.suptitle("salmon bench --sweep: the trained scorer's cost by group size and principle-block length")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_markdown(env: dict, args: argparse.Namespace, argv: list[str], scorer_version: str | None,
                   rows: list[dict], png: Path) -> str:
    """One BENCHMARKS.md entry for a sweep."""
    return "\n".join([
        f"## {env['date']} — `salmon bench --sweep` (trained {scorer_version}, model {args.model})", "",
        f"- Machine: {env['nproc']} CPU ({env['cpu']}), {env['ram_gib']} GiB RAM"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"; device {args.device}, dtype {args.dtype}; "
        f"load average (1/5/15 min) at start {env['load_average']} (the machine was shared).",
        f"- Command: `salmon {' '.join(argv)}`.",
        f"- Versions: salmon {env['salmon']} (git {env['git']}), torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}.",
        f"- Each point: B={args.prompts} prompts × G responses × R={args.rounds} rounds, responses "
        f"{args.min_response_tokens}–{args.max_response_tokens} tokens, seed {args.seed}; G axis at "
        f"--prefix-tokens {args.prefix_tokens}, block axis at G={args.generations}. Plot: `{png}`.",
        "",
        sweep_table(rows, args.configs),
        "",
    ]) + "\n"


def run_sweep(args: argparse.Namespace, argv: list[str], scorer_version: str | None) -> int:
    """`salmon bench --sweep`: every point, then the table, the PNG, the JSON and the BENCHMARKS.md entry."""
    from benchmarks.cli import run_once
    from benchmarks.report import append_markdown

    env = environment(args)
    rows, reports = [], []
    for point in sweep_points(args):
        one = copy.copy(args)
        one.generations, one.prefix_tokens = point["generations"], point["prefix_tokens"]
        print(f"salmon bench --sweep: G={one.generations}, block ~{one.prefix_tokens} tokens", file=sys.stderr,
              flush=True)
        report = run_once(one, argv, scorer_version)
        reports.append(report)
        rows.append(point_row(point, report))
    configs = [c for c in CONFIGS if c in args.configs]
    png = Path(args.sweep_png)
    plot_sweep(rows, configs, targets_for("trained")["service_vs_limit_time"], png)
    print(sweep_table(rows, configs))
    print(f"salmon bench --sweep: plot written to {png}", file=sys.stderr)
    if args.out:
        from salmon.atomic import atomic_write_json

        atomic_write_json(args.out, {"environment": env, "points": rows, "reports": reports, "png": str(png)})
    if args.benchmarks_md:
        append_markdown(Path(args.benchmarks_md), sweep_markdown(env, args, argv, scorer_version, rows, png))
    return 0
