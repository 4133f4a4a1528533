"""The on-policy loop: rollout shards in, judged pairs, retrain, publish; manifests say which data."""

from __future__ import annotations

import json

import pytest

from data_synth.config import AggregateConfig, JudgeConfig, TrainConfig, WatchConfig
from data_synth.watch import pairs_from_rollouts, watch
from principles.schema import load_principle_set
from rm_core.registry import Registry
from salmon.atomic import atomic_write_jsonl
from salmon.errors import UserError


def rollout_shard(root, run_id: str, step: int, n_prompts: int = 3) -> str:
    recs = []
    for k in range(n_prompts):
        for c in range(2):
            recs.append({"run_id": run_id, "step": step, "prompt_id": f"q{k}", "prompt": f"Name fruit number {k}.",
                         "type": "general", "completion": f"Fruit {k}: {'apple' if c else 'a ripe pear, I think'}.",
                         "reward": 0.1 * c, "principle_set": "concise", "principle_set_hash": "abc",
                         "policy_version": f"policy-step{step}"})
    rel = f"{run_id}/step-{step:08d}.jsonl"
    atomic_write_jsonl(root / rel, recs)
    return rel


def test_groups_become_pairs_and_short_answers_are_dropped(tmp_path):
    rel = rollout_shard(tmp_path, "run1", 3, n_prompts=2)
    counters: dict[str, int] = {}
    pairs = pairs_from_rollouts(tmp_path / rel, 12, 1, counters)
    # "Fruit 0: apple." is 15 chars: kept with min 12; the pair is (pear, apple) in completion order.
    assert [p["pair_id"] for p in pairs] == ["run1/3/q0#0", "run1/3/q1#0"]
    assert pairs[0]["response_a"].endswith("pear, I think.") and pairs[0]["policy"] == "policy-step3"
    assert pairs_from_rollouts(tmp_path / rel, 16, 1, {}) == []
    bad = tmp_path / "run1" / "step-00000004.jsonl"
    bad.write_text(json.dumps({"run_id": "run1"}) + "\n")
    with pytest.raises(UserError, match=r"step-00000004.jsonl: record 1: missing field"):
        pairs_from_rollouts(bad, 1, 1, {})


def test_watch_judges_new_shards_retrains_and_records_the_data_of_each_version(tmp_path, tiny_model_dir):
    rollouts = tmp_path / "rollouts"
    first = rollout_shard(rollouts, "run1", 1)
    cfg = WatchConfig(
        rollouts_dir=rollouts, work_dir=tmp_path / "work", min_new_pairs=3, min_response_chars=4,
        judge=JudgeConfig(model=str(tiny_model_dir), source="ab", principle_set="concise"),
        aggregate=AggregateConfig(require_order_agreement=False, eval_fraction=0.34),
        train=TrainConfig(base_model=str(tiny_model_dir), registry=tmp_path / "registry", batch_size=4,
                          lora_r=2, init_from="parent"),
    )
    rep = watch(cfg, once=True)
    assert rep["new_shards"] == 1 and rep["new_pairs"] == 3 and rep["published"] == ["v0001"]
    reg = Registry(cfg.train.registry)
    m1 = reg.manifest("v0001").model_dump()
    assert m1["training_data_rollouts"] == [str(rollouts / first)] and m1["parent_version"] is None
    assert m1["policy_versions"] == ["policy-step1"] and m1["trigger"] == "watch"
    judged = (tmp_path / "work" / "judgments" / first).read_text().splitlines()
    n_principles = len(load_principle_set("concise").principles)
    assert len(judged) == 3 * n_principles  # each pair judged under each principle of 'concise'

    # Nothing new: no retrain. One new shard below the threshold: judged, not yet trained.
    assert watch(cfg, once=True)["published"] == []
    second = rollout_shard(rollouts, "run1", 2, n_prompts=1)
    rep = watch(cfg, once=True)
    assert rep["new_pairs"] == 1 and rep["published"] == [] and rep["pending_pairs"] == 1
    third = rollout_shard(rollouts, "run1", 3, n_prompts=2)
    rep = watch(cfg, once=True)
    assert rep["published"] == ["v0002"] and reg.current() == "v0002"
    m2 = reg.manifest("v0002").model_dump()
    assert m2["parent_version"] == "v0001" and m2["init_from"] == "parent"
    assert m2["training_data_rollouts"] == [str(rollouts / s) for s in (first, second, third)]
    assert m2["new_rollout_shards"] == [second, third]
    assert m2["policy_versions"] == ["policy-step1", "policy-step2", "policy-step3"]
