"""Faults: the registry publisher SIGKILLed at random points; corrupt or missing checkpoint files.

- A publish is run in a child process and killed with SIGKILL after a seeded random delay, several
  times. After every kill, Registry.versions() and current() show only complete versions whose
  files verify against their manifest; the next publish succeeds and cleans up what was left.
- A corrupt or missing checkpoint file: the service keeps serving the old version and says why,
  in the reload response, in /v1/model and in the log.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rm_core.registry import Registry
from rm_core.render import PROMPT_FORMAT_VERSION
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.reliability.helpers import REPO, record
from tests.rm_service.helpers import publish_tiny_version

PUBLISHER = r"""
import sys
from rm_core.registry import Registry
build, root = sys.argv[1], sys.argv[2]
sys.stdout.write("ready\n"); sys.stdout.flush()
v = Registry(root).publish(build, {"base_model": "none", "adapter": "adapter",
                                   "prompt_format_version": sys.argv[3], "data_hash": "kill-test"})
sys.stdout.write(v + "\n"); sys.stdout.flush()
"""


def _make_build(path: Path, seed: int) -> Path:
    """A version's files: several adapter shards (a few MB), so a publish takes long enough to be cut."""
    rng = random.Random(seed)
    (path / "adapter").mkdir(parents=True)
    for i in range(12):
        (path / "adapter" / f"shard-{i}.safetensors").write_bytes(rng.randbytes(384 * 1024))
    (path / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    return path


def _check_registry(reg: Registry) -> list[str]:
    """Everything a reader can see is complete and verifiable."""
    versions = reg.versions()
    for v in versions:
        m = reg.manifest(v, verify=True)  # raises on a missing or corrupt file
        assert m.version == v and len(m.files) == 13, m.files
    cur = reg.current()
    assert cur is None or cur in versions, (cur, versions)
    return versions


def _half_versions(reg: Registry, root: Path) -> int:
    """Version directories a reader could find that are not complete, verifiable versions."""
    listed = set(reg.versions())
    half = 0
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            try:
                ok = d.name in listed and len(reg.manifest(d.name, verify=True).files) == 13
            except Exception:  # noqa: BLE001 - a manifest that does not verify is exactly a half version
                ok = False
            half += not ok
    return half


def _start_publisher(build: Path, root: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(build), str(root), PROMPT_FORMAT_VERSION],
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_publisher_sigkilled_at_random_points_never_leaves_a_half_version(tmp_path):
    rng = random.Random(7)
    root = tmp_path / "registry"
    build = _make_build(tmp_path / "build", seed=0)
    reg = Registry(root)
    # One uninterrupted publish: its duration sets the range of kill delays.
    p = _start_publisher(build, root)
    t0 = time.monotonic()
    first = p.stdout.readline().strip()
    assert p.wait(timeout=60) == 0 and first == "v0001"
    duration = time.monotonic() - t0
    kills, completed, outcomes, half_versions_seen = 0, 1, [], 0
    for _ in range(10):
        p = _start_publisher(build, root)
        delay = rng.uniform(0, duration)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(timeout=30)
        p.stdout.close()
        finished = p.returncode == 0
        completed += finished
        leftovers = sorted(x.name for x in root.iterdir() if x.name.startswith("."))
        outcomes.append(("completed" if finished else "killed", round(delay, 3), bool(leftovers)))
        half_versions_seen += _half_versions(reg, root)
        _check_registry(reg)
    # After all that, a publish succeeds, takes the next number, and cleans up staging leftovers.
    p = _start_publisher(build, root)
    final = p.stdout.readline().strip()
    assert p.wait(timeout=60) == 0
    versions = _check_registry(reg)
    assert reg.current() == final == versions[-1]
    assert not list(root.glob(".staging-*"))
    record("registry publisher SIGKILL", publishes_started=12, sigkills=kills,
           killed_with_staging_left=sum(1 for o in outcomes if o[0] == "killed" and o[2]),
           completed=completed + 1, versions=len(versions), publish_s=round(duration, 3),
           half_versions_seen=half_versions_seen)
    assert kills >= 5, outcomes  # the delays did land inside publishes
    # at least one kill landed mid-copy (a staging directory left behind), so that case was exercised
    assert any(o[0] == "killed" and o[2] for o in outcomes), outcomes
    assert half_versions_seen == 0, outcomes


@pytest.fixture()
def two_versions(tmp_path, tiny_model_dir):
    root = tmp_path / "registry"
    v1 = publish_tiny_version(root, tiny_model_dir, seed=1, tmp=tmp_path)
    v2 = publish_tiny_version(root, tiny_model_dir, seed=2, tmp=tmp_path)
    Registry(root).set_current(v1)
    return root, v1, v2


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_checkpoint_keeps_old_version_and_says_why_in_response_model_info_and_log(two_versions, damage, caplog):
    root, v1, v2 = two_versions
    weights = next(Registry(root).path(v2).rglob("*.safetensors"))
    if damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:-64] + b"\xff" * 64)
    else:
        weights.unlink()
    item = {"items": [{"prompt": "Say hi.", "response": "Hi!"}], "principle_set": "hhh"}
    caplog.set_level(logging.INFO, logger="salmon.rm_service")
    with ServerThread(ServiceSettings(port=0, registry=root, watch_registry=True, watch_interval_s=0.1)) as srv:
        before = httpx.post(srv.url + "/v1/score", json=item, timeout=60).json()
        # 1) the admin endpoint
        r = httpx.post(srv.url + "/v1/admin/reload", json={"version": v2}, timeout=60).json()
        assert not r["reloaded"] and r["model_version"] == v1 and damage in r["message"], r
        # 2) the registry watcher: CURRENT now names the broken version
        Registry(root).set_current(v2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum("reload failed" in m for m in caplog.messages) < 2:
            time.sleep(0.1)
        time.sleep(0.5)  # a few more watch ticks: the broken version is not retried every tick
        info = httpx.get(srv.url + "/v1/model", timeout=30).json()
        after = httpx.post(srv.url + "/v1/score", json=item, timeout=60).json()
    failed = [rec for rec in caplog.records if "reload failed" in rec.getMessage()]
    assert len(failed) == 2, [rec.getMessage() for rec in failed]  # one from the endpoint, one from the watcher
    for rec in failed:
        msg = rec.getMessage()
        assert rec.levelno == logging.ERROR and f"still serving {v1}" in msg and v2 in msg and damage in msg, msg
    assert info["model_version"] == v1 and damage in info["last_reload_error"]
    assert after["model_version"] == v1 and after["scores"] == before["scores"]
    record(f"bad checkpoint ({damage})", reloads_refused=2, requests_failed=0, log_line=failed[0].getMessage()[:120])
