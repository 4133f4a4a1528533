"""``salmon synth run``: prompts -> sample -> judge -> aggregate -> rm-train -> published version.

Every stage writes under ``out/<stage>/``; a rerun after a crash resumes the unfinished stage and
skips finished ones (their manifests say so), then retrains and publishes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from salmon.atomic import atomic_write_json

from .config import SynthRunConfig


def run_pipeline(cfg: SynthRunConfig) -> dict[str, Any]:
    from .aggregate import run_aggregate
    from .judge import run_judge, select_principles
    from .prompts import load_prompts
    from .rm_train import train_reward_model
    from .sample import run_sample
    from .shards import iter_stage, stage_shards

    t0 = time.monotonic()
    out = Path(cfg.out)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts)
    summary: dict[str, Any] = {"prompts": len(prompts)}
    summary["sample"] = run_sample(prompts, out / "sample", cfg.sample)
    pairs = list(iter_stage(out / "sample"))
    summary["judge"] = run_judge(pairs, out / "judge", cfg.judge)
    judgments = list(iter_stage(out / "judge"))
    pset, _ = select_principles(cfg.judge)
    summary["aggregate"] = run_aggregate(pairs, judgments, pset, out / "aggregate", cfg.aggregate)
    extra = {"training_shards": {"sample": [str(out / "sample" / s) for s in stage_shards(out / "sample")],
                                 "judge": [str(out / "judge" / s) for s in stage_shards(out / "judge")]},
             "judge_source": summary["judge"]["source"], "policy": cfg.sample.policy}
    result = train_reward_model(out / "aggregate" / "train.jsonl", out / "aggregate" / "eval.jsonl",
                                cfg.train, extra_manifest=extra)
    summary["train"] = {"version": result.version, "registry": str(cfg.train.registry), **result.metrics}
    summary["time_s"] = round(time.monotonic() - t0, 1)
    atomic_write_json(out / "run_summary.json", summary)
    return summary
