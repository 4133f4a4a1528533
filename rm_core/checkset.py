"""The labelled principle-flip check: does a scorer follow the principle it is given?

Each pair (principles/checks/flip_pairs.jsonl) has a prompt, one principle with its negation, and
two responses: ``response_a`` is better under the principle, ``response_b`` under its negation.
A scorer *flips correctly* on a pair when it prefers a under P AND b under not-P. The flip rate is
the share of pairs where it does; ``accuracy`` counts the first condition alone.

The flip table measures it three ways (:func:`flip_table`): the principle alone (``single``), the
principle inside a set of 5 with 4 distractors from other axes (``set``), and the principle as a
plain instruction against its opposite instruction (``plain``; principles/checks/plain_forms.yaml).
``run_check`` prints it for each scorer: the shipped RM, a registry version, the zero-shot
contrastive scorer and the yes/no probe. None of the check set's axes is trained on.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from principles.schema import Principle
from salmon.atomic import read_jsonl
from salmon.config import format_validation_error
from salmon.errors import UserError

DEFAULT_CHECK_SET = Path(str(resources.files("principles"))) / "checks" / "flip_pairs.jsonl"


FLIP_PAIR_FIELDS = ("prompt", "principle", "response_a", "response_b")


def flip_pair_principle(pair: dict) -> Principle:
    """A flip pair's principle (a pair may leave out its name: it is the only principle there)."""
    return Principle.model_validate({**pair["principle"], "name": pair["principle"].get("name", "p")})


def load_pairs(path: Path, limit: int | None = None, *, evenly_spaced: bool = False) -> list[dict]:
    """The labelled flip pairs of ``path``, each checked (fields, principle); a bad one is a UserError.

    ``limit`` keeps the first N pairs, or with ``evenly_spaced`` N pairs spread over the file: it is
    grouped by principle, so its first few records would measure one principle only.
    """
    pairs = read_jsonl(path)
    for n, p in enumerate(pairs, 1):
        if not isinstance(p, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(p).__name__}")
        for k in FLIP_PAIR_FIELDS:
            if k not in p:
                raise UserError(f"{path}:{n}: missing field {k!r}")
        if not isinstance(p["principle"], dict):
            raise UserError(f"{path}:{n}: field 'principle' must be an object with a definition")
        try:
            flip_pair_principle(p)
        except ValidationError as e:
            raise UserError(format_validation_error(e, f"{path}:{n}: principle")) from None
    if limit and limit < len(pairs) and evenly_spaced:
        return [pairs[i * len(pairs) // limit] for i in range(limit)]
    return pairs[:limit] if limit else pairs


def _flip(sp_a: float, sp_b: float, sn_a: float, sn_b: float) -> tuple[bool, bool]:
    return sp_a > sp_b and sn_b > sn_a, sp_a > sp_b


SCORERS = ("shipped", "trained", "contrastive", "probe")


def scorer_score_fn(scorer):
    """A flip-table scoring function over a scorer's offline path (the one the service runs)."""
    def score_fn(principles, negate, items):
        return scorer.score_items(principles, items, negate=negate)

    return score_fn


def check_pairs(path: Path, limit: int | None = None) -> list[dict]:
    """The flip pairs of ``path`` with each principle's plain and opposite forms (for the plain column)."""
    forms = plain_forms()
    return [{**p, **forms.get(flip_pair_principle(p).name, {})} for p in load_pairs(path, limit, evenly_spaced=True)]


def run_check(model: str, path: Path | None, scorers: list[str], registry: str | None = None,
              limit: int | None = None, modes: tuple[str, ...] | None = None, seed: int = 0,
              contrast_adapter: str | Path | None = None, pairs: list[dict] | None = None) -> dict:
    """The flip table (single / inside a set of 5 / plain text) of each scorer on the check set
    (``path``), or on ``pairs`` already built (e.g. the held-out axes' written pairs)."""
    from rm_core.scorers import ProbeScorer, load_shipped, load_trained, load_zero_shot

    unknown = [v for v in scorers if v not in SCORERS]
    if unknown:
        raise UserError(f"unknown scorers {unknown}; choose from {list(SCORERS)}")
    if "trained" in scorers and not registry:
        raise UserError("the 'trained' scorer needs --registry DIR")
    if pairs is None:
        pairs = check_pairs(path, limit)
    elif limit and limit < len(pairs):
        pairs = [pairs[i * len(pairs) // limit] for i in range(limit)]
    modes = tuple(modes or FLIP_MODES)
    t0 = time.perf_counter()
    tables: dict[str, dict] = {}
    zero = None  # the contrastive scorer and the probe share one loaded causal LM
    for kind in scorers:
        t1 = time.perf_counter()
        if kind in {"contrastive", "probe"} and zero is None:
            zero = load_zero_shot("contrastive", model, adapter=contrast_adapter)
        if kind == "shipped":
            scorer = load_shipped()
        elif kind == "trained":
            scorer = load_trained(registry)
        elif kind == "contrastive":
            scorer = zero
        elif contrast_adapter is not None:  # the probe reads the model as it is, without the adapter
            scorer = load_zero_shot("probe", model)
        else:
            scorer = ProbeScorer(zero.model, zero.tokenizer, version="probe", base_model=model)
        tables[kind] = {"version": scorer.version,
                        **flip_table(scorer_score_fn(scorer), pairs, seed=seed, modes=modes, desc=kind),
                        "seconds": round(time.perf_counter() - t1, 1)}
    return {"check_set": str(path) if path else "held-out axes", "pairs": len(pairs), "model": model,
            "modes": list(modes),
            "seconds": round(time.perf_counter() - t0, 1), "scorers": tables}


# -- the flip table: single principle, inside a set with distractors, plain text ----------------

PLAIN_FORMS = Path(str(resources.files("principles"))) / "checks" / "plain_forms.yaml"
FLIP_MODES = ("single", "set", "plain")


def plain_forms(path: Path = PLAIN_FORMS) -> dict[str, dict[str, str]]:
    """``{principle name: {"plain": …, "opposite": …}}`` for the check set's principles."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of principle name -> {{plain, opposite}}")
    for name, v in data.items():
        if not isinstance(v, dict) or not {"plain", "opposite"} <= set(v):
            raise UserError(f"{path}: {name}: needs both 'plain' and 'opposite'")
    return data


def flip_table(score_fn, pairs: list[dict], *, seed: int = 0, distractors: int = 4,
               modes: tuple[str, ...] = FLIP_MODES, desc: str = "flip table") -> dict[str, dict]:
    """Flip rate and accuracy of one scorer in each mode, over labelled flip pairs.

    ``score_fn(principles, negate, items) -> scores`` scores ``(prompt, response)`` items. Per pair:
    - ``single``: the principle alone vs its negation;
    - ``set``: the principle inside a set with ``distractors`` principles of other pairs' axes (the
      same set, shuffled once per pair under ``seed``), negating only it;
    - ``plain``: the pair's ``plain`` instruction vs its ``opposite`` as plain strings (pairs without
      them are skipped). A scorer that cannot read plain principles raises a UserError, reported as
      ``unsupported`` with its message.
    A pair flips correctly when response a wins under the first and response b under the second;
    ``accuracy`` counts the first condition alone.
    """
    import random

    pool = {}
    for p in pairs:
        pr = flip_pair_principle(p)
        pool.setdefault(pr.name, pr)
    out: dict[str, dict] = {}
    for mode in modes:
        hits: list[tuple[bool, bool]] = []
        try:
            for i, p in enumerate(tqdm(pairs, desc=f"{desc}: {mode}", unit="pair", leave=False)):
                rng = random.Random(f"{seed}:{i}")  # the same distractors for every scorer
                items = [(p["prompt"], p["response_a"]), (p["prompt"], p["response_b"])]
                pr = flip_pair_principle(p)
                if mode == "single":
                    sp, sn = score_fn([pr], [], items), score_fn([pr], [pr.name], items)
                elif mode == "set":
                    others = [q for n, q in sorted(pool.items()) if n != pr.name]
                    members = [pr, *rng.sample(others, min(distractors, len(others)))]
                    rng.shuffle(members)
                    sp, sn = score_fn(members, [], items), score_fn(members, [pr.name], items)
                else:
                    if not p.get("plain") or not p.get("opposite"):
                        continue
                    sp = score_fn([Principle(name="p1", definition=p["plain"])], [], items)
                    sn = score_fn([Principle(name="p1", definition=p["opposite"])], [], items)
                hits.append(_flip(sp[0], sp[1], sn[0], sn[1]))
        except UserError as e:
            out[mode] = {"unsupported": str(e)}
            continue
        n = max(len(hits), 1)
        out[mode] = {"pairs": len(hits), "flip_rate": round(sum(f for f, _ in hits) / n, 4),
                     "accuracy": round(sum(a for _, a in hits) / n, 4)}
    return out
