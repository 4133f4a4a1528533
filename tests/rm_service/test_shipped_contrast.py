"""A contrast adapter shipped as the package's RM: `scorer: auto` serves the contrastive scorer with it.

A tiny random-init model is contrast-tuned for a few steps, shipped into a temporary package
directory, and rm_core.registry is pointed there (the real rm_core/shipped is never touched here).
The real shipped artifact's own checks are in tests/rm_core/test_shipped_artifact.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

import rm_core.registry as registry_mod
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from salmon.errors import UserError
from tests.data_synth.test_contrast_tune import tiny_config, write_axes

ITEMS = [{"prompt": "Say something.", "response": "I like dog."},
         {"prompt": "Say something.", "response": "I like nothing."}]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    """(the contrast-tune output dir, the shipped registry dir it was shipped to)."""
    from data_synth.contrast_tune import ship_adapter, tune

    tmp = tmp_path_factory.mktemp("shipped-contrast")
    axes = write_axes(tmp / "axes.yaml", ["dog", "cat", "sun", "tea"])
    out = tmp / "run"
    tune(tiny_config(tiny_model_dir, axes, max_train_pairs=4, eval_pairs_per_axis=1), out,
         command="salmon contrast-tune --out run --ship", evaluate_check=False, progress=False)
    return out, ship_adapter(out, tmp / "pkg" / "shipped")


@pytest.fixture()
def use_shipped(tuned, monkeypatch):
    monkeypatch.setattr(registry_mod, "SHIPPED_REGISTRY", tuned[1])
    return tuned


def test_the_shipped_version_keeps_the_adapter_and_its_provenance(use_shipped, tiny_model_dir):
    out, target = use_shipped
    reg = registry_mod.Registry(target)
    m = reg.manifest("v0001", verify=True)
    run = json.loads((out / "manifest.json").read_text())
    assert m.kind == registry_mod.CONTRAST_ADAPTER_KIND and m.base_model == str(tiny_model_dir)
    assert m.model_extra["command"] == "salmon contrast-tune --out run --ship"
    assert m.model_extra["data_sha256"] == run["data_sha256"] and m.eval_metrics == run["metrics"]
    assert {f.split("/", 1)[1]: d for f, d in m.files.items()} == {
        f.split("/", 1)[1]: d for f, d in run["files"].items()}  # the very bytes that were trained
    assert registry_mod.shipped_version(str(tiny_model_dir)) == "v0001"
    assert registry_mod.shipped_one_pass_version(str(tiny_model_dir)) is None


def test_auto_serves_it_as_the_tuned_contrastive_scorer(use_shipped, tiny_model_dir):
    from principles.schema import Principle
    from rm_core.scorers import load_zero_shot

    out, _ = use_shipped
    pr = Principle(name="dog", definition="The response mentions dog.", negative_definition="The response never "
                   "mentions dog.")
    offline = load_zero_shot("contrastive", str(tiny_model_dir), adapter=out).score_items(
        [pr], [(i["prompt"], i["response"]) for i in ITEMS])
    with ServerThread(ServiceSettings(port=0, model=str(tiny_model_dir), scorer="auto")) as srv:
        r = httpx.post(srv.url + "/v1/score", json={"items": ITEMS, "principles": [pr.model_dump(exclude_defaults=True)]}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "shipped:v0001" and body["scorer"] == "contrastive"
        assert body["scores"] == pytest.approx(offline, abs=1e-4)
        plain = httpx.post(srv.url + "/v1/score", json={"items": ITEMS, "principles": ["Mention a dog."]},
                           timeout=60)
        assert plain.status_code == 200, plain.text


def test_a_tampered_shipped_adapter_is_refused(use_shipped, tmp_path, monkeypatch):
    import shutil

    from rm_core.scorers import load_shipped

    _, target = use_shipped
    copy = tmp_path / "shipped"
    shutil.copytree(target, copy)
    monkeypatch.setattr(registry_mod, "SHIPPED_REGISTRY", copy)
    weights = next(copy.glob("v0001/adapter/*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        load_shipped()


def test_init_from_shipped_names_the_contrast_adapter(use_shipped, tiny_model_dir, tmp_path):
    from data_synth.config import TrainConfig
    from data_synth.rm_train import train_reward_model
    from salmon.atomic import atomic_write_jsonl

    atomic_write_jsonl(tmp_path / "train.jsonl", [{
        "prompt": "Hi.", "chosen": "Hello.", "rejected": "Go away.", "negated": [],
        "principles": [{"name": "p1", "definition": "Be polite."}]}])
    cfg = TrainConfig(base_model=str(tiny_model_dir), registry=tmp_path / "reg", init_from="shipped", epochs=1)
    with pytest.raises(UserError, match="contrast adapter"):
        train_reward_model(tmp_path / "train.jsonl", None, cfg)


@pytest.mark.parametrize("metrics, ok", [
    ({"single_flip_before": {"held_out_axes": 0.7}, "single_flip_after": {"held_out_axes": 0.9}}, True),
    ({"single_flip_before": {"held_out_axes": 0.7}, "single_flip_after": {"held_out_axes": 0.7}}, False),
    ({"single_flip_before": {"held_out_axes": 0.2}, "single_flip_after": {"held_out_axes": 0.4}}, False),
    ({}, False),
])
def test_only_an_adapter_that_beats_zero_shot_on_held_out_axes_ships(metrics, ok):
    from data_synth.contrast_tune import ship_refusal

    assert (ship_refusal({"metrics": metrics}, 0.5) is None) == ok


def test_contrast_tune_ship_refuses_without_touching_the_shipped_rm(use_shipped, monkeypatch, tmp_path):
    from data_synth import contrast_tune
    from data_synth.cli import main

    _, target = use_shipped
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    shipped = []
    monkeypatch.setattr(contrast_tune, "tune", lambda cfg, out, **k: {"metrics": {
        "single_flip_before": {"held_out_axes": 0.73}, "single_flip_after": {"held_out_axes": 0.71}}})
    monkeypatch.setattr(contrast_tune, "ship_adapter", lambda *a, **k: shipped.append(a))
    with pytest.raises(UserError, match="not shipped: held-out single-principle flip rate 0.71"):
        main(["contrast-tune", "--out", str(tmp_path / "new"), "--ship"])
    assert not shipped
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
