"""POST /v1/generate against a real uvicorn on 127.0.0.1 with the tiny model: JSON and SSE, limits, errors, auth."""

from __future__ import annotations

import json

import httpx
import pytest

from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread

PRINCIPLE = {"name": "polite", "definition": "The response is polite.", "negative_definition": "The response is rude."}
FAST = {"max_new_tokens": 8, "time_budget_s": 20, "options": {"max_expansions": 4, "min_segment_tokens": 2,
                                                              "commit_visits": 3}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    st = ServiceSettings(port=0, model=str(tiny_model_dir), scorer="contrastive", max_items=8, max_principles=2,
                         max_messages=4, generate_max_new_tokens=16, generate_max_expansions=8,
                         generate_max_time_s=30, max_prompt_tokens=64)
    with ServerThread(st) as srv:
        yield srv


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/generate", json=body, timeout=60, **kw)


def events(text: str) -> list[tuple[str, dict]]:
    """Parse an SSE body: every event is 'event: name', 'data: json', then a blank line."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        out.append((lines[0][7:], json.loads(lines[1][6:])))
    return out


def test_rain_json_response_and_its_budgets(server):
    r = post(server, {"prompt": "Say hello.", "principles": [PRINCIPLE], "seed": 1, **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    st = body["stats"]
    assert body["search"] == "rain" and body["scorer"] == "contrastive"
    assert body["principle_set"] == f"inline@{body['principle_set_hash']}"
    assert body["usage"]["completion_tokens"] == st["tokens_committed"] <= 8
    assert st["iterations"] <= 4 and st["value_evaluations"] >= st["expansions"] >= 1
    assert body["finish_reason"] == st["stopped"] and isinstance(body["text"], str)
    again = post(server, {"prompt": "Say hello.", "principles": [PRINCIPLE], "seed": 1, **FAST}).json()
    assert again["text"] == body["text"]  # seeded: the same request gives the same text


def test_rain_reads_plain_string_principles(server):
    """The contrastive scorer values a plain principle against generic instructions: no negation needed."""
    r = post(server, {"prompt": "Say hello.", "principles": ["Answer in one sentence."], "seed": 1, **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["stats"]["value_evaluations"] >= 1


def test_plain_sampling_is_the_same_endpoint_without_search(server):
    r = post(server, {"prompt": "Say hello.", "principle_set": "hhh", "search": "none", "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    st = r.json()["stats"]
    assert st["search"] == "none" and st["expansions"] == 0 and st["tokens_committed"] <= 6
    assert r.json()["principle_set"].startswith("hhh@")


def test_stream_is_server_sent_events_ending_in_done(server):
    with httpx.stream("POST", server.url + "/v1/generate", timeout=60,
                      json={"prompt": "Say hello.", "principles": [PRINCIPLE], "stream": True, "seed": 2,
                            **FAST}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    evs = events(text)
    names = [n for n, _ in evs]
    assert names[-1] == "done" and set(names[:-1]) <= {"segment"}
    segments = [d for n, d in evs if n == "segment"]
    assert [d["index"] for d in segments] == list(range(len(segments)))
    done = evs[-1][1]
    assert "".join(d["text"] for d in segments) == done["text"]
    assert done["stats"]["commits"] >= len(segments)


def test_stream_errors_before_it_starts_are_ordinary_error_responses(server):
    r = post(server, {"prompt": "x", "principle_set": "no-such-set", "stream": True})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == "principle_set"


@pytest.mark.parametrize("body, status, param", [
    ({"principles": [PRINCIPLE]}, 422, "prompt"),
    ({"prompt": "x", "search": "beam"}, 422, "search"),
    ({"prompt": "x", "extra": 1}, 422, "extra"),
    ({"prompt": "x", "max_new_tokens": 17}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "x", "time_budget_s": 31}, 422, "time_budget_s"),
    ({"prompt": "x", "options": {"max_expansions": 9}}, 422, "options.max_expansions"),
    ({"prompt": "x", "options": {"min_segment_tokens": 9, "max_segment_tokens": 2}}, 422, "options"),
    ({"prompt": "x", "options": {"unknown_knob": 1}}, 422, "options.unknown_knob"),
    ({"prompt": "x", "principles": [PRINCIPLE], "negate": ["nope"]}, 422, "negate"),
    ({"prompt": [{"role": "assistant", "content": "hi"}]}, 422, "prompt"),
    ({"prompt": "x", "principles": [PRINCIPLE, PRINCIPLE, PRINCIPLE]}, 413, "principles"),
    ({"prompt": [{"role": "user", "content": "x"}] * 5}, 413, "prompt"),
    ({"prompt": "x", "principle_set": "hhh@000000000000"}, 404, "principle_set"),
])
def test_bad_input_is_4xx_with_the_error_body(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["param"].startswith(param) and len(err["message"]) > 10


def test_a_second_generation_beyond_the_concurrency_is_429(tiny_model_dir):
    import threading

    st = ServiceSettings(port=0, model=str(tiny_model_dir), scorer="contrastive", generate_concurrency=1)
    with ServerThread(st) as srv:
        slow = {"prompt": "Say hello.", "principle_set": "hhh", "max_new_tokens": 64, "time_budget_s": 3,
                "options": {"max_expansions": 256, "commit_visits": 1000, "rewind_after": 10_000, "min_segment_tokens": 1,
                            "max_segment_tokens": 1}}
        started = threading.Event()

        def hold_the_slot():
            started.set()
            while post(srv, slow).status_code == 429:  # a probe below may have held the slot first
                pass

        t = threading.Thread(target=hold_the_slot)
        t.start()
        started.wait()
        try:
            seen = None
            for _ in range(100):  # until the slow one holds the slot
                r = post(srv, {"prompt": "x", "search": "none", "max_new_tokens": 2})
                if r.status_code == 429:
                    seen = r
                    break
            assert seen is not None and "Retry-After" in seen.headers
            assert seen.json()["error"]["type"] == "overloaded"
            # Scoring is served while the generation runs: its value calls share the batcher.
            score = httpx.post(srv.url + "/v1/score", json={"items": [{"prompt": "x", "response": "y"}]}, timeout=30)
            assert score.status_code == 200
        finally:
            t.join()


def test_auth_is_the_api_key(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SALMON_API_KEY", "k-test")
    st = ServiceSettings(port=0, model=str(tiny_model_dir), scorer="contrastive")
    with ServerThread(st) as srv:
        body = {"prompt": "x", "search": "none", "max_new_tokens": 2}
        r = post(srv, body)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert post(srv, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(srv, body, headers={"Authorization": "Bearer k-test"}).status_code == 200


def test_the_route_is_in_the_openapi_description(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/generate" in spec["paths"]
    assert "GenerateRequest" in spec["components"]["schemas"]


def test_cli_generate_streams_text_then_stats(tiny_model_dir, capsys):
    from salmon_cli.main import main

    rc = main(["generate", "--model", str(tiny_model_dir), "--scorer", "contrastive", "--prompt", "Say hello.",
               "--principles", "concise", "--rain", "--max-new-tokens", "6", "--max-expansions", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    stats = json.loads(out.strip().splitlines()[-1].removeprefix("stats: "))
    assert stats["search"] == "rain" and stats["iterations"] <= 3 and stats["tokens_committed"] <= 6


@pytest.mark.parametrize("argv, says", [
    (["--principles", "no-such-set"], "--principles"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--negate", "nope"], "--negate"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_model_dir, capsys, argv, says):
    from salmon_cli.main import main

    rc = main(["generate", "--model", str(tiny_model_dir), "--scorer", "contrastive", "--prompt", "x", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("salmon generate: error:") and says in err[-1]


@pytest.mark.slow
def test_rain_on_the_embedded_model_streams_a_valued_answer():
    """The real SmolLM2-135M behind the service: a short RAIN search, streamed, within its budgets."""
    principle = {"name": "no_price", "definition": "The response never mentions a price or amount of money.",
                 "negative_definition": "The response states prices and amounts of money."}
    with ServerThread(ServiceSettings(port=0, request_timeout_s=120)) as srv:
        with httpx.stream("POST", srv.url + "/v1/generate", timeout=120, json={
                "prompt": "How much does a new iPhone cost?", "principles": [principle], "stream": True,
                "max_new_tokens": 12, "time_budget_s": 30, "seed": 0,
                "options": {"max_expansions": 6, "min_segment_tokens": 4}}) as r:
            assert r.status_code == 200
            evs = events(r.read().decode())
    done = evs[-1][1]
    st = done["stats"]
    assert evs[-1][0] == "done" and done["scorer"] == "contrastive" and done["model_version"] == "shipped:v0001"  # auto: the shipped RM
    assert "".join(d["text"] for n, d in evs if n == "segment") == done["text"]
    assert st["tokens_committed"] <= 12 and st["iterations"] <= 6 and st["wall_s"] < 40
    assert st["value_evaluations"] >= 2 and st["final_value"] is not None


def test_the_token_limit_keeps_every_candidate_scorable():
    from rm_service.serving import ScoreService

    svc = ScoreService(ServiceSettings(scorer="rule", max_response_tokens=24, generate_max_new_tokens=256))
    assert svc.generation.max_new_tokens == 8  # 24 less the closing turn's margin
