"""The one loader of the labelled flip-pair check set (used by `salmon check` and `salmon synth judge-check`)."""

from __future__ import annotations

import json

import pytest

from rm_core.checkset import DEFAULT_CHECK_SET, flip_pair_principle, load_pairs
from salmon.errors import UserError


def _pair(i: int, **over) -> dict:
    return {"id": f"f{i}", "prompt": f"q{i}", "response_a": "a", "response_b": "b",
            "principle": {"name": f"p{i // 2}", "definition": "d", "negative_definition": "n"}, **over}


def test_limit_keeps_the_first_pairs_or_spreads_them_over_the_file(tmp_path):
    path = tmp_path / "flips.jsonl"
    path.write_text("".join(json.dumps(_pair(i)) + "\n" for i in range(8)))
    assert [p["id"] for p in load_pairs(path)] == [f"f{i}" for i in range(8)]
    assert [p["id"] for p in load_pairs(path, 3)] == ["f0", "f1", "f2"]
    assert [p["id"] for p in load_pairs(path, 4, evenly_spaced=True)] == ["f0", "f2", "f4", "f6"]
    assert len(load_pairs(path, 20, evenly_spaced=True)) == 8


def test_a_bad_record_is_a_user_error_naming_the_file_and_record(tmp_path):
    path = tmp_path / "flips.jsonl"
    cases = {"missing field 'response_b'": {k: v for k, v in _pair(1).items() if k != "response_b"},
             "principle: field 'definition': is required": _pair(1, principle={"name": "x"}),
             "expected a JSON object": [1, 2]}
    for expect, bad in cases.items():
        path.write_text(json.dumps(_pair(0)) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=f"flips.jsonl:2: {expect}"):
            load_pairs(path)


def test_the_shipped_check_set_loads_and_a_nameless_principle_is_named_p():
    pairs = load_pairs(DEFAULT_CHECK_SET)
    assert pairs and all(flip_pair_principle(p).definition for p in pairs)
    assert flip_pair_principle({"principle": {"definition": "d"}}).name == "p"
