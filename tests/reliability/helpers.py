"""Shared pieces of the reliability suites: error-body checks, a `salmon serve` subprocess, figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from rm_service.testing import free_port

REPO = Path(__file__).resolve().parents[2]

# Measured figures, printed by the tests (visible with -s) and summarised at the end of the run.
FIGURES: dict[str, dict] = {}


def record(name: str, **figures) -> None:
    FIGURES.setdefault(name, {}).update(figures)
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def assert_error_body(r: httpx.Response, context: object = "") -> None:
    """Every 4xx/5xx leaves as {"error": {message, type, param, code}} with a message that says what to fix."""
    assert r.status_code < 500, f"{r.status_code} for {context!r}: {r.text[:500]}"
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
    except Exception as e:  # noqa: BLE001 - the body itself is the finding
        raise AssertionError(f"{r.status_code} body is not an error object ({e}): {r.text[:300]!r}") from None
    assert err["code"] == r.status_code, err
    assert isinstance(err["type"], str) and err["type"], err
    assert isinstance(err["message"], str) and len(err["message"]) >= 12, err
    assert "Traceback" not in err["message"] and "internal error" not in err["message"], err


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# A wrapper that runs the `salmon` CLI with socket.bind replaced: any bind attempt exits at once with
# code 99 (and says where), so CLI tests can prove a refusal happens before anything is bound, and a
# config that WOULD start a server never binds anything either.
NO_BIND = r"""
import os, socket, sys
def _no_bind(self, addr):
    sys.stderr.write(f"BIND ATTEMPTED {addr!r}\n"); sys.stderr.flush(); os._exit(99)
socket.socket.bind = _no_bind
from salmon_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli_no_bind(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in {"SALMON_API_KEY", "SALMON_ADMIN_KEY"}}
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", NO_BIND, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=e)


class ServeProcess:
    """`salmon serve --config cfg.yaml` as a child process on 127.0.0.1 (its RSS is the server's alone).

    On ``port`` (a free one if None); ready when ``ready_path`` answers 200. ``kill()`` SIGKILLs it the
    way an OOM killer or a lost node does; a new ServeProcess on the same port is an orchestrator's restart.
    """

    def __init__(self, tmp: Path, settings: dict, env: dict | None = None, port: int | None = None,
                 ready_path: str = "/readyz"):
        self.port = port or free_port()
        self.ready_path = ready_path
        self.started_at = self.ready_at = 0.0
        self.cfg = tmp / f"serve-{self.port}.yaml"
        self.cfg.write_text(yaml.safe_dump({"host": "127.0.0.1", **settings}))
        self.log = tmp / f"serve-{self.port}.log"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "salmon_cli", "serve", "--config", str(self.cfg), "--port", str(self.port),
             "--log-level", "warning"], stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"salmon serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.ready_at = time.monotonic()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise TimeoutError(f"salmon serve not ready: {self.log.read_text()[-2000:]}")

    def kill(self) -> float:
        """SIGKILL, no shutdown of any kind; returns when the process is gone (monotonic time of the kill)."""
        assert self.proc is not None and self.proc.poll() is None
        t = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        return t

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._logf.close()


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples in a /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def dump_figures(path: Path) -> None:
    path.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")


def fuzz_settings(max_examples: int):
    """Hypothesis settings for the property suites: bounded, no deadline (shared CI cores are slow), no
    example database (CI starts clean). SALMON_FUZZ_SCALE multiplies the counts for a longer local run."""
    from hypothesis import HealthCheck, settings

    scale = float(os.environ.get("SALMON_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(max_examples * scale)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
