"""The A/B judge: arithmetic against a hand computation, shared-prefix reuse, both backends, contrastive."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from data_synth.config import EndpointConfig
from data_synth.judge import PREFILL, ContrastiveSource, JudgeLayout, LocalABJudge, OpenAIABJudge
from principles.schema import Principle
from salmon.errors import UserError

PRINCIPLES = [
    Principle(name="concise", definition="The response is short.", negative_definition="The response is long."),
    Principle(name="kind", definition="The response is kind and warm to the reader.",
              negative_definition="The response is cold."),
    Principle(name="exact", definition="Numbers are exact.", negative_definition="Numbers are vague."),
]
Q, A, B = "What is 2+2?", "It is 4.", "Two plus two makes four, as everybody learns at school."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from salmon.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def hand_score(model, tok, first: str, second: str, p: Principle) -> float:
    """logit('a') − logit('b') at the last position of one plain forward over the whole judge prompt."""
    pre, suf = JudgeLayout(tok).texts(Q, first, second, p)
    ids = tok.encode(pre, add_special_tokens=False) + tok.encode(suf, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    a, b = tok.encode("a", add_special_tokens=False)[0], tok.encode("b", add_special_tokens=False)[0]
    return float(logits[a] - logits[b])


def test_layout_puts_the_shared_part_first_and_the_principle_last(tiny):
    _, tok = tiny
    layout = JudgeLayout(tok)
    (pre1, suf1), (pre2, suf2) = (layout.texts(Q, A, B, p) for p in PRINCIPLES[:2])
    assert pre1 == pre2 and Q in pre1 and A in pre1 and B in pre1
    assert pre1.index(A) < pre1.index(B)  # order ab: A is Output (a)
    assert PRINCIPLES[0].definition in suf1 and PRINCIPLES[0].definition not in pre1
    assert suf1.endswith(PREFILL) and "<|im_start|>assistant" in suf1
    # A response cannot close the judge's turn with a special-token string.
    pre, _ = layout.texts(Q, "x<|im_end|>y", B, PRINCIPLES[0])
    assert pre.count("<|im_end|>") == tok.apply_chat_template([{"role": "user", "content": "z"}],
                                                              tokenize=False).count("<|im_end|>") - 1


@pytest.mark.parametrize("reuse", [True, False])
def test_ab_scores_equal_a_hand_computation_in_both_orders(tiny, reuse):
    model, tok = tiny
    judge = LocalABJudge(model, tok, prefix_reuse=reuse, batch_size=2)  # 3 principles -> 2 chunks
    got = judge.judge_pair(Q, A, B, PRINCIPLES)
    for (ab, ba), p in zip(got, PRINCIPLES, strict=True):
        assert ab == pytest.approx(hand_score(model, tok, A, B, p), abs=1e-4)
        # b shown first: its raw a-minus-b is about B, so the stored a-oriented score is its negation.
        assert ba == pytest.approx(-hand_score(model, tok, B, A, p), abs=1e-4)


def test_prefix_reuse_computes_the_shared_part_once_and_gives_the_same_scores(tiny):
    model, tok = tiny
    reuse = LocalABJudge(model, tok, prefix_reuse=True, batch_size=16)
    full = LocalABJudge(model, tok, prefix_reuse=False, batch_size=16)
    flat = lambda pairs: [s for pair in pairs for s in pair]  # noqa: E731
    assert flat(reuse.judge_pair(Q, A, B, PRINCIPLES)) == pytest.approx(flat(full.judge_pair(Q, A, B, PRINCIPLES)),
                                                                        abs=1e-4)
    prefix, suffixes = JudgeLayout(tok).ids(Q, A, B, PRINCIPLES)
    per_order_reuse = len(prefix) + sum(map(len, suffixes))
    per_order_full = len(PRINCIPLES) * len(prefix) + sum(map(len, suffixes))
    assert reuse.stats["tokens"] == 2 * per_order_reuse
    assert full.stats["tokens"] == 2 * per_order_full
    assert reuse.stats["forward_calls"] == 4 and full.stats["forward_calls"] == 2


# -- OpenAI-compatible backend against a small loopback server -------------------------------------
class _FakeCompletions(BaseHTTPRequestHandler):
    """Returns top logprobs that favour whichever output slot holds the text 'GOOD'."""

    bodies: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            slot_a = prompt.split("## Output (a)")[1].split("## Output (b)")[0]
            top = {"a": -0.1, "b": -2.5, " c": -6.0} if "GOOD" in slot_a else {"a": -2.5, " b": -0.1, "x": -6.0}
            if "DROP_B" in prompt:
                top.pop("b", None)
            choices.append({"index": i, "text": "a", "logprobs": {"top_logprobs": [top]}})
        data = json.dumps({"choices": choices[::-1]}).encode()  # out of order: the client must sort
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_server():
    _FakeCompletions.bodies, _FakeCompletions.fail_first = [], 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    t.join(timeout=10)


def test_openai_backend_scores_both_orders_from_logprobs(fake_server, tiny):
    _, tok = tiny
    ep = EndpointConfig(base_url=fake_server, model="judge-70b", timeout_s=10, max_retries=2)
    _FakeCompletions.fail_first = 1  # one 503 first: retried
    judge = OpenAIABJudge(ep, tok)
    got = judge.judge_pair(Q, "GOOD answer", "meh answer", PRINCIPLES)
    # ab: GOOD in slot a -> lp(a) − lp(b) = −0.1 − (−2.5) = 2.4. ba: GOOD in slot b -> raw −2.4, flipped.
    assert got == [pytest.approx((2.4, 2.4))] * 3
    body = _FakeCompletions.bodies[-1]
    assert body["model"] == "judge-70b" and body["max_tokens"] == 1 and body["logprobs"] == 20
    assert len(body["prompt"]) == 3 and all(p.endswith(PREFILL) for p in body["prompt"])
    assert len(_FakeCompletions.bodies) == 3 and judge.stats["requests"] == 2
    # A choice missing from the top-k gets the smallest returned logprob as its (upper-bound) value.
    (ab, _), = judge.judge_pair(Q, "GOOD DROP_B", "meh", PRINCIPLES[:1])
    assert ab == pytest.approx(-0.1 - (-6.0)) and judge.stats["missing_choice"] == 1


def test_unreachable_endpoint_is_one_clear_error_naming_the_url(tiny):
    from rm_service.testing import free_port

    _, tok = tiny
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = OpenAIABJudge(EndpointConfig(base_url=url, model="m", timeout_s=2, max_retries=0), tok)
    with pytest.raises(UserError, match=f"judge endpoint {url}/completions: unreachable"):
        judge.judge_pair(Q, A, B, PRINCIPLES)


def test_contrastive_source_is_the_difference_of_the_services_pointwise_scores(tiny):
    from rm_core.scorers import ContrastiveScorer

    model, tok = tiny
    src = ContrastiveSource(model, tok, name="tiny")
    ref = ContrastiveScorer(model, tok, version="ref", base_model="tiny")  # no prefix cache: the plain path
    got = src.judge_pair(Q, A, B, PRINCIPLES)
    for (ab, ba), p in zip(got, PRINCIPLES, strict=True):
        sa, sb = ref.score_items([p], [(Q, A), (Q, B)])
        assert ab == ba == pytest.approx(sa - sb, abs=1e-3)
    swapped = src.judge_pair(Q, B, A, PRINCIPLES)
    assert [s for s, _ in swapped] == pytest.approx([-s for s, _ in got], abs=1e-3)  # no position bias
    assert src.negated_pair(Q, A, B, PRINCIPLES[0]) == pytest.approx(-got[0][0], abs=1e-3)


@pytest.mark.slow
def test_prefix_reuse_matches_full_passes_on_the_embedded_model():
    from salmon.modeling import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("embedded"), load_tokenizer("embedded")
    reuse = LocalABJudge(model, tok, prefix_reuse=True).judge_pair(Q, A, B, PRINCIPLES)
    full = LocalABJudge(model, tok, prefix_reuse=False).judge_pair(Q, A, B, PRINCIPLES)
    assert [s for p in reuse for s in p] == pytest.approx([s for p in full for s in p], abs=1e-3)


def test_check_set_evaluation_reads_the_shared_loaders_records():
    """A judge that reads its principle perfectly scores 1.0 on the loaded (evenly spaced) check pairs."""
    from data_synth.judge import evaluate_source
    from rm_core.checkset import DEFAULT_CHECK_SET, load_pairs

    checks = load_pairs(DEFAULT_CHECK_SET, 4, evenly_spaced=True)
    positives = {c["principle"]["definition"] for c in checks}

    class Oracle:
        source, name, stats = "ab", "oracle", {}

        def judge_pair(self, prompt, a, b, principles):
            return [(1.0, 1.0) if p.definition in positives else (-1.0, -1.0) for p in principles]

    res = evaluate_source(Oracle(), checks)
    assert res["n"] == 4 and res["accuracy"] == 1.0 and res["flip_both"] == 1.0 and res["order_agreement"] == 1.0
