"""Rubric and listwise scoring over HTTP (tiny contrastive model): each is the fold of ordinary
pointwise scores, checked against /v1/score itself; same limits, errors and client as pointwise."""

from __future__ import annotations

import math

import httpx
import pytest

from principles.schema import Principle, RubricScale, load_principle_set, parse_principle_set
from rm_core.modes import candidates_prompt, expected_rating, level_principle, ranks_of
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread

POLITE = {"name": "polite", "definition": "The response is polite.", "negative_definition": "The response is rude."}
BRIEF = {"name": "brief", "definition": "The response is brief.", "negative_definition": "The response rambles."}
RUBRIC = {"scale": [1, 10], "anchors": {"1": "It ignores the principle.", "5": "It partly follows it.",
                                        "10": "It follows the principle fully."}}
ITEMS = [{"prompt": "What time zone is Tokyo in?", "response": "Tokyo uses Japan Standard Time, UTC+9."},
         {"prompt": [{"role": "user", "content": "Name a prime."}], "response": "7"},
         {"prompt": "What time zone is Tokyo in?", "response": "Look it up yourself."},
         {"prompt": "What time zone is Tokyo in?", "response": "UTC+9."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    st = ServiceSettings(port=0, model=str(tiny_model_dir), scorer="contrastive", max_items=8,
                         max_queue_items=64, max_prompt_tokens=256)
    with ServerThread(st) as srv:
        r = httpx.put(srv.url + "/v1/principle-sets/rated",
                      json={"principles": [POLITE, BRIEF], "rubric": RUBRIC})
        assert r.status_code == 201, r.text
        yield srv


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/score", json=body, timeout=60, **kw)


def pointwise(server, principle: Principle, prompt, response) -> float:
    body = {"items": [{"prompt": prompt, "response": response}],
            "principles": [{"name": principle.name, "definition": principle.definition,
                            "negative_definition": principle.negative_definition}]}
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()["scores"][0]


def test_expected_rating_and_ranks_by_hand():
    assert expected_rating([1, 10], [0.0, math.log(2)]) == pytest.approx((1 * 1 + 10 * 2) / 3)
    assert expected_rating([1, 5, 10], [3.0, 3.0, 3.0]) == pytest.approx(16 / 3)
    assert ranks_of([0.5, 2.0, 0.5, -1.0]) == [2, 1, 2, 4]


def test_rubric_is_the_softmax_mean_of_pointwise_level_scores(server):
    r = post(server, {"items": ITEMS[:2], "principle_set": "rated", "mode": "rubric"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "rubric" and body["scale"] == [1, 10] and body["ranks"] is None
    scale = RubricScale.model_validate(RUBRIC)
    for item, ratings, score in zip(ITEMS[:2], body["rubric"], body["scores"], strict=True):
        assert set(ratings) == {"polite", "brief"}
        for p in (POLITE, BRIEF):
            prin = Principle(**p)
            vals = [pointwise(server, level_principle(prin, scale, k), item["prompt"], item["response"])
                    for k in (1, 5, 10)]
            assert vals[0] == pytest.approx(0.0, abs=1e-6)  # the lowest anchor against itself
            w = [math.exp(v) for v in vals]
            assert ratings[p["name"]] == pytest.approx(sum(k * x for k, x in zip((1, 5, 10), w, strict=True)) / sum(w), abs=1e-3)
            assert 1 <= ratings[p["name"]] <= 10
        assert score == pytest.approx(sum(ratings.values()) / 2, abs=1e-6)


def test_rubric_negation_rates_the_negative_definition(server):
    plain = post(server, {"items": ITEMS[:1], "principle_set": "rated", "mode": "rubric"}).json()["rubric"][0]
    neg = post(server, {"items": ITEMS[:1], "principle_set": "rated", "mode": "rubric",
                        "negate": ["polite"]}).json()["rubric"][0]
    assert neg["brief"] == pytest.approx(plain["brief"], abs=1e-5) and neg["polite"] != pytest.approx(plain["polite"])


def test_rubric_from_the_request_header_and_inline_scale(server):
    by_field = post(server, {"items": ITEMS[:1], "principles": [POLITE], "rubric": RUBRIC, "mode": "rubric"}).json()
    by_header = post(server, {"items": ITEMS[:1], "principles": [POLITE], "rubric": RUBRIC},
                     headers={"X-Score-Mode": "rubric"}).json()
    assert by_header["mode"] == "rubric" and by_header["scores"] == pytest.approx(by_field["scores"], abs=1e-6)
    six = {"scale": [1, 6], "anchors": {"1": "Not at all.", "6": "Completely."}}
    dno = post(server, {"items": ITEMS[:1], "principle_set": "rated", "rubric": six, "mode": "rubric"}).json()
    assert dno["scale"] == [1, 6] and all(1 <= v <= 6 for v in dno["rubric"][0].values())


@pytest.mark.parametrize(("body", "headers", "status", "says"), [
    ({"items": ITEMS[:1], "principles": [POLITE], "mode": "rubric"}, {}, 422, "needs a rating scale"),
    ({"items": ITEMS[:1], "principle_set": "hhh", "mode": "rubric"}, {}, 422, "'hhh' has no 'rubric'"),
    ({"items": ITEMS[:1], "principles": [POLITE], "mode": "rubric",
      "rubric": {"scale": [1, 10], "anchors": {"1": "low"}}}, {}, 422, "both ends"),
    ({"items": ITEMS[:1], "principles": [POLITE], "mode": "ranked"}, {}, 422, "mode"),
    ({"items": ITEMS[:1], "principles": [POLITE]}, {"X-Score-Mode": "ranked"}, 422, "not a mode"),
    ({"items": ITEMS[:1], "principles": [{"name": "x", "definition": "plain"}], "rubric": RUBRIC,
      "mode": "rubric", "negate": ["x"]}, {}, 422, "no negative_definition"),
    ({"items": ITEMS * 2, "principle_set": "rated", "mode": "rubric",  # 8 x 2 x 5 = 80 sequences > 64
      "rubric": {"scale": [1, 5], "anchors": {str(k): f"level {k}" for k in range(1, 6)}}}, {}, 413,
     "max_queue_items"),
])
def test_mode_errors_use_the_error_contract(server, body, headers, status, says):
    r = post(server, body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["code"] == status


def test_listwise_ranks_each_prompts_list_with_the_candidates_shown(server):
    r = post(server, {"items": ITEMS, "principles": [POLITE], "mode": "listwise"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "listwise" and body["lists"] == [0, 1, 0, 0] and body["rubric"] is None
    tokyo = [ITEMS[i]["response"] for i in (0, 2, 3)]
    shown = candidates_prompt(ITEMS[0]["prompt"], tokyo)
    want = [pointwise(server, Principle(**POLITE), shown, resp) for resp in tokyo]
    assert [body["scores"][i] for i in (0, 2, 3)] == pytest.approx(want, abs=1e-4)
    assert [body["ranks"][i] for i in (0, 2, 3)] == ranks_of(want)
    assert body["ranks"][1] == 1  # a list of one
    prime = pointwise(server, Principle(**POLITE), candidates_prompt(ITEMS[1]["prompt"], ["7"]), "7")
    assert body["scores"][1] == pytest.approx(prime, abs=1e-4)
    assert "Candidate responses" in shown and shown.endswith(ITEMS[0]["prompt"])


def test_listwise_shares_the_prefix_cache_within_a_list(server):
    same = [{"prompt": "Say something kind.", "response": r} for r in ("Hello!", "You are great.", "Nice day.")]
    post(server, {"items": same, "principles": [POLITE], "mode": "listwise"})
    again = post(server, {"items": same, "principles": [POLITE], "mode": "listwise"}).json()
    assert again["usage"]["cached_tokens"] > 0


def test_a_set_without_rubric_keeps_its_hash_form():
    s = load_principle_set("concise")
    assert "rubric" not in s.canonical()
    rated = parse_principle_set({**s.canonical(), "rubric": RUBRIC})
    assert rated.hash != s.hash and rated.canonical()["rubric"]["scale"] == [1, 10]
    assert parse_principle_set(s.canonical()).hash == s.hash


def test_public_client_requests_a_mode_with_its_headers(server):
    from salmon_client import SalmonClient

    pairs = [(it["prompt"], it["response"]) for it in ITEMS]
    with SalmonClient(server.url) as client:
        got = client.score(pairs, principle_set="rated", headers={"X-Score-Mode": "listwise"})
        rub = client.score(pairs[:1], principle_set="rated", headers={"X-Score-Mode": "rubric"})
    direct = post(server, {"items": ITEMS, "principle_set": "rated", "mode": "listwise"}).json()
    assert got.scores == pytest.approx(direct["scores"], abs=1e-4)
    assert rub.scores == pytest.approx(
        post(server, {"items": ITEMS[:1], "principle_set": "rated", "mode": "rubric"}).json()["scores"], abs=1e-4)


def test_rule_scorer_rubric_is_the_anchor_mean():
    with ServerThread(ServiceSettings(port=0, scorer="rule", max_items=8)) as srv:
        r = post(srv, {"items": ITEMS[:2], "principles": [POLITE], "rubric": RUBRIC, "mode": "rubric"})
        assert r.status_code == 200, r.text
        assert r.json()["scores"] == pytest.approx([16 / 3, 16 / 3])  # the rule reads no principle
