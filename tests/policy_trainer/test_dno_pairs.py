"""DNO's pair selection (margins, any source may win) and the replay share of earlier pairs."""

from __future__ import annotations

import random

import pytest

from policy_trainer.dno_pairs import Candidate, Pair, build_pairs, mix_replay, replay_count, select_pair


def c(text: str, score: float, source: str = "policy") -> Candidate:
    return Candidate(text, score, source)


def test_chosen_is_the_top_and_rejected_the_lowest_at_least_margin_below():
    chosen, rejected = select_pair([c("a", 1.0), c("b", 3.0), c("d", 2.5), c("e", -1.0)], margin=1.0)
    assert (chosen.text, rejected.text) == ("b", "e")


def test_no_pair_when_nothing_is_margin_below_the_top():
    assert select_pair([c("a", 1.0), c("b", 1.4), c("d", 0.6)], margin=1.0) is None
    assert select_pair([c("a", 1.0), c("b", 0.0)], margin=1.0) is not None  # exactly the margin counts
    assert select_pair([c("a", 1.0)], margin=0.0) is None


def test_identical_texts_never_make_a_pair():
    assert select_pair([c("same", 1.0), c("same", 1.0)], margin=0.0) is None


@pytest.mark.parametrize("scores, want", [
    ((5.0, 1.0, 2.0), ("teacher", "policy")),  # teacher > student
    ((0.0, 1.0, 3.0), ("policy", "teacher")),  # student > teacher
    ((2.0, 4.0, 0.5), ("policy", "policy")),   # student > student, the teacher in between
])
def test_every_source_combination_is_allowed(scores, want):
    t, s1, s2 = scores
    chosen, rejected = select_pair([c("t", t, "teacher"), c("s1", s1), c("s2", s2)], margin=1.0)
    assert (chosen.source, rejected.source) == want


def test_build_pairs_keeps_prompts_with_a_margin_and_records_it():
    groups = [("p1", "q1", [c("x", 2.0), c("y", 0.0)]), ("p2", "q2", [c("x", 0.2), c("y", 0.0)])]
    pairs = build_pairs(groups, margin=0.5, iteration=3)
    assert [(p.prompt_id, p.chosen, p.rejected, p.iteration) for p in pairs] == [("p1", "x", "y", 3)]
    assert pairs[0].margin == pytest.approx(2.0)


def _pairs(n: int, iteration: int) -> list[Pair]:
    return [Pair(f"p{iteration}-{i}", "q", "a", "b", 1.0, 0.0, "policy", "policy", iteration) for i in range(n)]


@pytest.mark.parametrize("n_new, share, available, want", [
    (4, 0.5, 10, 4), (6, 0.25, 10, 2), (4, 0.5, 1, 1), (4, 0.0, 10, 0), (0, 0.5, 10, 0), (3, 0.75, 100, 9)])
def test_replay_count_makes_share_of_the_set(n_new, share, available, want):
    assert replay_count(n_new, share, available) == want


def test_replay_count_rejects_a_share_of_one():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        replay_count(4, 1.0, 10)


def test_mix_replay_draws_distinct_earlier_pairs_in_the_share():
    new, earlier = _pairs(6, 2), _pairs(5, 0) + _pairs(5, 1)
    mixed = mix_replay(new, earlier, 0.25, random.Random(0))
    old = [p for p in mixed if p.iteration < 2]
    assert len(mixed) == 8 and len(old) == 2 and len(set(old)) == 2
    assert sorted(p.prompt_id for p in mixed if p.iteration == 2) == sorted(p.prompt_id for p in new)
    # Different seeds draw different replay: it is a sample, not the first pairs of the pool.
    draws = {tuple(sorted(p.prompt_id for p in mix_replay(new, earlier, 0.25, random.Random(s)) if p.iteration < 2))
             for s in range(10)}
    assert len(draws) > 1
