"""The registry watcher under load: another process publishes and flips CURRENT while 16 clients score.

`salmon serve` runs as a child process with ``watch_registry`` on (the reload-under-load tests drive
reloads through the admin endpoint with the watcher off). A second child process, knowing nothing of
the service, publishes two versions (each publish switches CURRENT) and then rolls CURRENT back to
the first with no publish, as an operator would. Throughout, 16 clients score the same request:

- no request fails (every answer a 200);
- each response's scores equal the offline scores of the version it names (abs 1e-4);
- each client sees the versions in the order CURRENT took them, never an older one again after a newer
  one answered it (a reload swaps the model whole);
- the watcher followed every flip: each version served, and every client's last answers come from the
  version CURRENT names at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import time

import httpx
import pytest

from principles.schema import Principle
from rm_core.registry import Registry
from rm_core.scorers import load_trained
from tests.reliability.helpers import REPO, ServeProcess, percentile, record
from tests.rm_service.helpers import build_tiny_version, publish_tiny_version

ITEMS = [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Say hi.", "response": "Hello there, friend."},
         {"prompt": [{"role": "user", "content": "Name a prime."}], "response": "7"}]
PRINCIPLE = "The response is helpful."
CLIENTS = 16
GAP_S = 3.0  # between the publisher's flips: long enough for every client to be answered by each version

# The other process: publishes each build (publish switches CURRENT), then points CURRENT back at the
# first version; prints the monotonic time of each flip (CLOCK_MONOTONIC is system-wide on Linux).
PUBLISHER = r"""
import json, sys, time
from rm_core.registry import Registry
root, plan = sys.argv[1], json.loads(sys.argv[2])
reg, first = Registry(root), Registry(root).current()
for build, manifest in plan:
    time.sleep(GAP)
    v = reg.publish(build, manifest)
    print(json.dumps({"version": v, "t": time.monotonic()}), flush=True)
time.sleep(GAP)
reg.set_current(first)
print(json.dumps({"version": first, "t": time.monotonic()}), flush=True)
time.sleep(GAP)
""".replace("GAP", repr(GAP_S))


def test_watcher_follows_another_process_publishing_and_flipping_current_under_16_clients(tmp_path,
                                                                                           tiny_model_dir):
    root = tmp_path / "registry"
    first = publish_tiny_version(root, tiny_model_dir, seed=11, tmp=tmp_path)
    plan = [[str(b), m] for b, m in (build_tiny_version(tiny_model_dir, s, tmp_path) for s in (12, 13))]
    settings = {"registry": str(root), "scorer": "trained", "watch_registry": True, "watch_interval_s": 0.25,
                "num_threads": 1, "default_principle_set": "concise"}
    body = {"items": ITEMS, "principles": [PRINCIPLE]}
    failures: list[str] = []
    answers: list[list[tuple[float, str, list[float]]]] = [[] for _ in range(CLIENTS)]
    latency: list[float] = []
    with ServeProcess(tmp_path, settings) as srv:
        rss_start = srv.rss_mb()
        done = False

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not done and len(answers[k]) < 2000:
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/v1/score", json=body)
                    except httpx.HTTPError as e:
                        failures.append(f"client {k}: {type(e).__name__}")
                        continue
                    latency.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        failures.append(f"client {k}: {r.status_code} {r.text[:200]}")
                        continue
                    out = r.json()
                    answers[k].append((time.monotonic(), out["model_version"], out["scores"]))

        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            futs = [pool.submit(client, k) for k in range(CLIENTS)]
            try:
                pub = subprocess.run([sys.executable, "-c", PUBLISHER, str(root), json.dumps(plan)], cwd=REPO,
                                     capture_output=True, text=True, timeout=300)
            finally:
                done = True
                for f in futs:
                    f.result()
        rss_end = srv.rss_mb()
    assert pub.returncode == 0, pub.stderr[-2000:]
    flips = [json.loads(line) for line in pub.stdout.splitlines()]
    order = [first] + [f["version"] for f in flips]
    assert order == [first, "v0002", "v0003", first] and Registry(root).current() == first

    p = [Principle(name="p1", definition=PRINCIPLE)]
    offline = {v: load_trained(root, v).score_items(p, [(i["prompt"], i["response"]) for i in ITEMS])
               for v in Registry(root).versions()}
    assert len({tuple(round(x, 4) for x in s) for s in offline.values()}) == 3  # versions are distinguishable

    seen: dict[str, int] = {}
    for k, got in enumerate(answers):
        pos = 0
        for _, v, scores in got:
            seen[v] = seen.get(v, 0) + 1
            if scores != pytest.approx(offline[v], abs=1e-4):
                failures.append(f"client {k}: scores from {v} differ from its offline scores: {scores}")
            if v != order[pos]:
                later = [j for j in range(pos + 1, len(order)) if order[j] == v]
                if not later:
                    failures.append(f"client {k}: answered by {v} after {order[pos]} (order {order})")
                    continue
                pos = later[0]
        assert got and got[-1][1] == first, f"client {k} never saw the rollback: last answer {got[-1:]}"
    # Time from each flip to the first answer naming the version it switched to.
    switch_s = []
    for f in flips:
        after = [t for got in answers for t, v, _ in got if v == f["version"] and t >= f["t"]]
        switch_s.append(round(min(after) - f["t"], 2) if after else None)
    sent = sum(len(a) for a in answers) + len(failures)
    lat_ms = [x * 1000 for x in latency]
    record("registry watcher under load", clients=CLIENTS, requests=sent, failures=len(failures),
           responses_per_version="/".join(f"{v}:{seen.get(v, 0)}" for v in sorted(offline)),
           flip_to_first_answer_s=switch_s, p50_ms=round(percentile(lat_ms, 50), 1),
           p99_ms=round(percentile(lat_ms, 99), 1), server_rss_mb=f"{rss_start:.1f} -> {rss_end:.1f}")
    assert not failures, failures[:5]
    assert set(seen) == set(offline) and all(s is not None for s in switch_s)
