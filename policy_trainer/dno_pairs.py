"""DNO's data step as pure functions: large-margin preference pairs per prompt, and the replay mix.

Direct Nash Optimization, its practical batched variant (Rosset et al., 2024): every iteration
samples K responses per prompt from the current policy (optionally plus a teacher's response),
scores them, and keeps a pair only when the chosen response beats the rejected one by a clear
margin, so that DPO learns from preferences the scorer is sure of rather than from its noise. Any
source may win: teacher ≻ student, student ≻ teacher and student ≻ student pairs are all allowed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float
    source: str = "policy"  # policy | teacher


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    prompt: Any  # chat messages
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    chosen_source: str
    rejected_source: str
    iteration: int

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_pair(candidates: Sequence[Candidate], margin: float) -> tuple[Candidate, Candidate] | None:
    """(chosen, rejected): the top-scored candidate and the lowest one at least ``margin`` below it.

    None when no candidate is that far below the top (the scorer cannot tell them apart well enough).
    The lowest rather than any below the margin: the widest gap is the preference the scorer is surest of.
    """
    if len(candidates) < 2:
        return None
    ranked = sorted(candidates, key=lambda c: c.score, reverse=True)  # stable: ties keep the given order
    chosen = ranked[0]
    below = [c for c in ranked[1:] if chosen.score - c.score >= margin and c.text != chosen.text]
    if not below:
        return None
    return chosen, below[-1]


def build_pairs(groups: Sequence[tuple[str, Any, Sequence[Candidate]]], margin: float, iteration: int) -> list[Pair]:
    """One pair per prompt whose candidates span at least ``margin``; ``groups`` is (prompt_id, prompt, candidates)."""
    pairs = []
    for pid, prompt, cands in groups:
        picked = select_pair(cands, margin)
        if picked is None:
            continue
        c, r = picked
        pairs.append(Pair(pid, prompt, c.text, r.text, c.score, r.score, c.source, r.source, iteration))
    return pairs


def replay_count(n_new: int, share: float, available: int) -> int:
    """How many earlier pairs to mix in so that they make ``share`` of the training set (capped by ``available``)."""
    if not 0 <= share < 1:
        raise ValueError(f"replay share must be in [0, 1); got {share}")
    if n_new == 0 or share == 0:
        return 0
    return min(available, round(share * n_new / (1 - share)))


def mix_replay(new: Sequence[Pair], earlier: Sequence[Pair], share: float, rng: random.Random) -> list[Pair]:
    """``new`` plus a uniform draw without replacement of earlier iterations' pairs, shuffled together."""
    k = replay_count(len(new), share, len(earlier))
    mixed = list(new) + rng.sample(list(earlier), k)
    rng.shuffle(mixed)
    return mixed
