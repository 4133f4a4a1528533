"""rm_core.modes offline and the mode-agreement measurement, on the tiny model."""

from __future__ import annotations

import json

import pytest

from rm_core.checkset import DEFAULT_CHECK_SET, flip_pair_principle, load_pairs
from rm_core.mode_agreement import SCALES, main, measure, summarize


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from rm_core.prefix_cache import PrefixCache
    from rm_core.scorers import load_zero_shot

    return load_zero_shot("contrastive", str(tiny_model_dir), prefix_cache=PrefixCache())


def test_summary_by_hand():
    prefs = [{"pointwise": [1.0, -1.0], "rubric": [1.0, 1.0], "listwise": [-1.0, 1.0]},
             {"pointwise": [1.0, 1.0], "rubric": [1.0, 1.0], "listwise": [1.0, -2.0]}]
    t = summarize(prefs)
    assert t["pointwise"]["agreement_with_pointwise"] == 1.0
    assert t["rubric"]["agreement_with_pointwise"] == pytest.approx((0.5 + 1.0) / 2)
    assert t["listwise"]["agreement_with_pointwise"] == pytest.approx((0.0 + 0.5) / 2)
    assert t["pointwise"]["flip_rate"] == 0.5 and t["listwise"]["flip_rate"] == 0.5
    assert t["rubric"]["accuracy"] == pytest.approx(0.5)
    lo, hi = t["rubric"]["agreement_ci95"]
    assert 0.5 <= lo <= 0.75 <= hi <= 1.0


def test_measure_uses_the_scorers_own_scores(scorer):
    pairs = load_pairs(DEFAULT_CHECK_SET, 3, evenly_spaced=True)
    rep = measure(scorer, pairs, SCALES[10])
    assert rep["pairs"] == 3 and rep["modes"]["pointwise"]["agreement_with_pointwise"] == 1.0
    for pair, row in zip(pairs, rep["per_pair"], strict=True):
        p = flip_pair_principle(pair)
        items = [(pair["prompt"], pair["response_a"]), (pair["prompt"], pair["response_b"])]
        s = scorer.score_items([p], items, negate=(p.name,))
        assert row["pointwise"][1] == pytest.approx(s[0] - s[1], abs=1e-4)
        assert all(abs(d) <= 9 for d in row["rubric"])  # two ratings on a 1-10 scale


def test_cli_writes_json_and_png(tiny_model_dir, tmp_path):
    assert main(["--model", str(tiny_model_dir), "--limit", "2", "--scale", "6", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "mode_agreement.json").read_text())
    assert rep["scale"] == [1, 6] and set(rep["modes"]) == {"pointwise", "rubric", "listwise"}
    assert (tmp_path / "mode_agreement.png").stat().st_size > 1000
