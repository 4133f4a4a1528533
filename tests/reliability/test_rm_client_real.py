"""The reward client against the REAL service (`salmon serve` child processes), for every path it claims.

- a full queue: the service's 429 and its Retry-After are honoured, then the batch is scored;
- a 413: the client is told a larger limit than the service has; it splits and every item is scored;
- a restart (SIGKILL, new process on the same port) that forgot a set registered over HTTP: the
  client registers it again and scores;
- a 503 while the model loads: its Retry-After is honoured and the call succeeds once loaded;
- error bodies: the client's message carries the service's own error message, type and param.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from principles.schema import load_principle_set, parse_principle_set
from salmon_client.client import AsyncSalmonClient, Group, RetryPolicy, RewardServiceError
from tests.policy_trainer.pt_fakes import rule_score
from tests.reliability.helpers import record
from tests.reliability.real_service import RULE_PATTERN, RULE_PENALTY, RULE_SETTINGS, Serve, Wire


class Sleeps:
    """The waits the client asks for, really waited (the service's timing is real)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, s: float) -> None:
        self.waits.append(s)
        await asyncio.sleep(s)


def client(url: str, wire: Wire, sleeps: Sleeps, **kw) -> AsyncSalmonClient:
    kw.setdefault("retry", RetryPolicy(budget_s=60, initial_backoff_s=0.1, max_backoff_s=1, rng=random.Random(0)))
    return AsyncSalmonClient(url, transport=wire, sleep=sleeps, **kw)


def groups(n: int, size: int, ref: str) -> list[Group]:
    return [Group(prompt=f"question {g}", responses=[f"answer {g}.{i} " + "ea" * i for i in range(size)],
                  principle_set=ref, key="k") for g in range(n)]


def expected(gs: list[Group]) -> list[list[float]]:
    return [[pytest.approx(rule_score(r, RULE_PATTERN, RULE_PENALTY), abs=1e-5) for r in g.responses] for g in gs]


KEY = "user-key"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One service for the queue, 413 and error-body cases (each start costs seconds): a queue of 4 items,
    4 items per request, and a worker that holds a taken job for batch_wait_ms while it still counts
    against the queue, so a request that arrives meanwhile finds the queue full."""
    settings = {**RULE_SETTINGS, "max_queue_items": 4, "max_items": 4, "batch_wait_ms": 1500}
    with Serve(tmp_path_factory.mktemp("serve"), settings, env={"SALMON_API_KEY": KEY}) as srv:
        yield srv


async def _score(c: AsyncSalmonClient, gs: list[Group]) -> list[list[float]]:
    try:
        return await c.score_groups(gs)
    finally:
        await c.aclose()


def test_full_queue_429_retry_after_honoured(shared):
    wire, sleeps = Wire(), Sleeps()
    gs = groups(2, 4, load_principle_set("concise").ref)
    out = asyncio.run(_score(client(shared.url, wire, sleeps, api_key=KEY, max_concurrent_requests=2), gs))
    assert out == expected(gs)
    score_calls = [c for c in wire.calls if c["path"] == "/v1/score"]
    full = [c for c in score_calls if c["status"] == 429]
    assert full, [c["status"] for c in score_calls]
    assert "queue is full" in full[0]["response"]["error"]["message"]
    retry_after = float(full[0]["retry_after"])
    assert retry_after >= 1 and sleeps.waits and min(sleeps.waits) >= retry_after  # every retry waited it out
    retried = [c for c in score_calls if c["t0"] > full[0]["t1"]]
    assert retried and retried[0]["t0"] - full[0]["t1"] >= retry_after
    assert len(wire.scored()) == 2  # each request scored once, none dropped
    record("client vs real full queue", statuses=[c["status"] for c in score_calls], retry_after_s=retry_after,
           waits_s=[round(w, 2) for w in sleeps.waits])


def test_413_from_the_real_service_splits_and_scores_everything(shared):
    wire, sleeps = Wire(), Sleeps()
    gs = groups(3, 3, load_principle_set("concise").ref)  # 9 items; the client believes 6 fit, the service 4
    out = asyncio.run(_score(client(shared.url, wire, sleeps, api_key=KEY, max_items=6,
                                    max_concurrent_requests=1), gs))
    assert out == expected(gs)
    statuses = [c["status"] for c in wire.calls if c["path"] == "/v1/score"]
    too_large = [c for c in wire.calls if c["status"] == 413]
    assert too_large and too_large[0]["response"]["error"]["param"] == "items"
    assert statuses.count(200) == 3 and all(s in (200, 413) for s in statuses)
    assert sum(len(c["request"]["items"]) for c in wire.scored()) == 9  # every item once
    assert sleeps.waits == []  # a 413 is split, not retried
    record("client vs real 413", statuses=statuses)


def test_restart_that_forgot_a_registered_set_reregisters(tmp_path):
    pset = parse_principle_set({"name": "kill-test", "principles": [
        {"name": "brief", "definition": "The response is brief and answers the question."}]})
    gs = groups(1, 2, pset.ref)
    wire, sleeps = Wire(), Sleeps()
    first_srv = Serve(tmp_path, RULE_SETTINGS)
    c = client(first_srv.url, wire, sleeps)
    restarted: list[Serve] = []

    def kill_and_restart() -> None:  # what an orchestrator does: the process dies, a new one takes the port
        first_srv.kill()
        first_srv.__exit__()
        restarted.append(Serve(tmp_path, RULE_SETTINGS, port=first_srv.port).__enter__())

    async def go():
        await c.register_set(pset)
        first = await c.score_groups(gs)
        await asyncio.to_thread(kill_and_restart)
        try:
            return first, await c.score_groups(gs)
        finally:
            await c.aclose()

    with first_srv:
        try:
            first, second = asyncio.run(go())
        finally:
            for srv in restarted:
                srv.__exit__()
    assert first == second == expected(gs)
    seq = [(c_["method"], c_["status"]) for c_ in wire.calls if c_["path"] != "/v1/model"]
    # a stale pooled connection to the dead process may cost one transport error first
    seq_ok = [x for x in seq if x[1] is not None]
    assert seq_ok == [("PUT", 201), ("POST", 200), ("POST", 404), ("PUT", 201), ("POST", 200)], seq
    forgot = next(c_ for c_ in wire.calls if c_["status"] == 404)
    assert forgot["response"]["error"]["type"] == "not_found" and "kill-test" in forgot["response"]["error"]["message"]
    record("client vs real restart (forgotten set)", sequence=seq)


def test_503_while_loading_honours_retry_after(tmp_path, tiny_model_dir):
    wire, sleeps = Wire(), Sleeps()
    settings = {"scorer": "contrastive", "model": str(tiny_model_dir), "default_principle_set": "concise",
                "watch_registry": False}
    with Serve(tmp_path, settings, ready_path="/healthz") as srv:  # up, model not necessarily loaded
        gs = groups(1, 2, load_principle_set("concise").ref)
        out = asyncio.run(_score(client(srv.url, wire, sleeps, max_items=8), gs))
    assert [len(row) for row in out] == [2]
    loading = [c for c in wire.calls if c["status"] == 503]
    if not loading:
        pytest.skip("the tiny model loaded before the first request; no 503 to honour")
    assert "loading" in loading[0]["response"]["error"]["message"]
    assert loading[0]["response"]["error"]["type"] == "not_ready"
    retry_after = float(loading[0]["retry_after"])
    assert sleeps.waits[0] >= retry_after
    record("client vs real 503 loading", statuses=[c["status"] for c in wire.calls], retry_after_s=retry_after,
           waits_s=[round(w, 2) for w in sleeps.waits])


def test_real_error_bodies_are_shown_in_the_clients_messages(shared):
    wire, sleeps = Wire(), Sleeps()
    with pytest.raises(RewardServiceError) as unknown:
        asyncio.run(_score(client(shared.url, wire, sleeps, api_key=KEY, max_items=4),
                           groups(1, 1, "no-such-set@0123")))
    with pytest.raises(RewardServiceError) as no_key:
        asyncio.run(_score(client(shared.url, Wire(), sleeps, max_items=4), groups(1, 1, "concise")))
    err = wire.calls[0]["response"]["error"]
    msg = str(unknown.value)
    assert unknown.value.status == 404 and err["message"] in msg and "(not_found, param principle_set)" in msg, msg
    assert no_key.value.status == 401 and "(unauthorized)" in str(no_key.value)
    assert "missing API key" in str(no_key.value)
    assert "{" not in msg and sleeps.waits == []
    record("client vs real error bodies", not_found=msg[:160], unauthorized=str(no_key.value)[:160])
