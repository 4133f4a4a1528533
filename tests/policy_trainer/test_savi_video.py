"""VideoSAVi on videos: a tiny random-init VLM built from a config, short videos the test writes, frames at the
segment midpoints shown to the model at every stage, pairs scored by a real rm_service app (rule scorer)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_service

pytest.importorskip("av")

from policy_trainer.savi import STAGES  # noqa: E402
from policy_trainer.savi_config import SAVISettings  # noqa: E402
from policy_trainer.savi_video import VideoSAVi, load_videos  # noqa: E402
from salmon.errors import UserError  # noqa: E402
from salmon_client import SalmonClient  # noqa: E402
from tests.media_fixtures import build_tiny_vlm, write_video  # noqa: E402


@pytest.fixture(scope="module")
def real_service():
    svc = make_service("real")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


def level(img) -> float:
    import numpy as np

    return float(np.asarray(img, dtype=float).mean())


def videos(tmp_path):
    write_video(tmp_path / "a.mp4", [10 * i for i in range(12)], fps=6)  # 2 s; midpoints of 3: frames 2, 6, 10
    write_video(tmp_path / "b.mp4", [240 - 10 * i for i in range(12)], fps=6)
    path = tmp_path / "videos.jsonl"
    path.write_text(json.dumps({"id": "a", "video": "a.mp4"}) + "\n" + json.dumps({"id": "b", "video": "b.mp4"}) + "\n")
    return load_videos(path)


def test_video_savi_stages_frames_pairs_and_resume(real_service, tiny_vlm, tmp_path, monkeypatch):
    items = videos(tmp_path)
    with SalmonClient(real_service.url) as client:
        savi = VideoSAVi(tiny_vlm, SAVISettings(questions_per_passage=4), client, "faithful", tmp_path / "work",
                         num_frames=3, max_new_tokens=6)
        assert savi.pset.startswith("faithful@")
        shown = []
        real_proc = savi.processor

        class Spy:  # what the model was given at each call: the number of frames and their grey levels
            tokenizer = real_proc.tokenizer

            def apply_chat_template(self, *a, **kw):
                return real_proc.apply_chat_template(*a, **kw)

            def __call__(self, *, text, images, **kw):
                shown.append([10 * round(level(f) / 10) for f in images[0]])  # the codec is lossy by a few levels
                assert text[0].count("<image>") == len(images[0])
                return real_proc(text=text, images=images, **kw)

        savi.processor = Spy()
        recs, figures = savi.run(items)
    assert len(recs) == 8 and [x["aspect"] for x in recs[:4]] == ["spatial", "temporal", "spatial", "temporal"]
    assert [x["kind"] for x in recs[:4]] == ["what", "why", "how", "what"]
    assert len(shown) == 4 * 8  # four generating stages, every record, every time with its video's frames
    assert {tuple(s) for s in shown} == {(20, 60, 100), (220, 180, 140)}
    for x in recs:
        assert x["kept"] == (x["refined_score"] > x["initial_score"] and x["refined"] != x["initial"])
        assert x["initial_grounding"] is None  # no text source: the lexical filter does not apply
    assert figures["pairs_kept"] + sum(figures["dropped"].values()) == 8
    for name in STAGES:
        assert (tmp_path / "work" / "round-1" / f"{name}.jsonl").is_file()

    rows = savi.dpo_rows(recs)
    assert len(rows) == figures["pairs_kept"]
    for row, x in zip(rows, [x for x in recs if x["kept"]], strict=True):
        assert len(row["images"]) == 3 and row["chosen"][0]["content"][0]["text"] == x["refined"]
        assert sum(c["type"] == "image" for c in row["prompt"][0]["content"]) == 3

    # A rerun reads every stage back: no generation, no scoring.
    monkeypatch.setattr(VideoSAVi, "_gen", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(VideoSAVi, "score_pairs", lambda *a, **k: pytest.fail("scored again"))
    with SalmonClient(real_service.url) as client:
        again = VideoSAVi(tiny_vlm, SAVISettings(questions_per_passage=4), client, "faithful", tmp_path / "work",
                          num_frames=3)
        assert again.run(items)[0] == recs


def test_video_list_errors(tmp_path):
    bad = tmp_path / "v.jsonl"
    bad.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(UserError, match="expected"):
        load_videos(bad)


def test_video_dpo_rows_train_in_trls_dpotrainer(real_service, tiny_vlm, tmp_path):
    """The rows are in the form TRL's DPOTrainer takes for a VLM: it reads them as a vision dataset and trains."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    with SalmonClient(real_service.url) as client:
        savi = VideoSAVi(tiny_vlm, SAVISettings(questions_per_passage=4), client, "faithful", tmp_path / "work",
                         num_frames=3, max_new_tokens=6)
        recs, _ = savi.run(videos(tmp_path))
    # The rows' form is under test here, not the service's verdict: take every pair whose texts differ.
    rows = savi.dpo_rows([{**x, "kept": True} for x in recs if x["refined"] != x["initial"]])
    assert rows
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, remove_unused_columns=False,
                     max_length=None)
    trainer = DPOTrainer(model=savi.model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=savi.processor,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert trainer._is_vision_dataset  # the images column reached the processor's path, not the text one
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 2 and hist[0]["rewards/margins"] == 0  # step 1: policy = reference (adapter off)
    assert all(math.isfinite(h["logps/chosen"]) and math.isfinite(h["logps/rejected"]) for h in hist)
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed  # the LoRA adapter moved
