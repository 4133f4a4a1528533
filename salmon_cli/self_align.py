"""`salmon self-align --config x.yaml`: SELF-ALIGN (Dromedary) end to end, read top to bottom.

    prompts (TGRT) -> principle-driven answers (rules + exemplars in context, thoughts stripped)
      -> post-filters (counted) -> principle engraving (SFT of the base on the bare prompts)
      -> [verbose cloning: the engraved model answers under a "be thorough" system prompt, filtered,
          distilled by a second SFT] -> evaluation on held-out prompts -> report.json + report.png

Every stage writes under ``output_dir`` and is resumable: a rerun after a kill (even SIGKILL) skips
what is finished, and refuses a directory made with other settings. The held-out prompts (evenly
spaced over ``eval.prompts``) are written first and kept out of TGRT (nor a near-duplicate), so no
model is ever trained on them.

Evaluation: each condition answers the held-out prompts with the same sampling seed, the answers get
the same edits as training data (thoughts stripped, cut at the next turn, repeats removed; none is
dropped), and the project's default scorer (``eval.scorer: auto``: the registry's or shipped RM, else
the zero-shot contrastive scorer) scores them under ``eval.principle_set``. The conditions:

- ``base``: the base model, bare prompt;
- ``base_rules``: the base model with the rules and exemplars in context (what the data came from);
- ``engraved``: the engraved model, bare prompt (does it keep the behaviour without the long prompt?);
- ``verbose``: the verbose-cloned model, bare prompt (only with ``verbose.enabled``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from data_synth.answer_filters import AnswerFilterConfig, filter_answer
from data_synth.self_align import (
    AnswerConfig,
    PromptsConfig,
    filter_answers,
    prompt_texts,
    run_answers,
    run_prompts,
)
from data_synth.shards import stable_hash
from policy_trainer.sft import SFTTrainSettings, train_sft
from salmon.atomic import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from salmon.config import load_config
from salmon.errors import UserError

SHIPPED_CONFIG = Path(__file__).resolve().parent / "configs" / "self_align_cpu.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VerboseConfig(_Strict):
    enabled: bool = Field(default=False, description="Run the verbose-cloning pass after engraving.")
    max_new_tokens: int = Field(default=192, ge=1, description="Token cap of a verbose answer.")
    filters: AnswerFilterConfig | None = Field(default=None, description="Post-filters of the verbose answers "
                                               "(None: the run's filters).")
    sft: SFTTrainSettings = Field(default_factory=SFTTrainSettings, description="The distillation SFT (from "
                                  "the engraved model).")


class EvalConfig(_Strict):
    prompts: Path | None = Field(default=None, description="Prompt JSONL the held-out prompts are drawn from "
                                 "(default: data_synth/data/prompts.jsonl).")
    num_prompts: int = Field(default=12, ge=2, description="Held-out prompts, evenly spaced over the file.")
    scorer: str = Field(default="auto", description="A scorer kind of rm_core's table, or auto (the default "
                        "scorer: registry/shipped RM if any, else contrastive).")
    scorer_model: str = Field(default="embedded", description="Causal LM of the zero-shot scorers.")
    principle_set: str = Field(default="self_align", description="Set the answers are scored under "
                               "(e.g. self_align or hhh).")
    max_new_tokens: int = Field(default=128, ge=1)
    thoughts_tokens: int = Field(default=48, ge=0, description="Extra tokens for the base_rules condition, "
                                 "whose thoughts line comes before the answer (stripped before scoring).")
    seed: int = 7


class SelfAlignConfig(_Strict):
    """Everything about one SELF-ALIGN run (policy_trainer/configs and salmon_cli/configs have examples)."""

    model: str = Field(default="embedded", description="The base model: 'embedded', a .gguf or a local HF directory.")
    output_dir: Path = Field(default=Path("runs/self_align"), description="Every stage's files and the report.")
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (None: torch's default).")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    answers: AnswerConfig = Field(default_factory=AnswerConfig)
    filters: AnswerFilterConfig = Field(default_factory=AnswerFilterConfig)
    engrave: SFTTrainSettings = Field(default_factory=SFTTrainSettings)
    verbose: VerboseConfig = Field(default_factory=VerboseConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def load_self_align_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SelfAlignConfig:
    return load_config(SelfAlignConfig, path, overrides)


# -- held-out prompts --------------------------------------------------------------------------------------
def heldout_prompts(cfg: EvalConfig) -> list[dict]:
    """``num_prompts`` prompts evenly spaced over the file (every type of a sorted file gets its share)."""
    from data_synth.prompts import load_prompts

    rows = load_prompts(cfg.prompts)
    if len(rows) < cfg.num_prompts:
        raise UserError(f"eval.num_prompts: {cfg.num_prompts} but {cfg.prompts or 'the shipped prompts'} has "
                        f"{len(rows)}; lower it or give eval.prompts more")
    step = len(rows) / cfg.num_prompts
    return [rows[int(i * step)] for i in range(cfg.num_prompts)]


# -- scoring -----------------------------------------------------------------------------------------------
def mean_sd(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": round(statistics.fmean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def answer_text(raw: str, filters: AnswerFilterConfig) -> str:
    """An eval answer as training data would see it (the edits only: nothing is dropped from the evaluation)."""
    return filter_answer(raw, filters.model_copy(update={"blacklist": [], "min_words": 0, "max_words": None})).text


def score_conditions(cfg: SelfAlignConfig, answers: dict[str, list[dict]], out: Path) -> dict[str, Any]:
    """Scores of every condition's answers, cached in ``out/scores.json`` under a fingerprint of the
    answers and the scorer (a rerun with the same ones reads them back)."""
    from principles.schema import load_principle_set
    from rm_core.scorer_table import ScorerOptions, build_scorer, resolve_kind

    e = cfg.eval
    pset = load_principle_set(e.principle_set)
    kind = resolve_kind(e.scorer, e.scorer_model, None)
    texts = {c: [answer_text(r["raw"], cfg.filters) for r in rows] for c, rows in answers.items()}
    key = stable_hash({"texts": texts, "kind": kind, "model": e.scorer_model, "set": pset.ref})
    path = out / "scores.json"
    if path.is_file():
        import json

        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    from rm_core.prefix_cache import PrefixCache

    # One call over every (prompt, condition) with a prompt's answers side by side: the principle blocks and
    # the prompt are a prefix the cache computes once for all of that prompt's answers.
    scorer = build_scorer(kind, ScorerOptions(model=e.scorer_model), {"prefix_cache": PrefixCache()})
    names = list(answers)
    n = len(answers[names[0]])
    items = [(answers[c][i]["prompt"], texts[c][i]) for i in range(n) for c in names]
    flat = scorer.score_items(pset.principles, items)
    by_condition = {c: [round(float(flat[i * len(names) + j]), 4) for i in range(n)] for j, c in enumerate(names)}
    result = {"key": key, "scorer": scorer.version, "scorer_kind": kind, "principle_set": pset.ref,
              "texts": texts, "scores": by_condition}
    atomic_write_json(path, result)
    return result


# -- the run -----------------------------------------------------------------------------------------------
def run_self_align(cfg: SelfAlignConfig) -> dict[str, Any]:
    """The whole method; returns the report (also written to output_dir/report.json and report.png)."""
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # salmon never downloads
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    # 1. Held-out prompts first, then the training prompts (TGRT keeps none of them).
    heldout = heldout_prompts(cfg.eval)
    atomic_write_jsonl(out / "heldout.jsonl", heldout)
    train_prompts = run_prompts(cfg.prompts, cfg.model, out / "prompts", heldout)
    held_ids, held_texts = {r["id"] for r in heldout}, set(prompt_texts(heldout))
    if any(r["id"] in held_ids or t in held_texts for r, t in zip(train_prompts, prompt_texts(train_prompts),
                                                                  strict=True)):
        raise RuntimeError("a held-out prompt reached the training prompts")
    if not train_prompts:
        raise UserError("prompts: no training prompt survived (TGRT kept none, or the file holds only held-out "
                        "ones); raise prompts.tgrt.target or max_rounds, or give prompts.file")
    t = lap("prompts", t0)

    # 2. Principle-driven answers, 3. the post-filters.
    loaded: dict[str, Any] = {}
    raw = run_answers(cfg.model, train_prompts, out / "answers", cfg.answers, "rules", loaded)
    kept, counts = filter_answers(raw, cfg.filters, out / "filter")
    if not kept:
        raise UserError(f"filters: every one of {len(raw)} answers was dropped ({counts.dropped}); see "
                        f"{out / 'filter' / 'dropped.jsonl'} and loosen filters or answers.max_new_tokens")
    t = lap("answers_and_filters", t)

    # 4. Principle engraving: SFT on (bare prompt, kept answer), no rules, no exemplars.
    engraved = train_sft(cfg.model, [{"prompt": k["prompt"], "completion": k["completion"]} for k in kept],
                         out / "engrave", cfg.engrave)
    loaded.clear()  # the base stays needed below; a reload is seconds, and memory stays flat
    t = lap("engrave", t)

    # 5. Optional verbose cloning: the engraved model under a "be thorough" prompt, filtered, distilled.
    verbose_model, verbose_counts = None, None
    if cfg.verbose.enabled:
        vcfg = cfg.answers.model_copy(update={"max_new_tokens": cfg.verbose.max_new_tokens})
        vraw = run_answers(engraved, train_prompts, out / "verbose_answers", vcfg, "verbose", loaded)
        vkept, vc = filter_answers(vraw, cfg.verbose.filters or cfg.filters, out / "verbose_filter")
        if not vkept:
            raise UserError(f"verbose.filters: every verbose answer was dropped ({vc.dropped}); loosen them")
        verbose_model = train_sft(engraved, [{"prompt": k["prompt"], "completion": k["completion"]} for k in vkept],
                                  out / "verbose_engrave", cfg.verbose.sft)
        verbose_counts = vc.as_dict()
        loaded.clear()
        t = lap("verbose", t)

    # 6. Evaluation on the held-out prompts.
    ecfg = cfg.answers.model_copy(update={"max_new_tokens": cfg.eval.max_new_tokens, "seed": cfg.eval.seed})
    conditions: dict[str, tuple[str | Path, str]] = {"base": (cfg.model, "plain"), "base_rules": (cfg.model, "rules"),
                                                     "engraved": (engraved, "plain")}
    if verbose_model is not None:
        conditions["verbose"] = (verbose_model, "plain")
    rules_cfg = ecfg.model_copy(update={"max_new_tokens": cfg.eval.max_new_tokens + cfg.eval.thoughts_tokens})
    answers = {c: run_answers(src, heldout, out / "eval" / c, rules_cfg if mode == "rules" else ecfg, mode, loaded)
               for c, (src, mode) in conditions.items()}
    loaded.clear()
    scored = score_conditions(cfg, answers, out / "eval")
    t = lap("eval", t)

    report = build_report(cfg, heldout, train_prompts, raw, kept, counts.as_dict(), verbose_counts, scored,
                          engraved, verbose_model, times, time.monotonic() - t0)
    write_report(report, out)
    return report


def build_report(cfg: SelfAlignConfig, heldout: list[dict], train_prompts: list[dict], raw: list[dict],
                 kept: list[dict], counts: dict[str, Any], verbose_counts: dict[str, Any] | None,
                 scored: dict[str, Any], engraved: Path, verbose_model: Path | None, times: dict[str, float],
                 wall_s: float) -> dict[str, Any]:
    from salmon.modeling import load_tokenizer

    tok = load_tokenizer(cfg.model)

    def n_tokens(texts: list[str]) -> list[int]:
        return [len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts]

    import json

    psum_path = cfg.output_dir / "prompts" / "summary.json"
    prompts_summary = json.loads(psum_path.read_text()) if psum_path.is_file() else {}
    conditions = {}
    for c, scores in scored["scores"].items():
        texts = scored["texts"][c]
        # An answer the edits leave empty (all thoughts, or only a next turn) is scored as empty, and counted.
        conditions[c] = {"score": mean_sd(scores), "length_tokens": mean_sd([float(n) for n in n_tokens(texts)]),
                         "empty_answers": sum(1 for x in texts if not x), "scores": scores}
    examples = [{"prompt": h["prompt"], **{c: scored["texts"][c][i] for c in scored["texts"]}}
                for i, h in enumerate(heldout[:4])]
    return {
        "method": "self_align",
        "model": cfg.model,
        "scorer": scored["scorer"], "scorer_kind": scored["scorer_kind"], "principle_set": scored["principle_set"],
        "heldout_prompts": len(heldout),
        "prompts": {"train": len(train_prompts), **{k: v for k, v in prompts_summary.items() if k != "stage"}},
        "answers": {"generated": len(raw), "kept": len(kept),
                    "kept_length_tokens": mean_sd([float(n) for n in n_tokens([k["completion"] for k in kept])])},
        "filters": counts,
        "verbose_filters": verbose_counts,
        "engraved_model": str(engraved),
        "verbose_model": str(verbose_model) if verbose_model else None,
        "conditions": conditions,
        "examples": examples,
        "stage_time_s": times,
        "wall_time_s": round(wall_s, 1),
    }


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """report.json and report.png (each condition's score, mean ± sd over the held-out prompts, and lengths)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    jpath, ppath = out / "report.json", out / "report.png"
    atomic_write_json(jpath, report)
    names = list(report["conditions"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax1, "score", f"score ({report['scorer_kind']}, {report['principle_set']})"),
                           (ax2, "length_tokens", "answer length (tokens)")):
        means = [report["conditions"][c][key]["mean"] for c in names]
        sds = [report["conditions"][c][key]["sd"] for c in names]
        ax.bar(names, means, yerr=sds, capsize=6, color=["#999999", "#4c72b0", "#dd8452", "#55a868"][:len(names)])
        ax.set_title(label)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.suptitle(f"SELF-ALIGN on {report['model']}: {report['heldout_prompts']} held-out prompts (mean ± sd)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(ppath, buf.getvalue())
    return jpath, ppath


# -- the command -------------------------------------------------------------------------------------------
def format_summary(report: dict[str, Any]) -> str:
    lines = [f"salmon self-align: {report['answers']['kept']}/{report['answers']['generated']} answers kept, "
             f"{report['prompts']['train']} training prompts, {report['wall_time_s']:.0f} s; "
             f"held-out scores ({report['scorer']}, {report['principle_set']}):"]
    for c, row in report["conditions"].items():
        s, n = row["score"], row["length_tokens"]
        lines.append(f"  {c:<11} {s['mean']:+.3f} ± {s['sd']:.3f}   length {n['mean']:.0f} ± {n['sd']:.0f} tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "self-align":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="salmon self-align", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"run YAML (SelfAlignConfig; the small CPU one: {SHIPPED_CONFIG})")
    p.add_argument("--model", help="overrides model")
    p.add_argument("--output-dir", help="overrides output_dir")
    p.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    cfg = load_self_align_config(args.config, {"model": args.model, "output_dir": args.output_dir})
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    report = run_self_align(cfg)
    print(format_summary(report))
    print(f"report: {cfg.output_dir / 'report.json'}, {cfg.output_dir / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
