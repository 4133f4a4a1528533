"""`salmon isheep`: I-SHEEP, iterative self-enhancement (Liang et al., 2024) of a small chat model.

Per iteration ``i`` (1-based), with model ``M_{i-1}`` (``M_0`` is the base):

1. ``M_{i-1}`` writes new prompts from few-shot seeds (ROUGE-L below 0.7 against every prompt kept so
   far and the held-out prompts), answers them, the rule post-filters clean the answers, and
   ``M_{i-1}`` rates each answer 1-10 for quality and for instruction following (its own next-token
   distribution over the ratings, not the reward service's rubric mode: the method is *self*-assessment,
   and the rubric mode would grade with the service's model, a different one);
2. the answers that reach both thresholds are this iteration's data, and the BASE model is fine-tuned
   on them alone (``policy_trainer.sft.train_sft``, LoRA, merged): ``M_i``. The paper found training
   the base on the latest iteration's data better than on the data of all iterations;
3. ``M_i`` answers a fixed set of held-out prompts and the project's default scorer (``scorer: auto``)
   scores them under a principle set (default ``hhh``); iteration 0 measures the base the same way.

Everything an iteration makes is a file under ``output_dir/iter-NN/``, each written atomically once;
a rerun (after a crash or a SIGKILL) reads back what exists and continues at the first missing file,
and the SFT resumes from its checkpoints. ``output_dir/report.{json,png}`` is rewritten after every
iteration. ``run.json`` holds the settings' fingerprint: a rerun with other settings into the same
directory is refused (``iterations`` and ``output_dir`` may change, so a finished run can be extended).

    salmon isheep --config salmon_cli/configs/isheep_cpu.yaml --iterations 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from data_synth.answer_filters import AnswerFilterConfig
from data_synth.isheep import (
    AXES,
    AnswerSettings,
    AssessSettings,
    SelfInstructSettings,
    answer,
    prompt_text,
    rule_filter,
    run_once,
    select,
    self_assess,
    self_instruct,
)
from data_synth.prompts import load_prompts, shipped_prompts, shipped_seeds
from data_synth.shards import derive_seed, stable_hash
from policy_trainer.sft import SFTTrainSettings, train_sft
from salmon.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temps
from salmon.config import load_config
from salmon.errors import UserError

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
RUN_JSON = "run.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeldOutSettings(_Strict):
    """The fixed prompts every iteration's model answers, and how those answers are scored."""

    prompts: Path | None = Field(default=None, description="Prompt JSONL (default: the shipped prompt set).")
    count: int = Field(default=8, ge=2, description="The LAST N prompts of the file are the held-out set.")
    principles: str = Field(default="hhh", description="Principle set the answers are scored under: a shipped "
                            "set's name (hhh, self_align, ...) or a YAML path.")
    scorer: str = Field(default="auto", description="Scorer kind of rm_core's table; auto: the project's default.")
    scorer_model: str = Field(default="embedded", description="Model of the zero-shot scorers.")
    temperature: float = Field(default=0.7, gt=0)
    max_new_tokens: int = Field(default=96, ge=1)


class ISheepConfig(_Strict):
    model: str = Field(default="embedded", description="The base model: M_0, and what every iteration fine-tunes.")
    seeds: Path | None = Field(default=None, description="Seed prompt JSONL (default: the shipped seeds).")
    output_dir: Path = Path("runs/isheep")
    iterations: int = Field(default=2, ge=1)
    seed: int = 42
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (None: torch's default).")
    self_instruct: SelfInstructSettings = Field(default_factory=SelfInstructSettings)
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    filters: AnswerFilterConfig = Field(default_factory=AnswerFilterConfig)
    assess: AssessSettings = Field(default_factory=AssessSettings)
    sft: SFTTrainSettings = Field(default_factory=SFTTrainSettings)
    heldout: HeldOutSettings = Field(default_factory=HeldOutSettings)


def fingerprint(cfg: ISheepConfig) -> str:
    """What makes two runs' files interchangeable: every setting except how far to go and where."""
    return stable_hash(cfg.model_dump(mode="json", exclude={"iterations", "output_dir"}))


def claim_output(cfg: ISheepConfig) -> None:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    fp = fingerprint(cfg)
    run_file = out / RUN_JSON
    if run_file.is_file():
        had = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
        if had != fp:
            raise UserError(f"{out} holds an I-SHEEP run with other settings (fingerprint {had} != {fp}); "
                            "use another --output-dir or the settings of that run")
    else:
        atomic_write_json(run_file, {"fingerprint": fp, "config": cfg.model_dump(mode="json")})


def answer_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def mean_sd(xs: Sequence[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": round(statistics.fmean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def load_heldout(h: HeldOutSettings) -> list[dict]:
    path = h.prompts or shipped_prompts()
    rows = load_prompts(path)
    if len(rows) < h.count:
        raise UserError(f"heldout.count: {h.count} but {path} has only {len(rows)} prompts")
    return [{"id": r["id"], "prompt": r["prompt"]} for r in rows[-h.count:]]


class Run:
    """One invocation: the settings, the held-out set, and models loaded only when a stage needs one
    (a resumed run whose files all exist loads none)."""

    def __init__(self, cfg: ISheepConfig, train_fn: Callable[..., Path]):
        self.cfg, self.train_fn = cfg, train_fn
        self.seeds = [prompt_text(s["prompt"]) for s in load_prompts(cfg.seeds or shipped_seeds())]
        self.heldout = load_heldout(cfg.heldout)
        self.loaded: dict[str, tuple[Any, Any]] = {}
        self.scorer: Any = None
        self.pset: Any = None

    def model(self, source: str) -> tuple[Any, Any]:
        """(model, tokenizer) of ``source``; one policy in memory at a time (the scorer is held apart)."""
        if source not in self.loaded:
            import torch

            from salmon.modeling import load_causal_lm, load_tokenizer

            if self.cfg.num_threads:
                torch.set_num_threads(self.cfg.num_threads)
            self.loaded.clear()
            model = load_causal_lm(source)
            model.eval()
            self.loaded[source] = (model, load_tokenizer(source))
        return self.loaded[source]

    def score(self, items: list[tuple[Any, str]]) -> list[float]:
        from principles.schema import load_principle_set
        from rm_core.scorer_table import ScorerOptions, build_scorer, resolve_kind

        h = self.cfg.heldout
        if self.scorer is None:
            self.pset = load_principle_set(h.principles)
            self.scorer = build_scorer(resolve_kind(h.scorer, h.scorer_model, None),
                                       ScorerOptions(model=h.scorer_model), {})
        return self.scorer.score_items(self.pset.principles, items)

    def heldout_eval(self, source: str) -> dict[str, Any]:
        """``source`` answers the held-out prompts (the same seed every iteration); the scorer scores them."""
        h = self.cfg.heldout
        model, tok = self.model(source)
        rows = answer(model, tok, self.heldout, AnswerSettings(temperature=h.temperature,
                                                               max_new_tokens=h.max_new_tokens,
                                                               batch_size=self.cfg.answer.batch_size),
                      seed=derive_seed(self.cfg.seed, "heldout"))
        scores = self.score([(r["prompt"], r["response"]) for r in rows])
        lengths = answer_tokens(tok, [r["response"] for r in rows])
        for r, s, n in zip(rows, scores, lengths, strict=True):
            r.update(score=round(float(s), 4), tokens=n)
        return {"model": source, "scorer": self.scorer.version, "principle_set": self.pset.name, "rows": rows,
                "reward": mean_sd(scores), "length_tokens": mean_sd(lengths)}

    def iteration(self, i: int, generator: str, earlier_prompts: list[str]) -> tuple[dict[str, Any], Path]:
        """Iteration ``i``'s data from ``generator`` (M_{i-1}) and the base fine-tuned on it: (figures, M_i)."""
        cfg = self.cfg
        d = cfg.output_dir / f"iter-{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(d)
        t0 = time.monotonic()

        def gen_prompts() -> dict[str, Any]:
            model, tok = self.model(generator)
            avoid = [*earlier_prompts, *(prompt_text(r["prompt"]) for r in self.heldout)]
            rows, counts = self_instruct(model, tok, self.seeds, avoid, cfg.self_instruct,
                                         seed=derive_seed(cfg.seed, i, "self_instruct"))
            return {"generator": generator, "rows": rows, "counts": counts}

        prompts = run_once(d / "prompts.json", gen_prompts)
        if not prompts["rows"]:
            raise UserError(f"iteration {i}: self-instruct kept no prompts ({prompts['counts']}); raise "
                            "self_instruct.max_rounds or max_rouge_l, in a new output directory")

        def gen_answers() -> dict[str, Any]:
            model, tok = self.model(generator)
            raw = answer(model, tok, prompts["rows"], cfg.answer, seed=derive_seed(cfg.seed, i, "answer"))
            kept, counts = rule_filter(raw, cfg.filters)
            return {"generator": generator, "rows": kept, "counts": counts}

        answers = run_once(d / "answers.json", gen_answers)

        def assess() -> dict[str, Any]:
            model, tok = self.model(generator)
            return {"generator": generator, "rows": self_assess(model, tok, answers["rows"], cfg.assess)}

        assessed = run_once(d / "assessed.json", assess)
        kept, counts = select(assessed["rows"], cfg.assess)
        # The SFT rows are exactly the kept answers: the prompt as asked, the filtered answer as completion.
        selected = run_once(d / "selected.json", lambda: {
            "rows": [{"prompt": r["prompt"], "completion": r["response"]} for r in kept], "counts": counts})
        train_rows = selected["rows"]  # what the file says is kept is what trains
        if not train_rows:
            raise UserError(f"iteration {i}: no answer reached assess.min_quality {cfg.assess.min_quality} and "
                            f"assess.min_following {cfg.assess.min_following} ({counts}); lower them, in a new "
                            "output directory")
        model_i = self.train_fn(cfg.model, train_rows, d / "sft", cfg.sft)  # the BASE, on this iteration's rows
        heldout = run_once(d / "heldout.json", lambda: self.heldout_eval(str(model_i)))
        figures = {
            "iteration": i, "generator": generator, "model": str(model_i),
            "counts": {"self_instruct": prompts["counts"], "rule_filter": answers["counts"], "self_assess": counts},
            "self_assessed_all": {a: mean_sd([r[a] for r in assessed["rows"]]) for a in AXES},
            "self_assessed_kept": {a: mean_sd([r[a] for r in kept]) for a in AXES},
            "train_rows": len(train_rows),
            "train_completion_words": mean_sd([len(r["completion"].split()) for r in train_rows]),
            "heldout_reward": heldout["reward"], "heldout_length_tokens": heldout["length_tokens"],
            "wall_s_this_invocation": round(time.monotonic() - t0, 1),
        }
        return figures, model_i


def run_isheep(cfg: ISheepConfig, train_fn: Callable[..., Path] = train_sft) -> dict[str, Any]:
    """The whole run (or what is left of it); returns the report. ``train_fn`` has ``train_sft``'s signature."""
    from tqdm.auto import tqdm

    claim_output(cfg)
    run = Run(cfg, train_fn)
    t0 = time.monotonic()
    base = run_once(cfg.output_dir / "iter-00" / "heldout.json", lambda: run.heldout_eval(cfg.model))
    report: dict[str, Any] = {"scorer": base["scorer"], "principle_set": base["principle_set"],
                              "config": cfg.model_dump(mode="json"), "iterations": [
                                  {"iteration": 0, "model": cfg.model, "heldout_reward": base["reward"],
                                   "heldout_length_tokens": base["length_tokens"]}]}
    generator, earlier = cfg.model, []
    for i in tqdm(range(1, cfg.iterations + 1), desc="isheep iterations", unit="iter", dynamic_ncols=True):
        figures, model_i = run.iteration(i, generator, earlier)
        earlier += [prompt_text(r["prompt"]) for r in
                    json.loads((cfg.output_dir / f"iter-{i:02d}" / "prompts.json").read_text())["rows"]]
        report["iterations"].append(figures)
        write_report(cfg.output_dir, report)
        generator = str(model_i)  # iteration i+1 generates with M_i
    report["wall_s_this_invocation"] = round(time.monotonic() - t0, 1)
    write_report(cfg.output_dir, report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json and report.png: held-out reward mean ± sd, self-assessed means, kept/dropped, length."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_json(out / REPORT_JSON, report)
    its = report["iterations"]
    xs = [r["iteration"] for r in its]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    mean = [r["heldout_reward"]["mean"] for r in its]
    sd = [r["heldout_reward"]["sd"] for r in its]
    ax[0].errorbar(xs, mean, yerr=sd, marker="o", capsize=4)
    ax[0].set_title(f"held-out reward ({report.get('principle_set', '')}), mean ± sd")
    later = [r for r in its if r["iteration"] > 0]
    lx = [r["iteration"] for r in later]
    for axis in ("quality", "following"):
        ax[1].plot(lx, [r["self_assessed_all"][axis]["mean"] for r in later], marker="o", label=f"{axis}, all")
        ax[1].plot(lx, [r["self_assessed_kept"][axis]["mean"] for r in later], marker="x", ls="--",
                   label=f"{axis}, kept")
    ax[1].set_title("self-assessed rating (1-10)")
    ax[1].legend(fontsize=7)
    kept = [r["counts"]["self_assess"]["kept"] for r in later]
    rule = [sum(r["counts"]["rule_filter"]["dropped"].values()) for r in later]
    low = [sum(v for k, v in r["counts"]["self_assess"].items() if k != "kept") for r in later]
    ax[2].bar(lx, kept, label="kept")
    ax[2].bar(lx, rule, bottom=kept, label="dropped: rules")
    ax[2].bar(lx, low, bottom=[a + b for a, b in zip(kept, rule, strict=True)], label="dropped: self-assessment")
    ax[2].set_title("answers per iteration")
    ax[2].legend(fontsize=7)
    ax[3].plot(xs, [r["heldout_length_tokens"]["mean"] for r in its], marker="o")
    ax[3].set_title("held-out answer length (tokens)")
    for a in ax:
        a.set_xlabel("iteration")
        a.set_xticks(xs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out / REPORT_PNG, buf.getvalue())


# -- the command ---------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salmon isheep", description="I-SHEEP: the model makes, rates and trains on "
                                "its own data, iteration after iteration; resumable (rerun the same command).")
    p.add_argument("--config", type=Path, help="YAML config (fields: salmon_cli/isheep.py ISheepConfig); "
                   "the shipped CPU one: salmon_cli/configs/isheep_cpu.yaml")
    p.add_argument("--iterations", type=int, help="overrides iterations")
    p.add_argument("--output-dir", type=Path, help="overrides output_dir")
    p.add_argument("--model", help="overrides model (embedded or a local path)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "isheep":
        argv = argv[1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    cfg = load_config(ISheepConfig, args.config, {"iterations": args.iterations, "output_dir": args.output_dir,
                                                  "model": args.model})
    report = run_isheep(cfg)
    for r in report["iterations"]:
        h = r["heldout_reward"]
        extra = ""
        if r["iteration"]:
            sa = r["self_assessed_all"]
            c = r["counts"]
            extra = (f"; {c['self_instruct']['kept']} new prompts, {c['rule_filter']['kept']} answers past the "
                     f"rules, {c['self_assess']['kept']} kept; self-assessed quality {sa['quality']['mean']}, "
                     f"following {sa['following']['mean']}")
        print(f"iteration {r['iteration']}: held-out reward {h['mean']:.3f} ± {h['sd']:.3f} (n={h['n']}), "
              f"length {r['heldout_length_tokens']['mean']:.1f} tokens{extra}")
    print(f"salmon isheep: report {cfg.output_dir / REPORT_JSON} and {cfg.output_dir / REPORT_PNG}")
    return 0
