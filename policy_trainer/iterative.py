"""What SAMI and DNO share: an outer loop of rounds (generate -> train -> evaluate) that the runner sees as a trainer.

Each round is one ``global_step`` for the runner (policy_trainer.train): its StepTimer times the
round, its reward wait comes from the same ServiceReward that GRPO uses, and ``state.log_history``
gets one entry per round. After round 0 (the initial policy, no training) and after every round the
policy answers the held-out prompts (the LAST ``heldout_prompts`` of ``data:``, never trained on)
and the reward service scores them under the run's principle set; a method adds its own figures
(SAMI: the mutual-information bound on held-out queries; DNO: pairs, margins, the reference probe).
The table goes to ``output_dir/iterations.json`` + ``iterations.png`` after every round, so a run
stopped part-way leaves what it measured.

Not in this version: resuming a stopped run (a rerun starts again from the initial policy), several
processes, vLLM generation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from policy_trainer.config import RunConfig
from policy_trainer.data import load_prompt_rows
from policy_trainer.iterative_config import IterativeSettings
from policy_trainer.reward_service import RewardService, TrainingAborted
from salmon.atomic import atomic_write_bytes, atomic_write_json
from salmon.errors import UserError
from salmon_client.client import Group, RewardServiceError

log = logging.getLogger(__name__)

REPORT_JSON = "iterations.json"
REPORT_PNG = "iterations.png"


def split_prompts(rows: list[dict[str, Any]], heldout: int, section: str) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the last ``heldout`` rows are held out; both must be non-empty."""
    if len(rows) <= heldout:
        raise UserError(f"{section}.heldout_prompts: {heldout} of {len(rows)} prompts leaves none to train on; "
                        f"give data.prompts more prompts or lower {section}.heldout_prompts")
    return rows[:-heldout], rows[-heldout:]


def round_rows(rows: list[dict], k: int, round_index: int, seed: int) -> list[dict]:
    """The ``k`` training prompts of round ``round_index`` (1-based): consecutive slices of seeded
    permutations, one permutation per pass, so every prompt is used before any repeats."""
    out, n = [], len(rows)
    for j in range((round_index - 1) * k, round_index * k):
        epoch, pos = divmod(j, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(rows[int(perm[pos])])
    return out


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


class IterativeTrainer:
    """The runner's view of an iterated method; subclasses implement ``setup_model`` and ``run_round``."""

    section = "iterative"  # the config section's name, for error messages

    def __init__(self, cfg: RunConfig, settings: IterativeSettings, *, model_dir: Path, reward: RewardService,
                 callbacks: list[Any] | None = None):
        from transformers import set_seed

        from salmon.modeling import load_tokenizer, pick_device_and_precision

        if cfg.generation.use_vllm:
            raise UserError(f"generation.use_vllm: {self.section} generates with HF generate; set it to false")
        if cfg.distributed.deepspeed:
            raise UserError(f"distributed.deepspeed: {self.section} runs in one process in this version")
        self.cfg, self.settings, self.model_dir, self.reward = cfg, settings, model_dir, reward
        self.callbacks = list(callbacks or [])
        self.out = Path(cfg.output.output_dir)
        self.args = SimpleNamespace(output_dir=str(self.out))
        self.state = SimpleNamespace(global_step=0, max_steps=settings.iterations, log_history=[],
                                     is_world_process_zero=True)
        use_cpu = cfg.distributed.use_cpu
        self.device, self.precision = pick_device_and_precision("cpu" if use_cpu else "auto", cfg.training.precision)
        self.accelerator = SimpleNamespace(process_index=0, is_main_process=True, num_processes=1, device=self.device)
        set_seed(cfg.training.seed)
        self.tokenizer = load_tokenizer(model_dir)
        self.processing_class = self.tokenizer
        self.train_rows, self.heldout_rows = split_prompts(load_prompt_rows(cfg.data), settings.heldout_prompts,
                                                           self.section)
        self.pset = reward.timeline.at_step(0)
        self.model: Any = None
        self.eos_token_ids: list[int] = []
        self.setup_model()
        # The reward client is async; one loop on a thread of its own serves every call of the run (as PPO).
        self.async_loop = asyncio.new_event_loop()
        threading.Thread(target=self.async_loop.run_forever, name=f"{self.section}-reward-loop", daemon=True).start()
        self.rounds: list[dict[str, Any]] = []

    # -- to implement --------------------------------------------------------------------------
    def setup_model(self) -> None:
        raise NotImplementedError

    def run_round(self, r: int) -> dict[str, Any]:
        """Generate, train; returns the round's figures (JSON-able)."""
        raise NotImplementedError

    def extra_eval(self, r: int) -> dict[str, Any]:
        return {}

    def eval_messages(self, row: dict) -> list[dict[str, str]]:
        """The messages a held-out prompt is answered from (SAMI puts the principles first)."""
        return row["prompt"]

    # -- shared pieces -------------------------------------------------------------------------
    def load_base(self) -> Any:
        from salmon.modeling import ModelOptions, load_causal_lm

        p = self.cfg.policy
        base = load_causal_lm(self.model_dir, ModelOptions(dtype=p.dtype, attention=p.attention,
                                                           device=str(self.device)))
        gen_eos = base.generation_config.eos_token_id if base.generation_config is not None else None
        eos = [self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        self.eos_token_ids = [int(e) for e in dict.fromkeys(eos) if e is not None]
        return base

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)

    @torch.no_grad()
    def generate(self, model: Any, prompts: list[list[dict[str, str]]], *, sample: bool, n: int = 1,
                 max_new_tokens: int | None = None, desc: str | None = None) -> list[list[tuple[str, list[int]]]]:
        """``n`` responses per prompt as (text, ids up to and including the first EOS), batched; ``desc``
        shows a progress bar."""
        from tqdm.auto import tqdm

        t = self.cfg.training
        tok = self.tokenizer
        out: list[list[tuple[str, list[int]]]] = []
        batch = max(1, t.per_device_train_batch_size // n) if n > 1 else t.per_device_train_batch_size
        was_training = model.training
        model.eval()
        for i in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", leave=False, disable=desc is None):
            chunk = prompts[i:i + batch]
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            kw: dict[str, Any] = dict(do_sample=sample, max_new_tokens=max_new_tokens or t.max_completion_length,
                                      eos_token_id=self.eos_token_ids, pad_token_id=tok.pad_token_id,
                                      num_return_sequences=n)
            if sample:
                kw.update(temperature=t.temperature, top_p=t.top_p, top_k=0)
            seqs = model.generate(input_ids=enc["input_ids"].to(self.device),
                                  attention_mask=enc["attention_mask"].to(self.device), **kw)
            resp = seqs[:, enc["input_ids"].shape[1]:].tolist()
            for k in range(len(chunk)):
                group = []
                for ids in resp[k * n:(k + 1) * n]:
                    cut = next((j + 1 for j, x in enumerate(ids) if x in self.eos_token_ids), len(ids))
                    ids = ids[:cut]
                    group.append((tok.decode(ids, skip_special_tokens=True), ids))
                out.append(group)
        if was_training:
            model.train()
        return out

    def run_async(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.async_loop).result()

    def score(self, rows: list[dict], texts: list[str], ids: list[list[int]]) -> list[float]:
        """Training scores through the run's reward callables (the same path, selection, shaping and
        rollout export as GRPO's); ``rows`` are the prompt rows, one per text."""
        kwargs = dict(prompts=[r["prompt"] for r in rows],
                      completions=[[{"role": "assistant", "content": x}] for x in texts], completion_ids=ids,
                      prompt_id=[r["prompt_id"] for r in rows], prompt_type=[r["prompt_type"] for r in rows])
        rm = self.run_async(self.reward.score(**kwargs, trainer_state=self.state))
        shaped = self.reward.shaping(**kwargs) if self.reward.shaping is not None else [0.0] * len(rm)
        return [a + b for a, b in zip(rm, shaped, strict=True)]

    def heldout_scores(self) -> tuple[list[float], list[int]]:
        """Greedy answers to the held-out prompts, scored by the service under the run's set (raw scores)."""
        answers = self.generate(self.model, [self.eval_messages(r) for r in self.heldout_rows], sample=False,
                                max_new_tokens=self.settings.eval_max_new_tokens,
                                desc=f"{self.section}: held-out answers")
        groups = [Group(prompt=r["prompt"], responses=[a[0][0]], principle_set=self.pset.ref, key=self.pset.ref)
                  for r, a in zip(self.heldout_rows, answers, strict=True)]
        scored = self.run_async(self.reward.client.score_groups(groups, headers={"X-Salmon-Run": self.cfg.run_id}))
        return [s[0] for s in scored], [len(a[0][1]) for a in answers]

    def evaluate(self, r: int) -> dict[str, Any]:
        scores, lengths = self.heldout_scores()
        m, s = mean_std(scores)
        return {"heldout_score_mean": m, "heldout_score_std": s, "heldout_scores": scores,
                "heldout_mean_length": statistics.fmean(lengths), **self.extra_eval(r)}

    # -- the loop ------------------------------------------------------------------------------
    def _callbacks(self, event: str) -> SimpleNamespace:
        control = SimpleNamespace(should_save=False)
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self.args, self.state, control)
        return control

    def train(self, resume_from_checkpoint: str | None = None) -> Any:
        from tqdm.auto import tqdm

        if resume_from_checkpoint:
            raise UserError(f"{self.section} does not resume in this version; use a fresh output.output_dir "
                            "or output.resume: never")
        try:
            self._rounds(tqdm)
        except RewardServiceError as e:
            # Raised here rather than left to the runner, whose message promises a resumable checkpoint.
            done = self.rounds[-1]["iteration"] if self.rounds else None
            kept = f"{self.out / REPORT_JSON} keeps rounds 0-{done}" if done is not None else "no round had finished"
            raise TrainingAborted(f"{e}; {kept}; {self.section} does not resume, so a rerun starts again from the "
                                  "initial policy", url=e.url, checkpoint=None,
                                  global_step=self.state.global_step) from e
        return self.state

    def _rounds(self, tqdm: Any) -> None:
        self.rounds = [{"iteration": 0, **self.evaluate(0)}]
        self.write_report()
        for r in tqdm(range(1, self.settings.iterations + 1), desc=self.section, unit="round"):
            self._callbacks("on_step_begin")
            figures = self.run_round(r)
            self.state.global_step = r
            row = {"iteration": r, **figures, **self.evaluate(r)}
            self.rounds.append(row)
            self.state.log_history.append({"step": r, "loss": figures.get("loss"),
                                           **{k: v for k, v in row.items() if isinstance(v, int | float)}})
            self._callbacks("on_step_end")
            self.after_round(r, row)
            self.write_report()
            log.info("%s round %d: held-out score %.4f", self.section, r, row["heldout_score_mean"])

    def after_round(self, r: int, row: dict[str, Any]) -> None:
        """Hook after a round's evaluation (DNO keeps the best iterate here)."""

    def _save_checkpoint(self, model: Any = None, trial: Any = None) -> None:
        """Rounds are not resumable yet: what a stopped run keeps is its iterations report (written
        after every round); ``train`` raises TrainingAborted itself, saying so."""
        self.write_report()

    def report(self) -> dict[str, Any]:
        first, last = self.rounds[0], self.rounds[-1]
        return {"run_id": self.cfg.run_id, "algorithm": self.cfg.algorithm, "principle_set": self.pset.ref,
                "reward_url": self.cfg.reward.url, "settings": self.settings.model_dump(mode="json"),
                "heldout_prompt_ids": [r["prompt_id"] for r in self.heldout_rows], "iterations": self.rounds,
                "summary": {"heldout_score_initial": first["heldout_score_mean"],
                            "heldout_score_final": last["heldout_score_mean"],
                            "heldout_score_change": (last["heldout_score_mean"] - first["heldout_score_mean"])}}

    def write_report(self) -> tuple[Path, Path]:
        jpath, ppath = self.out / REPORT_JSON, self.out / REPORT_PNG
        report = self.report()
        atomic_write_json(jpath, report)
        atomic_write_bytes(ppath, report_figure(report, self.figure_keys()))
        return jpath, ppath

    def figure_keys(self) -> list[tuple[str, str | None, str]]:
        """(mean key, std key or None, title) of the method's own panels."""
        return []


def report_figure(report: dict[str, Any], panels: list[tuple[str, str | None, str]]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["iterations"]
    allp = [("heldout_score_mean", "heldout_score_std",
             f"held-out service score under {report['principle_set']} (mean ± std)"), *panels]
    fig, axes = plt.subplots(1, len(allp), figsize=(5.5 * len(allp), 4), squeeze=False)
    for ax, (key, std, title) in zip(axes[0], allp, strict=True):
        pts = [(r["iteration"], r[key], r.get(std) if std else None) for r in rows if r.get(key) is not None]
        if pts:
            xs, ys, es = zip(*pts, strict=True)
            if std:
                ax.errorbar(xs, ys, yerr=[0.0 if e is None or math.isnan(e) else e for e in es], marker="o",
                            capsize=3)
            else:
                ax.plot(xs, ys, marker="o")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration (0: initial policy)")
    fig.suptitle(f"{report['run_id']} ({report['algorithm']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
