"""`salmon isheep` end to end on the tiny random-init model: resume after SIGKILL, the data flow, the report.

A subprocess run (2 iterations) is killed halfway through writing iteration 2's answers; the same run
is then finished in-process with every call of the trainer and every model load recorded. The tests
check that the rerun left iteration 1 untouched and regenerated the very answers the killed process
was writing, that what each iteration kept is exactly what its SFT trained on, that the SFT always
starts from the base, and that iteration i+1 generated with iteration i's model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import salmon.modeling
from policy_trainer.sft import train_sft
from salmon.atomic import FAULT_ENV, read_jsonl
from salmon.errors import UserError
from salmon_cli.isheep import ISheepConfig, run_isheep
from salmon_cli.main import main as salmon_main

REPO = Path(__file__).resolve().parents[1]


def tiny_config(model: Path, out: Path, **extra) -> dict:
    cfg = {
        "model": str(model), "output_dir": str(out), "iterations": 2, "num_threads": 1,
        "self_instruct": {"prompts_per_iteration": 4, "requests_per_round": 2, "max_rounds": 2,
                          "max_new_tokens": 32, "min_chars": 5},
        "answer": {"max_new_tokens": 16, "batch_size": 4},
        "filters": {"min_words": 1},
        # The random model rates everything near 5; thresholds just under keep most, and the test sees
        # both outcomes of the select stage.
        "assess": {"min_quality": 4.99, "min_following": 4.99},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 1, "use_cpu": True,
                "num_threads": 1},
        "heldout": {"count": 2, "scorer_model": str(model), "max_new_tokens": 8},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def clean_run(tiny_model_dir, tmp_path_factory):
    """A run killed inside a write of iteration 2, then finished in-process with trainer calls and loads recorded."""
    import torch

    root = tmp_path_factory.mktemp("isheep")
    out = root / "run"
    raw = tiny_config(tiny_model_dir, out)
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           FAULT_ENV: "*iter-02/answers.json:1"}
    killed = subprocess.run([str(Path(sys.executable).parent / "salmon"), "isheep", "--config", str(root / "cfg.yaml")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    half = list((out / "iter-02").glob(".answers.json.*.tmp"))
    assert len(half) == 1, "the kill did not land inside the write"
    before_resume = {"half_answers": half[0].read_bytes(),
                     "iter1": {p: p.stat().st_ino for p in (out / "iter-01").glob("*.json")}}

    cfg = ISheepConfig.model_validate(raw)
    trained, loaded = [], []

    def recording_train(base, rows, out_dir, settings):
        trained.append({"base": str(base), "rows": [dict(r) for r in rows], "out_dir": Path(out_dir)})
        return train_sft(base, rows, out_dir, settings)

    real_load = salmon.modeling.load_causal_lm

    def recording_load(source, *a, **kw):
        loaded.append(str(source))
        return real_load(source, *a, **kw)

    threads = torch.get_num_threads()
    salmon.modeling.load_causal_lm = recording_load
    try:
        report = run_isheep(cfg, train_fn=recording_train)
    finally:
        salmon.modeling.load_causal_lm = real_load
        torch.set_num_threads(threads)
    return {"cfg": cfg, "out": out, "report": report, "trained": trained, "loaded": loaded, **before_resume}


def test_resume_after_sigkill_inside_iteration_2(clean_run):
    out = clean_run["out"]
    assert {p: p.stat().st_ino for p in clean_run["iter1"]} == clean_run["iter1"]  # read back, not rewritten
    assert clean_run["iter1"] and not list(out.rglob(".*.tmp"))
    # The killed process had written the first half of its answers file; the rerun wrote the same bytes.
    assert (out / "iter-02" / "answers.json").read_bytes().startswith(clean_run["half_answers"])
    assert [r["iteration"] for r in json.loads((out / "report.json").read_text())["iterations"]] == [0, 1, 2]


def stage(out: Path, i: int, name: str) -> dict:
    return json.loads((out / f"iter-{i:02d}" / name).read_text())


def test_kept_rows_are_exactly_what_the_sft_trains_on(clean_run):
    out, trained = clean_run["out"], clean_run["trained"]
    assert len(trained) == 2
    for i, call in enumerate(trained, 1):
        prompts = {r["prompt"] for r in stage(out, i, "prompts.json")["rows"]}
        answers = stage(out, i, "answers.json")["rows"]
        assessed = stage(out, i, "assessed.json")["rows"]
        selected = stage(out, i, "selected.json")
        a = clean_run["cfg"].assess
        expected = [{"prompt": r["prompt"], "completion": r["response"]} for r in assessed
                    if r["quality"] >= a.min_quality and r["following"] >= a.min_following]
        assert selected["rows"] == expected and call["rows"] == expected
        assert selected["counts"]["kept"] == len(expected) > 0
        assert {r["prompt"] for r in answers} <= prompts           # answers are to this iteration's prompts
        assert [r["response"] for r in assessed] == [r["response"] for r in answers]
        # What the trainer got is what it wrote down and what its loss saw.
        assert read_jsonl(call["out_dir"] / "sft_data.jsonl") == expected
        seen = [r["completion"] for r in read_jsonl(call["out_dir"] / "trained_on.jsonl")]
        assert seen == [r["completion"].strip() for r in expected]


def test_every_iteration_trains_the_base_and_the_next_generates_with_it(clean_run):
    out, cfg, trained = clean_run["out"], clean_run["cfg"], clean_run["trained"]
    assert [c["base"] for c in trained] == [cfg.model, cfg.model]  # the BASE each time, not the last iterate
    model_1 = str(out / "iter-01" / "sft" / "merged")
    for name in ("prompts.json", "answers.json", "assessed.json"):
        assert stage(out, 1, name)["generator"] == cfg.model
        assert stage(out, 2, name)["generator"] == model_1
    # The resumed part loads M1 to finish iteration 2's data, M2 to answer the held-out prompts, then the
    # scorer's model (here the tiny one); nothing of iteration 1 is redone, so the base is not loaded as a
    # policy (the SFT loads its own). In the full suite on two xdist workers the recorder missed the M1
    # load once and the scorer's load once, depending on what other test files ran in the same worker
    # before (iteration 2's files name M1 as their generator, checked above), so only what may and must
    # be loaded is asserted, not the order.
    loaded = clean_run["loaded"]
    model_2 = str(out / "iter-02" / "sft" / "merged")
    assert set(loaded) <= {model_1, model_2, cfg.heldout.scorer_model}
    assert model_2 in loaded
    assert loaded.count(cfg.model) <= (1 if cfg.model == cfg.heldout.scorer_model else 0)
    # Iteration 2's prompts were filtered against iteration 1's and the held-out ones.
    first = {r["prompt"] for r in stage(out, 1, "prompts.json")["rows"]}
    assert not first & {r["prompt"] for r in stage(out, 2, "prompts.json")["rows"]}


def test_report_has_every_iteration(clean_run):
    out, report = clean_run["out"], clean_run["report"]
    on_disk = json.loads((out / "report.json").read_text())
    assert [r["iteration"] for r in on_disk["iterations"]] == [0, 1, 2]
    assert on_disk["scorer"].startswith("contrastive:") and on_disk["principle_set"] == "hhh"
    for r in on_disk["iterations"]:
        h = r["heldout_reward"]
        assert h["n"] == 2 and h["sd"] is not None and r["heldout_length_tokens"]["mean"] is not None
    for r in on_disk["iterations"][1:]:
        assert set(r["counts"]) == {"self_instruct", "rule_filter", "self_assess"}
        assert r["self_assessed_all"]["quality"]["n"] == r["counts"]["rule_filter"]["kept"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert report["iterations"][2]["heldout_reward"] == on_disk["iterations"][2]["heldout_reward"]


def test_a_rerun_of_a_finished_run_loads_no_model(clean_run, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a finished run reloaded a model")

    monkeypatch.setattr(salmon.modeling, "load_causal_lm", refuse)
    before = (clean_run["out"] / "iter-01" / "prompts.json").stat().st_ino
    report = run_isheep(clean_run["cfg"], train_fn=train_sft)
    assert report["iterations"][1:] and (clean_run["out"] / "iter-01" / "prompts.json").stat().st_ino == before


def test_other_settings_into_the_same_directory_are_refused(clean_run):
    cfg = clean_run["cfg"].model_copy(update={"seed": 7})
    with pytest.raises(UserError, match="other settings"):
        run_isheep(cfg)


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("assess: {min_quality: 11}\nitterations: 2\n")
    assert salmon_main(["isheep", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "assess.min_quality" in err and "itterations" in err


def test_the_shipped_cpu_config_validates():
    from salmon.config import load_config

    cfg = load_config(ISheepConfig, REPO / "salmon_cli" / "configs" / "isheep_cpu.yaml")
    assert cfg.model == "embedded" and cfg.heldout.scorer == "auto" and cfg.heldout.principles in {"hhh", "self_align"}
