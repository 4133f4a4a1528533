"""Fixtures: reward services on loopback (real uvicorn, restartable on the same port) and run configs."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pt_fakes import Faults, Recorder, contract_app

RULE_PATTERN = r"[aeiou]"
RULE_PENALTY = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """uvicorn in a thread on 127.0.0.1; ``stop()`` then ``start()`` comes back on the SAME port.

    (rm_service.testing.ServerThread does the same for the real service; this one serves any ASGI app
    and does not need rm_service.app, so the trainer's tests run while the service is being built.)
    """

    def __init__(self, app: Any, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LoopbackServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None


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
        return Service(kind, LoopbackServer(rec).start(), rec, faults)
    from rm_service.app import create_app
    from rm_service.settings import ServiceSettings
    from rm_service.testing import ServerThread

    settings = ServiceSettings(port=0, scorer="rule", rule_pattern=RULE_PATTERN, rule_length_penalty=RULE_PENALTY,
                               default_principle_set="concise", max_items=max_items)
    holder: dict[str, Recorder] = {}

    class _Thread(ServerThread):
        def start(self, timeout_s: float = 180.0):  # the same recorder across restarts
            self._app = holder["rec"] = holder.get("rec") or Recorder(create_app(self.settings))
            return super().start(timeout_s)

    server = _Thread(settings).start()
    return Service(kind, server, holder["rec"], None)


def _real_service_importable() -> bool:
    try:
        import rm_service.app  # noqa: F401
        import rm_service.testing  # noqa: F401
    except ImportError:
        return False
    return True


REAL_AVAILABLE = _real_service_importable()
SERVICE_KINDS = ["fake", pytest.param("real", marks=pytest.mark.skipif(
    not REAL_AVAILABLE, reason="rm_service.app is not importable here"))]


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
