"""RAIN's search logic on deterministic fakes (PUCT, commit, rewind, budgets), and its sampler on the tiny model."""

from __future__ import annotations

import math

import pytest

from rm_core.rain import (
    CausalLMSampler,
    Node,
    RainConfig,
    Segment,
    TextStream,
    plain_generate,
    priors,
    puct,
    rain_generate,
    select_child,
)


class FakeSampler:
    """Tokens are ints; ``pick(context, i, k)`` decides the k-th token of candidate i. Decoding spells
    each token as a letter, so a response's text shows its tokens."""

    def __init__(self, pick=None, stop_after: int | None = None):
        self.pick = pick or (lambda ctx, i, k: i % 3)
        self.stop_after = stop_after  # end every response at this many tokens
        self.calls: list[tuple[int, int]] = []  # (n, max_tokens)

    def sample(self, context, n, max_tokens, seed, temperature, top_p):
        self.calls.append((n, max_tokens))
        out = []
        for i in range(n):
            toks = []
            for k in range(max_tokens):
                if self.stop_after is not None and len(context) - 1 + len(toks) >= self.stop_after:
                    break
                toks.append(self.pick(context, i, k))
            ended = self.stop_after is not None and len(context) - 1 + len(toks) >= self.stop_after
            out.append(Segment(tuple(toks), -0.1 * len(toks) - i * 0.01, ended))
        return out

    def decode(self, tokens):
        return "".join("abcdefghij"[t] for t in tokens)


def count_value(letter: str):
    """Value: the share of ``letter`` in the text (per token already, so value_per_token is off)."""
    return lambda texts: [t.count(letter) / max(1, len(t)) for t in texts]


CTX = (99,)  # one context token; FakeSampler counts response tokens as len(context) - 1


def test_puct_picks_as_computed_by_hand():
    parent = Node(response=())
    a = Node(response=(0,), prior=0.5, visits=3, total=1.5)   # Q 0.5
    b = Node(response=(1,), prior=0.3, visits=1, total=0.4)   # Q 0.4
    c = Node(response=(2,), prior=0.2, visits=0, total=0.0, value=0.1)  # unvisited: Q is its own value
    parent.children = [a, b, c]
    n = 4
    # By hand, c_puct 1: a 0.5 + 0.5*2/4 = 0.75; b 0.4 + 0.3*2/2 = 0.7; c 0.1 + 0.2*2/1 = 0.5.
    assert puct(a, n, 1.0) == pytest.approx(0.75)
    assert puct(b, n, 1.0) == pytest.approx(0.7)
    assert puct(c, n, 1.0) == pytest.approx(0.5)
    assert select_child(parent, 1.0) is a
    # More exploration weight: c_puct 2.5: a 0.5 + 2.5*0.25 = 1.125; b 0.4 + 2.5*0.3 = 1.15; c 0.1 + 2.5*0.4 = 1.1.
    assert select_child(parent, 2.5) is b
    # c_puct 4: a 1.5, b 1.6, c 1.7: the unvisited child.
    assert select_child(parent, 4.0) is c
    assert select_child(parent, 0.0) is a  # no exploration: the best Q


def test_priors_are_a_softmax_of_mean_token_logprob():
    p = priors([Segment((1, 2), -2.0, False), Segment((3,), -0.5, True)])
    # means: -1.0 and -0.25 (stop token counted)
    e1, e2 = math.exp(-1.0), math.exp(-0.25)
    assert p == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)])


def test_commits_the_valuable_branch_and_respects_the_token_budget():
    cfg = RainConfig(max_new_tokens=10, max_expansions=100, candidates=3, min_segment_tokens=2,
                     max_segment_tokens=4, commit_visits=4, value_per_token=False, c_puct=0.5)
    sampler = FakeSampler()  # candidate 0 says "a", 1 says "b", 2 says "c"
    shown: list[str] = []
    r = rain_generate(sampler, count_value("b"), CTX, cfg, on_commit=shown.append)
    assert r.text == "b" * 10 and len(r.tokens) == 10
    assert "".join(shown) == r.text and r.stats.commits >= 2
    assert r.stats.stopped == "max_new_tokens" and r.stats.tokens_committed == 10
    assert all(m <= 10 for _, m in sampler.calls)
    # Confident commits grow the segment from 2 up to the maximum of 4.
    assert {m for _, m in sampler.calls} >= {2, 4} and max(m for _, m in sampler.calls) == 4


def test_no_commit_before_the_visit_threshold():
    cfg = RainConfig(max_new_tokens=8, max_expansions=1, candidates=3, min_segment_tokens=2, commit_visits=4,
                     value_per_token=False, finish="stop")
    r = rain_generate(FakeSampler(), count_value("b"), CTX, cfg)
    # One expansion gives each root child one visit: below 4, so the search committed nothing itself;
    # the budget's end commits the most visited path (one segment) and stops there (finish: stop).
    assert r.stats.expansions == 1 and r.stats.stopped == "max_expansions"
    assert len(r.tokens) == 2 and r.stats.commits == 1


def test_rewind_when_value_falls_then_forced_commit():
    # Every continuation is worth less than the response it continues: nothing can commit.
    def value(texts):
        return [-float(len(t)) for t in texts]

    cfg = RainConfig(max_new_tokens=4, max_expansions=50, candidates=2, min_segment_tokens=2, max_segment_tokens=4,
                     commit_visits=2, rewind_after=3, max_rewinds_per_step=2, value_per_token=False)
    r = rain_generate(FakeSampler(), value, CTX, cfg)
    # Per position: 3 tries, rewind, 3 tries, rewind, 3 tries, forced commit. Two positions of 2 tokens.
    assert r.stats.rewinds == 4 and r.stats.forced_commits == 2
    assert r.stats.iterations == 18 and len(r.tokens) == 4


def test_value_margin_lets_a_slightly_worse_branch_commit():
    def value(texts):
        return [1.0 if t == "" else 0.9 for t in texts]

    cfg = RainConfig(max_new_tokens=4, max_expansions=50, candidates=2, min_segment_tokens=2, commit_visits=2,
                     value_margin=0.2, value_per_token=False)
    r = rain_generate(FakeSampler(), value, CTX, cfg)
    assert r.stats.rewinds == 0 and r.stats.forced_commits == 0 and len(r.tokens) == 4


def test_expansion_budget_is_never_exceeded_and_the_rest_is_sampled_plainly():
    cfg = RainConfig(max_new_tokens=30, max_expansions=3, candidates=3, min_segment_tokens=2, commit_visits=50,
                     value_per_token=False)
    sampler = FakeSampler()
    r = rain_generate(sampler, count_value("a"), CTX, cfg)
    assert r.stats.iterations == 3 and r.stats.expansions <= 3 and r.stats.stopped == "max_expansions"
    assert len(r.tokens) == 30  # the most visited path, then a plain sample of what is left
    n, rest = sampler.calls[-1]
    assert n == 1 and 30 - rest in {2, 4, 6}  # the last call is the plain one, after a path of 1 to 3 segments


def test_deadline_is_honoured():
    now = [0.0]

    def slow_value(texts):
        now[0] += 0.1  # each value call takes 0.1 s on the fake clock
        return [0.0 for _ in texts]

    cfg = RainConfig(max_new_tokens=1000, max_expansions=10_000, time_budget_s=1.0, min_segment_tokens=1,
                     max_segment_tokens=1, commit_visits=10_000, value_per_token=False)
    r = rain_generate(FakeSampler(), slow_value, CTX, cfg, clock=lambda: now[0])
    assert r.stats.stopped == "deadline"
    assert r.stats.wall_s <= 1.0 + 0.1 + 1e-9  # overshoot at most one iteration's value call


def test_cancel_stops_the_search():
    calls = [0]

    def stop():
        calls[0] += 1
        return calls[0] > 2

    r = rain_generate(FakeSampler(), count_value("a"), CTX, RainConfig(max_new_tokens=100, commit_visits=1000,
                                                                       value_per_token=False), should_stop=stop)
    assert r.stats.stopped == "cancelled" and r.stats.iterations == 2


def test_an_ended_candidate_ends_the_response():
    cfg = RainConfig(max_new_tokens=50, max_expansions=200, candidates=2, min_segment_tokens=3, commit_visits=3,
                     value_per_token=False)
    r = rain_generate(FakeSampler(stop_after=5), count_value("a"), CTX, cfg)
    assert r.stats.stopped == "eos" and len(r.tokens) == 5


def test_plain_generate_is_one_sample_within_the_budget():
    sampler = FakeSampler()
    shown: list[str] = []
    r = plain_generate(sampler, count_value("a"), CTX, RainConfig(max_new_tokens=7), on_commit=shown.append)
    assert sampler.calls == [(1, 7)] and len(r.tokens) == 7 and shown == [r.text]
    assert r.stats.search == "none" and r.stats.value_evaluations == 1 and r.stats.expansions == 0


def test_per_token_values_divide_by_length():
    seen = []

    def value(texts):
        seen.extend(texts)
        return [float(len(t)) for t in texts]  # summed value grows with length; per token it is 1

    cfg = RainConfig(max_new_tokens=4, max_expansions=3, candidates=1, min_segment_tokens=2, commit_visits=1)
    r = rain_generate(FakeSampler(), value, CTX, cfg)
    assert r.stats.final_value == pytest.approx(1.0) and len(r.tokens) == 4


def test_text_stream_holds_back_an_incomplete_character():
    pieces = {(1,): "caf\ufffd", (1, 2): "café"}
    s = TextStream(lambda toks: pieces[tuple(toks)])
    assert s.delta((1,)) == "caf"
    assert s.delta((1, 2)) == "é"


def test_config_rejects_inconsistent_segments():
    with pytest.raises(ValueError):
        RainConfig(min_segment_tokens=8, max_segment_tokens=4)


def test_causal_lm_sampler_on_the_tiny_model(tiny_model_dir):
    from salmon.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    sampler = CausalLMSampler(load_causal_lm(str(tiny_model_dir)), tok)
    ctx = tuple(tok("Hello there", add_special_tokens=False)["input_ids"])
    a = sampler.sample(ctx, 3, 5, seed=7)
    b = sampler.sample(ctx, 3, 5, seed=7)
    assert a == b and len(a) == 3  # seeded: the same call gives the same segments
    assert all(len(s.tokens) <= 5 and s.logprob < 0 for s in a)
    assert sampler.sample(ctx, 3, 5, seed=8) != a
    r = rain_generate(sampler, lambda texts: [float(len(t)) for t in texts], ctx,
                      RainConfig(max_new_tokens=12, max_expansions=6, min_segment_tokens=2, commit_visits=3))
    assert len(r.tokens) <= 12 and r.stats.iterations <= 6 and r.stats.tokens_sampled >= len(r.tokens)


def test_the_check_set_loads_and_its_rules_judge():
    from rm_core.rain_checks import RainRule, count_sentences, load_rain_checks, rule_violations

    checks = load_rain_checks()
    assert len(checks) >= 10 and all(c.principle.negative_definition for c in checks)
    price = next(c for c in checks if c.id == "price_iphone").rule
    assert rule_violations(price, "The base model costs $799.") and not rule_violations(price, "Prices vary by model.")
    assert count_sentences("It is 3.5 m tall. Really! Yes") == 3
    assert rule_violations(RainRule(max_sentences=1), "One. Two.") == ["2 sentences"]
    assert rule_violations(RainRule(max_words=3), "one two three four") == ["4 words"]
    assert rule_violations(None, "anything") == []


def test_a_bad_check_set_is_a_user_error(tmp_path):
    from rm_core.rain_checks import load_rain_checks
    from salmon.errors import UserError

    bad = tmp_path / "bad.yaml"
    bad.write_text("checks:\n  - {id: a, prompt: p, principle: {name: n, definition: d}, rule: {absent: '('}}\n")
    with pytest.raises(UserError, match="checks\\[0\\]"):
        load_rain_checks(bad)


def test_the_sampler_reuses_the_shared_context_and_matches_a_full_forward(tiny_model_dir):
    import torch

    from salmon.modeling import kv_cache_kwargs, load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    sampler = CausalLMSampler(model, tok)
    ctx = tuple(tok("The principles, then the prompt asks a question", add_special_tokens=False)["input_ids"])
    sampler.sample(ctx + (11, 12, 13), 2, 3, seed=1)  # keeps a branch the next contexts diverge from
    with torch.inference_mode():
        for c in [ctx, ctx + (42,), ctx, ctx + (42, 43), ctx[:4]]:
            cache, logits = sampler.context_state(c)
            full = model(input_ids=torch.tensor([list(c)])).logits[:, -1].float()
            assert torch.allclose(logits, full, atol=1e-4)
            # Sampling grows the cache; the kept copy must not change under it.
            step = model(input_ids=torch.tensor([[77]]), use_cache=True, **kv_cache_kwargs(model, cache))
            assert torch.allclose(step.logits[:, -1], model(input_ids=torch.tensor([[*c, 77]])).logits[:, -1],
                                  atol=1e-4)
