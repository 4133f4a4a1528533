"""SALMON aggregation rules: order agreement, normalisation, negation, dominant principle, ties, split."""

from __future__ import annotations

import numpy as np
import pytest

from data_synth.aggregate import (
    aggregate,
    counted_score,
    dominant_label,
    draw_principles,
    normalisers,
    rule_label,
    split_prompts,
)
from data_synth.config import AggregateConfig
from principles.schema import Principle, PrincipleSet
from salmon.errors import UserError


def P(name: str, neg: bool = True) -> Principle:
    return Principle(name=name, definition=f"{name} good", negative_definition=f"{name} bad" if neg else None)


PSET = PrincipleSet(name="t", principles=(P("x"), P("y"), P("z"), P("w", neg=False)))


def test_counted_score_needs_both_orders_to_agree():
    assert counted_score(2.0, 1.0, True) == 1.5
    assert counted_score(-2.0, -4.0, True) == -3.0
    assert counted_score(2.0, -1.0, True) is None  # position bias, not a preference
    assert counted_score(0.0, 1.0, True) is None
    assert counted_score(2.0, -1.0, False) == 0.5


def test_variance_normalisation_by_hand():
    js = [{"principle": "x", "score_ab": 1.0, "score_ba": 3.0}, {"principle": "x", "score_ab": -1.0, "score_ba": 1.0},
          {"principle": "y", "score_ab": 5.0, "score_ba": 5.0}]
    # x: values 1, 3, -1, 1 -> mean 1, variance (0 + 4 + 4 + 0) / 4 = 2; y is constant -> 1.
    assert normalisers(js, "variance") == {"x": 2.0, "y": 1.0}
    assert normalisers(js, "std")["x"] == pytest.approx(2 ** 0.5)
    assert normalisers(js, "none") == {"x": 1.0, "y": 1.0}


def test_dominant_principle_sets_the_label_and_negation_flips_its_sign():
    scores = {"x": 0.5, "y": -2.0, "z": None}
    label, dom, s, _ = dominant_label(scores, [(P("x"), False), (P("y"), False), (P("z"), False)])
    assert (label, dom, s) == (-1, "y", -2.0)  # |−2| beats 0.5; z (orders disagreed) does not count
    label, dom, s, _ = dominant_label(scores, [(P("x"), False), (P("y"), True)])
    assert (label, dom, s) == (1, "y", 2.0)  # negated y: worse under y = better under not-y
    label, dom, _, reason = dominant_label(scores, [(P("z"), False)])
    assert label is None and reason == "no_counted_score"


def test_ties_are_skipped_only_when_the_leaders_disagree():
    label, _, _, reason = dominant_label({"x": 1.0, "y": -1.0}, [(P("x"), False), (P("y"), False)])
    assert label is None and reason == "tie"
    label, _, _, reason = dominant_label({"x": 1.0, "y": 1.0}, [(P("x"), True), (P("y"), False)])
    assert label is None and reason == "tie"  # negation makes x's 1.0 a −1.0
    label, dom, _, _ = dominant_label({"x": 1.0, "y": 1.0}, [(P("x"), False), (P("y"), False)])
    assert label == 1 and dom == "x"
    assert dominant_label({"x": 0.0}, [(P("x"), False)])[3] == "zero_score"


def test_draws_are_geometric_capped_and_only_negate_negatable_principles():
    cfg = AggregateConfig(max_k=3)
    rng = np.random.default_rng(0)
    ks, negs = [], 0
    for _ in range(4000):
        d = draw_principles(rng, PSET.principles, cfg)
        ks.append(len(d))
        assert len({p.name for p, _ in d}) == len(d)
        assert not any(neg for p, neg in d if p.name == "w")  # no negative definition
        negs += sum(neg for _, neg in d)
    assert min(ks) == 1 and max(ks) == 3
    # P(k=1) of Geometric(0.2) is 0.2; k >= 3 is capped: P = 0.8^2 = 0.64.
    assert np.mean(np.array(ks) == 1) == pytest.approx(0.2, abs=0.03)
    assert np.mean(np.array(ks) == 3) == pytest.approx(0.64, abs=0.03)
    assert 0.3 < negs / sum(ks) < 0.5  # 0.5 on the three negatable, 0 on w


def _pairs_and_judgments():
    pairs, js = [], []
    for i in range(12):
        pairs.append({"pair_id": f"p{i}#0", "prompt_id": f"p{i}", "prompt": f"q{i}", "response_a": f"A{i}",
                      "response_b": f"B{i}"})
        # x strongly prefers a, y weakly prefers b, z orders disagree.
        for name, ab, ba in (("x", 3.0 + i, 2.0 + i), ("y", -0.1, -0.2), ("z", 1.0, -1.0), ("w", 0.01, 0.01)):
            js.append({"pair_id": f"p{i}#0", "principle": name, "score_ab": ab, "score_ba": ba})
    return pairs, js


def test_aggregate_rows_follow_the_dominant_principle_and_its_negation():
    pairs, js = _pairs_and_judgments()
    cfg = AggregateConfig(normalize="none", passes=6, eval_fraction=0.25)
    train, evals, counters = aggregate(pairs, js, PSET, cfg)
    rows = train + evals
    assert rows and counters["scores_orders_disagree"] == 12
    for r in rows:
        names = [p["name"] for p in r["principles"]]
        assert r["dominant"] != "z" and r["dominant"] in names
        pair = pairs[int(r["pair_id"][1:].split("#")[0])]
        # Expected label by hand: the drawn principle with the largest |score|, sign flipped if negated.
        raw = {"x": 2.5 + int(r["pair_id"][1:].split("#")[0]), "y": -0.15, "w": 0.01}
        eff = {n: (-raw[n] if n in r["negated"] else raw[n]) for n in names if n in raw}
        best = max(eff, key=lambda n: abs(eff[n]))
        assert r["dominant"] == best
        assert (r["chosen"], r["rejected"]) == ((pair["response_a"], pair["response_b"]) if eff[best] > 0
                                                else (pair["response_b"], pair["response_a"]))
        assert r["principles"][0].keys() == {"name", "definition", "negative_definition"}
    assert any(r["negated"] for r in rows) and any(not r["chosen_is_a"] for r in rows)
    # Held out by prompt: no prompt on both sides; deterministic under the seed.
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}
    assert aggregate(pairs, js, PSET, cfg)[0] == train


def test_label_noise_and_rule_overrides_are_off_by_default_and_work_when_on():
    pairs, js = _pairs_and_judgments()
    base = aggregate(pairs, js, PSET, AggregateConfig(normalize="none", eval_fraction=0))[0]
    noisy = aggregate(pairs, js, PSET, AggregateConfig(normalize="none", eval_fraction=0, label_noise=0.5))
    assert noisy[2]["noise_flipped"] > 0
    assert rule_label("As an AI language model, I cannot.", "Sure: 4.") == -1
    # The language rule: the answer in the prompt's script wins; same script on both sides: no rule.
    assert rule_label("Paris is the capital.", "首都是巴黎。", "What is the capital of France?") == 1
    assert rule_label("Столица — Париж.", "It is Paris.", [{"role": "user", "content": "Capital of France?"}]) == -1
    assert rule_label("巴黎。", "首都是巴黎。", "法国的首都是哪里？") is None
    assert rule_label("Paris.", "It is Paris.", "Capital of France?") is None
    pairs[0]["response_a"] = "As an AI language model I can't say."
    ruled = aggregate(pairs, js, PSET, AggregateConfig(normalize="none", eval_fraction=0, rule_overrides=True))[0]
    assert all(r["chosen"] == "B0" for r in ruled if r["pair_id"] == "p0#0")
    assert not any(r["label_source"] == "rule" for r in base)


def test_unknown_principle_in_judgments_is_a_clear_error():
    pairs, js = _pairs_and_judgments()
    js[0] = {**js[0], "principle": "nope"}
    with pytest.raises(UserError, match="'nope'.*not in the principle set"):
        aggregate(pairs, js, PSET, AggregateConfig())


def test_split_keeps_at_least_one_prompt_on_each_side():
    held = split_prompts([f"p{i}" for i in range(10)], 0.2, 1)
    assert len(held) == 2 and held == split_prompts([f"p{i}" for i in range(10)], 0.2, 1)
    assert len(split_prompts(["a", "b"], 0.9, 0)) == 1
    assert split_prompts(["a", "b"], 0.0, 0) == set()
