"""``salmon synth run``: every stage of :data:`data_synth.stages.STAGES` in order -> a published version.

Every stage writes under ``out/<stage>/``; a rerun after a crash resumes the unfinished stage and
skips finished ones (their manifests say so), then retrains and publishes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from salmon.atomic import atomic_write_json, remove_stale_temps

from .config import SynthRunConfig
from .stages import StageContext, run_stages


def _manifest_extra(ctx: StageContext) -> dict[str, Any]:
    from .shards import stage_shards

    shards = {name: [str(ctx.dir(name) / s) for s in stage_shards(ctx.dir(name))] for name in ("sample", "judge")}
    return {"training_shards": shards, "judge_source": ctx.summaries["judge"]["source"],
            "policy": ctx.config.sample.policy}


def run_pipeline(cfg: SynthRunConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # run_summary.json's temp file, if a kill landed inside its write
    ctx = run_stages(StageContext(config=cfg, out=out, manifest_extra=_manifest_extra))
    summary: dict[str, Any] = dict(ctx.summaries)
    summary["time_s"] = round(time.monotonic() - t0, 1)
    atomic_write_json(out / "run_summary.json", summary)
    return summary
