"""VideoSAVi on videos: the same stages as the text variant (policy_trainer.savi), over frames, with a local
vision-language model (any ``AutoModelForImageTextToText`` directory with its processor).

Each video gives ``num_frames`` frames at uniform segment midpoints (salmon.frames; an image or a folder
of images works as well). The model sees the frames as images before each stage's text: it writes
spatial and temporal questions (what / why / how), answers, critiques its answer and refines it; the
reward service scores (initial, refined) under the run's set through the one client, and pairs the service
does not prefer are dropped and counted. The stage files and counts are those of the text variant.

``dpo_rows`` gives the kept pairs in the form TRL's DPOTrainer takes for a VLM (an ``images`` column and
messages with image placeholders). Not in this version: training on them inside the method table (DNO's
DPO step takes text pairs only), and a grounding filter against frames (it needs an image-text
similarity model; the lexical one needs text).

    python -m policy_trainer.savi_video --model DIR --videos videos.jsonl --out runs/savi_video \\
        --url http://127.0.0.1:8000 --principle-set faithful --frames 8
"""

from __future__ import annotations

import argparse
import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from policy_trainer.savi import SAVIStages, user
from policy_trainer.savi_config import SAVISettings
from policy_trainer.savi_text import answer_prompt
from principles.schema import load_principle_set
from salmon.atomic import JsonlError, atomic_write_json, read_jsonl
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

    def __init__(self, model_dir: str | Path, settings: SAVISettings, client: SalmonClient, principle_set: str,
                 work: Path, *, num_frames: int = 8, max_new_tokens: int = 64, temperature: float = 0.8,
                 device: str = "cpu", seed: int = 0):
        from salmon.modeling import ModelOptions, load_vision_lm

        if num_frames < 1:
            raise UserError(f"--frames {num_frames}: give at least 1")
        self.s, self.client, self.work = settings, client, Path(work)
        self.pset = client.resolve_set(load_principle_set(principle_set))  # registered, named by name@hash
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

    @torch.no_grad()
    def _gen(self, prompts: list[str], recs: list[dict], desc: str, max_new_tokens: int | None = None) -> list[str]:
        from tqdm.auto import tqdm

        out = []
        tok = self.processor.tokenizer
        for i, (prompt, rec) in enumerate(tqdm(list(zip(prompts, recs, strict=True)), desc=desc, leave=False)):
            frames = self.frames(rec)
            text = self.processor.apply_chat_template(self.messages(prompt, len(frames)), add_generation_prompt=True)
            enc = self.processor(text=[text], images=[frames], return_tensors="pt").to(self.model.device)
            # Seeded per stage and record: reproducible, and no two stages draw the same noise.
            torch.manual_seed(self.seed + zlib.crc32(desc.encode()) + i)
            ids = self.model.generate(**enc, do_sample=True, temperature=self.temperature, top_k=0,
                                      max_new_tokens=max_new_tokens or self.max_new_tokens,
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
