"""Fixtures: reward services on loopback (real uvicorn, restartable on the same port) and run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pt_fakes import Faults, Recorder, contract_app

from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread, free_port  # noqa: F401  (free_port: used by the tests)

RULE_PATTERN = r"[aeiou]"
RULE_PENALTY = 0.01


def loopback_server(app: Any) -> ServerThread:
    """A started uvicorn thread on 127.0.0.1 serving ``app``; stop() then start() comes back on the same
    port. A short graceful shutdown so that "the service goes away" happens at once."""
    return ServerThread(ServiceSettings(port=0), app=app, shutdown_timeout_s=1).start()


class Service:
    """A service under test: ``url``, ``recorder`` (what it received/returned), stop/start."""

    def __init__(self, kind: str, server: Any, recorder: Recorder, faults: Faults | None):
        self.kind, self.server, self.recorder, self.faults = kind, server, recorder, faults

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


def make_service(kind: str, max_items: int = 256) -> Service:
    if kind == "fake":
        faults = Faults()
        rec = Recorder(contract_app(pattern=RULE_PATTERN, penalty=RULE_PENALTY, max_items=max_items, faults=faults))
        return Service(kind, loopback_server(rec), rec, faults)
    from rm_service.app import create_app

    settings = ServiceSettings(port=0, scorer="rule", rule_pattern=RULE_PATTERN, rule_length_penalty=RULE_PENALTY,
                               default_principle_set="concise", max_items=max_items)
    rec = Recorder(create_app(settings))  # one app, so what it recorded survives stop()/start()
    return Service(kind, ServerThread(settings, app=rec).start(), rec, None)


SERVICE_KINDS = ["fake", "real"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's matmuls are too small for threads; on a shared 2-core machine extra OpenMP
    threads only spin against the neighbours (measured: 8 s/step -> 3.4 s/step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=SERVICE_KINDS)
def service(request):
    svc = make_service(request.param)
    yield svc
    svc.stop()


@pytest.fixture
def fake_service():
    svc = make_service("fake")
    yield svc
    svc.stop()


def tiny_run_config(tmp_path: Path, model_dir: Path, url: str, **sections: Any) -> dict:
    """A run config (dict) that trains the tiny model in about a second per step."""
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text(
            '{"id": "g1", "prompt": "Name a fruit.", "type": "general"}\n'
            '{"id": "r1", "prompt": "What is 2 + 3?", "type": "reasoning"}\n'
            '{"id": "t1", "prompt": "How do I pick a lock?", "type": "redteam"}\n'
            '{"id": "g2", "prompt": "Say hello.", "type": "general"}\n')
    cfg: dict[str, Any] = {
        "algorithm": "grpo",
        "policy": {"model": str(model_dir), "lora": {"r": 4, "alpha": 8}},
        "data": {"prompts": str(prompts)},
        "reward": {"url": url, "retry": {"max_attempts": 4, "initial_backoff_s": 0.05, "budget_s": 5}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                     "max_completion_length": 8, "learning_rate": 1e-3, "temperature": 1.0},
        "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": str(tmp_path / "rollouts"),
                   "tensorboard": False, "save_steps": 1, "run_id": "t"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg
