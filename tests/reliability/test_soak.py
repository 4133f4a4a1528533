"""Soak: `salmon serve` + a GRPO run + `salmon synth watch` together on loopback, the loop closed.

The service (child process, registry watcher on) scores the trainer's rollouts; the trainer exports
them; `synth watch` (child process) judges them, retrains and publishes; the service picks each new
version up by itself and the trainer's next rewards come from it. Required:

- 0 failed reward calls (every attempt on the wire a 200; the principle set registered once);
- the trainer's reward log equals the service's responses: per step, the rolled-out rewards are the
  scores the service returned (each item once) and the logged mean is their mean;
- at least two publishes by the watch, each then named by the service's answers to the trainer;
- RSS and open file descriptors of the service and the watch flat: sampled every 2 s, the second
  half of the run grows RSS by < 64 MB (full form; < 128 MB in the CI form, whose second half holds
  the reloads) and fds by <= 4 (start/end figures are recorded);
- no temp file, staging directory or half-written checkpoint left anywhere.

The CI form runs until the service has answered with the second published version for a few steps
(about a minute or two); ``SALMON_SOAK_S=600`` runs the full form for that many seconds instead
(RELIABILITY.md reports its figures).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from statistics import mean

import psutil
import pytest
import yaml
from transformers import TrainerCallback

from policy_trainer.config import RunConfig
from policy_trainer.rollouts import read_shards
from policy_trainer.train import run_training
from rm_core.registry import Registry
from tests.reliability.helpers import REPO, ServeProcess, record
from tests.reliability.test_trainer_real_kill import _run_config, _wired
from tests.rm_service.helpers import publish_tiny_version

SOAK_S = float(os.environ.get("SALMON_SOAK_S", "0"))  # 0: the CI form
CI_DEADLINE_S = 300
STEPS_AFTER_SECOND_PUBLISH = 3
# RSS growth allowed over the second half. The CI form's second half holds the reloads of the new
# versions (each loads a model and refills the prefix cache); the full form's is steady state.
RSS_GROWTH_MB = 64 if SOAK_S else 128


class Sampler(threading.Thread):
    """RSS (MB) and open fds of the given processes every ``every_s``."""

    def __init__(self, procs: dict[str, int], every_s: float = 2.0):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.every_s, self.samples, self.stop = every_s, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            row = {"t": time.monotonic()}
            for name, p in self.procs.items():
                try:
                    row[name] = (p.memory_info().rss / 2**20, p.num_fds())
                except psutil.Error:
                    pass
            self.samples.append(row)
            self.stop.wait(self.every_s)

    def figures(self, name: str) -> dict[str, float]:
        rows = [r[name] for r in self.samples if name in r]
        # "start" is a tenth into the run: the processes have loaded their models and served a while.
        warm, mid = rows[len(rows) // 10], rows[len(rows) // 2]
        return {"rss_start": warm[0], "rss_mid": mid[0], "rss_end": rows[-1][0],
                "rss_max": max(r[0] for r in rows), "fds_start": warm[1], "fds_mid": mid[1],
                "fds_end": rows[-1][1], "fds_max": max(r[1] for r in rows)}


class Until(TrainerCallback):
    """Stops the run once ``done()`` says so, checked after each step."""

    def __init__(self, done):
        self.done = done

    def on_step_end(self, args, state, control, **kwargs):
        if self.done():
            control.should_training_stop = True
        return control


def _temps(*roots):
    return [p for r in roots if r.exists() for p in [*r.rglob(".*.tmp"), *r.rglob(".staging-*"),
                                                     *r.rglob(".checkpoint-*")]]


@pytest.mark.slow
def test_soak_service_trainer_and_watch_together(tmp_path, tiny_model_dir, monkeypatch):
    wire = _wired(monkeypatch)
    registry, rollouts, work, run_dir = (tmp_path / n for n in ("registry", "rollouts", "watch", "run"))
    publish_tiny_version(registry, tiny_model_dir, seed=11, tmp=tmp_path)
    settings = {"registry": str(registry), "scorer": "trained", "watch_registry": True, "watch_interval_s": 0.5,
                "num_threads": 1, "default_principle_set": "concise"}
    wcfg = tmp_path / "watch.yaml"
    wcfg.write_text(yaml.safe_dump({
        "rollouts_dir": str(rollouts), "work_dir": str(work), "poll_s": 1.0, "min_response_chars": 1,
        "min_new_pairs": int(os.environ.get("SALMON_SOAK_MIN_PAIRS", "4")),
        "judge": {"model": str(tiny_model_dir), "source": "ab", "principle_set": "concise"},
        "aggregate": {"require_order_agreement": False},
        "train": {"base_model": str(tiny_model_dir), "registry": str(registry), "batch_size": 4, "lora_r": 2},
    }))
    watch_log = open(tmp_path / "watch.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    with ServeProcess(tmp_path, settings) as srv:
        watch = subprocess.Popen([sys.executable, "-m", "salmon_cli", "synth", "watch", "--config", str(wcfg)],
                                 cwd=REPO, env=env, stdout=watch_log, stderr=subprocess.STDOUT)
        sampler = Sampler({"service": srv.proc.pid, "watch": watch.pid, "trainer": os.getpid()})
        sampler.start()
        first_seen: dict[str, int] = {}  # version -> first step whose reward the service scored with it

        def done() -> bool:
            for c in wire.scored():
                first_seen.setdefault(c["response"]["model_version"], int(c["step"]))
            if SOAK_S:
                return time.monotonic() - t0 >= SOAK_S
            published = [v for v in first_seen if v != "v0001"]
            last_step = max((int(c["step"]) for c in wire.scored()), default=0)
            return (len(published) >= 2 and last_step - first_seen[sorted(published)[1]] >= STEPS_AFTER_SECOND_PUBLISH
                    ) or time.monotonic() - t0 >= CI_DEADLINE_S

        cfg = _run_config(tmp_path, tiny_model_dir, srv.url, save_steps=25)
        cfg["training"]["max_steps"] = 100_000  # the callback ends the run
        try:
            result = run_training(RunConfig.model_validate(cfg), callbacks=[Until(done)])
            # Let the watch judge the last shards (and retrain if they are enough), then stop it while idle.
            deadline = time.monotonic() + 120
            n_shards = len(list(rollouts.glob("*/step-*.jsonl")))
            while time.monotonic() < deadline:
                state = yaml.safe_load((work / "state.json").read_text()) if (work / "state.json").is_file() else {}
                if len(state.get("consumed", {})) == n_shards and state.get("pending_pairs", 0) < int(
                        os.environ.get("SALMON_SOAK_MIN_PAIRS", "4")):
                    break
                time.sleep(0.5)
            time.sleep(1.5)
        finally:
            sampler.stop.set()
            sampler.join(timeout=10)
            watch.send_signal(signal.SIGINT)
            try:
                watch.wait(timeout=30)
            except subprocess.TimeoutExpired:
                watch.kill()
                watch.wait(timeout=10)
            watch_log.close()
    elapsed = time.monotonic() - t0

    # Figures first, so a failing run still reports them.
    attempts = [c for c in wire.calls if c["path"] == "/v1/score"]
    bad = [c for c in wire.calls if c["status"] not in (200, 201)]
    published = Registry(registry).versions()[1:]
    figs = {name: sampler.figures(name) for name in ("service", "watch", "trainer")}
    record("soak: serve + GRPO + synth watch", duration_s=round(elapsed), steps=result.global_step,
           min_new_pairs=int(os.environ.get("SALMON_SOAK_MIN_PAIRS", "4")),
           reward_calls=len(attempts), failed_calls=len(bad), publishes=len(published),
           first_step_scored_by={v: first_seen[v] for v in sorted(first_seen)},
           **{f"{n}_{k}": round(v, 1) if "rss" in k else v for n, f in figs.items() for k, v in f.items()
              if k.endswith(("start", "mid", "end", "max"))})

    # 0 failed reward calls
    assert not bad, [(c["method"], c["path"], c["status"], c["error"]) for c in bad[:5]]
    assert len([c for c in wire.calls if c["method"] == "PUT"]) == 1
    # the trainer's reward log equals the service's responses
    rows = read_shards(rollouts, "t")
    logged = {h["step"] - 1: h["rewards/salmon_rm/mean"] for h in result.log_history if "rewards/salmon_rm/mean" in h}
    steps = sorted(logged)
    assert steps == list(range(result.global_step))
    for s in steps:
        returned = [x for c in attempts if c["step"] == str(s) for x in c["response"]["scores"]]
        assert len(returned) == 4, (s, len(returned))  # 2 prompts x 2 completions, each scored once
        assert logged[s] == pytest.approx(mean(returned), abs=1e-5)
        assert sorted(r["reward"] for r in rows if r["step"] == s) == pytest.approx(sorted(returned), abs=1e-6)
    # at least two publishes, each then scoring the trainer's rollouts
    assert len(published) >= 2 and {"v0002", "v0003"} <= set(first_seen), (published, first_seen)
    # flat resources, no leftovers
    for name in ("service", "watch"):
        f = figs[name]
        assert f["rss_end"] - f["rss_mid"] < RSS_GROWTH_MB, (name, f)
        assert f["fds_end"] - f["fds_mid"] <= 4, (name, f)
    assert not _temps(registry, rollouts, work, run_dir)
