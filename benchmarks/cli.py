"""`salmon bench`: arguments, the run of every configuration, the report (see benchmarks/__init__.py for the method)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import CONFIGS, LABELS, append_markdown, environment, markdown, summarize, table
from benchmarks.runner import run_config
from benchmarks.workload import SET_NAME, build_principles, build_workload
from salmon.errors import UserError


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options of `salmon bench` (``argv`` without the command name); bad values are UserErrors."""
    p = argparse.ArgumentParser(
        prog="salmon bench",
        description="Benchmark /v1/score (prefix cache on/off) against its limit and a serve_rm-style "
        "baseline on a GRPO-shaped workload; see benchmarks/__init__.py for the method.")
    p.add_argument("--model", default=None,
                   help="causal LM of the contrastive scorer: 'embedded' (default), a .gguf, or a local HF dir; "
                   "the trained scorer runs on its manifest's base model")
    p.add_argument("--scorer", default="contrastive", choices=["contrastive", "trained"],
                   help="the scorer whose sequences are run: contrastive (zero-shot) or trained (a registry "
                   "version, by default the shipped reward model)")
    p.add_argument("--registry", default=None,
                   help="trained scorer: a reward-model registry directory (default: the shipped RM, rm_core/shipped)")
    p.add_argument("--version", default=None, help="trained scorer: the registry version (default: its CURRENT)")
    p.add_argument("--contrast", default="whole_set", choices=["whole_set", "per_principle"],
                   help="whole_set: 2 sequences per item (default); per_principle: k+1")
    p.add_argument("--prompts", "-B", type=int, default=4, help="prompts per round (B; concurrent requests)")
    p.add_argument("--generations", "-G", type=int, default=8, help="responses per prompt (G; items per request)")
    p.add_argument("--rounds", "-R", type=int, default=1,
                   help="timed rounds (training steps); 1 keeps the default run within 10 min on a 2-core CPU")
    p.add_argument("--prefix-tokens", type=int, default=600, help="target length of the principle block, in tokens")
    p.add_argument("--min-response-tokens", type=int, default=64)
    p.add_argument("--max-response-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="the service's padded-token budget per forward")
    p.add_argument("--max-padding", type=float, default=0.25,
                   help="the service's pad share before a length-sorted batch is split (also used by (1))")
    p.add_argument("--prefix-attention", default="auto", choices=["auto", "expanded"],
                   help="how (1) and (2) attend to a cached prefix (the service's prefix_attention setting)")
    p.add_argument("--baseline-batch-size", type=int, default=0,
                   help="sequences per forward in the baseline (serve_rm's --batch_size); 0: the whole request")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per configuration (default: torch's)")
    p.add_argument("--configs", default=None,
                   help=f"comma list, subset of {','.join(CONFIGS)} (default: all; with --sweep: limit,service)")
    p.add_argument("--sweep", action="store_true",
                   help="the trained scorer over group sizes (G = 4, 8, 16) and principle-block lengths (~150, "
                   "~600, ~1,200 tokens), one axis at a time: a table and a PNG of time per item and the ratio "
                   "to the limit (see benchmarks/sweep.py)")
    p.add_argument("--sweep-generations", default="4,8,16", help="--sweep: the group sizes G (at --prefix-tokens)")
    p.add_argument("--sweep-prefix-tokens", default="150,600,1200",
                   help="--sweep: the principle-block lengths (at --generations)")
    p.add_argument("--sweep-png", default="benchmarks_sweep.png", help="--sweep: where the PNG goes")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--benchmarks-md", default="BENCHMARKS.md", help="append the markdown table here ('' skips)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up on a configuration after this long")
    args = p.parse_args(argv)
    for name in ("prompts", "generations", "rounds", "prefix_tokens", "min_response_tokens", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_response_tokens < args.min_response_tokens:
        raise UserError("--max-response-tokens must be at least --min-response-tokens")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.configs is None:
        args.configs = "limit,service" if args.sweep else ",".join(CONFIGS)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise UserError(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    args.configs = [c for c in CONFIGS if c in configs]
    if args.scorer != "trained" and (args.registry or args.version):
        raise UserError("--registry and --version choose the trained scorer's model; add --scorer trained")
    if args.sweep and args.scorer != "trained":
        raise UserError("--sweep measures the trained scorer; add --scorer trained")
    for name in ("sweep_generations", "sweep_prefix_tokens"):
        flag = "--" + name.replace("_", "-")
        try:
            values = [int(v) for v in getattr(args, name).split(",") if v.strip()]
        except ValueError:
            raise UserError(f"{flag}: a comma list of whole numbers, e.g. 4,8,16") from None
        if not values or min(values) < 1:
            raise UserError(f"{flag}: give at least one value, each at least 1")
        setattr(args, name, values)
    if args.sweep and not {"limit", "service"} <= set(args.configs):
        raise UserError("--sweep reports the service against its limit: --configs must include limit and service")
    if args.version and not args.registry:
        raise UserError("--version needs --registry: the shipped reward model is served at its CURRENT version")
    return args


def resolve_trained(args: argparse.Namespace) -> str:
    """The trained scorer's version name as the service reports it; sets ``args.model`` to its base model.
    The version's files are verified when the workers load it."""
    from rm_core.registry import (
        CONTRAST_ADAPTER_KIND,
        SHIPPED_PREFIX,
        SHIPPED_REGISTRY,
        Registry,
        RegistryError,
    )

    root = Path(args.registry) if args.registry else SHIPPED_REGISTRY
    reg = Registry(root)
    version = args.version or reg.current()
    if not version:
        where = f"registry {root}" if args.registry else "the shipped reward model (rm_core/shipped)"
        raise UserError(f"{where} has no CURRENT version; pass --registry DIR (and --version) of a trained one")
    try:
        manifest = reg.manifest(version, verify=False)
    except RegistryError as e:
        raise UserError(str(e)) from None
    if manifest.kind == CONTRAST_ADAPTER_KIND:
        raise UserError(f"{version} of {root} is a contrast adapter (the contrastive scorer's k+1 passes), not a "
                        "one-pass trained RM: benchmark the contrastive scorer, or pass --registry DIR of a trained one")
    if args.model is not None and args.model != manifest.base_model:
        raise UserError(f"--model {args.model!r} is not the base model of {version} ({manifest.base_model!r}); "
                        "leave --model out with --scorer trained")
    args.model = manifest.base_model
    args.version = version
    return version if args.registry else SHIPPED_PREFIX + version


def main(argv: list[str]) -> int:
    """`salmon bench`: ``argv[0]`` is the command name, as salmon_cli passes it."""
    args = parse_args(argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    scorer_version = resolve_trained(args) if args.scorer == "trained" else None
    if args.model is None:
        args.model = "embedded"
    if args.sweep:
        from benchmarks.sweep import run_sweep

        return run_sweep(args, argv, scorer_version)
    report = run_once(args, argv, scorer_version)
    print(table(report))
    print(json.dumps({"ratios": report["summary"]["ratios"], "targets": report["summary"]["targets"]}, indent=2))
    if args.out:
        from salmon.atomic import atomic_write_json

        atomic_write_json(args.out, report)
    if args.benchmarks_md:
        append_markdown(Path(args.benchmarks_md), markdown(report))
    return 0


def run_once(args: argparse.Namespace, argv: list[str], scorer_version: str | None) -> dict:
    """One run of the configurations in ``args`` on its workload: the report (environment, workload, summary)."""
    from rm_core.render import Renderer
    from salmon.modeling import ModelSourceError, load_tokenizer

    try:
        tok = load_tokenizer(args.model)
    except (ModelSourceError, OSError) as e:
        raise UserError(str(e)) from None
    renderer = Renderer(tok)
    principles, block_tokens = build_principles(renderer, args.prefix_tokens)
    workload = build_workload(tok, args)
    resp_tokens = [len(tok(r, add_special_tokens=False)["input_ids"])
                   for rnd in workload["rounds"] for _, rs in rnd for r in rs]
    env = environment(args)
    wl_info = {"model": args.model, "scorer": args.scorer, "scorer_version": scorer_version,
               "contrast": args.contrast if args.scorer == "contrastive" else None, "prompts": args.prompts,
               "generations": args.generations, "rounds": args.rounds, "prefix_tokens": args.prefix_tokens,
               "prefix_tokens_actual": block_tokens, "num_principles": len(principles),
               "min_response_tokens": args.min_response_tokens, "max_response_tokens": args.max_response_tokens,
               "mean_response_tokens": statistics.fmean(resp_tokens), "seed": args.seed,
               "max_batch_tokens": args.max_batch_tokens, "max_padding": args.max_padding,
               "prefix_attention": args.prefix_attention, "baseline_batch_size": args.baseline_batch_size,
               "dtype": args.dtype, "device": args.device, "threads": args.threads,
               "command": "salmon " + " ".join(argv)}
    print(f"salmon bench: {scorer_version or args.scorer}, {args.prompts}×{args.generations} items × {args.rounds} rounds, principle block "
          f"{block_tokens} tokens ({len(principles)} principles), load {env['load_average']}", file=sys.stderr)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="salmon-bench-") as tmpd:
        tmp = Path(tmpd)
        import yaml

        set_dir = tmp / "sets"
        set_dir.mkdir()
        set_path = set_dir / f"{SET_NAME}.yaml"
        set_path.write_text(yaml.safe_dump({
            "name": SET_NAME, "description": "salmon bench: shipped principles up to the target block length",
            "principles": [pr.model_dump(mode="json", exclude_defaults=True) for pr in principles]}, sort_keys=False))
        spec = {"model": args.model, "scorer": args.scorer, "contrast": args.contrast,
                "registry": str(Path(args.registry).resolve()) if args.registry else None,
                "version": args.version, "dtype": args.dtype,
                "device": args.device, "threads": args.threads, "max_batch_tokens": args.max_batch_tokens,
                "max_padding": args.max_padding, "prefix_attention": args.prefix_attention,
                "max_response_tokens": args.max_response_tokens, "generations": args.generations,
                "baseline_batch_size": args.baseline_batch_size, "timeout_s": args.timeout_s,
                "set_path": str(set_path), "workload": workload}
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for config in args.configs:
            t0 = time.perf_counter()
            print(f"salmon bench: running {LABELS[config]} ...", file=sys.stderr, flush=True)
            results[config] = run_config(config, spec, spec_path, tmp)
            print(f"salmon bench:   {results[config]['wall_s']:.2f} s timed ({time.perf_counter() - t0:.0f} s "
                  "with start and warm-up)", file=sys.stderr, flush=True)
    return {"environment": env, "workload": wl_info, "summary": summarize(results, spec),
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
