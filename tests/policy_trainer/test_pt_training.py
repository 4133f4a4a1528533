"""End to end on CPU: tiny policy, real TRL trainers, a reward service on loopback over real HTTP.

Runs against the contract double and, when importable, the real rm_service app (rule scorer).
"""

from __future__ import annotations

import json
import logging
import threading
from statistics import mean

import pytest
from conftest import RULE_PATTERN, RULE_PENALTY, free_port, tiny_run_config
from pt_fakes import rule_score
from transformers import TrainerCallback

from policy_trainer.config import RunConfig
from policy_trainer.rollouts import list_shards, read_shards
from policy_trainer.train import TrainingAborted, run_training
from principles.schema import load_principle_set


def scored_by_step(recorder) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in recorder.scored():
        out.setdefault(int(c["headers"]["x-salmon-step"]), []).append(c)
    return out


def service_scores(calls: list[dict]) -> list[float]:
    return [s for c in calls for s in c["response"]["scores"]]


def check_rewards_match_service(result, recorder, steps: range) -> None:
    """TRL's logged rm reward per step == the mean of what the service returned for that step."""
    by_step = scored_by_step(recorder)
    logged = {h["step"] - 1: h for h in result.log_history if "rewards/salmon_rm/mean" in h}
    for s in steps:
        scores = service_scores(by_step[s])
        assert logged[s]["rewards/salmon_rm/mean"] == pytest.approx(mean(scores), abs=1e-5)
        # and every score is what the rule says about the text the service was sent
        for c in by_step[s]:
            for item, score in zip(c["request"]["items"], c["response"]["scores"], strict=True):
                assert score == pytest.approx(rule_score(item["response"], RULE_PATTERN, RULE_PENALTY), abs=1e-4)


def test_grpo_two_steps_with_principle_switch(service, tiny_model_dir, tmp_path):
    # k = the size of concise: step 0 scores the whole set; rl is larger, so step 1 draws k of it
    k = len(load_principle_set("concise").principles)
    assert len(load_principle_set("rl").principles) > k
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, service.url,
        principles={"set": "concise", "select_k": k, "schedule": [{"step": 1, "set": "rl"}]}))
    result = run_training(cfg)

    assert result.global_step == 2
    check_rewards_match_service(result, service.recorder, range(2))
    concise, rl = load_principle_set("concise"), load_principle_set("rl")
    by_step = scored_by_step(service.recorder)
    # step 0: k covers concise -> the whole set, by name@hash (prefix-cacheable)
    assert {c["request"].get("principle_set") for c in by_step[0]} == {concise.ref}
    assert all("principles" not in c["request"] for c in by_step[0])
    # step 1: switched to rl -> each prompt scored with its own k principles drawn from rl, inline
    rl_names = set(rl.names())
    for c in by_step[1]:
        names = [p["name"] for p in c["request"]["principles"]]
        assert len(names) == k and set(names) <= rl_names
    assert len(by_step[1]) <= 2  # 2 prompts per step: at most one request per distinct selection
    puts = {c["path"] for c in service.recorder.calls if c["method"] == "PUT"}
    assert puts == {"/v1/principle-sets/concise", "/v1/principle-sets/rl"}

    assert [e["set"] for e in result.principle_set_timeline] == [concise.ref, rl.ref]
    shards = list_shards(tmp_path / "rollouts", "t")
    assert [s for s, _ in shards] == [0, 1]
    rows = read_shards(tmp_path / "rollouts", "t")
    assert {r["principle_set_hash"] for r in rows if r["step"] == 1} == {rl.hash}
    assert sorted(r["reward"] for r in rows if r["step"] == 0) == pytest.approx(sorted(service_scores(by_step[0])))
    assert {r["policy_version"] for r in rows} == {"t@step-0", "t@step-1"}
    report = json.loads(result.report_json.read_text())
    assert report["summary"]["steps"] == 2 and 0 < report["summary"]["reward_wait_share"] < 1
    assert result.report_png.read_bytes()[:4] == b"\x89PNG"


def test_rloo_two_steps(service, tiny_model_dir, tmp_path):
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, service.url, algorithm="rloo", output={"tensorboard": True},
        shaping={"length_bonus": {"enabled": True}, "unfinished_penalty": 0.5}))
    result = run_training(cfg)
    assert result.global_step == 2
    check_rewards_match_service(result, service.recorder, range(2))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"salmon/step_time_s", "salmon/reward_wait_share", "train/reward_service/wait_s"} <= tags
    assert len(acc.Scalars("salmon/step_time_s")) == 2
    # shaping is its own reward function: total = service + shaping, each logged separately
    for h in (h for h in result.log_history if "reward" in h):
        assert h["reward"] == pytest.approx(h["rewards/salmon_rm/mean"] + h["rewards/shaping/mean"], abs=1e-4)
        assert h["rewards/shaping/mean"] != 0


class _Outage(TrainerCallback):
    """Takes the service away after ``at`` steps. With ``back_after_s`` it comes back that long after
    the trainer's first failed reward request (so the outage is sure to hit a reward call, however
    long generation takes on a loaded CI machine); without, it stays away."""

    def __init__(self, service, at: int, back_after_s: float | None):
        self.service, self.at, self.back_after_s = service, at, back_after_s
        self.timer: threading.Timer | None = None
        self.retries_seen = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.service.stop()
            if self.back_after_s is not None:
                logging.getLogger("salmon_client.client").addHandler(self._Handler(self))

    class _Handler(logging.Handler):
        def __init__(self, outage: _Outage):
            super().__init__(logging.WARNING)
            self.outage = outage

        def emit(self, record: logging.LogRecord) -> None:
            o = self.outage
            o.retries_seen += 1
            if o.timer is None:
                o.timer = threading.Timer(o.back_after_s, o.service.start)
                o.timer.start()

    def close(self) -> None:
        for h in list(logging.getLogger("salmon_client.client").handlers):
            if isinstance(h, self._Handler):
                logging.getLogger("salmon_client.client").removeHandler(h)


def test_service_outage_within_retry_budget_loses_no_step(fake_service, tiny_model_dir, tmp_path):
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, fake_service.url,
        reward={"retry": {"max_attempts": 30, "initial_backoff_s": 0.1, "max_backoff_s": 0.5, "budget_s": 30}},
        training={"max_steps": 3, "beta": 0.0}))
    outage = _Outage(fake_service, at=1, back_after_s=1.0)
    try:
        result = run_training(cfg, callbacks=[outage])
    finally:
        outage.close()
    outage.timer.join()
    assert outage.retries_seen >= 2  # the trainer really met the outage on a reward call
    assert result.global_step == 3
    assert [s for s, _ in list_shards(tmp_path / "rollouts", "t")] == [0, 1, 2]
    check_rewards_match_service(result, fake_service.recorder, range(3))
    waits = {r["step"]: r["reward_wait_s"] for r in json.loads(result.report_json.read_text())["steps"]}
    assert waits[1] >= 1.0  # step 1 waited out the outage instead of failing or faking a reward


def test_long_outage_checkpoints_exits_and_resume_continues(fake_service, tiny_model_dir, tmp_path, capsys):
    cfg_dict = tiny_run_config(tmp_path, tiny_model_dir, fake_service.url, training={"max_steps": 3, "beta": 0.0},
                               reward={"retry": {"max_attempts": 3, "initial_backoff_s": 0.1, "budget_s": 1}},
                               output={"save_steps": 10})
    cfg = RunConfig.model_validate(cfg_dict)
    with pytest.raises(TrainingAborted) as ei:
        run_training(cfg, callbacks=[_Outage(fake_service, at=1, back_after_s=None)])
    err = ei.value
    assert fake_service.url in str(err) and "ConnectError" in str(err)
    assert err.global_step == 1 and err.checkpoint == tmp_path / "run" / "checkpoint-1"
    assert (err.checkpoint / "trainer_state.json").is_file() and (err.checkpoint / "salmon_state.json").is_file()

    fake_service.start()
    before = len(fake_service.recorder.scored())
    result = run_training(cfg)
    assert result.global_step == 3
    steps_after = sorted({int(c["headers"]["x-salmon-step"]) for c in fake_service.recorder.scored()[before:]})
    assert steps_after == [1, 2]  # resumed at step 1, not from scratch
    assert [s for s, _ in list_shards(tmp_path / "rollouts", "t")] == [0, 1, 2]
    logged_steps = [h["step"] for h in result.log_history if "rewards/salmon_rm/mean" in h]
    assert logged_steps == [1, 2, 3]  # history kept across the restart


def test_cli_exits_non_zero_naming_the_url_when_the_service_is_gone(tiny_model_dir, tmp_path, capsys):
    import yaml

    from salmon_cli.main import main

    url = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_run_config(tmp_path, tiny_model_dir, url,
                          reward={"retry": {"max_attempts": 2, "initial_backoff_s": 0.05, "budget_s": 1}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and err[0].startswith("salmon train: error:")


@pytest.mark.slow
def test_embedded_policy_one_grpo_step(fake_service, tmp_path):
    """The real default policy (SmolLM2-135M via salmon.modeling) trains a LoRA step over HTTP."""
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, "embedded", fake_service.url, training={"max_steps": 1, "beta": 0.0}))
    result = run_training(cfg)
    assert result.global_step == 1
    check_rewards_match_service(result, fake_service.recorder, range(1))
    assert (result.checkpoint / "adapter_model.safetensors").is_file()
