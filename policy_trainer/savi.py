"""VideoSAVi (``algorithm: savi``), the text-only variant: self-critique pairs from passages, then DPO, iterated.

One round r from the current iterate π_r (policy_trainer.iterative runs ``savi.iterations`` of them):

1. ``questions``: the policy writes ``questions_per_passage`` questions (what / why / how) about each of
   the round's passages (``data.prompts``: {id, prompt: the passage}); an unusable one is replaced by the
   kind's fallback and counted;
2. ``initial``: it answers each question from the passage;
3. ``critique``: it critiques its answer (inconsistencies, unsupported claims, omissions);
4. ``refined``: it rewrites the answer from the critique;
5. ``pairs``: the grounding filter (``grounding_min``: the answer's similarity to the passage) and the
   reward service, through the one client, scoring initial and refined answer under the run's set
   (``faithful``); a pair (refined ≻ initial) is kept only when the service prefers the refined one;
   the rest are dropped and counted by reason;
6. DPO on the kept pairs with DNO's machinery (policy_trainer.dno: TRL's DPOTrainer, a fresh LoRA on
   π_r, reference = π_r with the adapter off, merged into π_{r+1}).

Resumable: each stage writes ``output_dir/savi/round-r/<stage>.jsonl`` when done and a rerun reads it
back instead of generating again; after each round the iterate and the table so far are saved
(``savi/iterate``, ``savi/state.json``), so a rerun of a stopped run (``output.resume: auto``)
continues with the next round. Held-out evaluation (round 0 = before any DPO): the policy answers the
held-out passages' own questions (their record's ``questions``) greedily, scored under the same set.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from policy_trainer.data import default_prompts_path
from policy_trainer.dno import DNOTrainer
from policy_trainer.dno_pairs import Pair, mix_replay
from policy_trainer.iterative import IterativeTrainer, mean_std, round_rows
from policy_trainer.savi_config import SAVISettings
from policy_trainer.savi_text import (
    FALLBACK_QUESTIONS,
    KINDS,
    answer_prompt,
    critique_prompt,
    grounding,
    judge_pair,
    parse_question,
    question_prompt,
    refine_prompt,
)
from salmon.atomic import JsonlError, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl
from salmon.errors import UserError
from salmon_client.client import Group

log = logging.getLogger(__name__)

STAGES = ("questions", "initial", "critique", "refined", "pairs")
FUNNEL_PNG = "savi_funnel.png"
# The report's panels beside the held-out score, for both variants.
PANELS = (("initial_score_mean", "initial_score_std", "service score: initial answers (mean ± std)"),
          ("refined_score_mean", "refined_score_std", "service score: refined answers (mean ± std)"),
          ("pairs_kept", None, "pairs kept (refined ≻ initial)"))


def passage_of(row: dict[str, Any]) -> str:
    return row["prompt"][-1]["content"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class SAVIStages:
    """The stages of a round, shared by the text variant (SAVITrainer) and the video one
    (policy_trainer.savi_video). An item is {passage_id, passage (None for frames)[, video]}; each stage
    adds fields to the records. A subclass gives ``s`` (SAVISettings), ``source`` ("passage" | "video"),
    ``aspects`` (question aspects cycled beside the kinds), ``work`` (the stage files' folder),
    ``_gen`` (one generation per record) and ``score_pairs`` (the service's scores of (initial, refined))."""

    s: SAVISettings
    source = "passage"
    aspects: tuple[str | None, ...] = (None,)
    work: Path

    def _gen(self, prompts: list[str], recs: list[dict], desc: str, max_new_tokens: int | None = None) -> list[str]:
        raise NotImplementedError

    def score_pairs(self, recs: list[dict]) -> list[tuple[float, float]]:
        raise NotImplementedError

    def stage_questions(self, r: int, items: list[dict]) -> list[dict]:
        n = self.s.questions_per_passage
        jobs = [{**it, "kind": KINDS[j % len(KINDS)], "aspect": self.aspects[j % len(self.aspects)]}
                for it in items for j in range(n)]
        texts = self._gen([question_prompt(x["passage"], x["kind"], self.source, x["aspect"]) for x in jobs], jobs,
                          f"savi round {r}: questions")
        out = []
        for x, text in zip(jobs, texts, strict=True):
            q, generated = parse_question(text, x["kind"], self.source)
            out.append({**x, "question": q, "question_generated": generated})
        return out

    def stage_initial(self, r: int, recs: list[dict]) -> list[dict]:
        texts = self._gen([answer_prompt(x["passage"], x["question"], self.source) for x in recs], recs,
                          f"savi round {r}: answers")
        return [{**x, "initial": t} for x, t in zip(recs, texts, strict=True)]

    def stage_critique(self, r: int, recs: list[dict]) -> list[dict]:
        texts = self._gen([critique_prompt(x["passage"], x["question"], x["initial"], self.source) for x in recs],
                          recs, f"savi round {r}: critiques", self.s.critique_max_new_tokens)
        return [{**x, "critique": t} for x, t in zip(recs, texts, strict=True)]

    def stage_refined(self, r: int, recs: list[dict]) -> list[dict]:
        texts = self._gen([refine_prompt(x["passage"], x["question"], x["initial"], x["critique"], self.source)
                           for x in recs], recs, f"savi round {r}: refined answers")
        return [{**x, "refined": t} for x, t in zip(recs, texts, strict=True)]

    def stage_pairs(self, r: int, recs: list[dict]) -> list[dict]:
        out = []
        for x, (si, sr) in zip(recs, self.score_pairs(recs), strict=True):
            # Lexical grounding needs the source as text; frames have none (None: the filter passes them).
            gi = grounding(x["initial"], x["passage"]) if x["passage"] is not None else None
            gr = grounding(x["refined"], x["passage"]) if x["passage"] is not None else None
            v = judge_pair(x["initial"], x["refined"], si, sr, self.s.margin, gr,
                           self.s.grounding_min if gr is not None else None)
            out.append({**x, "initial_score": si, "refined_score": sr, "initial_grounding": gi,
                        "refined_grounding": gr, "kept": v.kept, "reason": v.reason})
        return out

    def run_stages(self, r: int, items: list[dict]) -> list[dict]:
        """Each stage's output is a file; a stage whose file exists is read back, not run again."""
        data: Any = items
        for name in STAGES:
            path = self.work / f"round-{r}" / f"{name}.jsonl"
            if path.is_file():
                data = read_jsonl(path)
                log.info("savi round %d: stage %s read back from %s", r, name, path)
                continue
            data = getattr(self, f"stage_{name}")(r, data)
            atomic_write_jsonl(path, data)
        return data

    def round_figures(self, n_items: int, recs: list[dict]) -> dict[str, Any]:
        """The round's counts per stage, drops by reason, and the service's scores of initial vs refined."""
        kept = sum(x["kept"] for x in recs)
        reasons = Counter(x["reason"] for x in recs)
        im, isd = mean_std([x["initial_score"] for x in recs])
        rm, rsd = mean_std([x["refined_score"] for x in recs])
        floor = self.s.grounding_min
        grounded = sum(floor is None or x["refined_grounding"] is None or x["refined_grounding"] >= floor
                       for x in recs)
        return {
            "stage_counts": {"passages": n_items, "questions": len(recs),
                             "questions_generated": sum(x["question_generated"] for x in recs),
                             "initial": len(recs), "critique": len(recs), "refined": len(recs),
                             "grounded": grounded, "pairs_kept": kept},
            "dropped": {k: reasons.get(k, 0) for k in ("identical", "ungrounded", "not_preferred")},
            "pairs_kept": kept,
            "initial_score_mean": im, "initial_score_std": isd, "refined_score_mean": rm, "refined_score_std": rsd,
            "refined_minus_initial_mean": mean_std([x["refined_score"] - x["initial_score"] for x in recs])[0],
            "initial_grounding_mean": mean_std([x["initial_grounding"] for x in recs
                                                if x["initial_grounding"] is not None])[0],
            "refined_grounding_mean": mean_std([x["refined_grounding"] for x in recs
                                                if x["refined_grounding"] is not None])[0],
        }


class SAVIRounds:
    """The round loop of both variants, resumable by round: ``work/state.json`` names the last finished
    round (with the rounds' figures and the best iterate so far) and ``work/iterate`` holds that round's
    iterate, so a rerun loads it and continues with the next round. A variant gives ``evaluate(r)``,
    ``run_round(r)``, ``load_iterate(path)``, ``save_iterate(path)``, ``after_round(r, row)``,
    ``write_report()`` and ``_callbacks(event)`` (no stubs here: in SAVITrainer several come from DNO's
    and the iterative trainer's classes, later in the method resolution order)."""

    s: SAVISettings
    work: Path
    state: Any
    rounds: list[dict[str, Any]]
    best: tuple[int, float] | None

    def train(self, resume_from_checkpoint: str | None = None) -> Any:
        from tqdm.auto import tqdm

        state_path, iterate = self.work / "state.json", self.work / "iterate"
        start = 1
        if state_path.is_file():
            st = json.loads(state_path.read_text())
            self.rounds, start = st["rounds"], st["round"] + 1
            self.best = tuple(st["best"]) if st.get("best") else None  # type: ignore[assignment]
            if st["round"] > 0:
                self.load_iterate(iterate)  # type: ignore[attr-defined]
            self.state.global_step = st["round"]
            log.warning("savi: resuming after round %d from %s", st["round"], self.work)
        else:
            self.rounds = [{"iteration": 0, **self.evaluate(0)}]  # type: ignore[attr-defined]
            atomic_write_json(state_path, {"round": 0, "rounds": self.rounds, "best": None})
        self.write_report()  # type: ignore[attr-defined]
        for r in tqdm(range(start, self.s.iterations + 1), desc="savi", unit="round", initial=start - 1,
                      total=self.s.iterations):
            self._callbacks("on_step_begin")  # type: ignore[attr-defined]
            figures = self.run_round(r)  # type: ignore[attr-defined]
            self.state.global_step = r
            row = {"iteration": r, **figures, **self.evaluate(r)}  # type: ignore[attr-defined]
            self.rounds.append(row)
            self.state.log_history.append({"step": r, "loss": figures.get("loss"),
                                           **{k: v for k, v in row.items() if isinstance(v, int | float)}})
            self._callbacks("on_step_end")  # type: ignore[attr-defined]
            self.after_round(r, row)  # type: ignore[attr-defined]
            if r < self.s.iterations:  # the last iterate is the run's result; only a middle one is resumed from
                self.save_iterate(iterate)  # type: ignore[attr-defined]
            atomic_write_json(state_path, {"round": r, "rounds": self.rounds, "best": self.best})
            self.write_report()  # type: ignore[attr-defined]
            log.info("savi round %d: %d pairs kept, held-out score %.4f", r, row["pairs_kept"],
                     row["heldout_score_mean"])
        return self.state


class SAVITrainer(SAVIStages, SAVIRounds, DNOTrainer):
    section = "savi"

    def __init__(self, cfg: Any, **kw: Any):
        # DNO's own __init__ reads cfg.dno; SAVi keeps DNO's DPO step and iterate bookkeeping but its own section.
        self.s: SAVISettings = cfg.savi
        self.teacher: dict[str, str] = {}
        IterativeTrainer.__init__(self, cfg, cfg.savi, **kw)
        self.pool: list[Pair] = []
        self.rng = random.Random(cfg.training.seed)
        self.best: tuple[int, float] | None = None
        self.work = self.out / "savi"
        if cfg.output.resume != "auto":
            shutil.rmtree(self.work, ignore_errors=True)
        self.heldout_questions = self._heldout_questions()

    def _heldout_questions(self) -> dict[str, list[str]]:
        path = Path(self.cfg.data.prompts) if self.cfg.data.prompts else default_prompts_path()
        try:
            records = {str(r.get("id")): r for r in read_jsonl(path) if isinstance(r, dict)}
        except JsonlError as e:
            raise UserError(f"data.prompts: {e}") from None
        out = {}
        for row in self.heldout_rows:
            qs = records.get(row["prompt_id"], {}).get("questions")
            if qs is None:  # a passage without its own questions is asked the three kinds' fallbacks
                qs = [FALLBACK_QUESTIONS[k].format(source="passage") for k in KINDS]
            if not (isinstance(qs, list) and qs and all(isinstance(q, str) and q.strip() for q in qs)):
                raise UserError(f"data.prompts: {path}: passage {row['prompt_id']!r}: 'questions' must be a "
                                "non-empty list of non-empty strings")
            out[row["prompt_id"]] = qs
        return out

    def _gen(self, prompts: list[str], recs: list[dict], desc: str, max_new_tokens: int | None = None) -> list[str]:
        res = self.generate(self.model, [user(p) for p in prompts], sample=True, max_new_tokens=max_new_tokens,
                            desc=desc)
        return [g[0][0].strip() for g in res]

    def score_pairs(self, recs: list[dict]) -> list[tuple[float, float]]:
        groups = [Group(prompt=user(answer_prompt(x["passage"], x["question"])), responses=[x["initial"], x["refined"]],
                        principle_set=self.pset.ref, key=self.pset.ref) for x in recs]
        scored = self.run_async(self.reward.client.score_groups(groups, headers={"X-Salmon-Run": self.cfg.run_id}))
        return [(a, b) for a, b in scored]

    def run_round(self, r: int) -> dict[str, Any]:
        rows = round_rows(self.train_rows, self.s.prompts_per_iteration, r, self.cfg.training.seed)
        recs = self.run_stages(r, [{"passage_id": row["prompt_id"], "passage": passage_of(row)} for row in rows])
        kept = [x for x in recs if x["kept"]]
        new = [Pair(prompt_id=x["passage_id"], prompt=user(answer_prompt(x["passage"], x["question"])),
                    chosen=x["refined"], rejected=x["initial"], chosen_score=x["refined_score"],
                    rejected_score=x["initial_score"], chosen_source="refined", rejected_source="initial",
                    iteration=r) for x in kept]
        batch = mix_replay(new, self.pool, self.s.replay_share, self.rng)
        figures: dict[str, Any] = {**self.round_figures(len(rows), recs), "pairs_trained": len(batch)}
        if batch:
            self.model, trained = self.dpo(r, batch)
            figures.update(trained)
        else:
            log.warning("savi round %d: the service preferred no refined answer; the iterate is unchanged", r)
            figures.update(loss=None, dpo_steps=0)
        self.pool.extend(new)
        return figures

    # -- held-out evaluation: before (round 0) and after each round of DPO ------------------------
    def evaluate(self, r: int) -> dict[str, Any]:
        items = [(row, q) for row in self.heldout_rows for q in self.heldout_questions[row["prompt_id"]]]
        prompts = [user(answer_prompt(passage_of(row), q)) for row, q in items]
        answers = self.generate(self.model, prompts, sample=False, max_new_tokens=self.s.eval_max_new_tokens,
                                desc=f"savi: held-out answers (round {r})")
        groups = [Group(prompt=p, responses=[a[0][0]], principle_set=self.pset.ref, key=self.pset.ref)
                  for p, a in zip(prompts, answers, strict=True)]
        scores = [s[0] for s in self.run_async(self.reward.client.score_groups(
            groups, headers={"X-Salmon-Run": self.cfg.run_id}))]
        m, s = mean_std(scores)
        return {"heldout_score_mean": m, "heldout_score_std": s, "heldout_scores": scores,
                "heldout_mean_length": statistics.fmean(len(a[0][1]) for a in answers),
                "heldout_grounding_mean": statistics.fmean(grounding(a[0][0], passage_of(row))
                                                           for (row, _), a in zip(items, answers, strict=True)),
                "heldout_answers": [{"passage_id": row["prompt_id"], "question": q, "answer": a[0][0]}
                                    for (row, q), a in zip(items, answers, strict=True)]}

    def load_iterate(self, path: Path) -> None:
        from salmon.modeling import ModelOptions, load_causal_lm

        p = self.cfg.policy
        self.model = load_causal_lm(path, ModelOptions(dtype=p.dtype, attention=p.attention, device=str(self.device)))
        self.model.eval()

    def figure_keys(self) -> list[tuple[str, str | None, str]]:
        return list(PANELS)

    def report(self) -> dict[str, Any]:
        rep = super().report()
        trained = [r for r in self.rounds if r["iteration"] > 0]
        rep["summary"].update(
            pairs_kept_total=sum(r["pairs_kept"] for r in trained),
            pairs_scored_total=sum(r["stage_counts"]["questions"] for r in trained),
            dropped_total=dict(sum((Counter(r["dropped"]) for r in trained), Counter())),
            heldout_grounding_initial=self.rounds[0]["heldout_grounding_mean"],
            heldout_grounding_final=self.rounds[-1]["heldout_grounding_mean"])
        return rep

    def write_report(self) -> tuple[Path, Path]:
        paths = super().write_report()
        atomic_write_bytes(self.out / FUNNEL_PNG, funnel_figure(self.rounds))
        return paths


def funnel_figure(rounds: list[dict[str, Any]]) -> bytes:
    """Per round: how many items reached each stage, and the held-out score before/after each round."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [r for r in rounds if "stage_counts" in r]
    if trained:
        keys = list(trained[0]["stage_counts"])
        width = 0.8 / len(trained)
        for i, r in enumerate(trained):
            a.bar([k + i * width for k in range(len(keys))], [r["stage_counts"][k] for k in keys], width,
                  label=f"round {r['iteration']}")
        a.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, rotation=30, fontsize=8)
        a.legend(fontsize=8)
    a.set_title("items per stage (pairs kept: the service preferred the refined answer)", fontsize=9)
    xs = [r["iteration"] for r in rounds]
    b.errorbar(xs, [r["heldout_score_mean"] for r in rounds], yerr=[r["heldout_score_std"] or 0 for r in rounds],
               marker="o", capsize=3)
    b.set_title("held-out passages: service score (0 = before DPO)", fontsize=9)
    b.set_xlabel("round")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
