"""Load: many concurrent clients for a bounded time on loopback.

Guarantee: under overload the only errors are the intended 429s (with Retry-After), which clients
retry with backoff until they succeed; every logical request ends with its scores; latency p50/p99
is reported; the server's memory stays bounded (the queue is bounded, nothing grows per request).
The server is a `salmon serve` child process, so the RSS measured is the server's alone.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest

from tests.reliability.helpers import ServeProcess, assert_error_body, metric, percentile, record

CLIENTS = 32
RETRY_BUDGET_S = 30.0


async def _client(url: str, body: dict, deadline: float, max_requests: int, stats: dict, rng: random.Random):
    """One RL-style client: sends until the deadline; on 429 waits max(backoff, Retry-After) + jitter and retries.

    The retry budget is time, as the trainer's RewardClient's is: 32 clients on a queue that holds two
    requests can lose the race several times in a row without anything being wrong, but a client that
    cannot get through in RETRY_BUDGET_S is starved, and that is a failure.
    """
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for _ in range(max_requests):
            if time.monotonic() >= deadline:
                return
            t0 = time.perf_counter()
            attempt = 0
            while True:
                attempt += 1
                r = await c.post("/v1/score", json=body)
                stats["sent"] += 1
                if r.status_code == 200:
                    scores = r.json()["scores"]
                    if len(scores) != len(body["items"]):
                        stats["errors"].append(f"{len(scores)} scores for {len(body['items'])} items")
                    stats["ok"] += 1
                    stats["latency"].append(time.perf_counter() - t0)
                    break
                if r.status_code != 429:
                    stats["errors"].append(f"{r.status_code}: {r.text[:200]}")
                    break
                stats["429"] += 1
                assert_error_body(r)
                if time.perf_counter() - t0 > RETRY_BUDGET_S:
                    stats["gave_up"] += 1
                    break
                retry_after = float(r.headers["Retry-After"])
                backoff = min(2.0, 0.05 * 2 ** (attempt - 1))
                await asyncio.sleep(min(retry_after, 2.0) * rng.uniform(0.5, 1.0) + backoff * rng.random())


def _drive(url: str, body: dict, seconds: float, max_requests: int, sample_rss) -> dict:
    stats = {"sent": 0, "ok": 0, "429": 0, "gave_up": 0, "errors": [], "latency": [], "rss": []}
    stop = threading.Event()

    def sampler():
        while not stop.wait(0.25):
            stats["rss"].append(sample_rss())

    th = threading.Thread(target=sampler, daemon=True)
    th.start()

    async def main():
        deadline = time.monotonic() + seconds
        await asyncio.gather(*[_client(url, body, deadline, max_requests, stats, random.Random(i))
                               for i in range(CLIENTS)])

    t0 = time.monotonic()
    asyncio.run(main())
    stats["wall_s"] = time.monotonic() - t0
    stop.set()
    th.join()
    return stats


def _check_and_report(name: str, srv: ServeProcess, stats: dict, rss0: float, queue_limit: int) -> None:
    rss = stats["rss"] or [srv.rss_mb()]
    half = rss[len(rss) // 2:]
    lat_ms = [x * 1000 for x in stats["latency"]]
    m = httpx.get(srv.url + "/metrics").text
    served_429 = metric(m, 'salmon_requests_total{endpoint="/v1/score",status="429"}')
    served_5xx = sum(metric(m, f'salmon_requests_total{{endpoint="/v1/score",status="{s}"}}') for s in (500, 503))
    record(name, clients=CLIENTS, seconds=round(stats["wall_s"], 1), requests_sent=stats["sent"],
           succeeded=stats["ok"], http_429_retried=stats["429"], failures=len(stats["errors"]) + stats["gave_up"],
           server_5xx=int(served_5xx), p50_ms=round(percentile(lat_ms, 50), 1), p99_ms=round(percentile(lat_ms, 99), 1),
           rss_start_mb=round(rss0, 1), rss_max_mb=round(max(rss), 1), rss_growth_2nd_half_mb=round(max(half) - min(half), 1))
    assert not stats["errors"], stats["errors"][:5]
    assert stats["gave_up"] == 0
    assert served_5xx == 0 and served_429 == stats["429"]
    assert stats["ok"] >= CLIENTS  # every client got through at least once
    # Memory is bounded: after warm-up, RSS does not keep growing with requests.
    assert max(half) - min(half) < 48, rss
    assert max(rss) - rss0 < 128, rss
    assert metric(m, "salmon_queue_items") <= queue_limit


def test_32_clients_rule_scorer_overload_only_429s_that_retry(tmp_path):
    """The rule scorer (no model) with a tiny queue: 32 clients overload it on purpose."""
    queue = 16
    with ServeProcess(tmp_path, {"scorer": "rule", "max_queue_items": queue, "batch_wait_ms": 5}) as srv:
        body = {"items": [{"prompt": "Say please.", "response": f"please, please {i}"} for i in range(8)]}
        rss0 = srv.rss_mb()
        stats = _drive(srv.url, body, seconds=8, max_requests=400, sample_rss=srv.rss_mb)
        _check_and_report("load: 32 clients, rule scorer, queue of 16 items", srv, stats, rss0, queue)
        assert stats["429"] > 0, "the queue was never full: the overload path was not exercised"


@pytest.mark.slow
def test_32_clients_tiny_model_with_prefix_cache(tmp_path, tiny_model_dir):
    """The tiny transformer (real tokenizer, real batching and prefix cache), one torch thread."""
    queue = 32
    settings = {"scorer": "contrastive", "model": str(tiny_model_dir), "max_queue_items": queue,
                "num_threads": 1, "prefix_cache_bytes": 8 * 2**20}
    with ServeProcess(tmp_path, settings) as srv:
        body = {"items": [{"prompt": "Name a prime number.", "response": r} for r in ("7", "Eleven.")],
                "principle_set": "hhh"}
        httpx.post(srv.url + "/v1/score", json=body, timeout=60).raise_for_status()  # warm-up
        rss0 = srv.rss_mb()
        stats = _drive(srv.url, body, seconds=8, max_requests=200, sample_rss=srv.rss_mb)
        _check_and_report("load: 32 clients, tiny model, queue of 32 items", srv, stats, rss0, queue)
