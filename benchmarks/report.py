"""What `salmon bench` reports: FLOPs counted from the model's shapes, the summary, the table, BENCHMARKS.md.

Nothing here runs a model; the configurations' names and labels are defined here for every other part.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

CONFIGS = ("limit", "service", "service_no_cache", "baseline")
LABELS = {
    "limit": "(1) limit: unique tokens, direct on the model",
    "service": "(2) service, HTTP, prefix cache on",
    "service_no_cache": "(3) service, HTTP, prefix cache off",
    "baseline": "(4) serve_rm-style stand-in (not OpenRLHF)",
}
TARGETS = {"service_vs_limit_time": 1.25, "speedup_vs_no_cache": 3.0, "speedup_vs_baseline": 4.0}
# The trained scorer runs one sequence per item and no lm_head, so little besides the forward itself
# stands between the service and its limit: its bound is tighter.
SCORER_TARGETS = {"trained": {**TARGETS, "service_vs_limit_time": 1.15}}


def targets_for(scorer: str | None) -> dict[str, float]:
    """The ratio targets of a run of ``scorer``."""
    return SCORER_TARGETS.get(scorer or "", TARGETS)


def workload_flops(config, groups: list[list], value_head: str = "lm") -> dict[str, float]:
    """FLOPs each configuration must do for ``groups`` (a request's sequences each), from the model's
    shapes: linear layers per token, attention per (query, key) pair, and the value head: ``"lm"``
    (the causal-LM scorers) is the lm_head per response token; ``"scalar"`` (the trained scorer) is a
    one-output head, read at one token per sequence on the cached path and, as transformers' sequence
    classifier does, applied to every token of a full forward.

    service: the responses as suffixes against their prefix, plus each prompt once per principle
    block (the blocks themselves are warm); no_cache: every full sequence, unpadded; baseline: every
    full sequence padded to its request's longest. The ratios of these are the most a speed-up can be
    when every configuration runs its kernels equally well.
    """
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = 2 * layers * (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter)
    attn_pair = layers * 4 * heads * head_dim
    if value_head not in {"lm", "scalar"}:
        raise ValueError("value_head must be 'lm' or 'scalar'")
    scalar = value_head == "scalar"
    head = 2 * hidden * (1 if scalar else config.vocab_size)

    def head_flops(x, width: int | None = None) -> int:  # a full forward of x, padded to width
        if scalar:
            return head * (width or len(x))
        return head * len(x.response_ids)

    def causal(start: int, n: int) -> int:  # Σ context over n tokens whose first sees start + 1 keys
        return n * start + n * (n + 1) // 2

    out = {"service": 0.0, "no_cache": 0.0, "baseline": 0.0}
    for seqs in groups:
        for x in seqs:
            p, r = len(x.prefix_ids), len(x.response_ids)
            out["service"] += r * linear + (head if scalar else r * head) + attn_pair * causal(p, r)
            out["no_cache"] += len(x) * linear + attn_pair * causal(0, len(x)) + head_flops(x)
        for system, prompt in {(x.system_ids, x.prompt_ids) for x in seqs}:
            out["service"] += len(prompt) * linear + attn_pair * causal(len(system), len(prompt))
        width = max(len(x) for x in seqs)
        out["baseline"] += sum(width * linear + attn_pair * causal(0, width) + head_flops(x, width)
                               for x in seqs)
    return out



def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values``, linear between the nearest ranks (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)



def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(results: dict[str, dict], spec: dict) -> dict:
    """Per-configuration rows, the time ratios against their targets and the counted work ratios."""
    lim = results.get("limit")
    tokens = lim["tokens"] if lim else next((r["tokens"] for r in results.values()), 0)
    rows = {}
    for name, r in results.items():
        lat = r.get("latencies_s") or []
        diff = None
        if lim and name != "limit" and len(r["scores"]) == len(lim["scores"]):
            diff = max((abs(a - b) for a, b in zip(r["scores"], lim["scores"], strict=True)), default=0.0)
        rows[name] = {
            "label": r["label"], "wall_s": r["wall_s"], "tokens_per_s": tokens / r["wall_s"] if r["wall_s"] else None,
            "p50_ms": _ms(percentile(lat, 0.5)), "p99_ms": _ms(percentile(lat, 0.99)), "requests": len(lat),
            "peak_rss_mib": r["peak_rss_mib"], "max_abs_score_diff_vs_limit": diff,
            "tokens_reported": r["tokens"], "cached_tokens": r.get("cached_tokens"),
            "load_before": r["load_before"], "load_after": r["load_after"], "torch_threads": r.get("torch_threads"),
        }
        for k in ("unique_tokens", "sequences", "block_kv_bytes", "prefix_cache", "model_version"):
            if k in r:
                rows[name][k] = r[k]
    t = {k: results[k]["wall_s"] if k in results else None for k in CONFIGS}
    ratios = {
        "service_vs_limit_time": _ratio(t["service"], t["limit"]),
        "speedup_vs_no_cache": _ratio(t["service_no_cache"], t["service"]),
        "speedup_vs_baseline": _ratio(t["baseline"], t["service"]),
    }
    flops = (lim or {}).get("flops") or {}
    work = {
        "no_cache_vs_service": _ratio(flops.get("no_cache"), flops.get("service")),
        "baseline_vs_service": _ratio(flops.get("baseline"), flops.get("service")),
    }
    for name, key in (("limit", "service"), ("service", "service"), ("service_no_cache", "no_cache"),
                      ("baseline", "baseline")):
        if name in rows and flops.get(key) and rows[name]["wall_s"]:
            rows[name]["gflop"] = flops[key] / 1e9
            rows[name]["gflop_per_s"] = flops[key] / 1e9 / rows[name]["wall_s"]
    pc = (results.get("service") or {}).get("prefix_cache") or {}
    bound = targets_for(spec.get("scorer"))
    targets = {
        f"service_within_{bound['service_vs_limit_time']:g}x_of_limit": None
        if ratios["service_vs_limit_time"] is None
        else ratios["service_vs_limit_time"] <= bound["service_vs_limit_time"],
        "service_3x_faster_than_no_cache": None if ratios["speedup_vs_no_cache"] is None
        else ratios["speedup_vs_no_cache"] >= bound["speedup_vs_no_cache"],
        "service_4x_faster_than_baseline": None if ratios["speedup_vs_baseline"] is None
        else ratios["speedup_vs_baseline"] >= bound["speedup_vs_baseline"],
        "cache_within_bound": (pc["bytes"] <= pc["max_bytes"]) if pc else None,
    }
    return {"configurations": rows, "ratios": ratios, "work_ratios": work, "targets": targets,
            "target_values": bound, "tokens": tokens}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def environment(args) -> dict:
    """Machine, versions, git commit, date and load average, for the report's header."""
    import torch
    import transformers

    from salmon import __version__

    cpu, mem = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    sha = None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(), "cpu": cpu,
            "ram_gib": mem, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "salmon": __version__, "git": sha,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:,.{nd}f}"


def table(report: dict) -> str:
    """The result table in markdown (printed and in BENCHMARKS.md)."""
    rows = report["summary"]["configurations"]
    lines = ["| configuration | time (s) | tokens/s | GFLOP | GFLOP/s | p50 (ms) | p99 (ms) | peak RSS (MiB) "
             "| max |Δscore| vs (1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in CONFIGS:
        if name in rows:
            r = rows[name]
            lines.append(f"| {r['label']} | {_fmt(r['wall_s'], 2)} | {_fmt(r['tokens_per_s'], 0)} | "
                         f"{_fmt(r.get('gflop'), 0)} | {_fmt(r.get('gflop_per_s'), 1)} | "
                         f"{_fmt(r['p50_ms'], 0)} | {_fmt(r['p99_ms'], 0)} | {_fmt(r['peak_rss_mib'], 0)} | "
                         f"{_fmt(r['max_abs_score_diff_vs_limit'], 4)} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """One BENCHMARKS.md entry: the run's machine, command, versions, workload, table and ratios."""
    env, wl, s = report["environment"], report["workload"], report["summary"]
    ra, tg = s["ratios"], s["targets"]
    bound = s.get("target_values") or TARGETS
    limit_key = f"service_within_{bound['service_vs_limit_time']:g}x_of_limit"
    pc = s["configurations"].get("service", {}).get("prefix_cache") or {}
    what = (f"trained {wl.get('scorer_version')}" if wl["scorer"] == "trained"
            else f"{wl['scorer']}, {wl['contrast']}")
    out = [
        f"## {env['date']} — `salmon bench` ({what}, model {wl['model']})", "",
        f"- Machine: {env['nproc']} CPU ({env['cpu']}), {env['ram_gib']} GiB RAM"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"; device {wl['device']}, dtype {wl['dtype']}, "
        f"torch threads {s['configurations'].get('service', {}).get('torch_threads', '–')}.",
        f"- Load average (1/5/15 min) at start: {env['load_average']}; at end: {report['load_average_end']} "
        "(the machine was shared; see per-configuration loads in the JSON).",
        f"- Command: `{wl['command']}`.",
        f"- Versions: salmon {env['salmon']} (git {env['git']}), torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}.",
        f"- Workload: B={wl['prompts']} prompts × G={wl['generations']} responses × R={wl['rounds']} timed rounds "
        f"(+1 warm-up item), principle block {wl['prefix_tokens_actual']} tokens ({wl['num_principles']} "
        f"principles), responses {wl['min_response_tokens']}–{wl['max_response_tokens']} tokens "
        f"(mean {wl['mean_response_tokens']:.0f}), seed {wl['seed']}, max_batch_tokens {wl['max_batch_tokens']}, "
        f"max_padding {wl.get('max_padding', '–')}; "
        f"{s['tokens']:,} full-sequence tokens scored per configuration"
        + (f", {s['configurations']['limit']['unique_tokens']:,} unique" if "limit" in s["configurations"] else "")
        + ".",
        "",
        table(report),
        "",
        f"- (2) vs (1), time: **{_fmt(ra['service_vs_limit_time'], 2)}×** "
        f"(target ≤ {bound['service_vs_limit_time']:g}: {_fmt(tg.get(limit_key))})",
        f"- (2) vs (3), speed-up: **{_fmt(ra['speedup_vs_no_cache'], 2)}×** "
        f"(target ≥ {bound['speedup_vs_no_cache']:g}: {_fmt(tg['service_3x_faster_than_no_cache'])})",
        f"- (2) vs (4), speed-up: **{_fmt(ra['speedup_vs_baseline'], 2)}×** (target ≥ {bound['speedup_vs_baseline']:g}: "
        f"{_fmt(tg['service_4x_faster_than_baseline'])})",
        (f"- Work (FLOPs counted from the model's shapes and the workload's lengths): (3) is "
         f"{_fmt(s.get('work_ratios', {}).get('no_cache_vs_service'), 2)}× and (4) "
         f"{_fmt(s.get('work_ratios', {}).get('baseline_vs_service'), 2)}× the work of (2): the speed-ups "
         "(2) could reach if every configuration ran its kernels equally well."),
        (f"- Prefix cache after the run: {pc.get('bytes', 0) / 2**20:.1f} MiB in {pc.get('entries')} entries, "
         f"bound {pc.get('max_bytes', 0) / 2**20:.0f} MiB (within: {_fmt(tg['cache_within_bound'])}); "
         f"hits {pc.get('hits')}, misses {pc.get('misses')}, evictions {pc.get('evictions')}.") if pc else
        "- Prefix cache: not measured.",
        "",
    ]
    return "\n".join(out) + "\n"


MD_HEADER = """# Benchmarks

Appended by `salmon bench` (benchmarks/__init__.py documents the method). Each entry is one run: the
ratios in it were measured in that run, on the machine and under the load it names.

"""


def append_markdown(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (created with its header), atomically."""
    from salmon.atomic import atomic_write_text

    old = path.read_text(encoding="utf-8") if path.is_file() else MD_HEADER
    atomic_write_text(path, old.rstrip("\n") + "\n\n" + text)

