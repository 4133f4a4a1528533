"""`salmon serve`, `salmon score`, `salmon check`, `salmon generate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from salmon.config import format_validation_error, load_yaml
from salmon.errors import UserError


def _settings_args(p: argparse.ArgumentParser) -> None:
    from rm_core.scorer_table import scorer_choices

    p.add_argument("--config", help="YAML file of service settings (see rm_service/settings.py)")
    p.add_argument("--scorer", choices=scorer_choices())
    p.add_argument("--model", help="causal LM for zero-shot scorers: 'embedded', a .gguf, or a local HF dir")
    p.add_argument("--registry", help="reward-model registry directory")
    p.add_argument("--principle-set", dest="default_principle_set", help="default principle set (name or YAML)")
    p.add_argument("--contrast", choices=["per_principle", "whole_set"])
    p.add_argument("--contrast-adapter", help="contrastive scorer: a `salmon contrast-tune` output directory")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None)
    p.add_argument("--max-batch-tokens", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device")


def build_settings(args: argparse.Namespace, **extra):
    from rm_service.settings import ServiceSettings

    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    if not isinstance(data, dict):
        raise UserError(f"{args.config}: expected a mapping of settings at the top level, got {type(data).__name__}")
    keys = ["scorer", "model", "registry", "default_principle_set", "contrast", "contrast_adapter", "prefix_cache",
            "max_batch_tokens", "dtype", "device", "host", "port", "insecure"]
    for k in keys:
        v = getattr(args, k, None)
        if v is not None:
            data[k] = v
    data.update({k: v for k, v in extra.items() if v is not None})
    try:
        return ServiceSettings(**data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, args.config or "settings")) from None


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="salmon serve", description="Run the reward-model service.")
    _settings_args(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow a non-loopback bind without SALMON_API_KEY")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    st = build_settings(args)
    if not st.is_loopback and st.api_key is None and not st.insecure:
        raise UserError(f"refusing to bind {st.host} without an API key: set SALMON_API_KEY (and SALMON_ADMIN_KEY), "
                       "or pass --insecure if the network is trusted")
    import uvicorn

    from principles.schema import PrincipleSetError
    from rm_service.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(st)
    except PrincipleSetError as e:
        raise UserError(f"{args.config or 'settings'}: {e}") from None
    uvicorn.run(app, host=st.host, port=st.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def score(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="salmon score", description="Score prompt/response pairs offline (no server).")
    _settings_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", action="append", required=True, help="repeat for several responses")
    p.add_argument("--principle", action="append", help="inline principle definition (repeatable)")
    args = p.parse_args(argv)
    st = build_settings(args)
    from principles.schema import Principle
    from rm_service.metrics import Metrics
    from rm_service.serving import ModelManager, PrincipleSetStore

    if args.principle:
        principles = [Principle(name=f"p{i + 1}", definition=d) for i, d in enumerate(args.principle)]
    else:
        principles = list(PrincipleSetStore(st.default_principle_set).resolve(None).principles)
    mm = ModelManager(st, Metrics())
    scorer = mm.build()
    scores = scorer.score_items(principles, [(args.prompt, r) for r in args.response])
    json.dump({"scores": scores, "model_version": scorer.version, "scorer": scorer.kind}, sys.stdout)
    print()
    return 0


def check_variants() -> list[str]:
    """What ``salmon check --scorers`` accepts (rm_core.checkset.SCORERS)."""
    from rm_core.checkset import SCORERS

    return list(SCORERS)


def format_flip_table(report: dict) -> str:
    """The check report as a text table: flip rate (and accuracy) per scorer and mode."""
    modes = report["modes"]
    width = max([22, *(len(t["version"]) for t in report["scorers"].values())])  # a version is never cut
    head = f"{'scorer':<12} {'version':<{width}} " + " ".join(f"{m:>16}" for m in modes)
    lines = [f"flip rate (accuracy) on {report['pairs']} pairs of {report['check_set']}", head, "-" * len(head)]
    for kind, t in report["scorers"].items():
        cells = []
        for m in modes:
            c = t.get(m, {})
            cells.append(f"{'n/a':>16}" if "flip_rate" not in c else
                         f"{c['flip_rate']:>8.1%} ({c['accuracy']:.0%})".rjust(16))
        lines.append(f"{kind:<12} {t['version']:<{width}} " + " ".join(cells))
    for kind, t in report["scorers"].items():
        for m in modes:
            if "unsupported" in t.get(m, {}):
                lines.append(f"n/a: {kind} {m}: {t[m]['unsupported']}")
    return "\n".join(lines)


def check(argv: list[str]) -> int:
    from rm_core.checkset import DEFAULT_CHECK_SET, FLIP_MODES, run_check

    p = argparse.ArgumentParser(prog="salmon check",
                                description="Principle-flip table of each scorer on the labelled check set: "
                                "the principle alone, inside a set of 5, and as plain text.")
    p.add_argument("--model", default="embedded")
    p.add_argument("--check-set", help="JSONL of flip pairs (default: principles/checks/flip_pairs.jsonl)")
    p.add_argument("--scorers", default="shipped,contrastive",
                   help=f"comma list of scorers ({', '.join(check_variants())}); --registry adds 'trained'")
    p.add_argument("--modes", default=",".join(FLIP_MODES), help="comma list of modes (single, set, plain)")
    p.add_argument("--registry", help="also evaluate the CURRENT trained version of this registry")
    p.add_argument("--contrast-adapter", help="merge this `salmon contrast-tune` adapter into the contrastive scorer")
    p.add_argument("--out", help="write the report JSON here")
    p.add_argument("--limit", type=int, help="only N pairs, spread evenly over the check set's principles")
    p.add_argument("--held-out-axes", type=int, metavar="N", dest="held_out_per_axis",
                   help="instead of the check set: the first N written pairs of each axis that `salmon "
                        "contrast-tune` and `salmon rm-pretrain` hold out of training")
    args = p.parse_args(argv)
    variants = [s.strip() for s in args.scorers.split(",") if s.strip()]
    if args.registry and "trained" not in variants:
        variants.append("trained")
    unknown = [v for v in variants if v not in check_variants()]
    if unknown:
        raise UserError(f"--scorers: unknown scorer {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(check_variants())}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in FLIP_MODES]
    if bad:
        raise UserError(f"--modes: unknown mode {', '.join(map(repr, bad))}; choose from {', '.join(FLIP_MODES)}")
    pairs = None
    if args.held_out_per_axis is not None:
        if args.check_set:
            raise UserError("--held-out-axes and --check-set are two sources of pairs: give one")
        if args.held_out_per_axis < 1:
            raise UserError("--held-out-axes must be at least 1 (pairs per held-out axis)")
        from principles.axes import DEFAULT_HELD_OUT, heldout_flip_pairs, load_axes

        pairs = heldout_flip_pairs([a for a in load_axes() if a.name in DEFAULT_HELD_OUT], args.held_out_per_axis)
    report = run_check(args.model, None if pairs else Path(args.check_set) if args.check_set else DEFAULT_CHECK_SET,
                       variants, registry=args.registry, limit=args.limit, modes=modes,
                       contrast_adapter=args.contrast_adapter, pairs=pairs)
    if args.out:
        from salmon.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(format_flip_table(report))
    return 0


def generate(argv: list[str]) -> int:
    """RAIN (``--rain``) or plain sampling on the core, no server: the committed text as it is
    committed, then the search statistics (or, with ``--json``, one JSON document)."""
    p = argparse.ArgumentParser(prog="salmon generate",
                                description="Generate an answer under principles: RAIN search (--rain; the scorer's "
                                "value of each partial answer guides it) or plain sampling. No server.")
    _settings_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--principles", dest="set_name", help="a principle set: shipped name or YAML path "
                   "(default: the default set)")
    p.add_argument("--principle", action="append", help="inline principle definition (repeatable; wins over "
                   "--principles; the contrastive scorer needs a set with negative definitions)")
    p.add_argument("--negate", action="append", default=[], help="principle name to generate under negated")
    p.add_argument("--rain", action="store_true", help="search (RAIN); without it, plain sampling")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-expansions", type=int)
    p.add_argument("--time-budget", type=float, dest="time_budget_s", help="seconds")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON document (text, stats) at the end")
    args = p.parse_args(argv)
    st = build_settings(args)
    from principles.schema import Principle
    from rm_core.rain import RainConfig, generate, generation_context, sampler_for, scorer_value_fn
    from rm_service.errors import NotFound
    from rm_service.metrics import Metrics
    from rm_service.serving import ModelManager, PrincipleSetStore

    knobs = {k: getattr(args, k) for k in ("max_new_tokens", "max_expansions", "time_budget_s", "temperature", "seed")
             if getattr(args, k) is not None}
    try:
        config = RainConfig(**knobs)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "options")) from None
    if args.principle:
        principles = [Principle(name=f"p{i + 1}", definition=d) for i, d in enumerate(args.principle)]
        ref = "inline"
    else:
        store = PrincipleSetStore(st.default_principle_set)
        try:
            pset = store.resolve(args.set_name)
        except NotFound:
            names = ", ".join(s.name for s in store.list().principle_sets)
            raise UserError(f"--principles: no principle set {args.set_name!r}; give a YAML path or one of: "
                            f"{names}") from None
        principles, ref = list(pset.principles), pset.ref
    unknown = [n for n in args.negate if n not in {p.name for p in principles}]
    if unknown:
        raise UserError(f"--negate names {unknown}, which are not in the principles {[p.name for p in principles]}")
    mm = ModelManager(st, Metrics())
    scorer = mm.build()
    sampler, renderer = sampler_for(scorer, st.model, mm.options, st.max_prompt_tokens, st.max_response_tokens)
    scorer.prepare(principles, args.prompt, "", args.negate)  # a RenderError (a UserError) before any sampling
    context = generation_context(renderer, principles, args.prompt, args.negate,
                                 with_principles=config.principles_in_context)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate("rain" if args.rain else "none", sampler,
                      scorer_value_fn(scorer, principles, args.prompt, args.negate), context, config,
                      on_commit=None if args.json else show)
    stats = result.stats.to_dict()
    if args.json:
        json.dump({"text": result.text, "principle_set": ref, "model_version": scorer.version, "stats": stats},
                  sys.stdout)
        print()
    else:
        print()
        print("stats: " + json.dumps(stats))
    return 0


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    return {"serve": serve, "score": score, "check": check, "generate": generate}[cmd](rest)
