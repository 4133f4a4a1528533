"""Every shipped principle set loads through the one loader; identity and error messages behave.

Fast: YAML and pydantic only, no model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from principles.schema import (
    PrincipleSetError,
    builtin_dir,
    builtin_names,
    load_principle_set,
)

PRINCIPLES_DIR = Path(__file__).resolve().parents[1] / "principles"
YAML_FILES = sorted(PRINCIPLES_DIR.glob("*.yaml"))
ALLOWED_TAGS = {"general", "reasoning", "redteam", "numerical", "creative", "safety", "honesty", "style"}

# Sets whose size is part of the spec (SALMON-style collections and the service default).
EXPECTED_COUNTS = {"rm": 11, "rl": 14, "intervention": 3, "hhh": 3, "self_align": 16}
SIZE_RANGES = {"harmless": (8, 11), "honest": (6, 8)}


def _ids(paths):
    return [p.stem for p in paths]


def test_shipped_sets_are_found():
    assert builtin_dir().resolve() == PRINCIPLES_DIR.resolve()
    names = set(builtin_names())
    for n in [*EXPECTED_COUNTS, *SIZE_RANGES, "concise"]:
        assert n in names, f"shipped set {n!r} is missing from principles/"


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_every_set_validates(path: Path):
    s = load_principle_set(path)
    assert s.name == path.stem, "a set's name should match its file name"
    assert s.description.strip()
    assert s.principles
    for p in s.principles:
        assert p.negative_definition, f"{path.name}: {p.name} has no negative_definition"
        assert p.negative_definition != p.definition
        assert p.definition.startswith("The response"), f"{path.name}: {p.name}"
        assert p.negative_definition.startswith("The response"), f"{path.name}: {p.name}"
        assert p.tags, f"{path.name}: {p.name} has no tags"
        assert set(p.tags) <= ALLOWED_TAGS, f"{path.name}: {p.name} has tags {set(p.tags) - ALLOWED_TAGS}"
    # The same set by bare name is the same content.
    assert load_principle_set(path.stem).hash == s.hash


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_every_file_starts_with_a_purpose_comment(path: Path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and len(first) > 10


@pytest.mark.parametrize(("name", "count"), sorted(EXPECTED_COUNTS.items()))
def test_set_sizes(name: str, count: int):
    assert len(load_principle_set(name).principles) == count


@pytest.mark.parametrize(("name", "bounds"), sorted(SIZE_RANGES.items()))
def test_set_size_ranges(name: str, bounds: tuple[int, int]):
    lo, hi = bounds
    assert lo <= len(load_principle_set(name).principles) <= hi


def test_rl_weights_are_integers_and_tags_cover_prompt_types():
    raw = yaml.safe_load((PRINCIPLES_DIR / "rl.yaml").read_text(encoding="utf-8"))
    for p in raw["principles"]:
        assert isinstance(p.get("weight"), int) and not isinstance(p["weight"], bool), p["name"]
        assert p["weight"] >= 1
    s = load_principle_set("rl")
    assert all(float(p.weight).is_integer() for p in s.principles)
    names = s.names()
    assert "consistent_reasoning" in names and "numerical_sensitivity" in names
    assert "reasoning" in s.get("consistent_reasoning").tags
    assert "numerical" in s.get("numerical_sensitivity").tags
    tags = {t for p in s.principles for t in p.tags}
    assert {"general", "reasoning", "redteam", "safety"} <= tags


def test_hhh_definitions_are_one_short_sentence():
    s = load_principle_set("hhh")
    assert s.names() == ["helpful", "honest", "harmless"]
    for p in s.principles:
        for text in (p.definition, p.negative_definition):
            assert text.count(".") == 1 and text.endswith("."), text
            assert len(text.split()) <= 20, text


# -- identity -------------------------------------------------------------------------------------

def _reorder(obj):
    """The same content with every mapping's keys in reverse order."""
    if isinstance(obj, dict):
        return {k: _reorder(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reorder(x) for x in obj]
    return obj


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_hash_is_stable_under_relayout(path: Path, tmp_path: Path):
    original = load_principle_set(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    flow = tmp_path / "flow.yaml"
    flow.write_text(yaml.safe_dump(_reorder(raw), default_flow_style=True, sort_keys=False, width=60))
    block = tmp_path / "block.yaml"
    block.write_text("# a different comment\n" + yaml.safe_dump(raw, default_flow_style=False, sort_keys=True))
    assert flow.read_text() != path.read_text()
    assert load_principle_set(flow).hash == original.hash
    assert load_principle_set(block).hash == original.hash
    assert load_principle_set(flow).ref == original.ref


def test_hash_fills_defaults(tmp_path: Path):
    bare = tmp_path / "a.yaml"
    bare.write_text("name: x\nprinciples:\n  - name: a\n    definition: The response is kind.\n")
    explicit = tmp_path / "b.yaml"
    explicit.write_text(
        "name: x\ndescription: ''\nprinciples:\n"
        "  - {name: a, definition: '  The response is kind.  ', weight: 1, tags: [], negative_definition: null}\n"
    )
    assert load_principle_set(bare).hash == load_principle_set(explicit).hash


def test_hash_changes_with_content(tmp_path: Path):
    src = PRINCIPLES_DIR / "hhh.yaml"
    original = load_principle_set(src)
    raw = yaml.safe_load(src.read_text(encoding="utf-8"))

    raw["principles"][0]["definition"] += " It is brief."
    changed = tmp_path / "hhh.yaml"
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    s = load_principle_set(changed)
    assert s.hash != original.hash and len(s.hash) == len(original.hash) == 12
    assert s.ref == f"hhh@{s.hash}"

    raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    raw["principles"][1]["negative_definition"] = "The response lies."
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_principle_set(changed).hash != original.hash

    raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    raw["principles"].reverse()  # order is content: it is the order of the rendered bullets
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_principle_set(changed).hash != original.hash


# -- error messages -------------------------------------------------------------------------------

GOOD_PRINCIPLE = "  - name: a\n    definition: The response is kind.\n"

BAD_FILES = {
    "missing_definition": ("name: x\nprinciples:\n  - name: a\n", ["principles.0.definition", "required"]),
    "unknown_principle_field": (
        f"name: x\nprinciples:\n{GOOD_PRINCIPLE}    colour: red\n",
        ["principles.0.colour", "not a known field", "negative_definition"],
    ),
    "unknown_top_field": (
        f"name: x\nauthor: me\nprinciples:\n{GOOD_PRINCIPLE}",
        ["'author'", "not a known field", "description", "principles"],
    ),
    "duplicate_name": (
        f"name: x\nprinciples:\n{GOOD_PRINCIPLE}{GOOD_PRINCIPLE}",
        ["principles", "'a'", "twice"],
    ),
    "invalid_yaml": ("name: x\nprinciples:\n  - name: a\n   definition: [oops\n", ["invalid YAML", "line"]),
    "empty_principles": ("name: x\nprinciples: []\n", ["principles", "at least one"]),
    "top_level_list": ("- name: a\n  definition: The response is kind.\n", ["expected a mapping", "list"]),
    "empty_file": ("", ["expected a mapping"]),
    "missing_principles": ("name: x\n", ["'principles'", "required"]),
    "empty_definition": ("name: x\nprinciples:\n  - name: a\n    definition: '   '\n",
                         ["principles.0.definition", "empty"]),
    "bad_name": (f"name: 'has spaces'\nprinciples:\n{GOOD_PRINCIPLE}", ["'name'", "letters"]),
    "negative_weight": (f"name: x\nprinciples:\n{GOOD_PRINCIPLE}    weight: -1\n", ["principles.0.weight"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_name_file_and_field(case: str, tmp_path: Path):
    text, needles = BAD_FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PrincipleSetError) as info:
        load_principle_set(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_unknown_principle_field_does_not_list_top_level_fields(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text(f"name: x\nauthor: me\nprinciples:\n{GOOD_PRINCIPLE}")
    with pytest.raises(PrincipleSetError) as info:
        load_principle_set(path)
    assert "negative_definition" not in str(info.value)


def test_missing_file_and_non_utf8(tmp_path: Path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(PrincipleSetError, match="file not found") as info:
        load_principle_set(missing)
    assert str(missing) in str(info.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PrincipleSetError, match="not UTF-8") as info:
        load_principle_set(latin)
    assert str(latin) in str(info.value)


def test_unknown_bare_name_lists_shipped_sets():
    with pytest.raises(PrincipleSetError) as info:
        load_principle_set("no_such_set_here")
    msg = str(info.value)
    assert "no_such_set_here" in msg
    for name in builtin_names():
        assert name in msg
