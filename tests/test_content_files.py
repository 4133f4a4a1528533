"""The shipped prompt set and the labelled principle-flip check set are well formed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data_synth" / "data" / "prompts.jsonl"
SEEDS = ROOT / "data_synth" / "data" / "seed_prompts.jsonl"
FLIPS = ROOT / "principles" / "checks" / "flip_pairs.jsonl"
PROMPT_TYPES = {"general", "reasoning", "redteam"}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{n}: blank line"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name}:{n}: not a JSON object"
        rows.append(row)
    return rows


def _check_prompts(rows: list[dict], name: str) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{name}: duplicate ids {[i for i, c in Counter(ids).items() if c > 1]}"
    keys = Counter(r["prompt"].strip().lower() for r in rows)
    dups = [k for k, c in keys.items() if c > 1]
    assert not dups, f"{name}: duplicate prompts {dups}"
    for r in rows:
        assert set(r) == {"id", "prompt", "type"}, r
        assert isinstance(r["id"], str) and r["id"]
        assert isinstance(r["prompt"], str) and r["prompt"].strip() == r["prompt"] and r["prompt"]
        assert r["type"] in PROMPT_TYPES, r


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return _read_jsonl(PROMPTS)


@pytest.fixture(scope="module")
def flips() -> list[dict]:
    return _read_jsonl(FLIPS)


def test_prompts_parse_and_are_unique(prompts):
    assert len(prompts) >= 150
    _check_prompts(prompts, PROMPTS.name)


def test_prompt_mix_and_length(prompts):
    by_type = Counter(r["type"] for r in prompts)
    assert by_type["general"] >= 70
    assert by_type["reasoning"] >= 30
    assert by_type["redteam"] >= 20
    long = [r["prompt"] for r in prompts if len(r["prompt"].split()) > 30]
    assert len(long) <= len(prompts) // 10, long


def test_seed_prompts(prompts):
    seeds = _read_jsonl(SEEDS)
    assert len(seeds) == 8
    _check_prompts(seeds, SEEDS.name)
    assert {r["type"] for r in seeds} == PROMPT_TYPES
    overlap = {r["prompt"].lower() for r in seeds} & {r["prompt"].lower() for r in prompts}
    assert not overlap, overlap


def test_flip_pairs_parse(flips):
    assert len(flips) >= 40
    ids = [r["id"] for r in flips]
    assert len(ids) == len(set(ids))
    for r in flips:
        assert set(r) == {"id", "prompt", "principle", "response_a", "response_b", "note"}, r["id"]
        for key in ("prompt", "response_a", "response_b", "note"):
            assert isinstance(r[key], str) and r[key].strip(), (r["id"], key)
        assert r["response_a"] != r["response_b"], r["id"]
        assert len(r["response_a"].split()) <= 70 and len(r["response_b"].split()) <= 70, r["id"]


def test_flip_principles_have_both_definitions(flips):
    for r in flips:
        p = r["principle"]
        assert set(p) <= {"name", "definition", "negative_definition"}, r["id"]
        for key in ("name", "definition", "negative_definition"):
            assert isinstance(p.get(key), str) and p[key].strip(), (r["id"], key)
        assert p["definition"] != p["negative_definition"], r["id"]


def test_flip_principles_are_consistent_per_name(flips):
    """One axis, one wording: a name always comes with the same two definitions."""
    seen: dict[str, tuple[str, str]] = {}
    for r in flips:
        p = r["principle"]
        pair = (p["definition"], p["negative_definition"])
        assert seen.setdefault(p["name"], pair) == pair, r["id"]


def test_flip_axes_coverage(flips):
    by_name = Counter(r["principle"]["name"] for r in flips)
    assert len(by_name) >= 12, by_name
    assert min(by_name.values()) >= 3, by_name


def test_flip_lengths_are_not_a_giveaway(flips):
    """A scorer that just prefers the shorter (or longer) response must not pass the check."""
    a_shorter = sum(len(r["response_a"]) < len(r["response_b"]) for r in flips)
    a_longer = sum(len(r["response_a"]) > len(r["response_b"]) for r in flips)
    assert a_shorter / len(flips) <= 0.6, f"response_a is shorter in {a_shorter}/{len(flips)} pairs"
    assert a_longer / len(flips) <= 0.6, f"response_a is longer in {a_longer}/{len(flips)} pairs"
