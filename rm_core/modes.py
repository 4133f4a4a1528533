"""Rubric and listwise scoring on top of any scorer: plans of ordinary prepared items, and their folds.

Both modes reuse the pointwise path unchanged (a plan is a flat list of :class:`~rm_core.scorers.Prepared`
the batcher runs like any other request), so batching, the prefix cache and every scorer work as they do:

- **rubric**: each (item, principle) gets a rating on the set's scale (:class:`~principles.schema.RubricScale`).
  For every anchored rating ``k`` the scorer scores the response under a level principle, "the principle,
  rated k: <anchor k>", whose negation is the lowest anchor's text; the values ``s_k`` become a
  distribution over the anchored ratings (``softmax(s)``, i.e. p(k | response) ∝ p(response | anchor k)
  under the contrastive scorer, whose common term cancels) and the rating is its mean, a number on
  the scale. An item's score is the mean of its principles' ratings.
- **listwise**: the items of one request that share a prompt form a list of K responses ranked
  together. Each response is scored with every candidate of its list shown in the prompt
  ("Candidate responses: [1] … [K] …" before the question), so its score is read against the
  others; the list's [principles + prompt + candidates] prefix is the same for all K, so the prefix
  cache computes it once. Ranks are 1 for the best of a list (ties share a rank).

``plan_*`` take a ``prepare(i, principles, prompt, response)`` callback (the service maps its
RenderErrors to the item's index; offline callers pass the scorer's own ``prepare``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from principles.schema import Principle, RubricScale
from rm_core.render import Prompt
from rm_core.scorers import Prepared, Scorer

Prepare = Callable[[int, Sequence[Principle], Prompt, str], Prepared]


@dataclass
class ModeResult:
    scores: list[float]
    truncated: list[bool]
    rubric: list[dict[str, float]] | None = None  # per item: principle name -> rating on the scale
    ranks: list[int] | None = None                # per item: 1 = best of its list
    lists: list[int] | None = None                # per item: which list (prompt) it was ranked in
    extra: dict = field(default_factory=dict)


@dataclass
class Plan:
    prepared: list[Prepared]
    fold: Callable[[list[float]], ModeResult]


def level_principle(p: Principle, scale: RubricScale, k: int, negated: bool = False) -> Principle:
    """The principle "``p``, rated ``k``": the anchor's text under ``p``'s definition (its negative one if
    ``negated``); its negation is the lowest anchor's, so contrastive values compare ratings."""
    lo, hi = scale.scale
    text = p.negative_definition if negated and p.negative_definition else p.definition

    def say(r: int) -> str:
        return f"Principle: {text}\nRating of the response on this principle: {r} of {hi}. {scale.anchors[r]}"

    return Principle(name=p.name, definition=say(k), negative_definition=say(lo))


def expected_rating(levels: Sequence[int], values: Sequence[float]) -> float:
    """Mean rating under softmax(values) over the anchored ``levels``."""
    top = max(values)
    w = [math.exp(v - top) for v in values]
    return sum(k * x for k, x in zip(levels, w, strict=True)) / sum(w)


def plan_rubric(prepare: Prepare, principles: Sequence[Principle], scale: RubricScale,
                items: Sequence[tuple[Prompt, str]], negate: Collection[str] = ()) -> Plan:
    levels = scale.levels()
    prepared: list[Prepared] = []
    for i, (prompt, response) in enumerate(items):
        for p in principles:
            for k in levels:
                prepared.append(prepare(i, [level_principle(p, scale, k, p.name in negate)], prompt, response))
    per_item = len(principles) * len(levels)

    def fold(values: list[float]) -> ModeResult:
        ratings, scores, truncated = [], [], []
        for i in range(len(items)):
            row = {}
            for j, p in enumerate(principles):
                at = i * per_item + j * len(levels)
                row[p.name] = expected_rating(levels, values[at:at + len(levels)])
            ratings.append(row)
            scores.append(sum(row.values()) / len(row))
            truncated.append(any(x.truncated for x in prepared[i * per_item:(i + 1) * per_item]))
        return ModeResult(scores=scores, truncated=truncated, rubric=ratings)

    return Plan(prepared, fold)


def prompt_key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def candidates_prompt(prompt: Prompt, responses: Sequence[str]) -> Prompt:
    """``prompt`` with the list's candidates shown before the question (a truncated prompt loses its start,
    so the candidates go before the question is cut)."""
    block = "Candidate responses, to be compared:\n" + "\n".join(
        f"[{n}] {r}" for n, r in enumerate(responses, 1)) + "\n\nQuestion: "
    if isinstance(prompt, str):
        return block + prompt
    msgs = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = block + msgs[last]["content"]
    return msgs


def ranks_of(scores: Sequence[float]) -> list[int]:
    """1 + how many score strictly higher (ties share a rank)."""
    return [1 + sum(o > s for o in scores) for s in scores]


def plan_listwise(prepare: Prepare, principles: Sequence[Principle], items: Sequence[tuple[Prompt, str]]) -> Plan:
    lists: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(items):
        lists.setdefault(prompt_key(prompt), []).append(i)
    list_of = [0] * len(items)
    shown: list[Prompt] = [None] * len(items)  # type: ignore[list-item]
    for n, rows in enumerate(lists.values()):
        joint = candidates_prompt(items[rows[0]][0], [items[i][1] for i in rows])
        for i in rows:
            list_of[i], shown[i] = n, joint
    prepared = [prepare(i, principles, shown[i], items[i][1]) for i in range(len(items))]

    def fold(values: list[float]) -> ModeResult:
        ranks = [0] * len(items)
        for rows in lists.values():
            for i, r in zip(rows, ranks_of([values[i] for i in rows]), strict=True):
                ranks[i] = r
        return ModeResult(scores=list(values), truncated=[p.truncated for p in prepared], ranks=ranks, lists=list_of)

    return Plan(prepared, fold)


def offline_prepare(scorer: Scorer, negate: Collection[str] = (), truncate: bool = True) -> Prepare:
    """``prepare`` for offline plans: the scorer's own (listwise keeps ``negate``; rubric levels carry it)."""
    return lambda _i, principles, prompt, response: scorer.prepare(principles, prompt, response, negate, truncate)


def run_offline(scorer: Scorer, plan: Plan) -> ModeResult:
    """A plan through the scorer without the service (the check scripts and tests)."""
    return plan.fold(scorer.score_prepared(plan.prepared))
