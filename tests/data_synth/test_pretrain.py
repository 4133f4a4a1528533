"""`salmon rm-pretrain`: the axis files, the minimal pairs, the held-out split, the flip table, ship()."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_synth.pretrain import PretrainConfig, build_rows, run_pretrain, ship
from principles.axes import DEFAULT_HELD_OUT, Axis, AxisPair, load_axes
from principles.schema import Principle
from rm_core.checkset import flip_table
from rm_core.registry import Registry, RegistryError
from rm_core.render import PROMPT_FORMAT_VERSION
from salmon.atomic import read_jsonl
from salmon.errors import UserError


def toy_axis(name: str, family: str, pairs: int = 3) -> Axis:
    return Axis(name=name, family=family, definition=f"The response is {name}.",
                negative_definition=f"The response is not {name}.", plain=f"Be {name}.",
                opposite=f"Be the opposite of {name}.",
                pairs=[AxisPair(prompt=f"{name} prompt {k}", follows=f"{name} yes {k}", violates=f"{name} no {k}")
                       for k in range(pairs)])


TOY = [toy_axis(f"{fam}_{i}", fam) for fam in ("format", "tone", "content") for i in range(3)]


# -- load_axes ---------------------------------------------------------------------------------

def test_the_shipped_axis_files_load():
    axes = load_axes()
    names = [a.name for a in axes]
    assert len(axes) >= 200 and len(set(names)) == len(names)
    assert all(len(a.pairs) >= 8 for a in axes), Counter(len(a.pairs) for a in axes)
    assert set(DEFAULT_HELD_OUT) <= set(names) and len(DEFAULT_HELD_OUT) == 30
    assert len({a.family for a in axes}) >= 10
    # the check set's axes are never written as training axes (its names are the closest proxy)
    from rm_core.checkset import DEFAULT_CHECK_SET, flip_pair_principle, load_pairs
    assert not {flip_pair_principle(p).name for p in load_pairs(DEFAULT_CHECK_SET)} & set(names)
    for a in axes:
        assert a.definition != a.negative_definition and a.plain != a.opposite
        assert all(p.follows != p.violates for p in a.pairs), a.name


AXIS_YAML = """axes:
  - name: a
    family: x
    definition: d
    negative_definition: n
{plain}    opposite: o
    pairs: [{{prompt: p, follows: f, violates: v{extra}}}]
"""


@pytest.mark.parametrize("plain, extra, field", [
    ("", "", "field 'plain'"),
    ("    plain: p\n", ", colour: red", "field 'pairs.0.colour'"),
])
def test_a_bad_axis_file_names_the_file_and_the_field(tmp_path, plain, extra, field):
    f = tmp_path / "bad.yaml"
    f.write_text(AXIS_YAML.format(plain=plain, extra=extra))
    with pytest.raises(UserError) as e:
        load_axes([f])
    assert str(f) in str(e.value) and "axes[0]" in str(e.value) and field in str(e.value)


def test_unreadable_yaml_and_repeated_names_are_user_errors(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("axes: [\n")
    with pytest.raises(UserError, match="broken.yaml"):
        load_axes([bad])
    good = tmp_path / "good.yaml"
    good.write_text(AXIS_YAML.format(plain="    plain: p\n", extra=""))
    with pytest.raises(UserError, match="repeated: a"):
        load_axes([good, good])


# -- build_rows --------------------------------------------------------------------------------

def test_both_halves_of_every_minimal_pair_in_every_variant():
    rows = build_rows(TOY, distractor_pool=TOY, distractors=4, seed=3)
    by_key = {}
    for r in rows:
        by_key.setdefault((r["axis"], r["prompt"], r["variant"]), []).append(r)
    assert len(by_key) == sum(len(a.pairs) for a in TOY) * 3
    axes = {a.name: a for a in TOY}
    for (axis, prompt, variant), (r1, r2) in ((k, v) for k, v in by_key.items()):
        ax = axes[axis]
        pair = next(p for p in ax.pairs if p.prompt == prompt)
        half = {r["chosen"]: r for r in (r1, r2)}
        assert set(half) == {pair.follows, pair.violates}
        pos, neg = half[pair.follows], half[pair.violates]
        assert pos["rejected"] == pair.violates and neg["rejected"] == pair.follows
        if variant == "plain":
            # Plain strings as users send them: the instruction one way, its opposite the other.
            assert pos["principles"] == [{"name": "p1", "definition": ax.plain}]
            assert neg["principles"] == [{"name": "p1", "definition": ax.opposite}]
            assert pos["negated"] == neg["negated"] == [] and pos["dominant"] == "p1"
            continue
        assert pos["dominant"] == neg["dominant"] == ax.name
        assert pos["principles"] == neg["principles"]  # the same principles; only the negation differs
        assert ax.principle.model_dump(exclude_defaults=True) in pos["principles"]
        assert ax.name not in pos["negated"] and ax.name in neg["negated"]
        assert sorted(set(neg["negated"]) - {ax.name}) == sorted(pos["negated"])
        if variant == "single":
            assert pos["principles"] == [ax.principle.model_dump(exclude_defaults=True)]
            assert pos["negated"] == []
        else:
            members = [p["name"] for p in pos["principles"]]
            assert len(members) == 5 and len(set(members)) == 5
            distractors = [axes[n] for n in members if n != ax.name]
            assert all(d.family != ax.family for d in distractors)
            assert all(n in {d.name for d in distractors} for n in pos["negated"])


def test_rows_are_deterministic_under_a_seed():
    a = build_rows(TOY, distractor_pool=TOY, seed=7)
    assert a == build_rows(TOY, distractor_pool=TOY, seed=7)
    assert a != build_rows(TOY, distractor_pool=TOY, seed=8)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_variants_per_pair_is_respected(k):
    rows = build_rows(TOY, distractor_pool=TOY, variants_per_pair=k, seed=1)
    per_pair = Counter((r["axis"], r["prompt"]) for r in rows)
    assert set(per_pair.values()) == {2 * k}  # k variants, both halves each
    variants = {key: {r["variant"] for r in rows if (r["axis"], r["prompt"]) == key} for key in per_pair}
    assert all(len(v) == k for v in variants.values())
    if k < 3:  # drawn per pair, so over many pairs every variant occurs
        assert {r["variant"] for r in rows} == {"single", "set", "plain"}


def test_unknown_variant_is_a_user_error_and_set_needs_enough_distractors():
    with pytest.raises(UserError, match="unknown pretraining variants"):
        build_rows(TOY, distractor_pool=TOY, variants=["single", "nope"])
    # Only one other family has 3 axes: a set of 4 distractors cannot be drawn, so no set rows.
    rows = build_rows(TOY[:6], distractor_pool=TOY[:6], variants=["set"], distractors=4)
    assert rows == []


def test_shipped_axes_build_and_set_distractors_come_from_other_families():
    axes = load_axes()
    family = {a.name: a.family for a in axes}
    rows = build_rows(axes, distractor_pool=axes, variants=["set"], seed=0)
    assert len(rows) == 2 * sum(len(a.pairs) for a in axes)
    for r in rows:
        names = [p["name"] for p in r["principles"]]
        assert r["dominant"] in names
        assert all(family[n] != family[r["axis"]] for n in names if n != r["dominant"])


# -- run_pretrain's split (the trainer replaced by a recorder) ---------------------------------

def test_held_out_axes_never_reach_the_training_rows(tmp_path, monkeypatch):
    import data_synth.rm_train as rm_train
    from data_synth.config import TrainConfig

    seen = {}

    def fake_train(train_path, eval_path, cfg, extra_manifest=None, extra_eval=None, keep_build=None):
        seen["rows"] = read_jsonl(Path(train_path))
        seen["manifest"] = extra_manifest

        def perfect(principles, negate, items):  # prefers response_a unless the principle is negated/opposite
            flip = bool(negate) or "opposite" in principles[0].definition.lower()
            return [0.0, 1.0] if flip else [1.0, 0.0]

        seen["eval"] = extra_eval(perfect)
        return rm_train.TrainResult("v0001", {}, seen["eval"], None, None, None)

    monkeypatch.setattr(rm_train, "train_reward_model", fake_train)
    axes_file = tmp_path / "axes.yaml"
    axes_file.write_text(json.dumps({"axes": [a.model_dump() for a in TOY]}))
    held = ["format_1", "tone_2"]
    cfg = PretrainConfig(axes=[axes_file], held_out_axes=held, out=tmp_path / "out", distractors=2,
                         eval_pairs_per_axis=2, train=TrainConfig(registry=tmp_path / "reg"))
    report = run_pretrain(cfg, command="salmon rm-pretrain --test")
    rows = seen["rows"]
    assert rows and not {r["axis"] for r in rows} & set(held)
    trained_texts = {p.get(k) for r in rows for p in r["principles"]
                     for k in ("name", "definition", "negative_definition")}
    held_texts = {t for a in TOY if a.name in held for t in (a.name, a.definition, a.negative_definition,
                                                              a.plain, a.opposite)}
    assert not trained_texts & held_texts  # not even as a distractor or a plain instruction
    held_responses = {t for a in TOY if a.name in held for p in a.pairs for t in (p.follows, p.violates)}
    assert not {r["chosen"] for r in rows} & held_responses
    pre = seen["manifest"]["pretrain"]
    assert pre["held_out_axes"] == held and set(pre["train_axes"]) == {a.name for a in TOY} - set(held)
    assert pre["train_pairs"] == len(rows) and seen["manifest"]["built_by"] == "salmon rm-pretrain --test"
    table = seen["eval"]["held_out_axes"]
    assert table["single"] == {"pairs": 4, "flip_rate": 1.0, "accuracy": 1.0}
    assert table["plain"]["pairs"] == 4
    assert report["version"] == "v0001"
    assert json.loads((tmp_path / "out" / "pretrain_report.json").read_text())["version"] == "v0001"


def test_unknown_or_all_held_out_axes_are_user_errors(tmp_path):
    axes_file = tmp_path / "axes.yaml"
    axes_file.write_text(json.dumps({"axes": [a.model_dump() for a in TOY[:2]]}))
    with pytest.raises(UserError, match="unknown axes"):
        run_pretrain(PretrainConfig(axes=[axes_file], held_out_axes=["nope"], out=tmp_path / "o"))
    with pytest.raises(UserError, match="every axis is held out"):
        run_pretrain(PretrainConfig(axes=[axes_file], held_out_axes=[a.name for a in TOY[:2]], out=tmp_path / "o"))


# -- flip_table against scorers whose answers are known ----------------------------------------

FLIP_PAIRS = [
    {"id": f"{a.name}-{k}", "prompt": p.prompt, "response_a": p.follows, "response_b": p.violates,
     "plain": a.plain, "opposite": a.opposite, "principle": a.principle.model_dump(exclude_defaults=True)}
    for a in TOY for k, p in enumerate(a.pairs[:2])
]
RESPONSE_AXIS = {p["response_a"]: p["principle"]["name"] for p in FLIP_PAIRS} | {
    p["response_b"]: p["principle"]["name"] for p in FLIP_PAIRS}
PLAIN_TO_AXIS = {a.plain: (a.name, False) for a in TOY} | {a.opposite: (a.name, True) for a in TOY}


def perfect_reader(principles, negate, items):
    """+1 per principle the response satisfies, -1 per one it violates; untouched axes count 0."""
    out = []
    for _, response in items:
        axis, follows = RESPONSE_AXIS[response], " yes " in response
        s = 0.0
        for p in principles:
            name, opposite = PLAIN_TO_AXIS.get(p.definition, (p.name, False))
            if name == axis:
                s += 1.0 if follows != (opposite or p.name in negate) else -1.0
        out.append(s)
    return out


def principle_blind(principles, negate, items):
    return [float(len(r)) + (0.5 if " yes " in r else 0.0) for _, r in items]


def no_plain(principles, negate, items):
    if any(not p.negative_definition for p in principles):
        raise UserError("this scorer needs a negative_definition for every principle")
    return perfect_reader(principles, negate, items)


def test_a_perfect_reader_flips_every_pair_in_every_mode():
    table = flip_table(perfect_reader, FLIP_PAIRS, seed=0)
    assert set(table) == {"single", "set", "plain"}
    for mode in table.values():
        assert mode == {"pairs": len(FLIP_PAIRS), "flip_rate": 1.0, "accuracy": 1.0}


def test_a_scorer_that_ignores_principles_never_flips():
    table = flip_table(principle_blind, FLIP_PAIRS, seed=0)
    for mode in table.values():
        assert mode["flip_rate"] == 0.0 and mode["accuracy"] == 1.0  # it prefers "yes" always


def test_a_scorer_that_cannot_read_plain_principles_is_unsupported_there_only():
    table = flip_table(no_plain, FLIP_PAIRS, seed=0)
    assert table["single"]["flip_rate"] == table["set"]["flip_rate"] == 1.0
    assert table["plain"] == {"unsupported": "this scorer needs a negative_definition for every principle"}


def test_set_mode_uses_distractors_the_same_way_for_every_scorer():
    calls: list[list[str]] = []

    def recorder(principles, negate, items):
        own_axis = RESPONSE_AXIS[items[0][1]]
        assert own_axis in [p.name for p in principles] and negate in ([], [own_axis])
        calls.append([p.name for p in principles])
        return [0.0, 0.0]

    flip_table(recorder, FLIP_PAIRS, seed=5, modes=("set",))
    first = list(calls)
    calls.clear()
    flip_table(recorder, FLIP_PAIRS, seed=5, modes=("set",))
    assert calls == first and all(len(c) == 5 and len(set(c)) == 5 for c in first)
    calls.clear()
    without_plain = [{k: v for k, v in p.items() if k not in ("plain", "opposite")} for p in FLIP_PAIRS]
    assert flip_table(recorder, without_plain, modes=("plain",))["plain"]["pairs"] == 0
    assert calls == []  # pairs without plain forms are skipped, not scored


# -- ship() ------------------------------------------------------------------------------------

def publish_fake(registry: Path, tmp: Path, payload: bytes, base: str = "tiny") -> str:
    build = tmp / f"build-{payload.hex()[:8]}"
    (build / "adapter").mkdir(parents=True)
    (build / "adapter" / "adapter_model.safetensors").write_bytes(payload)
    (build / "adapter" / "adapter_config.json").write_text("{}")
    return Registry(registry).publish(build, {
        "base_model": base, "adapter": "adapter", "prompt_format_version": PROMPT_FORMAT_VERSION,
        "eval_metrics": {"held_out_axes": {"single": {"flip_rate": 0.9}}}, "training_data": ["/x/train.jsonl"],
    })


def test_ship_replaces_the_target_and_verifies_against_the_manifest(tmp_path, monkeypatch):
    reg = tmp_path / "registry"
    v1 = publish_fake(reg, tmp_path, b"first")
    v2 = publish_fake(reg, tmp_path, b"second")
    target = tmp_path / "pkg" / "shipped"
    target.parent.mkdir()
    assert ship(reg, v1, target) == target
    ship(reg, v2, target)
    shipped = Registry(target)
    assert shipped.versions() == ["v0001"] and shipped.current() == "v0001"
    m = shipped.manifest("v0001", verify=True)
    assert (target / "v0001" / "adapter" / "adapter_model.safetensors").read_bytes() == b"second"
    assert m.base_model == "tiny" and m.eval_metrics["held_out_axes"]["single"]["flip_rate"] == 0.9
    assert "training_data" not in m.model_dump()  # a path on the machine that built it
    assert sorted(p.name for p in target.parent.iterdir()) == ["shipped"]  # no staging or old tree left

    import rm_core.registry as registry_mod

    monkeypatch.setattr(registry_mod, "SHIPPED_REGISTRY", target)
    assert registry_mod.shipped_version("tiny") == "v0001" and registry_mod.shipped_version("embedded") is None

    (target / "v0001" / "adapter" / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="corrupt"):
        shipped.manifest("v0001")
    from rm_core.scorers import load_shipped

    with pytest.raises(RegistryError, match="corrupt"):
        load_shipped()


def test_a_failed_ship_leaves_the_old_shipped_rm(tmp_path):
    reg = tmp_path / "registry"
    v1 = publish_fake(reg, tmp_path, b"first")
    v2 = publish_fake(reg, tmp_path, b"second")
    target = tmp_path / "pkg" / "shipped"
    target.parent.mkdir()
    ship(reg, v1, target)
    (reg / v2 / "adapter" / "adapter_model.safetensors").write_bytes(b"rotten")
    with pytest.raises(RegistryError, match="corrupt"):
        ship(reg, v2, target)
    assert (target / "v0001" / "adapter" / "adapter_model.safetensors").read_bytes() == b"first"
    Registry(target).manifest("v0001", verify=True)
    with pytest.raises(UserError, match="nothing to ship"):
        ship(reg, None, target)


def test_principle_objects_in_rows_round_trip():
    rows = build_rows(TOY, distractor_pool=TOY, seed=0)
    for r in rows:
        for p in r["principles"]:
            Principle.model_validate(p)


@pytest.mark.parametrize("flip", [0.0, 0.49, None])
def test_ship_refuses_an_rm_that_does_not_read_its_principles(tmp_path, monkeypatch, flip):
    """`salmon rm-pretrain --ship` replaces what every scorer-auto service serves: below the floor it
    is one line, exit 2, and ship() is never called."""
    from data_synth import pretrain
    from salmon_cli.main import main

    metrics = {"held_out_axes": {"single": {"flip_rate": flip}}} if flip is not None else {}
    monkeypatch.setattr(pretrain, "run_pretrain", lambda cfg, command=None: {"version": "v0001", "metrics": metrics})
    shipped = []
    monkeypatch.setattr(pretrain, "ship", lambda *a, **k: shipped.append(a))
    assert main(["rm-pretrain", "--out", str(tmp_path), "--ship"]) == 2
    assert shipped == []


def test_ship_goes_ahead_at_the_floor(tmp_path, monkeypatch, capsys):
    from data_synth import pretrain
    from salmon_cli.main import main

    report = {"version": "v0001", "metrics": {"held_out_axes": {"single": {"flip_rate": 0.5}}}}
    monkeypatch.setattr(pretrain, "run_pretrain", lambda cfg, command=None: dict(report))
    shipped = []
    monkeypatch.setattr(pretrain, "ship", lambda registry, version: shipped.append((registry, version)) or "x")
    assert main(["rm-pretrain", "--out", str(tmp_path), "--ship"]) == 0
    assert shipped == [(tmp_path / "registry", "v0001")]
