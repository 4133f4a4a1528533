"""The public client (sync and async) against a real `salmon serve`: typed results, set specs, keys, 413s."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import yaml

from principles.schema import load_principle_set, parse_principle_set
from salmon_client import AsyncSalmonClient, RewardServiceError, SalmonClient
from tests.reliability.real_service import Wire
from tests.salmon_client.conftest import KEY, MAX_ITEMS

ITEMS = [("What time zone is Tokyo in?", "Japan Standard Time, UTC+9."),
         ("Name a prime.", "7"),
         ("What time zone is Tokyo in?", "Look it up yourself."),
         ([{"role": "user", "content": "Name a colour."}], "Blue.")]


def direct_scores(serve, items, **extra) -> dict:
    body = {"items": [{"prompt": p, "response": r} for p, r in items], **extra}
    r = httpx.post(serve.url + "/v1/score", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_sync_score_is_typed_and_equals_the_service(env):
    with SalmonClient() as client:  # URL and key from the environment only
        result = client.score(ITEMS, principle_set="concise")
        info = client.model_info()
    direct = direct_scores(env, ITEMS, principle_set="concise")
    assert result.scores == pytest.approx(direct["scores"], abs=1e-5)
    concise = load_principle_set("concise")
    assert result.principle_set == concise.ref == direct["principle_set"]
    assert result.principle_set_hash == concise.hash
    assert result.model_version == info["model_version"] == direct["model_version"]
    assert result.scorer == "contrastive" and result.requests >= 1


def test_async_client_is_the_same_client(env):
    async def go():
        async with AsyncSalmonClient(env.url) as client:
            return await client.score([{"prompt": p, "response": r} for p, r in ITEMS])

    result = asyncio.run(go())
    direct = direct_scores(env, ITEMS)  # no set: the service's default
    assert result.scores == pytest.approx(direct["scores"], abs=1e-5)
    assert result.principle_set == load_principle_set("concise").ref


def test_set_from_a_file_is_registered_once_and_named_by_hash(env, tmp_path):
    data = {"name": "file-set", "description": "from a file", "principles": [
        {"name": "brief", "definition": "The response is brief.", "negative_definition": "The response rambles."}]}
    path = tmp_path / "file-set.yaml"
    path.write_text(yaml.safe_dump(data))
    pset = parse_principle_set(data)
    wire = Wire()
    with SalmonClient(transport=wire) as client:
        first = client.score(ITEMS[:2], principle_set=path)
        second = client.score(ITEMS[:2], principle_set=str(path))
    assert first.principle_set == second.principle_set == pset.ref
    assert [c["path"] for c in wire.calls if c["method"] == "PUT"] == ["/v1/principle-sets/file-set"]
    assert first.scores == pytest.approx(direct_scores(env, ITEMS[:2], principle_set=pset.ref)["scores"], abs=1e-5)


def test_inline_principles(env):
    principles = [{"name": "polite", "definition": "The response is polite.",
                   "negative_definition": "The response is rude."}]
    with SalmonClient() as client:
        result = client.score(ITEMS, principles=principles)
    assert result.principle_set.startswith("inline@")
    assert result.scores == pytest.approx(direct_scores(env, ITEMS, principles=principles)["scores"], abs=1e-5)


def test_a_413_is_split_and_remembered_for_later_calls(env):
    wire = Wire()
    items = [("One prompt for all.", f"answer {i}") for i in range(2 * MAX_ITEMS)]
    with SalmonClient(max_items=2 * MAX_ITEMS, transport=wire) as client:  # told more than the service takes
        first = client.score(items)
        first_calls = [c["status"] for c in wire.calls if c["path"] == "/v1/score"]
        second = client.score(items)
        second_calls = [c["status"] for c in wire.calls if c["path"] == "/v1/score"][len(first_calls):]
        learned = client.aio.learned_max_items
    assert first.scores == pytest.approx(second.scores, abs=1e-5)
    assert first_calls == [413, 200, 200]
    assert second_calls == [200, 200]  # no second 413: the smaller size was kept
    assert learned == MAX_ITEMS


def test_key_from_the_environment_and_errors_in_the_services_words(env, monkeypatch):
    with SalmonClient() as client:
        with pytest.raises(RewardServiceError) as bad:
            client.score([([{"role": "assistant", "content": "hi"}], "x")])
        with pytest.raises(RewardServiceError) as unknown:
            client.score(ITEMS[:1], principle_set="no-such-set")
    assert bad.value.status == 422 and not bad.value.retryable and "items.0" in str(bad.value)
    assert unknown.value.status == 404 and "not registered" in str(unknown.value)
    monkeypatch.delenv("SALMON_API_KEY")
    with SalmonClient() as client, pytest.raises(RewardServiceError) as no_key:
        client.score(ITEMS[:1])
    assert no_key.value.status == 401 and "missing API key" in str(no_key.value)


def test_the_sync_client_serves_several_threads(env):
    from concurrent.futures import ThreadPoolExecutor

    with SalmonClient() as client, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda it: client.score([it]).scores[0], ITEMS))
    assert results == pytest.approx(direct_scores(env, ITEMS)["scores"], abs=1e-5)


def test_mode_goes_to_the_service_and_its_scores_come_back(env):
    with SalmonClient() as client:
        listwise = client.score(ITEMS, principle_set="concise", mode="listwise")
        pointwise = client.score(ITEMS, principle_set="concise")
    direct = direct_scores(env, ITEMS, principle_set="concise", mode="listwise")
    assert listwise.scores == pytest.approx(direct["scores"], abs=1e-5)
    # listwise shows the other candidates of a prompt, so its scores are not the pointwise ones
    assert listwise.scores != pytest.approx(pointwise.scores, abs=1e-5)
    with SalmonClient() as client, pytest.raises(RewardServiceError, match="not a mode"):
        client.score(ITEMS, principle_set="concise", mode="bogus")
