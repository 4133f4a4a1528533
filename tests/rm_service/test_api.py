"""The HTTP contract against a real uvicorn on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import json

import httpx
import pytest

from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread

PRINCIPLE = {"name": "polite", "definition": "The response is polite.", "negative_definition": "The response is rude."}
ITEMS = [{"prompt": "What time zone is Tokyo in?", "response": "Tokyo uses Japan Standard Time, UTC+9."},
         {"prompt": "What time zone is Tokyo in?", "response": "Look it up yourself."},
         {"prompt": [{"role": "user", "content": "Name a prime."}], "response": "7"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    st = ServiceSettings(port=0, model=str(tiny_model_dir), scorer="contrastive", max_items=8,
                         max_queue_items=16, max_body_bytes=64 * 1024, max_prompt_tokens=64)
    with ServerThread(st) as srv:
        yield srv


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def test_score_shape_and_one_score_per_item(server):
    r = post(server, "/v1/score", {"items": ITEMS, "principles": [PRINCIPLE]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["scores"]) == 3 and all(isinstance(s, float) for s in body["scores"])
    assert body["model_version"].startswith("contrastive:") and body["scorer"] == "contrastive"
    assert body["principle_set"] == f"inline@{body['principle_set_hash']}"
    assert body["usage"]["tokens"] > 0


def test_batched_scores_equal_one_at_a_time(server):
    batched = post(server, "/v1/score", {"items": ITEMS, "principle_set": "hhh"}).json()["scores"]
    single = [post(server, "/v1/score", {"items": [it], "principle_set": "hhh"}).json()["scores"][0] for it in ITEMS]
    assert batched == pytest.approx(single, abs=1e-4)


def test_default_and_named_sets_and_hash_refs(server):
    sets = httpx.get(server.url + "/v1/principle-sets").json()
    names = {s["name"]: s for s in sets["principle_sets"]}
    assert sets["default"] == "hhh" and {"hhh", "rm", "concise"} <= set(names)
    default = post(server, "/v1/score", {"items": ITEMS[:1]}).json()
    assert default["principle_set"] == names["hhh"]["ref"]
    pinned = post(server, "/v1/score", {"items": ITEMS[:1], "principle_set": names["hhh"]["ref"]}).json()
    assert pinned["scores"] == default["scores"]


def test_unknown_set_is_404_with_a_hint(server):
    r = post(server, "/v1/score", {"items": ITEMS[:1], "principle_set": "no-such-set"})
    assert r.status_code == 404 and "GET /v1/principle-sets" in r.json()["error"]["message"]
    r = post(server, "/v1/score", {"items": ITEMS[:1], "principle_set": "hhh@000000000000"})
    assert r.status_code == 404 and "current content of 'hhh' is hhh@" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, where", [
    ({"items": []}, "items"),
    ({"items": [{"prompt": "x"}]}, "items.0.response"),
    ({"items": [{"prompt": "x", "response": 3}]}, "items.0.response"),
    ({"items": [{"prompt": "x", "response": "y", "extra": 1}]}, "items.0.extra"),
    ({"items": ITEMS[:1], "principles": []}, "principles"),
    ({"items": ITEMS[:1], "principles": [PRINCIPLE], "negate": ["nope"]}, "negate"),
    ({"items": [{"prompt": [{"role": "robot", "content": "x"}], "response": "y"}]}, "items.0.prompt"),
    ({"items": [{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "response": "z"}]}, "items.0"),
    ({"items": ITEMS[:1], "principles": [{"name": "a", "definition": "d"}], "negate": ["a"]}, "items.0"),
])
def test_bad_input_is_422_and_says_what_to_fix(server, body, where):
    r = post(server, "/v1/score", body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == 422 and err["param"].startswith(where) and len(err["message"]) > 10


def test_invalid_json_and_utf8_are_422(server):
    for raw in (b'{"items": [', b'\xff\xfe{"items": 1}', b"[]"):
        r = httpx.post(server.url + "/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert r.json()["error"]["message"]


def test_limits_413_and_429(server):
    r = post(server, "/v1/score", {"items": ITEMS * 3})
    assert r.status_code == 413 and "limit is 8" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/score", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413
    long_prompt = " ".join(["token"] * 300)
    r = post(server, "/v1/score", {"items": [{"prompt": long_prompt, "response": "ok"}], "truncate": False})
    assert r.status_code == 422 and "truncate" in r.json()["error"]["message"]
    r = post(server, "/v1/score", {"items": [{"prompt": long_prompt, "response": "ok"}]})
    assert r.status_code == 200 and r.json()["truncated"] == [0]


def test_queue_full_is_429_with_retry_after(tiny_model_dir):
    st = ServiceSettings(port=0, scorer="rule", max_queue_items=2, max_items=8)
    with ServerThread(st) as srv:
        r = post(srv, "/v1/score", {"items": ITEMS})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "queue is full" in r.json()["error"]["message"]


def test_principle_set_hot_swap_keeps_old_hash_reachable(server):
    v1 = {"name": "swap", "description": "", "principles": [PRINCIPLE]}
    r = httpx.put(server.url + "/v1/principle-sets/swap", json=v1)
    assert r.status_code == 201
    ref1 = r.json()["ref"]
    s1 = post(server, "/v1/score", {"items": ITEMS[:2], "principle_set": "swap"}).json()
    v2 = {**v1, "principles": [{**PRINCIPLE, "definition": "The response is extremely detailed and long."}]}
    r = httpx.put(server.url + "/v1/principle-sets/swap", json=v2)
    assert r.status_code == 200 and r.json()["ref"] != ref1
    s2 = post(server, "/v1/score", {"items": ITEMS[:2], "principle_set": "swap"}).json()
    assert s2["principle_set"] == r.json()["ref"] and s2["scores"] != s1["scores"]
    again = post(server, "/v1/score", {"items": ITEMS[:2], "principle_set": ref1}).json()
    assert again["scores"] == pytest.approx(s1["scores"], abs=1e-5)
    got = httpx.get(server.url + "/v1/principle-sets/swap").json()
    assert got["ref"] == r.json()["ref"] and got["principles"][0]["definition"].startswith("The response is extremely")
    bad = httpx.put(server.url + "/v1/principle-sets/swap", json={"principles": [{"name": "x"}]})
    assert bad.status_code == 422 and "definition" in bad.json()["error"]["message"]
    assert httpx.delete(server.url + "/v1/principle-sets/swap").status_code == 204
    assert post(server, "/v1/score", {"items": ITEMS[:1], "principle_set": "swap"}).status_code == 404
    assert httpx.delete(server.url + "/v1/principle-sets/hhh").status_code == 409


def test_openrlhf_get_reward_shape(server, embedded_tokenizer):
    texts = [embedded_tokenizer.apply_chat_template(
        [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["response"]}], tokenize=False)
        for it in ITEMS[:2]]
    r = post(server, "/get_reward", {"query": texts, "prompts": ["p1", "p2"], "labels": [None, None]},
             headers={"X-Principle-Set": "concise"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["rewards"]) == 2 and body["rewards"] == body["scores"]
    assert body["extra_logs"]["principle_set"].startswith("concise@")
    # The same items through /v1/score give the same numbers (the query was parsed back into turns).
    direct = post(server, "/v1/score", {"items": ITEMS[:2], "principle_set": "concise"}).json()["scores"]
    assert body["rewards"] == pytest.approx(direct, abs=1e-4)
    assert post(server, "/get_reward", {"query": ["no template here"]}).status_code == 422


def test_health_ready_model_and_metrics(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    info = httpx.get(server.url + "/v1/model").json()
    assert info["limits"]["max_items"] == 8 and info["prompt_format_version"] == "salmon-rm-v1"
    text = httpx.get(server.url + "/metrics").text
    for name in ("salmon_requests_total", "salmon_request_latency_seconds", "salmon_batch_items",
                 "salmon_tokens_per_second", "salmon_queue_items"):
        assert name in text
    assert httpx.get(server.url + "/nope").json()["error"]["code"] == 404


def test_auth_api_key_and_admin_key(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SALMON_API_KEY", "user-key")
    monkeypatch.setenv("SALMON_ADMIN_KEY", "admin-key")
    with ServerThread(ServiceSettings(port=0, scorer="rule")) as srv:
        body = {"items": ITEMS[:1]}
        assert httpx.get(srv.url + "/healthz").status_code == 200  # health stays open
        assert post(srv, "/v1/score", body).status_code == 401
        assert post(srv, "/v1/score", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(srv, "/v1/score", body, headers={"Authorization": "Bearer user-key"}).status_code == 200
        put = {"name": "x", "principles": [PRINCIPLE]}
        r = httpx.put(srv.url + "/v1/principle-sets/x", json=put, headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
        r = httpx.put(srv.url + "/v1/principle-sets/x", json=put, headers={"Authorization": "Bearer admin-key"})
        assert r.status_code == 201
        r = httpx.post(srv.url + "/v1/admin/reload", headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 403
        assert httpx.get(srv.url + "/metrics").status_code == 401


def test_openapi_spec_is_served(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/score", "/get_reward", "/v1/principle-sets/{name}", "/v1/admin/reload"} <= set(spec["paths"])
    json.dumps(spec)
