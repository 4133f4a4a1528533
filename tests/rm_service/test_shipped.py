"""The RM shipped with the package: `scorer: auto` serves it for its base, reads plain principles.

A tiny random-init backbone is pre-trained for a moment with data_synth's trainer on build_rows
minimal pairs, published, shipped into a temporary package directory, and rm_core.registry is
pointed at that directory (the real rm_core/shipped is never touched here).
"""

from __future__ import annotations

import httpx
import pytest

import rm_core.registry as registry_mod
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.conftest import build_tiny_model
from tests.rm_service.helpers import publish_tiny_version

ITEMS = [{"prompt": "Why is the sky blue?", "response": "Sunlight scatters off air, and blue scatters most."},
         {"prompt": "Why is the sky blue?", "response": "Air scatters blue light. Red passes. So it looks blue."}]
PLAIN = {"items": ITEMS, "principles": ["Answer in one sentence."]}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_model_dir):
    """(shipped registry dir, the training registry) of a tiny pre-trained RM for tiny_model_dir."""
    import torch

    from data_synth.config import TrainConfig
    from data_synth.pretrain import build_rows, ship
    from data_synth.rm_train import train_reward_model
    from principles.axes import load_axes
    from salmon.atomic import atomic_write_jsonl

    tmp = tmp_path_factory.mktemp("shipped")
    axes = load_axes()[:8]
    rows = build_rows(axes, distractor_pool=load_axes(), variants_per_pair=1, seed=0)[:24]
    atomic_write_jsonl(tmp / "train.jsonl", rows)
    cfg = TrainConfig(base_model=str(tiny_model_dir), registry=tmp / "pretrain-registry", batch_size=8, lora_r=4,
                      epochs=1, max_length=384, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train_reward_model(tmp / "train.jsonl", None, cfg)
    finally:
        torch.set_num_threads(threads)
    target = ship(cfg.registry, res.version, tmp / "pkg" / "shipped")
    return target, cfg.registry


@pytest.fixture()
def use_shipped(shipped, monkeypatch):
    target, _ = shipped
    monkeypatch.setattr(registry_mod, "SHIPPED_REGISTRY", target)
    return target


def score(srv, body):
    return httpx.post(srv.url + "/v1/score", json=body, timeout=60)


def test_auto_serves_the_shipped_rm_for_its_base_and_it_reads_plain_principles(use_shipped, tiny_model_dir):
    assert registry_mod.shipped_version(str(tiny_model_dir)) == "v0001"
    with ServerThread(ServiceSettings(port=0, model=str(tiny_model_dir), scorer="auto")) as srv:
        r = score(srv, PLAIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "shipped:v0001" and body["scorer"] == "trained"
        assert len(body["scores"]) == 2 and all(isinstance(s, float) for s in body["scores"])
        ready = httpx.get(srv.url + "/readyz", timeout=10).json()
        assert ready["model_version"] == "shipped:v0001"


def test_the_served_scores_are_the_shipped_models_own(use_shipped, tiny_model_dir):
    from principles.schema import Principle
    from rm_core.scorers import load_shipped

    offline = load_shipped().score_items([Principle(name="p1", definition="Answer in one sentence.")],
                                         [(i["prompt"], i["response"]) for i in ITEMS])
    with ServerThread(ServiceSettings(port=0, model=str(tiny_model_dir), scorer="shipped")) as srv:
        got = score(srv, PLAIN).json()
    assert got["model_version"] == "shipped:v0001"
    assert got["scores"] == pytest.approx(offline, abs=1e-4)


def test_auto_serves_contrastive_for_another_base_and_it_reads_plain_principles(use_shipped, tmp_path):
    other = build_tiny_model(tmp_path / "other-base", seed=1)
    assert registry_mod.shipped_version(str(other)) is None
    with ServerThread(ServiceSettings(port=0, model=str(other), scorer="auto")) as srv:
        r = score(srv, PLAIN)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"].startswith("contrastive:")
        assert r.json()["scores"][0] != r.json()["scores"][1]
        ok = score(srv, {"items": ITEMS, "principles": [{
            "name": "brief", "definition": "The response is one sentence.",
            "negative_definition": "The response is several sentences."}]})
        assert ok.status_code == 200 and ok.json()["model_version"].startswith("contrastive:")


def test_a_user_registry_current_wins_over_the_shipped_rm(use_shipped, tiny_model_dir, tmp_path):
    user = tmp_path / "registry"
    settings = ServiceSettings(port=0, model=str(tiny_model_dir), scorer="auto", registry=user, watch_registry=False)
    user.mkdir()
    with ServerThread(settings) as srv:  # a registry without a CURRENT yet: still the shipped RM
        assert score(srv, PLAIN).json()["model_version"] == "shipped:v0001"
    version = publish_tiny_version(user, tiny_model_dir, seed=3, tmp=tmp_path)
    with ServerThread(settings) as srv:
        r = score(srv, PLAIN)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version == "v0001" and r.json()["scorer"] == "trained"


def test_without_a_shipped_rm_auto_is_contrastive(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setattr(registry_mod, "SHIPPED_REGISTRY", tmp_path / "nothing-shipped")
    from rm_service.metrics import Metrics
    from rm_service.serving import ModelManager

    mm = ModelManager(ServiceSettings(model=str(tiny_model_dir), scorer="auto"), Metrics())
    assert mm._kind() == "contrastive"


def test_init_from_shipped_continues_from_the_shipped_adapter(use_shipped, shipped, tiny_model_dir, tmp_path):
    from data_synth.config import TrainConfig
    from data_synth.rm_train import train_reward_model
    from salmon.atomic import atomic_write_jsonl, read_jsonl

    _, pretrain_registry = shipped
    rows = read_jsonl(pretrain_registry.parent / "train.jsonl")[:8]
    atomic_write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = TrainConfig(base_model=str(tiny_model_dir), registry=tmp_path / "reg", init_from="shipped",
                      batch_size=8, epochs=1, seed=0, max_length=384)
    res = train_reward_model(tmp_path / "train.jsonl", None, cfg)
    assert res.manifest["init_from"] == "shipped" and res.manifest["init_version"] == "v0001"


def test_init_from_shipped_without_a_shipped_rm_for_the_base_is_a_user_error(use_shipped, tmp_path):
    from data_synth.config import TrainConfig
    from data_synth.rm_train import train_reward_model
    from salmon.atomic import atomic_write_jsonl
    from salmon.errors import UserError

    other = build_tiny_model(tmp_path / "other-base", seed=2)
    atomic_write_jsonl(tmp_path / "train.jsonl", [{
        "prompt": "Hi.", "chosen": "Hello.", "rejected": "Go away.", "negated": [],
        "principles": [{"name": "p1", "definition": "Be polite."}]}])
    cfg = TrainConfig(base_model=str(other), registry=tmp_path / "reg", init_from="shipped", epochs=1)
    with pytest.raises(UserError, match="does not exist for base"):
        train_reward_model(tmp_path / "train.jsonl", None, cfg)
