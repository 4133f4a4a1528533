"""RL-time principle selection, the set timeline, reward shaping: pure logic, no HTTP."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from policy_trainer.config import RunConfig, ShapingConfig
from policy_trainer.principles_select import PrincipleSelector, SetTimeline
from policy_trainer.shaping import RunningNormalizer, length_bonus, scale_scores, shaping_terms
from principles.schema import load_principle_set

RL = load_principle_set("rl")
INTERVENTION = load_principle_set("intervention")
TAGS = RunConfig().principles.type_tags


def test_whole_set_when_k_is_none_goes_by_reference():
    sel = PrincipleSelector().select(RL, step=0, prompt_id="a", prompt_type="general")
    assert not sel.inline and sel.set_ref == RL.ref and sel.names == RL.names()


def test_k_without_replacement_plus_intervention_deterministic_per_step_and_prompt():
    s = PrincipleSelector(k=3, intervention=INTERVENTION, type_tags=TAGS, seed=1)
    a = s.select(RL, step=4, prompt_id="p1", prompt_type="general")
    assert a.inline and len(a.names) == 6 and len(set(a.names)) == 6
    assert a.names[3:] == INTERVENTION.names()
    assert s.select(RL, step=4, prompt_id="p1", prompt_type="general") == a  # resume draws the same
    draws = {tuple(s.select(RL, step=st, prompt_id="p1", prompt_type="general").names) for st in range(20)}
    assert len(draws) > 5  # but different steps draw differently


def test_draw_frequency_follows_weight():
    s = PrincipleSelector(k=1, type_tags=TAGS)
    counts = Counter(s.select(RL, step=i, prompt_id="x", prompt_type="general").names[0] for i in range(3000))
    w = {p.name: p.weight for p in RL.principles}
    total = sum(w.values())
    for name in ("helpful", "creative", "concise"):
        assert counts[name] / 3000 == pytest.approx(w[name] / total, abs=0.03)


@pytest.mark.parametrize(("ptype", "expected"), [
    ("reasoning", {"consistent_reasoning", "numerical_sensitivity"}),
    ("redteam", {"ethical", "harmless", "respectful", "privacy_respecting"}),
])
def test_prompt_type_boosts_matching_principles(ptype, expected):
    boosted = PrincipleSelector(k=2, type_tags=TAGS, type_boost=128)
    plain = PrincipleSelector(k=2, type_tags=TAGS, type_boost=0)
    hit_b = np.mean([set(boosted.select(RL, step=i, prompt_id="q", prompt_type=ptype).names) <= expected
                     for i in range(300)])
    hit_p = np.mean([set(plain.select(RL, step=i, prompt_id="q", prompt_type=ptype).names) <= expected
                     for i in range(300)])
    # SALMON's +128 makes the matching principles dominate without forcing them (k=2 of 14)
    assert hit_b > 0.45 and hit_p < 0.05


def test_timeline_schedule_control_file_and_resume(tmp_path):
    concise, harmless = load_principle_set("concise"), load_principle_set("harmless")
    ctl = tmp_path / "ctl"
    t = SetTimeline(concise, [(2, RL)], control_file=ctl)
    assert t.at_step(0) is concise and t.at_step(1) is concise and t.poll_control() is None
    assert t.at_step(2) is RL
    ctl.write_text("harmless\n")
    assert t.poll_control() == "harmless" and t.poll_control() is None  # read once
    t.switch(3, harmless, "control_file")
    assert t.at_step(3) is harmless
    assert [(e.step, e.ref, e.source) for e in t.events] == [
        (0, concise.ref, "start"), (2, RL.ref, "schedule"), (3, harmless.ref, "control_file")]
    again = SetTimeline(concise, [(2, RL)], control_file=ctl)
    again.load_state_dict(t.state_dict(), resume_step=2)
    assert again.current is not None and again.current.ref == RL.ref
    assert again.at_step(2).ref == RL.ref and again.poll_control() is None  # no re-switch on resume


def test_length_bonus_salmon_formula_and_cap():
    cfg = ShapingConfig.model_validate({"length_bonus": {"enabled": True}}).length_bonus
    assert length_bonus(512, "general", cfg) == pytest.approx(5 * 0.5)
    assert length_bonus(4096, "general", cfg) == pytest.approx(5 * 0.8)  # capped
    assert length_bonus(512, "reasoning", cfg) == pytest.approx(5 * 0.5 * -0.4)
    assert length_bonus(512, "unknown", cfg) == pytest.approx(5 * 0.5)
    assert length_bonus(512, "general", ShapingConfig().length_bonus) == 0.0


def test_unfinished_penalty_only_without_eos():
    cfg = ShapingConfig(unfinished_penalty=2.0)
    assert shaping_terms([[5, 6, 2], [5, 6, 7]], ["general", "general"], [2], cfg) == [0.0, -2.0]


def test_running_normalizer_matches_numpy_and_persists():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, 50).tolist(), rng.normal(3, 2, 70).tolist()
    n = RunningNormalizer()
    n.update(a)
    n.update(b)
    assert n.mean == pytest.approx(np.mean(a + b)) and n.std == pytest.approx(np.std(a + b))
    m = RunningNormalizer()
    m.load_state_dict(n.state_dict())
    cfg = ShapingConfig(normalize="running", rm_scale=10)
    out = scale_scores([n.mean], cfg, m)
    assert abs(out[0]) < 1.0
