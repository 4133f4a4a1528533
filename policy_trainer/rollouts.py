"""Rollout shards for on-policy reward-model retraining (consumed by data_synth's watch loop).

One shard per generation step, ``<rollouts_dir>/<run_id>/step-00000012.jsonl``, written atomically
(salmon.atomic): a shard that exists is complete, so the consumer never reads half a step. A step
that is re-generated after a crash or resume overwrites its shard with what was actually trained on.
With several ranks, rank r > 0 writes ``step-00000012.rank-r.jsonl`` beside rank 0's shard.

Record: ``{"run_id","step","prompt_id","prompt","type","completion","reward","principle_set",
"principle_set_hash","policy_version"}`` plus ``reward_total`` (what the trainer optimised after
shaping) and ``principles`` (the names this prompt was scored against).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salmon.atomic import atomic_write_jsonl, read_jsonl

SHARD_RE = re.compile(r"^step-(\d{8})(?:\.rank-(\d+))?\.jsonl$")


def shard_path(rollouts_dir: Path, run_id: str, step: int, rank: int = 0) -> Path:
    suffix = f".rank-{rank}" if rank else ""
    return Path(rollouts_dir) / run_id / f"step-{step:08d}{suffix}.jsonl"


def policy_version(run_id: str, step: int) -> str:
    """The weights that generated a rollout: the run and the number of optimizer steps taken before."""
    return f"{run_id}@step-{step}"


@dataclass
class RolloutWriter:
    rollouts_dir: Path
    run_id: str
    rank: int = 0

    def write_step(self, step: int, records: Sequence[dict[str, Any]]) -> Path:
        path = shard_path(self.rollouts_dir, self.run_id, step, self.rank)
        atomic_write_jsonl(path, records)
        return path


def list_shards(rollouts_dir: Path, run_id: str) -> list[tuple[int, Path]]:
    d = Path(rollouts_dir) / run_id
    out = []
    for p in d.glob("step-*.jsonl") if d.is_dir() else ():
        m = SHARD_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_shards(rollouts_dir: Path, run_id: str) -> list[dict[str, Any]]:
    return [r for _, p in list_shards(rollouts_dir, run_id) for r in read_jsonl(p)]
