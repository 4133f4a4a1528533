"""The reward client against a real HTTP server on loopback: packing, retries, errors, protocols."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import pytest
from conftest import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from pt_fakes import rule_score

from principles.schema import load_principle_set
from salmon_client.client import (
    AsyncSalmonClient,
    Group,
    RetryPolicy,
    RewardServiceError,
    parse_retry_after,
    plan_requests,
)

PATTERN, PENALTY = r"[aeiou]", 0.01


class Sleeps:
    """Records the waits the client asks for, and waits a token time (tests stay fast)."""

    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, s: float) -> None:
        self.waits.append(s)
        await asyncio.sleep(0)


def client_for(url: str, **kw) -> AsyncSalmonClient:
    kw.setdefault("retry", RetryPolicy(max_attempts=4, initial_backoff_s=0.1, max_backoff_s=1, jitter=0.5,
                                       budget_s=30, rng=random.Random(0)))
    return AsyncSalmonClient(url, **kw)


def run(coro):
    return asyncio.run(coro)


def groups_of(n_groups: int, size: int, key=None) -> list[Group]:
    return [Group(prompt=f"p{g}", responses=[f"answer {g}.{i} " + "ae" * i for i in range(size)],
                  principle_set=load_principle_set("concise").ref, key=key if key is not None else "k") for g in range(n_groups)]


# -- packing ----------------------------------------------------------------------------------------

def test_plan_keeps_groups_whole_in_fewest_requests():
    groups = groups_of(8, 4)
    plan = plan_requests(groups, max_items=16)
    assert len(plan) == 2  # 32 items, 16 per request
    for req in plan:
        assert all(e - s == 4 for _, s, e in req)  # every group whole


def test_plan_never_mixes_principle_selections():
    groups = groups_of(3, 2, key="a") + groups_of(3, 2, key="b")
    plan = plan_requests(groups, max_items=100)
    assert len(plan) == 2
    for req in plan:
        assert len({groups[g].key for g, _, _ in req}) == 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 12), st.sampled_from("abc")), min_size=1, max_size=20),
       max_items=st.integers(1, 16))
def test_plan_covers_every_item_once_within_limits(sizes, max_items):
    groups = [Group(prompt="p", responses=["r"] * n, key=k) for n, k in sizes]
    plan = plan_requests(groups, max_items)
    seen = [(g, i) for req in plan for g, s, e in req for i in range(s, e)]
    assert sorted(seen) == sorted((g, i) for g, (n, _) in enumerate(sizes) for i in range(n))
    for req in plan:
        assert sum(e - s for _, s, e in req) <= max_items
        assert len({groups[g].key for g, _, _ in req}) == 1
        for g, s, e in req:  # a group that fits is never split
            if len(groups[g].responses) <= max_items:
                assert (s, e) == (0, len(groups[g].responses))
    for key in "abc":  # fewest requests: first-fit decreasing never needs more than 2x the lower bound
        items = sum(n for n, k in sizes if k == key)
        reqs = sum(1 for req in plan if groups[req[0][0]].key == key)
        assert -(-items // max_items) <= reqs <= 2 * -(-items // max_items)


# -- backoff and Retry-After -----------------------------------------------------------------------

def test_backoff_grows_exponentially_within_jitter_and_cap():
    p = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4, jitter=0.5, rng=random.Random(1))
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 4.0)]:
        waits = [p.backoff(attempt) for _ in range(50)]
        assert all(base * 0.5 <= w <= base for w in waits)
        assert max(waits) - min(waits) > 0.1 * base  # jitter actually spreads retries


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= parse_retry_after(date) <= 5.5
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- against a live server --------------------------------------------------------------------------

def test_scores_in_order_with_server_limit_and_inline_principles(fake_service):
    # the server says max_items 256; force 5 to see packing on the wire
    client = client_for(fake_service.url, max_items=5)
    concise = load_principle_set("concise")
    inline = [{"name": p.name, "definition": p.definition} for p in concise.principles]
    groups = [Group(prompt=f"q{g}", responses=[f"resp {g} {i} " + "o" * (g + i) for i in range(2)],
                    principles=inline if g % 2 else None, principle_set=concise.ref,
                    key="inline" if g % 2 else "named") for g in range(6)]

    async def go():
        await client.register_set(concise)
        try:
            return await client.score_groups(groups)
        finally:
            await client.aclose()

    out = run(go())
    assert out == [[pytest.approx(rule_score(r, PATTERN, PENALTY)) for r in g.responses] for g in groups]
    calls = fake_service.recorder.scored()
    assert len(calls) == 4  # 6 items per kind, 2-item groups, 5 per request -> 2 + 2
    for c in calls:
        body = c["request"]
        assert len(body["items"]) <= 5
        assert ("principles" in body) != ("principle_set" in body)


def test_retries_5xx_and_429_honouring_retry_after(fake_service):
    # 500 (scoring failed) carries no Retry-After in the real contract: plain backoff; 429 does
    fake_service.faults.statuses[:] = [500, 429]
    fake_service.faults.retry_after = "0.7"
    sleeps = Sleeps()
    client = client_for(fake_service.url, sleep=sleeps)
    out = run(client.score_groups(groups_of(1, 2)))
    assert len(out[0]) == 2
    assert [c["status"] for c in fake_service.recorder.calls if c["path"] == "/v1/score"] == [500, 429, 200]
    assert len(sleeps.waits) == 2 and sleeps.waits[0] < 0.7 and sleeps.waits[1] >= 0.7
    assert client.last.retries == 2 and client.last.requests == 3


@pytest.mark.parametrize("status", [401, 403, 404, 413, 422])
def test_other_4xx_are_not_retried(fake_service, status):
    fake_service.faults.statuses[:] = [status, status, status]
    sleeps = Sleeps()
    client = client_for(fake_service.url, sleep=sleeps, max_items=1)
    groups = [Group(prompt="p", responses=["r"], principles=[{"name": "a", "definition": "b"}], key="k")]
    with pytest.raises(RewardServiceError) as ei:
        run(client.score_groups(groups))
    assert ei.value.status == status and not ei.value.retryable
    assert sleeps.waits == []
    assert len([c for c in fake_service.recorder.calls if c["path"] == "/v1/score"]) == 1


def test_time_governs_by_default_not_a_count_of_tries(monkeypatch):
    """With the default policy a dead URL is retried until the budget is spent, however many tries that is;
    the last wait is cut so the final try lands at the budget."""
    import salmon_client.client as rm_client_module

    url = f"http://127.0.0.1:{free_port()}"
    waited = [0.0]

    async def sleep(s: float) -> None:
        waited[0] += s
        await asyncio.sleep(0)

    class ClockOfWaits:  # the client's clock advances by the waits it asked for (the test stays fast)
        time = staticmethod(time.time)

        @staticmethod
        def monotonic() -> float:
            return real_monotonic() + waited[0]

    real_monotonic = time.monotonic
    monkeypatch.setattr(rm_client_module, "time", ClockOfWaits)
    policy = RetryPolicy(budget_s=90, rng=random.Random(0))
    assert policy.max_attempts is None
    client = AsyncSalmonClient(url, retry=policy, sleep=sleep, max_items=8)
    with pytest.raises(RewardServiceError) as ei:
        run(client.score_groups(groups_of(1, 2)))
    assert ei.value.attempts > 6  # more tries than a count cap of 6 would have allowed
    assert 89 <= waited[0] <= 90  # waited out the whole budget, never past it
    assert "retry budget 90 s)" in str(ei.value)


def test_a_read_timeout_does_not_spend_the_retry_budget(fake_service):
    """A loaded service answers one request past read_timeout_s; the budget starts at that failure, so the
    retry still happens even though the timeout alone is longer than the budget."""
    fake_service.faults.delays_s[:] = [2.0]
    policy = RetryPolicy(initial_backoff_s=0.05, budget_s=0.5, rng=random.Random(0))
    client = client_for(fake_service.url, retry=policy, read_timeout_s=0.8, max_items=8)
    out = run(client.score_groups(groups_of(1, 2)))
    assert len(out[0]) == 2
    assert client.last.requests == 2 and client.last.retries == 1  # the stalled try, then the one answered


def test_error_messages_carry_the_service_error_object(fake_service):
    fake_service.faults.statuses[:] = [422]
    client = client_for(fake_service.url, max_items=1)
    with pytest.raises(RewardServiceError) as ei:
        run(client.score_groups(groups_of(1, 1)))
    msg = str(ei.value)
    assert "HTTP 422: injected fault: HTTP 422 scripted by the test (invalid_request)" in msg
    assert "{" not in msg  # the message, not the raw body


def test_gives_up_after_attempts_naming_url_and_last_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sleeps = Sleeps()
    client = client_for(url, sleep=sleeps, max_items=8)
    with pytest.raises(RewardServiceError) as ei:
        run(client.score_groups(groups_of(1, 2)))
    msg = str(ei.value)
    assert url in msg and "ConnectError" in msg and "4 times" in msg
    assert len(sleeps.waits) == 3


def test_retry_after_beyond_budget_fails_now(fake_service):
    fake_service.faults.statuses[:] = [429]
    fake_service.faults.retry_after = "100"
    sleeps = Sleeps()
    client = client_for(fake_service.url, sleep=sleeps)
    with pytest.raises(RewardServiceError, match="HTTP 429"):
        run(client.score_groups(groups_of(1, 1)))
    assert sleeps.waits == []


def test_reregisters_a_set_the_service_forgot(fake_service):
    concise = load_principle_set("concise")
    client = client_for(fake_service.url)

    async def go():
        await client.register_set(concise)
        fake_service.recorder.app.state.sets.clear()  # as after a service restart
        return await client.score_groups([Group(prompt="p", responses=["abc"], principle_set=concise.ref,
                                                key="named")])

    assert run(go()) == [[pytest.approx(rule_score("abc", PATTERN, PENALTY))]]
    puts = [c for c in fake_service.recorder.calls if c["method"] == "PUT"]
    assert len(puts) == 2


def test_413_splits_the_request(fake_service):
    # the contract app enforces max_items=256; the client is told 400 (as if the limit shrank)
    client = client_for(fake_service.url, max_items=400)
    groups = groups_of(100, 3)
    out = run(client.score_groups(groups))
    assert [len(g) for g in out] == [3] * 100
    statuses = [c["status"] for c in fake_service.recorder.calls if c["path"] == "/v1/score"]
    assert statuses[0] == 413 and statuses.count(200) == 2


def test_openrlhf_get_reward_protocol(fake_service):
    def render(prompt, response):
        return f"<user>{prompt}</user><assistant>{response}</assistant>"

    client = client_for(fake_service.url, protocol="openrlhf", render_query=render)
    out = run(client.score_groups([Group(prompt="hi", responses=["aaa", "b"], principle_set="concise@abc",
                                         key="k")]))
    assert out == [[pytest.approx(rule_score(render("hi", r), PATTERN, PENALTY)) for r in ["aaa", "b"]]]
    call = fake_service.recorder.scored("/get_reward")[0]
    assert call["headers"]["x-principle-set"] == "concise@abc"
    assert call["request"]["query"][0] == render("hi", "aaa")


def test_bearer_keys_are_sent(fake_service):
    from conftest import loopback_server
    from pt_fakes import Recorder, contract_app

    rec = Recorder(contract_app(api_key="user-k", admin_key="admin-k"))
    srv = loopback_server(rec)
    try:
        good = client_for(srv.url, api_key="user-k", admin_key="admin-k")
        run(good.register_set(load_principle_set("concise")))
        assert run(good.score_groups(groups_of(1, 1)))[0]
        bad = client_for(srv.url, api_key="user-k")  # no admin key: registering is refused, not retried
        with pytest.raises(RewardServiceError) as ei:
            run(bad.register_set(load_principle_set("concise")))
        assert ei.value.status == 403
    finally:
        srv.stop()
