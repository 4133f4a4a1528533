"""``salmon synth …`` and ``salmon rm-train``: the synthetic-preference stages from the command line.

Each stage command takes an optional ``--config`` YAML of that stage's config (data_synth.config) and
a few flags for the common fields; flags win over the file. User errors raise ``UserError`` (one line,
exit 2, nothing already written is touched).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from salmon.config import load_config
from salmon.errors import UserError

from . import config as C
from .stages import stage_names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits; salmon's CLI reports one line instead
        raise UserError(f"{self.prog}: {message}")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _nested(cfg_cls, path: str | None, overrides: dict[str, Any]):
    return load_config(cfg_cls, path, {k: v for k, v in overrides.items() if v is not None})


def _synth_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="salmon synth", description="Synthetic principle preferences (SALMON).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("prompts", help="validate a prompt JSONL file and count its types")
    s.add_argument("--prompts", help="prompt JSONL (default: the shipped set)")

    s = sub.add_parser("generate-prompts", help="grow a prompt set from seeds with TGRT self-instruct")
    s.add_argument("--out", required=True, help="prompt JSONL to write (extended if it exists)")
    s.add_argument("--seeds", help="seed prompt JSONL (default: the shipped seeds)")
    s.add_argument("--target", type=int, help="new prompts wanted")
    s.add_argument("--model", help="generator model source")
    s.add_argument("--config")

    s = sub.add_parser("sample", help="the policy answers each prompt >= 2 times; pairs")
    s.add_argument("--prompts", help="prompt JSONL (default: the shipped set)")
    s.add_argument("--limit", type=int, help="first N prompts")
    s.add_argument("--out", required=True, help="output directory (shards + manifest)")
    s.add_argument("--policy")
    s.add_argument("--config")

    s = sub.add_parser("judge", help="score each pair under each principle (A/B both orders, or contrastive)")
    s.add_argument("--pairs", required=True, help="sample stage directory")
    s.add_argument("--out", required=True)
    s.add_argument("--source", choices=["auto", "ab", "contrastive"])
    s.add_argument("--backend", choices=["local", "openai"])
    s.add_argument("--model")
    s.add_argument("--principle-set")
    s.add_argument("--no-prefix-reuse", action="store_true", help="run every principle's full prompt")
    s.add_argument("--config")

    s = sub.add_parser("judge-check", help="both label sources on the labelled flip-pair check set")
    s.add_argument("--limit", type=int, help="first N check pairs")
    s.add_argument("--model")
    s.add_argument("--config")

    s = sub.add_parser("aggregate", help="judgments -> RewardTrainer dataset (train/eval)")
    s.add_argument("--pairs", required=True)
    s.add_argument("--judgments", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--principle-set", default=None, help="the set the judgments used (default: rm)")
    s.add_argument("--config")

    s = sub.add_parser("watch", help="on-policy loop: judge RL rollouts, retrain, publish")
    s.add_argument("--rollouts", help="rollouts directory (overrides the config)")
    s.add_argument("--work-dir")
    s.add_argument("--registry")
    s.add_argument("--once", action="store_true", help="one pass over what is there, then exit")
    s.add_argument("--config")

    s = sub.add_parser("run", help=" -> ".join(stage_names()) + " -> publish")
    s.add_argument("--prompts", help="prompt JSONL (default: the shipped set)")
    s.add_argument("--num-prompts", type=int)
    s.add_argument("--out")
    s.add_argument("--registry")
    s.add_argument("--config")
    return p


def _rm_train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="salmon rm-train", description="Train a principle-following RM and publish it.")
    p.add_argument("--data", required=True, help="aggregate output directory (train.jsonl, eval.jsonl)")
    p.add_argument("--registry")
    p.add_argument("--base-model")
    p.add_argument("--no-publish", action="store_true")
    p.add_argument("--config")
    return p


def _rm_pretrain_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="salmon rm-pretrain",
                description="Pre-train the principle-following RM on minimal pairs over many axes (the shipped RM).")
    p.add_argument("--config", help="YAML of data_synth.pretrain.PretrainConfig")
    p.add_argument("--out", help="datasets and report (default runs/rm-pretrain)")
    p.add_argument("--registry", help="publish here (default OUT/registry)")
    p.add_argument("--ship", action="store_true",
                   help="replace the RM shipped with the package (rm_core/shipped) with the result")
    p.add_argument("--max-train-pairs", type=int, help="train on the first N built pairs (smoke runs)")
    return p


def _rm_pretrain(args, argv: list[str]) -> int:
    from .pretrain import PretrainConfig, run_pretrain, ship

    cfg = _nested(PretrainConfig, args.config, {"out": args.out, "max_train_pairs": args.max_train_pairs})
    registry = Path(args.registry) if args.registry else cfg.out / "registry"
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"registry": registry})})
    report = run_pretrain(cfg, command=" ".join(["salmon", *argv]))
    if args.ship:
        # Shipping replaces what every `scorer: auto` service serves: only an RM that reads principles.
        single = report["metrics"].get("held_out_axes", {}).get("single", {}).get("flip_rate")
        if single is None or single < cfg.ship_min_flip:
            raise UserError(f"not shipped: held-out single-principle flip rate {single} is below "
                            f"ship_min_flip={cfg.ship_min_flip}; the run's version is {report['version']} "
                            f"in {registry} (the shipped RM is unchanged)")
        report["shipped"] = str(ship(registry, report["version"]))
    _print(report)
    return 0


def _contrast_tune_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="salmon contrast-tune",
                description="Train a LoRA adapter that makes the contrastive scorer read principles "
                            "(contrast margins on the written minimal pairs, whole axes held out).")
    p.add_argument("--config", help="YAML of data_synth.contrast_tune.ContrastTuneConfig")
    p.add_argument("--out", required=True, help="directory for adapter/ and manifest.json (must not hold a manifest)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train-pairs", type=int, help="train on the first N shuffled pairs (smoke runs)")
    p.add_argument("--no-check", action="store_true", help="skip the check-set accuracy before and after")
    p.add_argument("--ship", action="store_true",
                   help="then make the adapter the RM shipped with the package (rm_core/shipped), which "
                        "`scorer: auto` serves; refused when it does not beat the zero-shot scorer on held-out axes")
    return p


def _contrast_tune(args, argv: list[str]) -> int:
    from rm_core.registry import MANIFEST

    from .contrast_tune import ContrastTuneConfig, ship_adapter, ship_refusal, tune

    out = Path(args.out)
    if (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a trained adapter ({MANIFEST}); choose a new --out")
    cfg = _nested(ContrastTuneConfig, args.config, {"epochs": args.epochs, "max_train_pairs": args.max_train_pairs})
    report = tune(cfg, out, command=" ".join(["salmon", *argv]), evaluate_check=not args.no_check)
    if args.ship:
        why = ship_refusal(report, cfg.ship_min_flip)
        if why:
            raise UserError(f"not shipped: {why}; the adapter stays in {out} and the shipped RM is unchanged")
        report["shipped"] = str(ship_adapter(out))
    _print(report)
    return 0


def main(argv: list[str]) -> int:
    commands = {"synth", "rm-train", "rm-pretrain", "contrast-tune"}
    if not argv or argv[0] not in commands:
        raise UserError(f"data_synth.cli.main expects argv[0] to be one of {sorted(commands)}")
    if argv[0] == "contrast-tune":
        return _contrast_tune(_contrast_tune_parser().parse_args(argv[1:]), argv)
    if argv[0] == "rm-train":
        return _rm_train(_rm_train_parser().parse_args(argv[1:]))
    if argv[0] == "rm-pretrain":
        return _rm_pretrain(_rm_pretrain_parser().parse_args(argv[1:]), argv)
    args = _synth_parser().parse_args(argv[1:])
    return {"prompts": _prompts, "generate-prompts": _generate, "sample": _sample, "judge": _judge,
            "judge-check": _judge_check, "aggregate": _aggregate, "watch": _watch, "run": _run}[args.cmd](args)


def _prompts(args) -> int:
    from collections import Counter

    from .prompts import load_prompts

    prompts = load_prompts(args.prompts)
    _print({"prompts": len(prompts), "types": dict(Counter(p["type"] for p in prompts))})
    return 0


def _generate(args) -> int:
    from salmon.atomic import atomic_write_jsonl

    from .prompts import generate_prompts, load_prompts

    cfg = _nested(C.GeneratePromptsConfig, args.config, {"seeds": args.seeds, "target": args.target,
                                                          "model": args.model})
    seeds = load_prompts(cfg.seeds or _shipped_seeds())
    out = Path(args.out)
    existing = load_prompts(out) if out.is_file() else []
    new, counters = generate_prompts(cfg, seeds, [p["prompt"] for p in existing if isinstance(p["prompt"], str)])
    known = {p["id"] for p in existing}
    merged = existing + [p for p in new if p["id"] not in known]
    atomic_write_jsonl(out, merged)
    _print({"written": str(out), "new": len(merged) - len(existing), "total": len(merged), **counters})
    return 0


def _shipped_seeds() -> Path:
    from .prompts import shipped_seeds

    return shipped_seeds()


def _sample(args) -> int:
    from .prompts import load_prompts
    from .sample import run_sample

    cfg = _nested(C.SampleConfig, args.config, {"policy": args.policy})
    _print(run_sample(load_prompts(args.prompts, args.limit), args.out, cfg))
    return 0


def _judge_cfg(args) -> C.JudgeConfig:
    return _nested(C.JudgeConfig, args.config, {
        "source": getattr(args, "source", None), "backend": getattr(args, "backend", None),
        "model": getattr(args, "model", None), "principle_set": getattr(args, "principle_set", None),
        "prefix_reuse": False if getattr(args, "no_prefix_reuse", False) else None})


def _judge(args) -> int:
    from .judge import run_judge
    from .shards import iter_stage

    cfg = _judge_cfg(args)
    _print(run_judge(list(iter_stage(args.pairs)), args.out, cfg))
    return 0


def _judge_check(args) -> int:
    from .judge import compare_sources, store_check

    cfg = _judge_cfg(args)
    if args.limit:
        cfg = cfg.model_copy(update={"check_limit": args.limit})
    res = compare_sources(cfg)
    store_check(cfg, res)  # `source: auto` with the same judge and limit reuses this measurement
    _print(res)
    return 0


def _aggregate(args) -> int:
    from principles.schema import PrincipleSetError, load_principle_set

    from .aggregate import run_aggregate
    from .shards import iter_stage

    cfg = _nested(C.AggregateConfig, args.config, {})
    try:
        pset = load_principle_set(args.principle_set or "rm")
    except PrincipleSetError as e:
        raise UserError(str(e)) from None
    _print(run_aggregate(list(iter_stage(args.pairs)), list(iter_stage(args.judgments)), pset, args.out, cfg))
    return 0


def _rm_train(args) -> int:
    from .rm_train import train_reward_model

    cfg = _nested(C.TrainConfig, args.config, {"registry": args.registry, "base_model": args.base_model,
                                               "publish": False if args.no_publish else None})
    data = Path(args.data)
    train = data / "train.jsonl" if data.is_dir() else data
    evals = data / "eval.jsonl" if data.is_dir() else None
    # A rerun after a kill that came after the publish returns that version instead of a duplicate.
    result = train_reward_model(train, evals, cfg, reuse_published=True)
    _print({"version": result.version, "registry": str(cfg.registry), **result.metrics})
    return 0


def _watch(args) -> int:
    from .watch import watch

    overrides: dict[str, Any] = {"work_dir": args.work_dir}
    if args.rollouts:
        overrides["rollouts_dir"] = args.rollouts
    cfg = _nested(C.WatchConfig, args.config, overrides)
    if args.registry:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"registry": Path(args.registry)})})
    _print(watch(cfg, once=args.once))
    return 0


def _run(args) -> int:
    from .pipeline import run_pipeline

    cfg = _nested(C.SynthRunConfig, args.config, {"prompts": args.prompts, "num_prompts": args.num_prompts,
                                             "out": args.out})
    if args.registry:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"registry": Path(args.registry)})})
    _print(run_pipeline(cfg))
    return 0
