"""Reward-model training: TRL trains on exactly the service's rendered ids; publish; the service serves it."""

from __future__ import annotations

import time

import httpx
import pytest

from data_synth.config import TrainConfig
from data_synth.rm_train import rewards, train_reward_model
from principles.schema import Principle
from rm_core.registry import Registry
from rm_core.render import PROMPT_FORMAT_VERSION
from salmon.atomic import atomic_write_jsonl

CONCISE = {"name": "concise", "definition": "The response is short and direct.",
           "negative_definition": "The response is long and padded."}
KIND = {"name": "kind", "definition": "The response is warm.", "negative_definition": "The response is cold."}


def rows(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        negated = ["kind"] if i % 3 == 0 else []
        out.append({"prompt": f"Question {i}: what is {i}+1?", "chosen": f"{i + 1}.",
                    "rejected": f"Well, let me think at length about {i} plus one, which is {i + 1}, I believe.",
                    "principles": [CONCISE, KIND] if i % 2 else [CONCISE], "negated": negated if i % 2 else [],
                    "dominant": "concise", "prompt_id": f"p{i}", "principle_set": "test@0"})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("rm")
    atomic_write_jsonl(tmp / "train.jsonl", rows(12))
    atomic_write_jsonl(tmp / "eval.jsonl", rows(4, offset=100))
    cfg = TrainConfig(base_model=str(tiny_model_dir), registry=tmp / "registry", batch_size=4, lora_r=4,
                      learning_rate=5e-3, epochs=2)
    return tmp, cfg, train_reward_model(tmp / "train.jsonl", tmp / "eval.jsonl", cfg)


def test_publishes_a_version_with_the_manifest_the_service_needs(trained):
    tmp, cfg, res = trained
    reg = Registry(cfg.registry)
    assert res.version == "v0001" and reg.current() == "v0001"
    m = reg.manifest("v0001")  # verifies every file's sha256
    assert m.base_model == str(cfg.base_model) and m.adapter == "adapter"
    assert m.prompt_format_version == PROMPT_FORMAT_VERSION and m.parent_version is None
    assert m.reward_std > 0 and m.data_hash
    extra = m.model_dump()
    assert extra["training_data"][0].endswith("train.jsonl") and extra["init_from"] == "base"
    assert 0 <= m.eval_metrics["accuracy"] <= 1 and 0 <= m.eval_metrics["flip_rate"] <= 1
    assert m.eval_metrics["eval_pairs"] == 4 and m.eval_metrics["flip_pairs"] == 4
    files = set(m.files)
    assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files
    from safetensors import safe_open

    with safe_open(str(reg.path("v0001") / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("score" in k for k in keys) and any("lora_A" in k for k in keys)  # head saved with the LoRA


def test_training_rendered_exactly_what_serving_renders(trained):
    from rm_core.scorers import load_trained

    tmp, cfg, res = trained
    scorer = load_trained(cfg.registry)
    train_rows = rows(12)
    ds = res.train_dataset
    assert len(ds) == len(train_rows)
    for r, chosen_ids, rejected_ids in zip(train_rows, ds["chosen_ids"], ds["rejected_ids"], strict=True):
        ps = [Principle.model_validate(p) for p in r["principles"]]
        served_c = scorer.prepare(ps, r["prompt"], r["chosen"], negate=r["negated"]).seqs[0].input_ids
        served_r = scorer.prepare(ps, r["prompt"], r["rejected"], negate=r["negated"]).seqs[0].input_ids
        assert list(chosen_ids) == served_c and list(rejected_ids) == served_r


def test_the_running_service_scores_with_the_new_version_and_picks_up_the_next(trained, tiny_model_dir):
    from rm_service.settings import ServiceSettings
    from rm_service.testing import ServerThread

    tmp, cfg, res = trained
    r = rows(1, offset=200)[0]
    item = [{"prompt": r["prompt"], "response": r["chosen"]}, {"prompt": r["prompt"], "response": r["rejected"]}]
    settings = ServiceSettings(port=0, scorer="trained", registry=cfg.registry, watch_registry=True,
                               watch_interval_s=0.2)
    with ServerThread(settings) as srv:
        body = {"items": item, "principles": [CONCISE, KIND], "negate": ["kind"]}
        got = httpx.post(srv.url + "/v1/score", json=body, timeout=60).json()
        assert got["model_version"] == "v0001"
        # The service's score is this training run's own reward, normalised by the manifest's mean/std.
        from rm_core.render import Renderer
        from salmon.modeling import load_tokenizer

        tok = load_tokenizer(str(tiny_model_dir))
        ps = [Principle.model_validate(p) for p in (CONCISE, KIND)]
        ids = [Renderer(tok).render_principles(ps, i["prompt"], i["response"], negated=["kind"]).input_ids
               for i in item]
        raw = rewards(res.model, ids, tok.pad_token_id)
        m = res.manifest
        assert got["scores"] == pytest.approx([(v - m["reward_mean"]) / m["reward_std"] for v in raw], abs=1e-3)

        # A retrain from the parent publishes v0002; the service switches to it by watching CURRENT.
        cfg2 = cfg.model_copy(update={"init_from": "parent", "epochs": 1})
        res2 = train_reward_model(tmp / "train.jsonl", None, cfg2)
        assert res2.version == "v0002" and res2.manifest["parent_version"] == "v0001"
        assert res2.manifest["init_from"] == "parent"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got2 = httpx.post(srv.url + "/v1/score", json=body, timeout=60).json()
            if got2["model_version"] == "v0002":
                break
            time.sleep(0.2)
        assert got2["model_version"] == "v0002"
