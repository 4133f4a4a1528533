"""ServiceReward without TRL: grouping, per-prompt principles, control-file switch, rollout shard."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
from pt_fakes import rule_score

from policy_trainer.config import ShapingConfig
from policy_trainer.principles_select import PrincipleSelector, SetTimeline
from policy_trainer.rewards import ServiceReward, ShapingReward
from policy_trainer.rollouts import read_shards
from principles.schema import load_principle_set
from salmon_client.client import AsyncSalmonClient, RetryPolicy

PATTERN, PENALTY = r"[aeiou]", 0.01


def batch(n_prompts: int = 3, g: int = 2) -> dict:
    prompts, completions, ids, types, cids = [], [], [], [], []
    for p in range(n_prompts):
        for i in range(g):
            prompts.append([{"role": "user", "content": f"question {p}"}])
            completions.append([{"role": "assistant", "content": f"answer {p}-{i} " + "ea" * (p + i)}])
            ids.append(f"p{p}")
            types.append(["general", "reasoning", "redteam"][p % 3])
            cids.append([7] * (3 + i) + ([2] if i else []))
    return {"prompts": prompts, "completions": completions, "completion_ids": cids, "prompt_id": ids,
            "prompt_type": types}


def test_groups_by_prompt_selects_per_prompt_and_writes_shard(fake_service, tmp_path):
    from policy_trainer.rollouts import RolloutWriter

    rl, concise = load_principle_set("rl"), load_principle_set("concise")
    client = AsyncSalmonClient(fake_service.url, retry=RetryPolicy(rng=random.Random(0)))
    ctl = tmp_path / "ctl"

    async def resolve(src: str):
        pset = load_principle_set(src)
        await client.register_set(pset)
        return pset

    metrics: dict[str, float] = {}
    extra: dict[str, list] = {}
    reward = ServiceReward(client, SetTimeline(concise, control_file=ctl),
                           PrincipleSelector(k=2, intervention=load_principle_set("intervention")),
                           ShapingConfig(rm_scale=2.0), run_id="r", writer=RolloutWriter(tmp_path / "ro", "r"),
                           resolve_set=resolve)
    b = batch()
    ctl.write_text("rl")  # the user switches sets before step 5
    out = asyncio.run(reward(**b, trainer_state=SimpleNamespace(global_step=5),
                             log_metric=metrics.__setitem__, log_extra=extra.__setitem__))

    texts = [c[0]["content"] for c in b["completions"]]
    assert out == [pytest.approx(2.0 * rule_score(t, PATTERN, PENALTY)) for t in texts]
    calls = fake_service.recorder.scored()
    assert len(calls) == 3  # three prompts, three distinct selections: one request each, groups whole
    for c in calls:
        names = [p["name"] for p in c["request"]["principles"]]
        assert len(names) == 5 and names[2:] == ["no_self_praise", "fulfil_the_request", "stay_on_point"]
        assert set(names[:2]) <= set(rl.names())
        assert len({it["prompt"][0]["content"] for it in c["request"]["items"]}) == 1
        assert c["headers"]["x-salmon-step"] == "5"
    assert [c["path"] for c in fake_service.recorder.calls if c["method"] == "PUT"] == ["/v1/principle-sets/rl"]
    assert [e.source for e in reward.timeline.events] == ["start", "control_file"]
    assert extra["principle_set"] == [rl.ref] * 6 and metrics["reward_service/requests"] == 3

    rows = read_shards(tmp_path / "ro", "r")
    assert [r["completion"] for r in rows] == texts
    assert {r["step"] for r in rows} == {5} and {r["principle_set_hash"] for r in rows} == {rl.hash}
    assert rows[0]["reward"] == pytest.approx(rule_score(texts[0], PATTERN, PENALTY))
    assert rows[0]["reward_total"] == pytest.approx(2 * rows[0]["reward"])
    assert set(rows[0]) >= {"run_id", "step", "prompt_id", "prompt", "type", "completion", "reward",
                            "principle_set", "principle_set_hash", "policy_version"}


def test_shaping_reward_uses_types_and_eos():
    cfg = ShapingConfig.model_validate({"length_bonus": {"enabled": True, "per_tokens": 10, "scale": 1.0},
                                        "unfinished_penalty": 1.0})
    b = batch(n_prompts=2, g=2)
    out = ShapingReward(cfg, eos_token_ids=[2])(**b)
    # p0 general: 3 tokens unfinished, 5 tokens finished; p1 reasoning (x-0.4): 3 unfinished, 5 finished
    assert out == pytest.approx([0.3 - 1.0, 0.5, -0.12 - 1.0, -0.2])
