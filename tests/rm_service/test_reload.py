"""Trained registry versions: reload beside the old, swap atomically, survive bad versions."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from principles.schema import Principle
from rm_core.registry import Registry
from rm_core.scorers import load_trained
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.rm_service.helpers import publish_tiny_version

ITEMS = [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Say hi.", "response": "Hello there, friend."}]
P = [Principle(name="hhh", definition="The response is helpful.")]


@pytest.fixture()
def registry(tmp_path, tiny_model_dir):
    reg = tmp_path / "registry"
    publish_tiny_version(reg, tiny_model_dir, seed=1, tmp=tmp_path)
    return reg


def offline(reg, version):
    s = load_trained(reg, version)
    return s.score_items(list(P), [(i["prompt"], i["response"]) for i in ITEMS])


def test_service_serves_current_and_applies_manifest_normalisation(registry, tiny_model_dir, tmp_path):
    v2 = publish_tiny_version(registry, tiny_model_dir, seed=2, tmp=tmp_path, mean=0.5, std=2.0)
    raw = load_trained(registry, v2)
    with ServerThread(ServiceSettings(port=0, registry=registry, watch_registry=False)) as srv:
        r = httpx.post(srv.url + "/v1/score", json={"items": ITEMS, "principles": ["The response is helpful."]}).json()
        assert r["model_version"] == v2 and r["scorer"] == "trained"
        prepared = [raw.prepare(P, i["prompt"], i["response"]) for i in ITEMS]
        raw_values, _ = raw.compute([p.seqs[0] for p in prepared])
        assert r["scores"] == pytest.approx([(v - 0.5) / 2.0 for v in raw_values], abs=1e-4)


def test_reload_under_concurrent_load_never_fails_and_names_the_version(registry, tiny_model_dir, tmp_path):
    versions = [Registry(registry).current()]
    for seed in (2, 3):
        versions.append(publish_tiny_version(registry, tiny_model_dir, seed=seed, tmp=tmp_path, ) )
    Registry(registry).set_current(versions[0])
    expected = {v: offline(registry, v) for v in versions}
    st = ServiceSettings(port=0, registry=registry, watch_registry=False)
    with ServerThread(st) as srv:
        stop = time.monotonic() + 20
        seen, failures = set(), []

        def client():
            with httpx.Client(timeout=30) as c:
                n = 0
                while time.monotonic() < stop and n < 200:
                    r = c.post(srv.url + "/v1/score", json={"items": ITEMS, "principles": ["The response is helpful."]})
                    n += 1
                    if r.status_code != 200:
                        failures.append(r.text)
                        continue
                    body = r.json()
                    seen.add(body["model_version"])
                    if body["scores"] != pytest.approx(expected[body["model_version"]], abs=1e-4):
                        failures.append(f"scores of {body['model_version']} differ from its offline scores")
            return n

        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(client) for _ in range(4)]
            for v in versions[1:] + versions[:1]:
                time.sleep(0.5)
                r = httpx.post(srv.url + "/v1/admin/reload", json={"version": v}, timeout=60).json()
                assert r["reloaded"] and r["model_version"] == v
            sent = sum(f.result() for f in futs)
    assert not failures, failures[:3]
    assert sent > 20 and seen == set(versions)


def test_watch_picks_up_a_new_current(registry, tiny_model_dir, tmp_path):
    st = ServiceSettings(port=0, registry=registry, watch_registry=True, watch_interval_s=0.2)
    with ServerThread(st) as srv:
        v2 = publish_tiny_version(registry, tiny_model_dir, seed=5, tmp=tmp_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if httpx.get(srv.url + "/v1/model").json()["model_version"] == v2:
                break
            time.sleep(0.2)
        assert httpx.get(srv.url + "/v1/model").json()["model_version"] == v2


@pytest.mark.parametrize("damage", ["corrupt", "missing", "pickle", "manifest"])
def test_bad_version_keeps_serving_the_old_one_and_says_why(registry, tiny_model_dir, tmp_path, damage):
    reg = Registry(registry)
    v1 = reg.current()
    v2 = publish_tiny_version(registry, tiny_model_dir, seed=7, tmp=tmp_path)
    reg.set_current(v1)
    vdir = reg.path(v2)
    weights = next(vdir.rglob("*.safetensors"))
    if damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    elif damage == "missing":
        weights.unlink()
    elif damage == "pickle":
        (vdir / "adapter" / "extra.bin").write_bytes(b"not really a pickle")
    else:
        (vdir / "manifest.json").write_text("{not json")
    with ServerThread(ServiceSettings(port=0, registry=registry, watch_registry=False)) as srv:
        r = httpx.post(srv.url + "/v1/admin/reload", json={"version": v2}, timeout=60).json()
        assert not r["reloaded"] and r["model_version"] == v1
        reason = {"corrupt": "corrupt", "missing": "missing", "pickle": "safetensors only", "manifest": "manifest"}
        assert reason[damage] in r["message"]
        assert httpx.get(srv.url + "/v1/model").json()["last_reload_error"]
        ok = httpx.post(srv.url + "/v1/score", json={"items": ITEMS}).json()
        assert ok["model_version"] == v1


def test_registry_confines_paths_and_names(registry):
    reg = Registry(registry)
    for bad in ("../etc", "v1/../../x", "latest", ""):
        with pytest.raises(ValueError):
            reg.path(bad)
    m = json.loads((reg.path(reg.current()) / "manifest.json").read_text())
    assert all(".." not in k for k in m["files"])


def test_half_published_version_is_never_served(registry, tiny_model_dir, tmp_path):
    reg = Registry(registry)
    (registry / ".staging-v0009-abc").mkdir()
    (registry / "v0010").mkdir()  # a directory without manifest: not a version
    assert reg.versions() == [reg.current()]
    v = publish_tiny_version(registry, tiny_model_dir, seed=9, tmp=tmp_path)
    assert v == "v0002" and not list(registry.glob(".staging-*"))
