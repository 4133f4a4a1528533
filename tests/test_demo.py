"""`salmon demo`'s plumbing: flags, the prompt split, the RM stage's start point, and the whole demo on the
tiny random-init model against a real service subprocess with the rule scorer (no real model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from salmon.errors import UserError
from salmon_cli import demo


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's matmuls are too small for threads; extra ones only spin on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_defaults_steer_one_policy_two_ways():
    args = demo.parse_args([])
    assert (args.principle_set, args.opposite_set) == ("concise", "detailed")
    assert args.max_completion_length == 128 and args.scorer == "auto" and args.model == "embedded"
    assert args.steps >= 10 and args.heldout_prompts == 8
    # The synthetic-preference stage fine-tunes a shipped one-pass RM; without one it is skipped by default.
    from rm_core.registry import shipped_one_pass_version

    assert args.synth_prompts == (8 if shipped_one_pass_version("embedded") else 0)
    # --prompts (the demo's earlier name for the synthetic-preference prompts) still works
    assert demo.parse_args(["--prompts", "3"]).synth_prompts == 3
    assert demo.parse_args(["--synth-prompts", "0"]).synth_prompts == 0


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--generations", "1"], ["--synth-prompts", "-1"],
                                   ["--heldout-prompts", "0"]])
def test_bad_sizes_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(flags)
    assert "must be" in capsys.readouterr().err


def test_the_two_sets_must_differ(tmp_path):
    with pytest.raises(UserError, match="same set"):
        demo.main(["demo", "--out", str(tmp_path / "d"), "--opposite-set", "concise"])
    assert not (tmp_path / "d").exists()  # refused before anything starts


def test_heldout_prompts_are_seen_by_neither_rl_nor_the_rm(tmp_path):
    from data_synth.prompts import load_prompts
    from salmon.atomic import read_jsonl

    rl, heldout = demo.split_prompts(tmp_path, 8)
    rl_rows, heldout_rows = read_jsonl(rl), read_jsonl(heldout)
    assert len(heldout_rows) == 8 and len(rl_rows) >= 20
    assert {r["type"] for r in rl_rows + heldout_rows} == {"general"}
    held_ids = {r["id"] for r in heldout_rows}
    assert not held_ids & {r["id"] for r in rl_rows}
    synth_ids = {r["id"] for r in load_prompts(None, limit=demo.parse_args(["--synth-prompts", "8"]).synth_prompts)}
    assert not held_ids & synth_ids
    with pytest.raises(UserError, match="general prompts"):
        demo.split_prompts(tmp_path, 10_000)


@pytest.mark.parametrize(("shipped", "init_from"), [("v0001", "shipped"), (None, "base")])
def test_the_rm_is_fine_tuned_from_the_shipped_one_when_there_is_one(monkeypatch, tmp_path, shipped, init_from):
    import data_synth.pipeline
    import rm_core.registry

    seen = {}

    def fake_pipeline(cfg):
        seen["cfg"] = cfg
        return {"train": {"version": "v0001"}}

    monkeypatch.setattr(rm_core.registry, "shipped_one_pass_version",
                        lambda base: shipped if base == "embedded" else None)
    monkeypatch.setattr(data_synth.pipeline, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(demo, "wait_for_version", lambda url, version: {"model_version": version, "scorer": "trained"})
    args = demo.parse_args(["--synth-prompts", "5"])
    rm = demo.build_reward_model(args, tmp_path, tmp_path / "registry", "http://127.0.0.1:9")
    cfg = seen["cfg"]
    assert cfg.train.init_from == init_from and rm["init_from"] == init_from
    assert cfg.num_prompts == 5 and cfg.train.registry == tmp_path / "registry"
    assert cfg.sample.policy == cfg.judge.model == cfg.train.base_model == "embedded"
    assert rm["version"] == "v0001" and rm["scorer"] == "trained"


def test_the_seed_reaches_both_rl_runs(monkeypatch, tmp_path):
    import policy_trainer.train as train_mod

    seen = []

    class Stop(Exception):
        pass

    def fake_run_training(cfg):
        seen.append(cfg.training.seed)
        raise Stop

    monkeypatch.setattr(train_mod, "run_training", fake_run_training)
    assert demo.parse_args([]).seed == 42  # the trainer's own default: a default demo is unchanged
    args = demo.parse_args(["--seed", "7"])
    for label in ("concise", "detailed"):
        with pytest.raises(Stop):
            demo.run_rl(args, label, label, "http://127.0.0.1:9", tmp_path, tmp_path / "p.jsonl")
    assert seen == [7, 7]


def test_the_whole_demo_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    # The rule scorer ignores principles, so both runs see the same rewards: what differs between them
    # is the principle set alone, and here nothing does, so they must come out identical.
    monkeypatch.setenv("SALMON_RULE_PATTERN", "[aeiou]")
    monkeypatch.setenv("SALMON_RULE_LENGTH_PENALTY", "0.01")
    out = tmp_path / "demo"
    rc = demo.main(["demo", "--out", str(out), "--model", str(tiny_model_dir), "--scorer", "rule",
                    "--synth-prompts", "0", "--steps", "2", "--generations", "2", "--prompts-per-step", "1",
                    "--max-completion-length", "8", "--heldout-prompts", "2"])
    assert rc == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert (out / "demo_report.png").stat().st_size > 10_000
    rm = report["reward_model"]
    assert rm["version"].startswith("rule") and rm["scorer"] == "rule" and rm["init_from"] is None
    assert report["synth"] is None
    runs = report["runs"]
    assert report["sets"] == ["concise", "detailed"] and set(runs) == {"concise", "detailed"}
    for label, run in runs.items():
        assert run["principle_set"] == label and run["set_ref"].startswith(f"{label}@")
        assert run["steps"] == 2 and [h["step"] for h in run["history"]] == [0, 1]
        assert all(h["reward"] is not None and h["completion_length"] <= 8 for h in run["history"])
        ckpt = Path(run["checkpoint"])
        assert ckpt.parent == out / f"rl-{label}" and (ckpt / "adapter_config.json").is_file()
    # the same seed, prompts and initial policy: the same LoRA start (B is zero, A is seeded), the same
    # first generation batch, the same rewards
    from safetensors.torch import load_file

    adapters = [load_file(Path(runs[label]["checkpoint"]) / "adapter_model.safetensors") for label in runs]
    lora_a = [k for k in adapters[0] if "lora_A" in k]
    assert lora_a and all(adapters[0][k].equal(adapters[1][k]) for k in lora_a)
    assert runs["concise"]["history"][0]["reward"] == runs["detailed"]["history"][0]["reward"]
    assert runs["concise"]["history"][0]["completion_length"] == runs["detailed"]["history"][0]["completion_length"]

    held = report["heldout"]
    assert set(held["policies"]) == {"initial", "concise", "detailed"}
    assert held["decoding"] == "greedy" and held["max_new_tokens"] == 8 and len(held["prompts"]) == 2
    rl_ids = {json.loads(line)["id"] for line in (out / "prompts" / "rl.jsonl").read_text().splitlines()}
    assert not set(held["prompts"]) & rl_ids
    for ev in held["policies"].values():
        assert len(ev["lengths"]) == 2 and all(1 <= n <= 8 for n in ev["lengths"])
        assert set(ev["mean_score"]) == {"concise", "detailed"}
        assert all(isinstance(v, float) for v in ev["mean_score"].values())
    answers = [json.loads(line) for line in (out / "heldout_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 2 and {a["policy"] for a in answers} == {"initial", "concise", "detailed"}
    for a in answers:  # the service scored each answer itself, under each set (the rule's formula)
        expected = len(re.findall("[aeiou]", a["answer"], re.IGNORECASE)) - 0.01 * len(a["answer"])
        assert a["scores"] == {"concise": pytest.approx(expected), "detailed": pytest.approx(expected)}

    head = report["headline"]
    lengths = {p: held["policies"][p]["mean_length"] for p in ("concise", "detailed")}
    assert head["heldout_length_ratio_of"] == "concise/detailed"
    assert head["heldout_length_ratio"] == pytest.approx(lengths["concise"] / lengths["detailed"], abs=1e-3)
    scores = {p: held["policies"][p]["mean_score"] for p in ("concise", "detailed")}
    assert head["heldout_score_margin"] == {
        s: pytest.approx(scores["concise"][s] - scores["detailed"][s], abs=1e-3) for s in ("concise", "detailed")}
    for label, run in runs.items():
        rewards = [h["reward"] for h in run["history"]]
        assert head["reward_first_vs_last_steps"][label] == [pytest.approx(sum(rewards[:3]) / len(rewards[:3]), abs=1e-3),
                                                             pytest.approx(sum(rewards[-3:]) / len(rewards[-3:]),
                                                                           abs=1e-3)]
    printed = capsys.readouterr().out
    assert "held-out length ratio concise/detailed" in printed and "RL under concise" in printed
    assert "held-out score margin (concise policy - detailed policy)" in printed
