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


def video_run_config(tmp_path, model_dir, url: str, **section):
    from policy_trainer.config import RunConfig

    for name, start in (("a", 10), ("b", 240), ("c", 120)):
        write_video(tmp_path / f"{name}.mp4", [start + (5 if start < 200 else -5) * i for i in range(12)], fps=6)
    path = tmp_path / "videos.jsonl"
    path.write_text("".join(json.dumps({"id": n, "video": f"{n}.mp4"}) + "\n" for n in "abc"))
    return RunConfig.model_validate({
        "algorithm": "savi",
        "policy": {"model": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}},
        "reward": {"url": url, "retry": {"max_attempts": 3, "initial_backoff_s": 0.05, "budget_s": 5}},
        "principles": {"set": "faithful"},
        "training": {"per_device_train_batch_size": 4, "max_completion_length": 6, "learning_rate": 5e-2,
                     "temperature": 1.0},
        "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": None, "tensorboard": False,
                   "run_id": "savi-video"},
        "savi": {"videos": str(path), "frames": 3, "iterations": 2, "prompts_per_iteration": 2, "heldout_prompts": 1,
                 "questions_per_passage": 2, **section},
    })


def test_video_savi_is_the_method_tables_savi_with_dpo_rounds_and_resume(real_service, tiny_vlm, tmp_path,
                                                                          monkeypatch):
    """algorithm: savi with savi.videos: rounds of the video stages, TRL DPO on the kept vision rows, held-out
    videos answered and scored before and after every round, and a rerun continuing after the last round."""
    import torch
    from safetensors.torch import load_file

    from policy_trainer.train import run_training

    # The service's verdicts are tested above; here every pair whose texts differ is preferred, so DPO runs.
    monkeypatch.setattr(VideoSAVi, "score_pairs", lambda self, recs: [(0.0, 1.0 if x["refined"] != x["initial"]
                                                                       else 0.0) for x in recs])
    cfg = video_run_config(tmp_path, tiny_vlm, real_service.url)
    assert run_training(cfg).global_step == 2
    out = tmp_path / "run"
    rep = json.loads((out / "iterations.json").read_text())
    assert rep["variant"] == "video" and rep["heldout_prompt_ids"] == ["c"]
    assert rep["principle_set"].startswith("faithful@")
    assert (out / "iterations.png").stat().st_size > 0 and (out / "savi_funnel.png").stat().st_size > 0
    rounds = rep["iterations"]
    assert [r["iteration"] for r in rounds] == [0, 1, 2]
    for r in rounds:  # the held-out video's three questions (what / why / how), each answer scored by the service
        assert len(r["heldout_answers"]) == 3 and len(r["heldout_scores"]) == 3
        assert {a["passage_id"] for a in r["heldout_answers"]} == {"c"}
    for r in rounds[1:]:
        kept = [x for x in read_jsonl_rows(tmp_path / "run" / "savi" / f"round-{r['iteration']}" / "pairs.jsonl")
                if x["kept"]]
        assert r["pairs_kept"] == r["pairs_trained"] == len(kept) > 0  # what is kept is what DPO trains on
        assert {x["passage_id"] for x in kept} <= {"a", "b"}  # never the held-out video
        assert r["dpo_steps"] > 0 and math.isfinite(r["loss"])
    # The iterate saved after round 1 is the base moved by DPO (the adapter was merged into the weights).
    base = load_file(str(next(tiny_vlm.glob("*.safetensors"))))
    moved = load_file(str(next((out / "savi" / "iterate").glob("*.safetensors"))))
    assert any(not torch.equal(base[k], moved[k]) for k in base if k in moved)

    # A rerun after round 1: round 1's stage files and iterate are read back, only round 2 runs again.
    state = json.loads((out / "savi" / "state.json").read_text())
    (out / "savi" / "state.json").write_text(json.dumps({"round": 1, "rounds": state["rounds"][:2]}))
    stamp = {p: p.stat().st_mtime_ns for p in (out / "savi" / "round-1").iterdir()}
    import shutil

    shutil.rmtree(out / "savi" / "round-2")
    assert run_training(cfg).global_step == 2
    again = json.loads((out / "iterations.json").read_text())["iterations"]
    assert [r["iteration"] for r in again] == [0, 1, 2] and again[:2] == rounds[:2]
    assert {p: p.stat().st_mtime_ns for p in (out / "savi" / "round-1").iterdir()} == stamp
    assert (out / "savi" / "round-2" / "pairs.jsonl").is_file()


def read_jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_video_savi_config_errors(real_service, tiny_vlm, tmp_path):
    from policy_trainer.train import run_training

    cfg = video_run_config(tmp_path, tiny_vlm, real_service.url, heldout_prompts=3)
    with pytest.raises(UserError, match="heldout_prompts"):
        run_training(cfg)
    cfg = video_run_config(tmp_path, tiny_vlm, real_service.url, videos=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="videos"):
        run_training(cfg)
