"""VideoSAVi on videos: the same stages as the text variant (policy_trainer.savi), over frames, with a local
vision-language model (any ``AutoModelForImageTextToText`` directory with its processor).

Each video gives ``num_frames`` frames at uniform segment midpoints (salmon.frames; an image or a folder
of images works as well). The model sees the frames as images before each stage's text: it writes
spatial and temporal questions (what / why / how), answers, critiques its answer and refines it; the
reward service scores (initial, refined) under the run's set through the one client, and pairs the service
does not prefer are dropped and counted. The stage files and counts are those of the text variant.

``dpo_rows`` gives the kept pairs in the form TRL's DPOTrainer takes for a VLM (an ``images`` column and
messages with image placeholders). ``VideoSAVITrainer`` is the method table's ``savi`` when the run
config names ``savi.videos``: rounds of these stages on the training videos, DPO on each round's kept
pairs (a fresh LoRA on the current iterate, whose adapter-off self is the reference, merged after the
round), and before the first round and after every round the iterate answers the held-out videos'
questions greedily and the service scores the answers. Not in this version: a grounding filter
against frames (it needs an image-text similarity model; the lexical one needs text).

    salmon train --config run.yaml      # algorithm: savi, savi: {videos: videos.jsonl}, policy.model: a VLM
    python -m policy_trainer.savi_video --model DIR --videos videos.jsonl --out runs/savi_video \\
        --url http://127.0.0.1:8000 --principle-set faithful --frames 8    # one round of stages, no training
"""

from __future__ import annotations

import argparse
import logging
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from policy_trainer.iterative import IterativeTrainer
from policy_trainer.savi import SAVIRounds, SAVIStages, user
from policy_trainer.savi_config import SAVISettings
from policy_trainer.savi_text import answer_prompt
from principles.schema import PrincipleSet, load_principle_set
from salmon.atomic import JsonlError, atomic_write_bytes, atomic_write_json, read_jsonl
from salmon.errors import UserError
from salmon_client.client import Group, SalmonClient

log = logging.getLogger(__name__)


def load_videos(path: str | Path) -> list[dict[str, Any]]:
    """Items {passage_id, passage: None, video} from a JSONL of {id, video} (a video file, image or image folder;
    relative paths are read from the JSONL's folder)."""
    path = Path(path)
    try:
        records = read_jsonl(path)
    except JsonlError as e:
        raise UserError(f"--videos: {e}") from None
    items = []
    for n, rec in enumerate(records, 1):
        if not (isinstance(rec, dict) and isinstance(rec.get("video"), str) and rec["video"].strip()):
            raise UserError(f"{path}:{n}: expected {{\"id\": str, \"video\": a path}}")
        video = Path(rec["video"])
        items.append({"passage_id": str(rec.get("id", f"line-{n}")), "passage": None,
                      "video": str(video if video.is_absolute() else path.parent / video)})
    if not items:
        raise UserError(f"{path}: no videos")
    return items


class VideoSAVi(SAVIStages):
    source = "video"
    aspects = ("spatial", "temporal")

    def __init__(self, model_dir: str | Path, settings: SAVISettings, client: SalmonClient,
                 principle_set: str | PrincipleSet,
                 work: Path, *, num_frames: int = 8, max_new_tokens: int = 64, temperature: float = 0.8,
                 device: str = "cpu", seed: int = 0):
        from salmon.modeling import ModelOptions, load_vision_lm

        if num_frames < 1:
            raise UserError(f"--frames {num_frames}: give at least 1")
        self.s, self.client, self.work = settings, client, Path(work)
        pset = load_principle_set(principle_set) if isinstance(principle_set, str) else principle_set
        self.pset = client.resolve_set(pset)  # registered, named by name@hash
        self.model, self.processor = load_vision_lm(model_dir, ModelOptions(device=device))
        self.num_frames, self.max_new_tokens, self.temperature, self.seed = num_frames, max_new_tokens, temperature, seed
        self._frames: dict[str, list[Any]] = {}

    def frames(self, rec: dict[str, Any]) -> list[Any]:
        from salmon.frames import load_frames

        if rec["video"] not in self._frames:  # every stage of a video shows the same frames: decode once
            self._frames[rec["video"]] = load_frames(rec["video"], self.num_frames)
        return self._frames[rec["video"]]

    def messages(self, text: str, n_images: int) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [*([{"type": "image"}] * n_images), {"type": "text", "text": text}]}]

    def _gen(self, prompts: list[str], recs: list[dict], desc: str, max_new_tokens: int | None = None) -> list[str]:
        return self.generate(prompts, recs, desc, max_new_tokens, sample=True)

    @torch.no_grad()
    def generate(self, prompts: list[str], recs: list[dict], desc: str, max_new_tokens: int | None = None, *,
                 sample: bool) -> list[str]:
        """One answer per (prompt, record), the record's frames shown first; sampled, or greedy (held-out)."""
        from tqdm.auto import tqdm

        out = []
        tok = self.processor.tokenizer
        for i, (prompt, rec) in enumerate(tqdm(list(zip(prompts, recs, strict=True)), desc=desc, leave=False)):
            frames = self.frames(rec)
            text = self.processor.apply_chat_template(self.messages(prompt, len(frames)), add_generation_prompt=True)
            enc = self.processor(text=[text], images=[frames], return_tensors="pt").to(self.model.device)
            # Seeded per stage and record: reproducible, and no two stages draw the same noise.
            torch.manual_seed(self.seed + zlib.crc32(desc.encode()) + i)
            kw: dict[str, Any] = dict(do_sample=True, temperature=self.temperature, top_k=0) if sample else \
                dict(do_sample=False)
            ids = self.model.generate(**enc, **kw, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                      pad_token_id=tok.pad_token_id)
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    def score_pairs(self, recs: list[dict]) -> list[tuple[float, float]]:
        # The service scores text: it sees the question (the prompt says a video was shown) and the two answers.
        groups = [Group(prompt=user(answer_prompt(None, x["question"], self.source)),
                        responses=[x["initial"], x["refined"]], principle_set=self.pset, key=self.pset) for x in recs]
        return [(a, b) for a, b in self.client.score_groups(groups)]

    def run(self, items: list[dict], r: int = 1) -> tuple[list[dict], dict[str, Any]]:
        recs = self.run_stages(r, items)
        return recs, self.round_figures(len(items), recs)

    def dpo_rows(self, recs: list[dict]) -> list[dict[str, Any]]:
        """The kept pairs as TRL's vision DPO rows: images, the answer prompt with image placeholders, refined ≻ initial."""
        rows = []
        for x in recs:
            if x["kept"]:
                frames = self.frames(x)
                rows.append({"images": frames,
                             "prompt": self.messages(answer_prompt(None, x["question"], self.source), len(frames)),
                             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": x["refined"]}]}],
                             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": x["initial"]}]}]})
        return rows


class VideoSAVITrainer(SAVIRounds):
    """VideoSAVi as the runner sees a trainer (policy_trainer.methods.base.Trainer): one round per step.

    A round draws ``prompts_per_iteration`` training videos, runs the stages (read back when their files
    exist), trains DPO on the kept pairs and evaluates; ``output_dir/savi/state.json`` and the iterate
    saved after each middle round make a rerun continue after the last finished round.
    """

    section = "savi"

    def __init__(self, cfg: Any, *, model_dir: Path, reward: Any, callbacks: list[Any] | None = None):
        from transformers import set_seed

        from policy_trainer.iterative import split_prompts
        from salmon.modeling import pick_device_and_precision

        self.cfg, self.s, self.model_dir = cfg, cfg.savi, Path(model_dir)
        self.callbacks = list(callbacks or [])
        self.out = Path(cfg.output.output_dir)
        self.work = self.out / "savi"
        if cfg.output.resume != "auto":
            import shutil

            shutil.rmtree(self.work, ignore_errors=True)
        self.args = SimpleNamespace(output_dir=str(self.out))
        self.state = SimpleNamespace(global_step=0, max_steps=self.s.iterations, log_history=[],
                                     is_world_process_zero=True)
        self.device, self.precision = pick_device_and_precision("cpu" if cfg.distributed.use_cpu else "auto",
                                                                cfg.training.precision)
        self.accelerator = SimpleNamespace(process_index=0, is_main_process=True, num_processes=1, device=self.device)
        set_seed(cfg.training.seed)
        videos = [{**v, "prompt_id": v["passage_id"]} for v in load_videos(self.s.videos)]
        self.train_videos, self.heldout_videos = split_prompts(videos, self.s.heldout_prompts, "savi")
        self.reward = reward
        self.pset = reward.timeline.at_step(0)
        # The stages call the service synchronously; the run's reward settings (URL, keys, retries) are the same.
        r = cfg.reward
        self.client = SalmonClient(r.url, api_key_env=r.api_key_env, admin_key_env=r.admin_key_env,
                                   connect_timeout_s=r.connect_timeout_s, read_timeout_s=r.read_timeout_s,
                                   max_items=r.max_items_per_request)
        t = cfg.training
        self.stages = VideoSAVi(model_dir, self.s, self.client, self.pset, self.work, num_frames=self.s.frames,
                                max_new_tokens=t.max_completion_length, temperature=t.temperature,
                                device=str(self.device), seed=t.seed)
        self.processing_class = self.stages.processor
        self.eos_token_ids = [self.stages.processor.tokenizer.eos_token_id]
        self.rounds: list[dict[str, Any]] = []
        self.best: tuple[int, float] | None = None

    @property
    def model(self) -> Any:
        return self.stages.model

    def heldout_questions(self) -> list[tuple[dict[str, Any], str]]:
        from policy_trainer.savi_text import FALLBACK_QUESTIONS, KINDS

        return [(v, FALLBACK_QUESTIONS[k].format(source="video")) for v in self.heldout_videos for k in KINDS]

    def evaluate(self, r: int) -> dict[str, Any]:
        from policy_trainer.iterative import mean_std

        items = self.heldout_questions()
        prompts = [answer_prompt(None, q, "video") for _, q in items]
        answers = self.stages.generate(prompts, [v for v, _ in items], f"savi: held-out answers (round {r})",
                                       self.s.eval_max_new_tokens, sample=False)
        groups = [Group(prompt=user(p), responses=[a], principle_set=self.pset.ref, key=self.pset.ref)
                  for p, a in zip(prompts, answers, strict=True)]
        scores = [g[0] for g in self.client.score_groups(groups, headers={"X-Salmon-Run": self.cfg.run_id})]
        m, sd = mean_std(scores)
        tok = self.stages.processor.tokenizer
        return {"heldout_score_mean": m, "heldout_score_std": sd, "heldout_scores": scores,
                "heldout_mean_length": sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
                / len(answers),
                "heldout_answers": [{"passage_id": v["passage_id"], "question": q, "answer": a}
                                    for (v, q), a in zip(items, answers, strict=True)]}

    def dpo(self, r: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's DPOTrainer on the round's vision rows; the merged result is the next iterate."""
        import statistics

        from datasets import Dataset
        from trl import DPOTrainer

        from policy_trainer.dno import dpo_config
        from policy_trainer.methods.trl_args import peft_config

        args = dpo_config(self.cfg, self.s, self.out, r, self.device, self.precision, max_length=None)
        trainer = DPOTrainer(model=self.stages.model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=self.stages.processor, peft_config=peft_config(self.cfg))
        if trainer.ref_model is not None:  # the reference must be the adapter-off current iterate, not a copy
            raise RuntimeError("DPOTrainer built a separate reference model; expected the PEFT adapter-off one")
        trainer.train()
        hist = [h for h in trainer.state.log_history if "loss" in h]
        merged = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
        self.stages.model = merged.eval()
        return {"loss": statistics.fmean(h["loss"] for h in hist) if hist else None,
                "dpo_steps": trainer.state.global_step,
                "rewards_accuracy": hist[-1].get("rewards/accuracies") if hist else None}

    def run_round(self, r: int) -> dict[str, Any]:
        from policy_trainer.iterative import round_rows

        items = round_rows(self.train_videos, self.s.prompts_per_iteration, r, self.cfg.training.seed)
        recs, figures = self.stages.run(items, r)
        rows = self.stages.dpo_rows(recs)
        figures["pairs_trained"] = len(rows)
        if rows:
            figures.update(self.dpo(r, rows))
        else:
            log.warning("savi round %d: the service preferred no refined answer; the iterate is unchanged", r)
            figures.update(loss=None, dpo_steps=0)
        return figures

    def load_iterate(self, path: Path) -> None:
        from salmon.modeling import ModelOptions, load_vision_lm

        self.stages.model, _ = load_vision_lm(path, ModelOptions(device=str(self.device)))

    def after_round(self, r: int, row: dict[str, Any]) -> None:
        """No best-iterate copy in the video variant: the last iterate is the result."""

    _callbacks = IterativeTrainer._callbacks  # the runner's callbacks, fired as for every iterated method

    def save_iterate(self, target: Path) -> None:
        import shutil

        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.stages.model.save_pretrained(tmp, safe_serialization=True)
        self.stages.processor.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # the state file names a round only after its iterate is complete

    def _save_checkpoint(self, model: Any = None, trial: Any = None) -> None:
        """What a stopped run keeps: the stage files, the state after the last finished round and its iterate."""
        self.write_report()

    def report(self) -> dict[str, Any]:
        first, last = self.rounds[0], self.rounds[-1]
        trained = [r for r in self.rounds if r["iteration"] > 0]
        return {"run_id": self.cfg.run_id, "algorithm": self.cfg.algorithm, "variant": "video",
                "principle_set": self.pset.ref, "reward_url": self.cfg.reward.url,
                "settings": self.s.model_dump(mode="json"),
                "heldout_prompt_ids": [v["passage_id"] for v in self.heldout_videos], "iterations": self.rounds,
                "summary": {"heldout_score_initial": first["heldout_score_mean"],
                            "heldout_score_final": last["heldout_score_mean"],
                            "heldout_score_change": last["heldout_score_mean"] - first["heldout_score_mean"],
                            "pairs_kept_total": sum(r["pairs_kept"] for r in trained),
                            "pairs_scored_total": sum(r["stage_counts"]["questions"] for r in trained)}}

    def write_report(self) -> tuple[Path, Path]:
        from policy_trainer.iterative import REPORT_JSON, REPORT_PNG, report_figure
        from policy_trainer.savi import FUNNEL_PNG, PANELS, funnel_figure

        report = self.report()
        jpath, ppath = self.out / REPORT_JSON, self.out / REPORT_PNG
        atomic_write_json(jpath, report)
        atomic_write_bytes(ppath, report_figure(report, list(PANELS)))
        atomic_write_bytes(self.out / FUNNEL_PNG, funnel_figure(self.rounds))
        return jpath, ppath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m policy_trainer.savi_video", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local vision-language model directory (with its processor)")
    p.add_argument("--videos", required=True, help="JSONL of {id, video}")
    p.add_argument("--out", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--principle-set", default="faithful")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help="questions per video (kinds and aspects cycle)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    settings = SAVISettings(questions_per_passage=a.questions)
    with SalmonClient(a.url) as client:
        savi = VideoSAVi(a.model, settings, client, a.principle_set, Path(a.out) / "savi", num_frames=a.frames,
                         max_new_tokens=a.max_new_tokens)
        _, figures = savi.run(load_videos(a.videos))
    atomic_write_json(Path(a.out) / "savi_video.json", figures)
    print(figures["stage_counts"], figures["dropped"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
