"""SAMI and DNO end to end on the tiny policy against a real rm_service app (rule scorer) on loopback:
constitutions, rounds, the held-out report, DNO's pairs, replay and advancing reference."""

from __future__ import annotations

import json
import math
import random

import pytest
import yaml
from conftest import RULE_PATTERN, RULE_PENALTY, make_service
from pt_fakes import rule_score

from policy_trainer.config import RunConfig
from policy_trainer.dno_pairs import replay_count
from policy_trainer.rollouts import read_shards
from policy_trainer.sami import draw_constitutions, render_constitution
from policy_trainer.train import run_training
from principles.schema import Principle, PrincipleSet, load_principle_set
from salmon.errors import UserError
from salmon_cli.main import main

PROMPTS = ["Name a fruit.", "Say hello.", "What is 2 + 3?", "Name a colour.", "Give me a word.", "Count to three."]


@pytest.fixture(scope="module")
def real_service():
    svc = make_service("real")
    yield svc
    svc.stop()


def iter_config(tmp_path, model_dir, url: str, algorithm: str, **section) -> RunConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "type": "general"}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    return RunConfig.model_validate({
        "algorithm": algorithm,
        "policy": {"model": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"prompts": str(prompts)},
        "reward": {"url": url, "retry": {"max_attempts": 3, "initial_backoff_s": 0.05, "budget_s": 5}},
        "principles": {"set": "concise"},
        "training": {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8,
                     "learning_rate": 5e-3, "temperature": 1.0},
        "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": str(tmp_path / "rollouts"),
                   "tensorboard": False, "run_id": "it"},
        algorithm: {"iterations": 2, "prompts_per_iteration": 2, "heldout_prompts": 2, **section},
    })


def test_constitutions_are_distinct_complete_and_negate_only_what_can_be():
    pset = PrincipleSet(name="s", principles=(
        Principle(name="a", definition="A.", negative_definition="not A."),
        Principle(name="b", definition="B.", negative_definition="not B."),
        Principle(name="c", definition="C.")))
    cons = draw_constitutions(pset, 4, random.Random(1))
    assert len({frozenset(k) for k in cons}) == 4  # four distinct sign patterns: all of them for 2 flippable
    for k in cons:
        assert sorted(n for n, _ in k) == ["a", "b", "c"] and ("c", True) not in k
    orders = {tuple(n for n, _ in k) for s in range(20) for k in draw_constitutions(pset, 2, random.Random(s))}
    assert len(orders) > 1  # the order is shuffled
    text = render_constitution(pset, (("b", True), ("a", False), ("c", False)))
    assert text.splitlines()[1:] == ["- not B.", "- A.", "- C."]
    with pytest.raises(UserError, match="num_constitutions: 5 .* has 2"):
        draw_constitutions(pset, 5, random.Random(0))


def test_sami_rounds_report_heldout_score_and_mi(real_service, tiny_model_dir, tmp_path):
    cfg = iter_config(tmp_path, tiny_model_dir, real_service.url, "sami", learning_rate=1e-2, optimizer="adamw",
                      epochs=3, kl_coef=0.1)
    result = run_training(cfg)
    assert result.global_step == 2
    rep = json.loads((tmp_path / "run" / "iterations.json").read_text())
    rounds = rep["iterations"]
    assert [r["iteration"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert len(r["heldout_scores"]) == 2 and r["heldout_score_mean"] == pytest.approx(
            sum(r["heldout_scores"]) / 2)
        assert -10 < r["heldout_mi_mean"] <= math.log(2) + 1e-6  # the bound never exceeds log C
    for r in rounds[1:]:
        # three passes over the same matrices with a large step: the symmetric InfoNCE loss goes down
        assert r["loss_by_epoch"][-1] < r["loss_by_epoch"][0]
        assert r["kl"] is not None and len(r["sample"]["constitutions"]) == 2
    assert rep["heldout_prompt_ids"] == ["q4", "q5"]
    assert not {q for r in rounds[1:] for q in r["queries"]} & {"q4", "q5"}  # held out means never trained on
    assert (tmp_path / "run" / "iterations.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    # the held-out answers were scored by the service under the run's set, exactly as the rule says
    concise = load_principle_set("concise")
    calls = [c for c in real_service.recorder.scored() if c["request"].get("principle_set") == concise.ref]
    assert calls and all(s == pytest.approx(rule_score(i["response"], RULE_PATTERN, RULE_PENALTY), abs=1e-4)
                         for c in calls for i, s in zip(c["request"]["items"], c["response"]["scores"], strict=True))


def test_dno_pairs_replay_and_the_reference_advances(real_service, tiny_model_dir, tmp_path):
    teacher = tmp_path / "teacher.jsonl"
    # Vowel-rich: the rule scorer rates it above the tiny model's noise, so teacher > student pairs appear.
    teacher.write_text("".join(json.dumps({"prompt_id": f"q{i}", "response": "aeiou " * 4}) + "\n" for i in range(4)))
    cfg = iter_config(tmp_path, tiny_model_dir, real_service.url, "dno", num_samples=3, margin=0.01,
                      replay_share=0.5, teacher_file=str(teacher), beta=0.1)
    result = run_training(cfg)
    assert result.global_step == 2
    rep = json.loads((tmp_path / "run" / "iterations.json").read_text())
    r1, r2 = rep["iterations"][1], rep["iterations"][2]
    assert r1["pairs_new"] >= 1 and r1["pairs_replay"] == 0  # nothing to replay in the first round
    assert r2["pairs_replay"] == replay_count(r2["pairs_new"], 0.5, r1["pairs_new"]) >= 1
    assert r1["pair_sources"].get("teacher>policy", 0) >= 1
    # The reference of round 2 is round 1's result, which moved away from round 1's reference.
    assert r1["policy_probe_logp"] != pytest.approx(r1["ref_probe_logp"], abs=1e-4)
    assert r2["ref_probe_logp"] == pytest.approx(r1["policy_probe_logp"], abs=1e-4)
    assert r2["policy_probe_logp"] != pytest.approx(r2["ref_probe_logp"], abs=1e-4)
    pairs2 = [json.loads(x) for x in (tmp_path / "run" / "pairs" / "round-2.jsonl").read_text().splitlines()]
    assert sorted(p["iteration"] for p in pairs2).count(1) == r2["pairs_replay"]
    assert all(p["chosen_score"] - p["rejected_score"] >= 0.01 - 1e-9 for p in pairs2)
    # the samples were scored through the run's reward path: rollouts of steps 0 and 1, K + teacher per prompt
    rows = read_shards(tmp_path / "rollouts", "it")
    assert sorted({r["step"] for r in rows}) == [0, 1] and len(rows) == 2 * 2 * (3 + 1)
    best = rep["summary"]["best_iteration"]
    assert (tmp_path / "run" / "best" / "config.json").is_file() == (best > 0)


def test_dno_bad_teacher_file_and_too_many_heldout_prompts_are_user_errors(real_service, tiny_model_dir, tmp_path):
    bad = tmp_path / "teacher.jsonl"
    bad.write_text('{"prompt_id": "q0"}\n')
    with pytest.raises(UserError, match=r"dno.teacher_file: .*:1: expected"):
        run_training(iter_config(tmp_path, tiny_model_dir, real_service.url, "dno", teacher_file=str(bad)))
    with pytest.raises(UserError, match="sami.heldout_prompts: 6 of 6 prompts leaves none"):
        run_training(iter_config(tmp_path, tiny_model_dir, real_service.url, "sami", heldout_prompts=6))


def test_sami_with_more_constitutions_than_the_set_allows_is_a_cli_error(real_service, tiny_model_dir, tmp_path,
                                                                        capsys):
    # one more than the sign patterns of concise's negatable principles can give
    flippable = sum(bool(p.negative_definition) for p in load_principle_set("concise").principles)
    too_many = 2 ** flippable + 1
    cfg = iter_config(tmp_path, tiny_model_dir, real_service.url, "sami", num_constitutions=too_many)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"sami.num_constitutions: {too_many} distinct constitutions" in err and len(err.strip().splitlines()) == 1


def test_service_gone_mid_run_aborts_saying_what_was_kept(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    from policy_trainer.train import TrainingAborted

    svc = make_service("real")

    class StopAfterRound1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                svc.stop()

    try:
        cfg = iter_config(tmp_path, tiny_model_dir, svc.url, "dno", margin=0.0)
        with pytest.raises(TrainingAborted, match=r"keeps rounds 0-1; dno does not resume") as e:
            run_training(cfg, callbacks=[StopAfterRound1()])
    finally:
        svc.stop()
    assert e.value.checkpoint is None and e.value.global_step == 1
    rep = json.loads((tmp_path / "run" / "iterations.json").read_text())
    assert [r["iteration"] for r in rep["iterations"]] == [0, 1]
