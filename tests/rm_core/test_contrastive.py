"""The contrastive scorer's terms, against log-probabilities computed here from the rendered blocks."""

from __future__ import annotations

import pytest

from principles.schema import Principle
from rm_core.render import REFERENCE_INSTRUCTIONS, principle_block
from rm_core.scorers import load_zero_shot

POLITE = Principle(name="polite", definition="The response is polite.", negative_definition="The response is rude.")
BRIEF = Principle(name="brief", definition="The response is brief.", negative_definition="The response rambles.")
PLAIN = Principle(name="p1", definition="Answer in one sentence.")
PROMPT, RESPONSE = "How do I boil an egg?", "Put it in boiling water for nine minutes, then cool it."


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return load_zero_shot("contrastive", str(tiny_model_dir))


def lp(scorer, principles, negated=()):
    seq = scorer.renderer.render(principle_block(principles, negated), PROMPT, RESPONSE)
    return scorer.padded_response_logprobs([seq])[0]


def replaced(principles, name, text):
    return [Principle(name=p.name, definition=text) if p.name == name else p for p in principles]


def test_per_principle_contrast_sums_each_toggle(scorer):
    ps = [POLITE, BRIEF]
    want = 2 * lp(scorer, ps) - lp(scorer, ps, ["polite"]) - lp(scorer, ps, ["brief"])
    assert scorer.score_items(ps, [(PROMPT, RESPONSE)])[0] == pytest.approx(want, abs=1e-3)
    # under a negation the toggle goes the other way
    neg = 2 * lp(scorer, ps, ["polite"]) - lp(scorer, ps) - lp(scorer, ps, ["polite", "brief"])
    assert scorer.score_items(ps, [(PROMPT, RESPONSE)], negate=["polite"])[0] == pytest.approx(neg, abs=1e-3)


def test_a_plain_principle_is_contrasted_with_generic_instructions_in_its_place(scorer):
    refs = [lp(scorer, [Principle(name="p1", definition=t)]) for t in REFERENCE_INSTRUCTIONS]
    want = lp(scorer, [PLAIN]) - sum(refs) / len(refs)
    assert scorer.score_items([PLAIN], [(PROMPT, RESPONSE)])[0] == pytest.approx(want, abs=1e-3)
    prepared = scorer.prepare([PLAIN], PROMPT, RESPONSE)
    assert len(prepared.seqs) == 1 + len(REFERENCE_INSTRUCTIONS)


def test_a_mixed_set_adds_the_toggle_and_the_plain_terms(scorer):
    ps = [POLITE, PLAIN]
    refs = [lp(scorer, replaced(ps, "p1", t)) for t in REFERENCE_INSTRUCTIONS]
    want = (lp(scorer, ps) - lp(scorer, ps, ["polite"])) + (lp(scorer, ps) - sum(refs) / len(refs))
    assert scorer.score_items(ps, [(PROMPT, RESPONSE)])[0] == pytest.approx(want, abs=1e-3)


def test_whole_set_toggles_every_negatable_principle_at_once(tiny_model_dir):
    whole = load_zero_shot("contrastive", str(tiny_model_dir), contrast="whole_set")
    ps = [POLITE, BRIEF]
    want = lp(whole, ps) - lp(whole, ps, ["polite", "brief"])
    assert whole.score_items(ps, [(PROMPT, RESPONSE)])[0] == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
def test_the_default_scorer_reads_principles_on_the_embedded_model():
    """The check set's flip table for the zero-shot contrastive scorer on the real SmolLM2-135M, on 14
    pairs (one per axis): a guard that fails if the default scorer stops reading principles. Chance is
    25% flip and 50% accuracy; the README has the figures on all 56 pairs."""
    from rm_core.checkset import DEFAULT_CHECK_SET, run_check

    table = run_check("embedded", DEFAULT_CHECK_SET, ["contrastive"], limit=14, modes=("single", "plain"))
    got = table["scorers"]["contrastive"]
    assert got["single"]["pairs"] == 14 and got["single"]["flip_rate"] >= 0.5, got
    assert got["plain"]["pairs"] >= 10 and got["plain"]["accuracy"] >= 0.55, got
