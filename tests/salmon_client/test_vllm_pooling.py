"""vLLM-style /classify and /pooling on a real `salmon serve`: vLLM's request and response shapes, the
scores of /v1/score, and /v1/score's auth, limits and error contract."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

from principles.schema import load_principle_set
from tests.reliability.helpers import assert_error_body
from tests.salmon_client.conftest import KEY, MAX_ITEMS

AUTH = {"Authorization": f"Bearer {KEY}"}
PAIRS = [("What time zone is Tokyo in?", "Japan Standard Time, UTC+9."),
         ("What time zone is Tokyo in?", "Look it up yourself."),
         ("Name a prime.", "7")]


def post(serve, path, body, headers=AUTH):
    return httpx.post(serve.url + path, json=body, headers=headers, timeout=60)


def v1_scores(serve, pairs, principle_set="concise") -> dict:
    r = post(serve, "/v1/score", {"items": [{"prompt": [{"role": "user", "content": p}], "response": a}
                                            for p, a in pairs], "principle_set": principle_set})
    assert r.status_code == 200, r.text
    return r.json()


def test_classify_shape_and_scores(serve, chat):
    r = post(serve, "/classify", {"model": "salmon", "input": [chat(p, a) for p, a in PAIRS]})
    assert r.status_code == 200, r.text
    body = r.json()
    want = v1_scores(serve, PAIRS)
    assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == "salmon"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["num_classes"] == 1 and d["label"] == "reward" and len(d["probs"]) == 1 for d in body["data"])
    assert [d["probs"][0] for d in body["data"]] == pytest.approx(want["scores"], abs=1e-4)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["usage"]["completion_tokens"] == 0
    assert body["model_version"] == want["model_version"] == r.headers["x-model-version"]
    assert body["principle_set"] == want["principle_set"] and body["principle_set_hash"] == want["principle_set_hash"]


def test_pooling_shape_float_and_base64(serve, chat):
    text = chat(*PAIRS[2])
    floats = post(serve, "/pooling", {"model": "m", "input": text}).json()  # one string, as vLLM takes it
    packed = post(serve, "/pooling", {"model": "m", "input": [text], "encoding_format": "base64",
                                      "endianness": "little"}).json()
    want = v1_scores(serve, PAIRS[2:])["scores"][0]
    assert floats["id"].startswith("pool-") and floats["data"][0]["object"] == "pooling"
    assert floats["data"][0]["index"] == 0 and floats["data"][0]["data"] == [pytest.approx(want, abs=1e-4)]
    (decoded,) = struct.unpack("<f", base64.b64decode(packed["data"][0]["data"]))
    assert decoded == pytest.approx(want, abs=1e-4)


def test_messages_principle_set_by_field_or_header_and_activation(serve):
    detailed = load_principle_set("detailed")
    conv = [{"role": "user", "content": PAIRS[0][0]}, {"role": "assistant", "content": PAIRS[0][1]}]
    want = v1_scores(serve, PAIRS[:1], "detailed")
    by_field = post(serve, "/classify", {"messages": conv, "principle_set": "detailed"}).json()
    by_header = post(serve, "/pooling", {"messages": conv}, headers={**AUTH, "X-Principle-Set": detailed.ref}).json()
    both = post(serve, "/pooling", {"messages": conv, "principle_set": "detailed"},
                headers={**AUTH, "X-Principle-Set": "concise"}).json()  # the field wins over the header
    sig = post(serve, "/classify", {"messages": conv, "principle_set": "detailed", "use_activation": True}).json()
    assert by_field["principle_set"] == by_header["principle_set"] == both["principle_set"] == detailed.ref
    assert by_field["data"][0]["probs"][0] == pytest.approx(want["scores"][0], abs=1e-4)
    assert by_header["data"][0]["data"][0] == pytest.approx(want["scores"][0], abs=1e-4)
    assert sig["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-want["scores"][0])), abs=1e-4)


@pytest.mark.parametrize("path", ["/classify", "/pooling"])
@pytest.mark.parametrize("body, status, param", [
    ({"model": "m", "input": [1, 2, 3]}, 422, "input"),                       # token ids
    ({"model": "m", "input": []}, 422, "input"),
    ({"model": "m"}, 422, "body"),                                            # neither input nor messages
    ({"input": "x", "messages": [{"role": "user", "content": "q"}]}, 422, "body"),
    ({"input": "x", "temperature": 1}, 422, "temperature"),                   # unknown field
    ({"input": "no chat template here"}, 422, "input.0"),
    ({"messages": [{"role": "user", "content": "q"}]}, 422, "messages"),     # nothing to score
    ({"messages": []}, 422, "messages"),                                    # found by the schema fuzz: was a 500
    ({"input": ["t"] * (MAX_ITEMS + 1)}, 413, "input"),
    ({"input": "x", "principle_set": "no-such-set"}, 404, "principle_set"),
])
def test_bad_input_is_a_4xx_in_the_contracts_shape(serve, path, body, status, param):
    r = post(serve, path, body)
    assert r.status_code == status, r.text
    assert_error_body(r, body)
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["/classify", "/pooling"])
def test_same_auth_as_v1_score(serve, path):
    r = post(serve, path, {"input": "x"}, headers={})
    assert r.status_code == 401 and r.headers["www-authenticate"].lower().startswith("bearer")
    assert_error_body(r)


def test_pooling_only_fields_are_refused_on_classify(serve, chat):
    r = post(serve, "/classify", {"input": chat(*PAIRS[0]), "encoding_format": "base64"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "encoding_format"
    assert post(serve, "/pooling", {"input": chat(*PAIRS[0]), "dimensions": 8}).status_code == 422
