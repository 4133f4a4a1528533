"""Stage ``sample``: the policy answers each prompt ``num_samples`` times; consecutive answers form pairs.

A pair with an empty or too-short answer is dropped (a judge comparing against nothing teaches the
reward model only "longer wins"), and so is a pair of identical answers (no preference to learn).
Each drop is counted by reason in the stage summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SampleConfig
from .shards import ShardedStage, counters_total, derive_seed, iter_stage, stable_hash, write_summary

if TYPE_CHECKING:
    from .stages import StageContext


def make_pairs(prompt: dict, responses: Sequence[str], min_chars: int, policy: str,
               counters: dict[str, int]) -> list[dict]:
    pairs = []
    for j in range(len(responses) // 2):
        a, b = responses[2 * j], responses[2 * j + 1]
        counters["pairs_formed"] = counters.get("pairs_formed", 0) + 1
        if not a or not b:
            reason = "dropped_empty"
        elif len(a) < min_chars or len(b) < min_chars:
            reason = "dropped_too_short"
        elif a == b:
            reason = "dropped_identical"
        else:
            reason = None
        if reason:
            counters[reason] = counters.get(reason, 0) + 1
            continue
        counters["pairs_kept"] = counters.get("pairs_kept", 0) + 1
        pairs.append({"pair_id": f"{prompt['id']}#{j}", "prompt_id": prompt["id"], "prompt": prompt["prompt"],
                      "type": prompt.get("type", "general"), "response_a": a, "response_b": b, "policy": policy})
    return pairs


def run_sample(prompts: list[dict], out_dir: str | Path, cfg: SampleConfig) -> dict[str, Any]:
    """Sample pairs for ``prompts`` into ``out_dir`` (resumable); returns the stage summary."""
    from salmon.modeling import ModelOptions, load_causal_lm, load_tokenizer

    from .generation import generate

    t0 = time.monotonic()
    fingerprint = {"config": cfg.model_dump(mode="json"), "prompts": stable_hash(prompts)}
    stage = ShardedStage(out_dir, "sample", fingerprint)
    state: dict[str, Any] = {}

    def shard(index: int, chunk: Sequence[dict]) -> tuple[list[dict], dict[str, int]]:
        if "model" not in state:  # loaded lazily: a finished stage reruns without loading a model
            state["tok"] = load_tokenizer(cfg.policy)
            state["model"] = load_causal_lm(cfg.policy, ModelOptions(dtype=cfg.dtype, device=cfg.device))
        counters: dict[str, int] = {"prompts": len(chunk)}
        records: list[dict] = []
        for b in range(0, len(chunk), cfg.batch_size):
            batch = chunk[b:b + cfg.batch_size]
            outs = generate(state["model"], state["tok"], [p["prompt"] for p in batch],
                            num_samples=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, seed=derive_seed(cfg.seed, index, b),
                            stats=counters)
            for p, responses in zip(batch, outs, strict=True):
                records.extend(make_pairs(p, responses, cfg.min_response_chars, cfg.policy, counters))
        return records, counters

    manifest = stage.run(prompts, cfg.shard_size, shard, desc="sample", unit_name="prompt")
    summary = {"stage": "sample", "policy": cfg.policy, **counters_total(manifest),
               "shards": len(manifest["done"]), "time_s": round(time.monotonic() - t0, 2)}
    write_summary(out_dir, summary)
    return summary


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Stage ``sample``: ``prompts`` -> ``pairs`` (the finished stage directory's records)."""
    out = ctx.dir("sample")
    summary = run_sample(ctx.data["prompts"], out, ctx.config.sample)
    ctx.data["pairs"] = list(iter_stage(out))
    return summary
