"""The labelled principle-flip check: does a scorer follow the principle it is given?

Each pair (principles/checks/flip_pairs.jsonl) has a prompt, one principle with its negation, and
two responses: ``response_a`` is better under the principle, ``response_b`` under its negation.
A scorer *flips correctly* on a pair when it prefers a under P AND b under not-P. The flip rate is
the share of pairs where it does; ``accuracy_p`` counts the first condition alone.

Variants reported (all over the same model, from one set of forward passes where possible):
- ``contrastive``: Σ log p(y|x,P) − Σ log p(y|x,¬P)  (the service's default scorer)
- ``contrastive-normalized``: the same divided by the response's token count
- ``contrastive-neutral``: Σ log p(y|x,P) − Σ log p(y|x, a neutral system prompt)
- ``probe``: logit(Yes) − logit(No) to "does the response follow the principles?"
- ``trained``: a registry version (``--registry``)
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from principles.schema import Principle
from rm_core.render import PRINCIPLE_HEADER, principle_block
from salmon.atomic import read_jsonl
from salmon.config import format_validation_error
from salmon.errors import UserError

DEFAULT_CHECK_SET = Path(str(resources.files("principles"))) / "checks" / "flip_pairs.jsonl"
NEUTRAL_SYSTEM = "You are a helpful AI assistant."
ZERO_SHOT = ("contrastive", "contrastive-normalized", "contrastive-neutral", "probe")


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


def run_check(model: str, path: Path, variants: list[str], registry: str | None = None,
              limit: int | None = None) -> dict:
    from rm_core.scorers import ProbeScorer, load_trained, load_zero_shot

    unknown = [v for v in variants if v not in ZERO_SHOT + ("trained",)]
    if unknown:
        raise ValueError(f"unknown scorer variants {unknown}; choose from {list(ZERO_SHOT) + ['trained']}")
    pairs = load_pairs(path, limit)
    t0 = time.perf_counter()
    results: dict[str, list[tuple[bool, bool]]] = {v: [] for v in variants}
    if registry:
        results["trained"] = []
    zero = [v for v in variants if v in ZERO_SHOT]
    if zero:
        cs = load_zero_shot("contrastive", model)
        probe = ProbeScorer(cs.model, cs.tokenizer, version="probe", base_model=model) if "probe" in zero else None
        for pair in tqdm(pairs, desc="check set", unit="pair"):
            pr = Principle.model_validate({**pair["principle"], "name": pair["principle"].get("name", "p")})
            systems = {"P": principle_block([pr]), "N": principle_block([pr], [pr.name]),
                       "0": NEUTRAL_SYSTEM}
            seqs, keys = [], []
            for resp_key in ("response_a", "response_b"):
                for sk, sys_text in systems.items():
                    seqs.append(cs.renderer.render(sys_text, pair["prompt"], pair[resp_key]))
                    keys.append((resp_key[-1], sk))
            vals, _ = cs.compute(seqs)
            v = dict(zip(keys, vals, strict=True))
            n = {r: len(seqs[keys.index((r, "P"))].response_ids) for r in "ab"}
            con = {r: v[(r, "P")] - v[(r, "N")] for r in "ab"}
            if "contrastive" in zero:
                results["contrastive"].append(_flip(con["a"], con["b"], -con["a"], -con["b"]))
            if "contrastive-normalized" in zero:
                results["contrastive-normalized"].append(
                    _flip(con["a"] / n["a"], con["b"] / n["b"], -con["a"] / n["a"], -con["b"] / n["b"]))
            if "contrastive-neutral" in zero:
                results["contrastive-neutral"].append(_flip(
                    v[("a", "P")] - v[("a", "0")], v[("b", "P")] - v[("b", "0")],
                    v[("a", "N")] - v[("a", "0")], v[("b", "N")] - v[("b", "0")]))
            if probe is not None:
                items = [(pair["prompt"], pair["response_a"]), (pair["prompt"], pair["response_b"])]
                sp = probe.score_items([pr], items)
                sn = probe.score_items([pr], items, negate=[pr.name])
                results["probe"].append(_flip(sp[0], sp[1], sn[0], sn[1]))
    if registry:
        ts = load_trained(registry)
        for pair in tqdm(pairs, desc="check set (trained)", unit="pair"):
            pr = Principle.model_validate({**pair["principle"], "name": pair["principle"].get("name", "p")})
            items = [(pair["prompt"], pair["response_a"]), (pair["prompt"], pair["response_b"])]
            sp = ts.score_items([pr], items)
            sn = ts.score_items([pr], items, negate=[pr.name])
            results["trained"].append(_flip(sp[0], sp[1], sn[0], sn[1]))
    report = {
        "check_set": str(path), "pairs": len(pairs), "model": model, "principle_header": PRINCIPLE_HEADER,
        "seconds": round(time.perf_counter() - t0, 1),
        "scorers": {k: {"flip_rate": round(sum(f for f, _ in r) / max(len(r), 1), 4),
                        "accuracy_p": round(sum(a for _, a in r) / max(len(r), 1), 4)}
                    for k, r in results.items()},
    }
    return report
