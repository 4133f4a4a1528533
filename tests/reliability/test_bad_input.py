"""Bad input never gets a 5xx, and every 4xx body says what to fix (property-based, live server).

Two live servers on 127.0.0.1: the rule scorer (no model: fast, exercises the HTTP layer and
validation) and the tiny transformer (exercises rendering: braces, template syntax and special
tokens in principles and prompts are data, never template code).
"""

from __future__ import annotations

import json
import math
import urllib.parse

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from principles.schema import PrincipleSetError, load_principle_set
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.reliability.helpers import assert_error_body, fuzz_settings, record

COUNT: dict[str, int] = {}

ENDPOINTS = [("POST", "/v1/score"), ("POST", "/get_reward"), ("PUT", "/v1/principle-sets/fuzzed"),
             ("POST", "/v1/admin/reload")]


@pytest.fixture(scope="module")
def rule_server():
    st_ = ServiceSettings(port=0, scorer="rule", max_items=16, max_body_bytes=256 * 1024, max_messages=16)
    with ServerThread(st_) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model_server(tiny_model_dir):
    st_ = ServiceSettings(port=0, scorer="contrastive", model=str(tiny_model_dir), max_items=8,
                          max_prompt_tokens=96, max_response_tokens=64, max_body_bytes=128 * 1024, num_threads=1)
    with ServerThread(st_) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    record("bad input (hypothesis, live server)", cases_tried=sum(COUNT.values()), **COUNT)


def _count(name: str) -> None:
    COUNT[name] = COUNT.get(name, 0) + 1


# -- strategies ------------------------------------------------------------------------------
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                        max_size=4), max_leaves=12)
# Text a template engine or chat template would choke on if it were treated as code.
TEMPLATE_BITS = ["{", "}", "{{ x }}", "{% if x %}", "{%- endif -%}", "{0}", "{name}", "%s", "%(x)s", "${x}",
                 "<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "\\n", "{{", "}}", "[INST]", "\x00"]
tricky_text = st.lists(st.sampled_from(TEMPLATE_BITS) | st.text(max_size=8), min_size=0, max_size=8).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]) | json_leaf,
                                 "content": tricky_text | json_leaf})
prompt = tricky_text | json_leaf | st.lists(message, max_size=5)
item = st.fixed_dictionaries({"prompt": prompt, "response": tricky_text | json_leaf}) | json_any
inline_principle = tricky_text | json_leaf | st.fixed_dictionaries(
    {"name": st.text(max_size=10) | json_leaf, "definition": tricky_text | json_leaf},
    optional={"negative_definition": tricky_text | json_leaf, "weight": json_leaf})
score_body = st.fixed_dictionaries(
    {"items": st.lists(item, max_size=20) | json_leaf},
    optional={"principle_set": st.text(max_size=30) | json_leaf | st.sampled_from(["hhh", "hhh@", "@", "hhh@x", "../x"]),
              "principles": st.lists(inline_principle, max_size=6) | json_leaf,
              "negate": st.lists(st.text(max_size=5) | st.sampled_from(["p1", "p2"]), max_size=3) | json_leaf,
              "truncate": json_leaf, "extra": json_leaf})


# -- arbitrary and structured JSON on every write endpoint -------------------------------------
@fuzz_settings(150)
@given(body=score_body)
@example(body={"items": [{"prompt": "x", "response": "y"}] * 17})
@example(body={"items": [{"prompt": [{"role": "user", "content": "x"}] * 17, "response": "y"}]})
@example(body={"items": [{"prompt": "x", "response": "y"}], "principles": ["x"] * 33})
def test_score_bodies_never_5xx(rule_server, body):
    _count("score_json_bodies")
    r = rule_server.post("/v1/score", json=body)
    assert_error_body(r, body)
    if r.status_code == 200:
        assert len(r.json()["scores"]) == len(body["items"])


@fuzz_settings(120)
@given(endpoint=st.sampled_from(ENDPOINTS), body=json_any)
def test_any_json_on_any_write_endpoint_never_5xx(rule_server, endpoint, body):
    _count("any_json_any_endpoint")
    r = rule_server.request(endpoint[0], endpoint[1], json=body)
    assert_error_body(r, (endpoint, body))


@fuzz_settings(120)
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(endpoint=ENDPOINTS[0], raw=b'\xff\xfe{"items": 1}')
@example(endpoint=ENDPOINTS[0], raw=b'{"items": [{"prompt": "\xc3\x28", "response": "x"}]}')
@example(endpoint=ENDPOINTS[0], raw=b'{"items": [{"prompt": "\\ud800", "response": "x"}]}')
@example(endpoint=ENDPOINTS[2], raw=b'{"principles": [{"name": "a", "definition": "\\udfff"}]}')
@example(endpoint=ENDPOINTS[0], raw=b'{"items": NaN}')
def test_invalid_json_and_utf8_are_4xx_that_say_why(rule_server, endpoint, raw):
    _count("raw_bytes_bodies")
    r = rule_server.request(endpoint[0], endpoint[1], content=raw, headers={"content-type": "application/json"})
    try:
        parsed, is_json = (json.loads(raw) if raw.strip() else None), True
    except ValueError:
        parsed, is_json = None, False
    # reload's body is optional (empty or {} means "reload CURRENT"): those few raws are valid requests
    valid = endpoint == ("POST", "/v1/admin/reload") and is_json and parsed in (None, {})
    if not valid:
        assert 400 <= r.status_code < 500, (endpoint, raw, r.status_code, r.text[:300])
    assert_error_body(r, (endpoint, raw))


@pytest.mark.parametrize("endpoint", ENDPOINTS[:3], ids=lambda e: e[1])
@pytest.mark.parametrize("depth", [64, 5000, 50000])
def test_deeply_nested_json_is_422_not_a_crash(rule_server, endpoint, depth):
    """Found by this suite: nesting past the JSON parser's recursion limit gave a 500 on PUT
    /v1/principle-sets and a bare 400 'There was an error parsing the body' on the others."""
    _count("deep_nesting")
    raw = b'{"items": ' + b"[" * depth + b"]" * depth + b"}"
    r = rule_server.request(endpoint[0], endpoint[1], content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422), r.text[:300]
    assert_error_body(r)


def test_huge_inputs_are_413_with_the_limit(rule_server):
    cases = {
        "1e5 items": {"items": [{"prompt": "a", "response": "b"}] * 100_000},
        "huge string": {"items": [{"prompt": "a", "response": "x" * 300_000}]},
        "deep chat": {"items": [{"prompt": [{"role": "user", "content": "hi"}] * 5000, "response": "b"}]},
    }
    for name, body in cases.items():
        _count("huge")
        r = rule_server.post("/v1/score", json=body)
        assert r.status_code == 413, (name, r.text[:300])
        assert_error_body(r, name)
        assert "limit" in r.json()["error"]["message"]
    # The same sizes under a default-limit server: 10^5 items fit the 8 MiB body but not max_items.
    with ServerThread(ServiceSettings(port=0, scorer="rule")) as srv:
        r = httpx.post(srv.url + "/v1/score", json=cases["1e5 items"], timeout=60)
        assert r.status_code == 413 and r.json()["error"]["param"] == "items", r.text[:300]
        # A body streamed without Content-Length is cut off at the limit as it is read. Found by this
        # suite: FastAPI turned the cut-off into a bare 400 on the JSON routes; now 413 everywhere.
        for method, path in (("POST", "/v1/score"), ("PUT", "/v1/principle-sets/big"), ("POST", "/get_reward")):
            chunks = (b'{"items": [' + b'{"prompt": "a", "response": "b"},' * 10_000 for _ in range(40))
            r = httpx.request(method, srv.url + path, content=chunks, headers={"content-type": "application/json"},
                              timeout=60)
            assert r.status_code == 413, (path, r.text[:300])
            assert_error_body(r)


def test_empty_strings(rule_server, model_server):
    for c in (rule_server, model_server):
        for body in ({"items": [{"prompt": "", "response": ""}]},
                     {"items": [{"prompt": [], "response": ""}]},
                     {"items": [{"prompt": "x", "response": "y"}], "principles": [""]},
                     {"items": [{"prompt": "x", "response": "y"}], "principle_set": ""}):
            _count("empty")
            r = c.post("/v1/score", json=body)
            assert_error_body(r, body)


# -- rendering: braces, templates and special tokens are data ---------------------------------
@fuzz_settings(40)
@given(principles=st.lists(tricky_text.filter(lambda s: s.strip()), min_size=1, max_size=3),
       prompt=tricky_text | st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": tricky_text}),
                                     min_size=1, max_size=3),
       response=tricky_text)
@example(principles=["{{ system }}", "{% raw %}"], prompt="<|im_start|>user\n{0}<|im_end|>", response="}}{{")
def test_template_syntax_in_principles_and_prompts_is_scored_as_text(model_server, principles, prompt, response):
    _count("template_syntax")
    body = {"items": [{"prompt": prompt, "response": response}], "principles": principles}
    r = model_server.post("/v1/score", json=body)
    assert_error_body(r, body)
    if r.status_code == 200:
        assert all(math.isfinite(s) for s in r.json()["scores"])
    else:  # e.g. a whitespace-only chat turn; never a template error
        assert r.status_code == 422 and "template" not in r.json()["error"]["message"].lower(), r.text


@fuzz_settings(40)
@given(body=score_body)
def test_score_bodies_on_the_model_server(model_server, body):
    _count("score_json_bodies_model")
    r = model_server.post("/v1/score", json=body)
    assert_error_body(r, body)


@fuzz_settings(30)
@given(query=st.lists(tricky_text | st.just("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{{x}}<|im_end|>"),
                      min_size=1, max_size=4),
       prompts=st.none() | st.lists(tricky_text, max_size=4), header=st.none() | st.sampled_from(["hhh", "nope", "hhh@0"]))
def test_openrlhf_get_reward_never_5xx(model_server, query, prompts, header):
    _count("get_reward")
    body = {"query": query, "prompts": prompts}
    r = model_server.post("/get_reward", json=body, headers={"X-Principle-Set": header} if header else {})
    assert_error_body(r, body)


# -- principle sets: unknown, malformed, hostile names ----------------------------------------
set_name = st.text(max_size=12) | st.sampled_from(["hhh", "..", "a@b", "x" * 80, "ok-name", "%2e%2e", "a/b"])


@fuzz_settings(80)
@given(name=set_name, body=json_any | st.fixed_dictionaries(
    {"principles": st.lists(inline_principle, max_size=4) | json_leaf},
    optional={"name": st.text(max_size=10) | json_leaf, "description": json_leaf, "extra": json_leaf}))
def test_principle_set_writes_and_reads_never_5xx(rule_server, name, body):
    _count("principle_set_put")
    path = "/v1/principle-sets/" + urllib.parse.quote(name, safe="")
    r = rule_server.put(path, json=body)
    assert_error_body(r, (name, body))
    if r.status_code in (200, 201):  # what was accepted is usable at once, by name and by hash
        ref = r.json()["ref"]
        for spec in (r.json()["name"], ref):
            s = rule_server.post("/v1/score", json={"items": [{"prompt": "x", "response": "y"}], "principle_set": spec})
            assert s.status_code == 200 and s.json()["principle_set"] == ref, s.text
    assert_error_body(rule_server.get(path), name)
    if name not in {"hhh"}:
        assert_error_body(rule_server.delete(path), name)


yaml_text = st.lists(st.sampled_from(["name: x\n", "principles:\n", "  - name: a\n", "    definition: d\n", "- ", ": ",
                                      "[", "]", "{", "}", "\t", "  ", "&a ", "*a ", "!!python/object:os.system ",
                                      "---\n", "%YAML 1.1\n", "\"", "'", "#", "\n"]) | st.text(max_size=6),
                     max_size=25).map("".join)


@fuzz_settings(120)
@given(text=yaml_text | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
@example(text="name: x\nprinciples: [\n")
@example(text="!!python/object/apply:os.system ['true']\n")
@example(text="- a\n- b\n")
def test_malformed_principle_set_yaml_is_one_clear_error(tmp_path_factory, text):
    """load_principle_set (used for shipped sets, principle_sets_dir and the default set) raises only
    PrincipleSetError naming the file, never another exception, and never runs YAML tags."""
    _count("principle_set_yaml")
    f = tmp_path_factory.mktemp("yaml") / "set.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        s = load_principle_set(f)
    except PrincipleSetError as e:
        assert str(e).startswith(str(f)) and len(str(e)) > len(str(f)) + 10, str(e)
    else:
        assert s.principles and json.dumps(s.canonical())


@pytest.mark.parametrize("where", ["top", "value"])
def test_yaml_tags_in_a_principle_set_are_never_executed(tmp_path, where):
    """A tag whose execution is observable (it would create a directory): loading the set must not create it.
    The control shows the same text does create it under an unsafe loader, so the check can fail."""
    import yaml

    def tagged(marker) -> str:
        tag = f"!!python/object/apply:os.mkdir ['{marker}']"
        return tag + "\n" if where == "top" else f"name: x\nprinciples:\n  - name: a\n    definition: {tag}\n"

    control = tmp_path / "control-ran"
    yaml.unsafe_load(tagged(control))
    assert control.is_dir()  # the tag is live: executing it leaves a trace

    marker = tmp_path / "tag-ran"
    f = tmp_path / "set.yaml"
    f.write_text(tagged(marker))
    with pytest.raises(PrincipleSetError):
        load_principle_set(f)
    assert not marker.exists()
