"""A GRPO run against a `salmon serve` child process that is SIGKILLed during a reward call.

The test plays the orchestrator: it kills the service while a step's reward request is in flight
and starts a new process on the same port a few seconds later. With the DEFAULT retry policy the
step in flight completes with the restarted service's scores (which first forgot the run's
registered set: the client registers it again), no step is lost or duplicated, and every logged
reward is what the service returned. Past the budget, `salmon train` checkpoints and exits 3
naming the URL.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from statistics import mean

import pytest
import yaml

import policy_trainer.reward_service as reward_service
from policy_trainer.config import RunConfig
from policy_trainer.rollouts import list_shards, read_shards
from policy_trainer.train import run_training
from tests.policy_trainer.pt_fakes import rule_score
from tests.reliability.helpers import record
from tests.reliability.real_service import RULE_PATTERN, RULE_PENALTY, RULE_SETTINGS, Serve, Wire

# Each reward request lingers in the service's batcher this long, so a kill can land inside one.
SERVE = {**RULE_SETTINGS, "batch_wait_ms": 800}
SET_YAML = """name: kill-run
principles:
  - name: brief
    definition: The response is brief and answers the question.
"""


def _wired(monkeypatch) -> Wire:
    wire = Wire()
    make = reward_service.make_client

    def make_client(cfg, render_query=None):
        c = make(cfg, render_query)
        c._transport = wire
        return c

    monkeypatch.setattr(reward_service, "make_client", make_client)
    return wire


def _run_config(tmp_path: Path, model_dir: Path, url: str, save_steps: int = 1, algorithm: str = "grpo") -> dict:
    """The tiny policy, three steps (GRPO or PPO) of 2 prompts x 2 completions, the DEFAULT retry policy."""
    (tmp_path / "kill-run.yaml").write_text(SET_YAML)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "g1", "prompt": "Name a fruit.", "type": "general"}\n'
                       '{"id": "g2", "prompt": "Say hello.", "type": "general"}\n')
    return {
        "algorithm": algorithm,
        "policy": {"model": str(model_dir), "lora": {"r": 4, "alpha": 8}},
        "data": {"prompts": str(prompts)},
        "principles": {"set": str(tmp_path / "kill-run.yaml")},
        "reward": {"url": url},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "num_generations": 2,
                     "max_completion_length": 8, "learning_rate": 1e-3, "temperature": 1.0, "beta": 0.0},
        "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": str(tmp_path / "rollouts"),
                   "tensorboard": False, "save_steps": save_steps, "run_id": "t"},
    }


class Orchestrator(threading.Thread):
    """SIGKILLs the service once a reward request of ``step`` is in flight; restarts it after ``down_s``
    (None: never)."""

    def __init__(self, wire: Wire, srv: Serve, tmp: Path, step: int, down_s: float | None):
        super().__init__(daemon=True)
        self.wire, self.srv, self.tmp, self.step, self.down_s = wire, srv, tmp, step, down_s
        self.killed_at = self.restarted_at = None
        self.in_flight: dict | None = None
        self.new: Serve | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.in_flight = self.wire.wait_in_flight(
                lambda c: c["path"] == "/v1/score" and c["step"] == str(self.step), timeout=300)
            time.sleep(0.2)  # inside the service's batch wait
            self.killed_at = self.srv.kill()
            if self.down_s is not None:
                time.sleep(self.down_s)
                self.new = Serve(self.tmp, SERVE, port=self.srv.port).__enter__()
                self.restarted_at = self.new.started_at
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


# PPO is our own trainer (its rollout, value model and reward call are not TRL's): the same orchestrated
# kill must hold for it too.
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_rides_out_a_sigkill_and_restart_with_default_retries(tmp_path, tiny_model_dir, monkeypatch, algorithm):
    wire = _wired(monkeypatch)
    srv = Serve(tmp_path, SERVE).__enter__()
    orch = Orchestrator(wire, srv, tmp_path, step=1, down_s=3.0)
    orch.start()
    try:
        result = run_training(RunConfig.model_validate(
            _run_config(tmp_path, tiny_model_dir, srv.url, algorithm=algorithm)))
    finally:
        orch.join(timeout=200)
        for s in (srv, orch.new):
            if s is not None:
                s.__exit__()
    assert orch.error is None, orch.error
    assert result.global_step == 3 and result.algorithm == algorithm
    # the kill landed inside a step-1 reward call: that attempt died with a transport error
    killed = orch.in_flight
    assert killed["status"] is None and killed["error"] and killed["t1"] >= orch.killed_at
    scores = [c for c in wire.calls if c["path"] == "/v1/score"]
    step1 = [c for c in scores if c["step"] == "1"]
    ok1 = [c for c in step1 if c["status"] == 200]
    assert ok1 and all(c["t0"] > orch.restarted_at for c in ok1)  # scored by the restarted service
    assert any(c["status"] == 404 for c in step1)  # which had forgotten the run's set ...
    puts = [c for c in wire.calls if c["method"] == "PUT" and c["status"] == 201]
    assert len(puts) == 2 and puts[1]["t0"] > orch.restarted_at  # ... and got it again
    # no step lost or duplicated; each item scored exactly once; rewards are the service's
    by_step = {s: [c for c in wire.scored() if c["step"] == str(s)] for s in range(3)}
    logged = {h["step"] - 1: h["rewards/salmon_rm/mean"] for h in result.log_history if "rewards/salmon_rm/mean" in h}
    assert sorted(logged) == [0, 1, 2]
    rows = read_shards(tmp_path / "rollouts", "t")
    assert [s for s, _ in list_shards(tmp_path / "rollouts", "t")] == [0, 1, 2]
    for s, calls in by_step.items():
        returned = [x for c in calls for x in c["response"]["scores"]]
        assert len(returned) == 4  # 2 prompts x 2 completions, once each
        assert logged[s] == pytest.approx(mean(returned), abs=1e-5)
        assert sorted(r["reward"] for r in rows if r["step"] == s) == pytest.approx(sorted(returned), abs=1e-6)
        for c in calls:
            for item, score in zip(c["request"]["items"], c["response"]["scores"], strict=True):
                assert score == pytest.approx(rule_score(item["response"], RULE_PATTERN, RULE_PENALTY), abs=1e-4)
    failed1 = [c for c in step1 if c["status"] != 200]
    outage = min(c["t0"] for c in ok1) - orch.killed_at
    record(f"{algorithm.upper()} vs SIGKILLed salmon serve (default retries)", steps=result.global_step,
           step1_attempts=len(step1), step1_failed_attempts=len(failed1),
           failures=sorted({c["error"] or str(c["status"]) for c in failed1}),
           outage_s=round(outage, 1), restart_ready_s=round(orch.new.ready_at - orch.restarted_at, 1),
           steps_lost=0, steps_duplicated=0)


def test_past_the_budget_salmon_train_checkpoints_and_exits_3_naming_the_url(tmp_path, tiny_model_dir,
                                                                            monkeypatch, capsys):
    from salmon_cli.main import main

    wire = _wired(monkeypatch)
    srv = Serve(tmp_path, SERVE).__enter__()
    cfg = _run_config(tmp_path, tiny_model_dir, srv.url, save_steps=10)
    cfg["reward"]["retry"] = {"budget_s": 3}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    orch = Orchestrator(wire, srv, tmp_path, step=1, down_s=None)
    orch.start()
    try:
        code = main(["train", "--config", str(path)])
    finally:
        orch.join(timeout=60)
        srv.__exit__()
    assert orch.error is None, orch.error
    assert code == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]  # tqdm
    assert len(err) == 1 and srv.url in err[0] and err[0].startswith("salmon train: error:"), err
    assert "checkpoint-1" in err[0]
    ckpt = tmp_path / "run" / "checkpoint-1"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "salmon_state.json").is_file()
    gave_up_after = max(c["t1"] for c in wire.calls) - orch.killed_at
    assert 2.5 <= gave_up_after <= 3.5 + 5.0  # the budget, not a count of tries (connect timeout slack)
    record("GRPO past the retry budget (real service killed)", exit_code=code, checkpoint=ckpt.name,
           gave_up_after_s=round(gave_up_after, 1), message=err[0][:160])
