"""DNO (``algorithm: dno``): Direct Nash Optimization, the practical batched on-policy variant.

One round t (policy_trainer.iterative runs ``dno.iterations`` of them), from the current iterate π_t:

1. sample K = ``num_samples`` responses per prompt from π_t (plus the teacher's response of
   ``teacher_file`` for that prompt, when there is one);
2. score them all through the run's reward callables (the service, under the run's principle set;
   the same request path, rollout export and timing as GRPO);
3. large-margin pairs (policy_trainer.dno_pairs): chosen = the top, rejected = the lowest at least
   ``margin`` below it; teacher and student may each win; plus ``replay_share`` of pairs from
   earlier rounds;
4. DPO on those pairs with TRL's DPOTrainer, a fresh LoRA adapter on π_t, and the REFERENCE = π_t
   itself (the adapter off: TRL's PEFT reference); the adapter is then merged, which makes π_{t+1}
   the base, so next round's reference is this round's result.

Each round records a probe (the mean log-prob of a fixed response) under the reference it trained
against and under the iterate it produced, so the report shows the reference advancing. With
``keep_best`` the iterate with the best held-out service score is saved to ``output_dir/best``.
"""

from __future__ import annotations

import logging
import random
import shutil
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from policy_trainer.dno_pairs import Candidate, Pair, build_pairs, mix_replay
from policy_trainer.iterative import IterativeTrainer, mean_std, round_rows
from policy_trainer.iterative_config import DNOSettings
from salmon.atomic import JsonlError, atomic_write_jsonl, read_jsonl
from salmon.errors import UserError

log = logging.getLogger(__name__)

PROBE_RESPONSE = "I am not sure, but here is a short answer."


def load_teacher(path: str) -> dict[str, str]:
    """``{prompt_id: response}`` from a JSONL of {prompt_id, response}."""
    try:
        records = read_jsonl(Path(path))
    except JsonlError as e:
        raise UserError(f"dno.teacher_file: {e}") from None
    out: dict[str, str] = {}
    for n, rec in enumerate(records, 1):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt_id"), str)
                and isinstance(rec.get("response"), str) and rec["response"].strip()):
            raise UserError(f"dno.teacher_file: {path}:{n}: expected {{\"prompt_id\": str, \"response\": "
                            "non-empty str}")
        out[rec["prompt_id"]] = rec["response"]
    return out


def dpo_config(cfg: Any, settings: Any, out: Path, r: int, device: Any, precision: str, **extra: Any) -> Any:
    """TRL's DPOConfig of round ``r`` of an iterated method: ``training:`` for the optimiser, the method's
    section (``beta``, ``epochs``) for DPO, no checkpoints of its own (the method saves its iterates)."""
    from trl import DPOConfig

    t = cfg.training
    return DPOConfig(
        output_dir=str(out / "dpo" / f"round-{r}"), beta=settings.beta, num_train_epochs=settings.epochs,
        learning_rate=t.learning_rate, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, seed=t.seed + r, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=device.type == "cpu", bf16=precision == "bf16", fp16=precision == "fp16",
        remove_unused_columns=False, dataloader_num_workers=0, **extra)


class DNOTrainer(IterativeTrainer):
    section = "dno"

    def __init__(self, cfg: Any, **kw: Any):
        self.s: DNOSettings = cfg.dno
        self.teacher = load_teacher(cfg.dno.teacher_file) if cfg.dno.teacher_file else {}
        super().__init__(cfg, cfg.dno, **kw)
        self.pool: list[Pair] = []  # every earlier round's pairs, for replay
        self.rng = random.Random(cfg.training.seed)
        self.best: tuple[int, float] | None = None

    def setup_model(self) -> None:
        if not self.cfg.policy.lora.enabled:
            raise UserError("policy.lora.enabled: dno trains a LoRA adapter per round against the previous "
                            "iterate (the adapter off); set it to true")
        self.model = self.load_base()
        self.model.eval()
        probe_row = self.train_rows[0]
        self.probe = (self.encode(probe_row["prompt"]),
                      self.tokenizer(PROBE_RESPONSE, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def probe_logp(self, model: Any) -> float:
        """Mean log-prob per token of the probe response: a fingerprint of a model's distribution."""
        p, r = self.probe
        ids = torch.tensor([p + r], device=self.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[0, len(p) - 1:]
        return float(logp.mean())

    def candidates(self, r: int, rows: list[dict]) -> list[tuple[str, Any, list[Candidate]]]:
        k = self.s.num_samples
        samples = self.generate(self.model, [row["prompt"] for row in rows], sample=True, n=k,
                                desc=f"dno round {r}: sample {k} per prompt")
        flat_rows, texts, ids, sources = [], [], [], []
        for row, group in zip(rows, samples, strict=True):
            for text, tid in group:
                flat_rows.append(row)
                texts.append(text)
                ids.append(tid)
                sources.append("policy")
            teach = self.teacher.get(row["prompt_id"])
            if teach is not None:
                flat_rows.append(row)
                texts.append(teach)
                ids.append(self.tokenizer(teach, add_special_tokens=False)["input_ids"] + self.eos_token_ids[:1])
                sources.append("teacher")
        self.state.global_step = r - 1  # the rollouts and reward wait of round r belong to step r - 1
        scores = self.score(flat_rows, texts, ids)
        groups: dict[str, tuple[Any, list[Candidate]]] = {}
        for row, text, score, src in zip(flat_rows, texts, scores, sources, strict=True):
            groups.setdefault(row["prompt_id"], (row["prompt"], []))[1].append(Candidate(text, score, src))
        return [(pid, prompt, cands) for pid, (prompt, cands) in groups.items()]

    def dpo(self, r: int, pairs: list[Pair]) -> tuple[Any, dict[str, Any]]:
        """TRL's DPOTrainer on ``pairs``: a fresh LoRA on the current iterate, whose adapter-off self is the reference."""
        from datasets import Dataset
        from trl import DPOTrainer

        from policy_trainer.methods.trl_args import peft_config

        ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                                 "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
        args = dpo_config(self.cfg, self.s, self.out, r, self.device, self.precision, disable_tqdm=False)
        trainer = DPOTrainer(model=self.model, ref_model=None, args=args, train_dataset=ds,
                             processing_class=self.tokenizer, peft_config=peft_config(self.cfg))
        if trainer.ref_model is not None:  # the reference must be the adapter-off current iterate, not a copy
            raise RuntimeError("DPOTrainer built a separate reference model; expected the PEFT adapter-off one")
        with trainer.model.disable_adapter():
            ref_probe = self.probe_logp(trainer.model)
        trainer.train()
        hist = [h for h in trainer.state.log_history if "loss" in h]
        merged = trainer.model.merge_and_unload()
        merged.eval()
        figures = {"loss": statistics.fmean(h["loss"] for h in hist) if hist else None,
                   "dpo_steps": trainer.state.global_step, "ref_probe_logp": ref_probe,
                   "rewards_accuracy": hist[-1].get("rewards/accuracies") if hist else None}
        return merged, figures

    def run_round(self, r: int) -> dict[str, Any]:
        rows = round_rows(self.train_rows, self.s.prompts_per_iteration, r, self.cfg.training.seed)
        groups = self.candidates(r, rows)
        new = build_pairs(groups, self.s.margin, r)
        batch = mix_replay(new, self.pool, self.s.replay_share, self.rng)
        sample_scores = [c.score for _, _, cands in groups for c in cands if c.source == "policy"]
        sm, ss = mean_std(sample_scores)
        figures: dict[str, Any] = {
            "sample_score_mean": sm, "sample_score_std": ss, "pairs_new": len(new),
            "pairs_replay": len(batch) - len(new), "pairs_trained": len(batch),
            "pair_margin_mean": mean_std([p.margin for p in new])[0],
            "pair_sources": dict(Counter(f"{p.chosen_source}>{p.rejected_source}" for p in new)),
        }
        atomic_write_jsonl(self.out / "pairs" / f"round-{r}.jsonl", [p.as_dict() for p in batch])
        if batch:
            self.model, trained = self.dpo(r, batch)
            figures.update(trained)
        else:
            # No sample cleared the margin: nothing to learn from, π_{t+1} = π_t.
            log.warning("dno round %d: no pair cleared margin %.3f; the iterate is unchanged", r, self.s.margin)
            figures.update(loss=None, dpo_steps=0, ref_probe_logp=self.probe_logp(self.model))
        figures["policy_probe_logp"] = self.probe_logp(self.model)
        self.pool.extend(new)
        return figures

    def after_round(self, r: int, row: dict[str, Any]) -> None:
        if r == 1:
            self.best = (0, self.rounds[0]["heldout_score_mean"])
        score = row["heldout_score_mean"]
        if self.best is not None and score > self.best[1]:
            self.best = (r, score)
            if self.s.keep_best:
                self.save_iterate(self.out / "best")

    def save_iterate(self, target: Path) -> None:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # whole: a reader never sees half an iterate

    def figure_keys(self) -> list[tuple[str, str | None, str]]:
        return [("sample_score_mean", "sample_score_std", "service score of the round's K samples"),
                ("pairs_trained", None, "DPO pairs per round (new + replay)"),
                ("policy_probe_logp", None, "probe log-prob of the iterate (reference = previous point)")]

    def report(self) -> dict[str, Any]:
        rep = super().report()
        if self.best is not None:
            rep["summary"].update(best_iteration=self.best[0], best_heldout_score=self.best[1],
                                  best_dir=str(self.out / "best") if self.s.keep_best and self.best[0] else None)
        return rep
