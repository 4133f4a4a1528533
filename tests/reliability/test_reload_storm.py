"""Hot reload under load: repeated reward-model reloads while clients score.

Extends tests/rm_service/test_reload.py (3 reloads) to 9 successful reloads cycling through three
versions plus one refused (corrupt) version in the middle, with 8 concurrent clients: zero failed
requests, every response names the version that scored it, and its scores equal that version's
offline scores (the same prepare/compute path without HTTP).
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from principles.schema import Principle
from rm_core.registry import Registry
from rm_core.scorers import load_trained
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.reliability.helpers import percentile, record
from tests.rm_service.helpers import publish_tiny_version

ITEMS = [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Say hi.", "response": "Hello there, friend."},
         {"prompt": [{"role": "user", "content": "Name a prime."}], "response": "7"}]
PRINCIPLE = "The response is helpful."
CLIENTS, RELOADS = 8, 9


@pytest.mark.slow
def test_repeated_reloads_under_load_zero_failures_and_version_exact_scores(tmp_path, tiny_model_dir):
    root = tmp_path / "registry"
    versions = [publish_tiny_version(root, tiny_model_dir, seed=s, tmp=tmp_path) for s in (11, 12, 13)]
    broken = publish_tiny_version(root, tiny_model_dir, seed=14, tmp=tmp_path)
    w = next(Registry(root).path(broken).rglob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-32] + b"\0" * 32)
    Registry(root).set_current(versions[0])
    p = [Principle(name="p1", definition=PRINCIPLE)]
    offline = {}
    for v in versions:
        sc = load_trained(root, v)
        offline[v] = sc.score_items(p, [(i["prompt"] if isinstance(i["prompt"], str) else i["prompt"], i["response"])
                                        for i in ITEMS])
    assert len({tuple(round(x, 4) for x in s) for s in offline.values()}) == 3  # versions are distinguishable

    st = ServiceSettings(port=0, registry=root, watch_registry=False, num_threads=1)
    body = {"items": ITEMS, "principles": [PRINCIPLE]}
    failures, seen, latency = [], {}, []
    with ServerThread(st) as srv:
        stop_at = time.monotonic() + 60

        def client(k: int) -> int:
            n = 0
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while time.monotonic() < stop_at and not done and n < 400:
                    t0 = time.perf_counter()
                    r = c.post("/v1/score", json=body)
                    latency.append(time.perf_counter() - t0)
                    n += 1
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    out = r.json()
                    v = out["model_version"]
                    seen[v] = seen.get(v, 0) + 1
                    if v not in offline or out["scores"] != pytest.approx(offline[v], abs=1e-4):
                        failures.append(f"scores from {v} differ from its offline scores: {out['scores']}")
            return n

        done = False
        reloads, refused = [], 0
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            futs = [pool.submit(client, k) for k in range(CLIENTS)]
            try:
                order = [versions[(i + 1) % 3] for i in range(RELOADS)]
                for i, v in enumerate(order):
                    time.sleep(0.4)
                    t0 = time.perf_counter()
                    r = httpx.post(srv.url + "/v1/admin/reload", json={"version": v}, timeout=60).json()
                    assert r["reloaded"] and r["model_version"] == v, r
                    reloads.append(time.perf_counter() - t0)
                    if i == RELOADS // 2:  # a broken version mid-storm: refused, the current one keeps serving
                        bad = httpx.post(srv.url + "/v1/admin/reload", json={"version": broken}, timeout=60).json()
                        assert not bad["reloaded"] and bad["model_version"] == v and "corrupt" in bad["message"]
                        refused += 1
                time.sleep(0.4)
            finally:
                done = True
                sent = sum(f.result() for f in futs)
    lat_ms = [x * 1000 for x in latency]
    record("hot reload under load", clients=CLIENTS, requests_sent=sent, failures=len(failures),
           reloads_survived=len(reloads), broken_reloads_refused=refused,
           responses_per_version="/".join(str(seen.get(v, 0)) for v in versions),
           reload_s_max=round(max(reloads), 2), p50_ms=round(percentile(lat_ms, 50), 1),
           p99_ms=round(percentile(lat_ms, 99), 1))
    assert not failures, failures[:5]
    assert len(reloads) == RELOADS and set(seen) == set(versions) and sent >= 4 * CLIENTS
