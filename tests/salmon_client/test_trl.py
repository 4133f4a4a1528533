"""TRL: the exported reward_funcs, called as GRPOTrainer calls a reward function, and examples/trl_grpo.py
run top to bottom as a user runs it, both against a real `salmon serve`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

from policy_trainer import reward_funcs
from salmon.errors import UserError
from salmon_client import SalmonClient
from tests.reliability.helpers import REPO, metric
from tests.salmon_client.conftest import KEY

PROMPTS = ["What time zone is Tokyo in?", "Name a prime."]
COMPLETIONS = [["UTC+9.", "Japan Standard Time, nine hours ahead of UTC.", "No idea."],
               ["7", "Seven, and two, three and five too.", "Primes are numbers."]]


def grpo_batch() -> dict:
    """GRPOTrainer's keywords: prompts and completions (conversational), completion ids, the dataset's
    other columns as lists, trainer_state, log_metric and log_extra."""
    prompts, completions, ids = [], [], []
    for p, group in zip(PROMPTS, COMPLETIONS, strict=True):
        for c in group:
            prompts.append([{"role": "user", "content": p}])
            completions.append([{"role": "assistant", "content": c}])
            ids.append([11] * len(c.split()) + [2])
    return {"prompts": prompts, "completions": completions, "completion_ids": ids}


def test_reward_funcs_as_grpo_trainer_calls_them(env):
    funcs = reward_funcs(url=env.url, principle_set="detailed")
    assert [f.__name__ for f in funcs] == ["salmon_rm"]  # shaping is off unless a config turns it on
    metrics, extra = {}, {}
    out = asyncio.run(funcs[0](**grpo_batch(), trainer_state=SimpleNamespace(global_step=3),
                               log_metric=metrics.__setitem__, log_extra=extra.__setitem__))
    with SalmonClient() as client:
        want = [s for p, group in zip(PROMPTS, COMPLETIONS, strict=True)
                for s in client.score([([{"role": "user", "content": p}], c) for c in group],
                                      principle_set="detailed").scores]
    assert out == pytest.approx(want, abs=1e-5)
    assert extra["principle_set"][0].startswith("detailed@") and metrics["reward_service/requests"] >= 1


def test_reward_funcs_with_a_run_config_and_a_bad_set(env, tmp_path):
    cfg = {"reward": {"url": env.url, "retry": {"budget_s": 5}},
           "principles": {"set": "rl", "select_k": 2, "intervention": "intervention"},
           "shaping": {"unfinished_penalty": 1.0}}
    score, shaping = reward_funcs(cfg, tokenizer=SimpleNamespace(eos_token_id=2))
    assert shaping(**grpo_batch()) == [0.0] * 6  # every completion ends with EOS 2
    assert len(asyncio.run(score(**grpo_batch()))) == 6
    with pytest.raises(UserError, match="no-such-set"):
        reward_funcs(principle_set="no-such-set")  # the URL from $SALMON_URL


def test_the_example_script_runs_top_to_bottom(env, tiny_model_dir, tmp_path):
    def scored() -> float:
        r = httpx.get(env.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        return metric(r.text, 'salmon_requests_total{endpoint="/v1/score",status="200"}')

    before = scored()
    proc = subprocess.run([sys.executable, "examples/trl_grpo.py", "--model", str(tiny_model_dir), "--max-steps", "1",
                           "--max-completion-length", "8", "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "salmon reward" in proc.stdout and "under concise" in proc.stdout, proc.stdout[-2000:]
    assert scored() > before  # the rewards came from this service
