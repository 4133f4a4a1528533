"""The on-policy loop. Judge the RL trainer's rollouts, retrain the RM, publish, repeat.

The RL trainer exports ``<rollouts_dir>/<run_id>/step-00000012.jsonl`` atomically (a file that exists
is complete). Completions of one ``prompt_id`` within a step are a group; consecutive completions of
a group form pairs (too-short, empty and identical answers dropped, as in ``sample``). Each rollout
shard's pairs and judgments are written under ``work_dir`` with atomic writes and then recorded in
``state.json``; a kill between the two only means the shard is judged again, to the same bytes.
This ingestion takes the place of the stages up to ``judge`` (:data:`data_synth.stages.STAGES`).
Once ``min_new_pairs`` judged pairs arrived since the last publish, the loop runs the stages after
``judge`` (aggregate, train and publish) over everything judged so far; the manifest lists the
rollout shards used, the policy versions they came from and the parent version (the base each
retrain starts from is ``init_from``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from salmon.atomic import JsonlError, atomic_write_json, atomic_write_jsonl, read_jsonl
from salmon.errors import UserError

from .config import WatchConfig
from .sample import make_pairs
from .stages import StageContext, run_stages, stages_after

log = logging.getLogger(__name__)

ROLLOUT_FIELDS = ("run_id", "step", "prompt_id", "prompt", "completion")
STATE = "state.json"


def rollout_shards(root: Path) -> list[Path]:
    """Finished rollout shards (atomic renames: only complete files carry the final name)."""
    if not root.is_dir():
        raise UserError(f"{root}: rollouts directory not found")
    return sorted(p for p in root.glob("*/step-*.jsonl") if p.is_file())


def pairs_from_rollouts(path: Path, min_chars: int, max_pairs_per_group: int,
                        counters: dict[str, int]) -> list[dict]:
    try:
        records = read_jsonl(path)
    except JsonlError as e:
        raise UserError(str(e)) from None
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for n, r in enumerate(records, 1):
        missing = [k for k in ROLLOUT_FIELDS if not isinstance(r, dict) or k not in r]
        if missing:
            raise UserError(f"{path}: record {n}: missing field(s) {', '.join(missing)}")
        groups.setdefault((r["run_id"], r["step"], r["prompt_id"]), []).append(r)
    pairs = []
    for (run_id, step, pid), recs in groups.items():
        prompt = {"id": f"{run_id}/{step}/{pid}", "prompt": recs[0]["prompt"], "type": recs[0].get("type", "general")}
        completions = [r["completion"] for r in recs][: 2 * max_pairs_per_group]
        policy = str(recs[0].get("policy_version", "unknown"))
        for p in make_pairs(prompt, completions, min_chars, policy, counters):
            p["source_prompt_id"] = pid
            p["rollout_principle_set"] = recs[0].get("principle_set_hash")
            pairs.append(p)
    return pairs


class WatchState:
    def __init__(self, work_dir: Path):
        self.path = work_dir / STATE
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {"consumed": {}, "pending_pairs": 0, "published": []}

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def scan_once(cfg: WatchConfig, judge_cache: dict[str, Any]) -> dict[str, Any]:
    """Judge every new rollout shard; retrain + publish if enough new pairs arrived."""
    from .judge import build_judge, judge_records, resolve_source, select_principles

    work = Path(cfg.work_dir)
    root = Path(cfg.rollouts_dir)
    state = WatchState(work)
    pset, principles = select_principles(cfg.judge)
    report: dict[str, Any] = {"new_shards": 0, "new_pairs": 0, "published": None}
    for shard in rollout_shards(root):
        rel = _rel(shard, root)
        if rel in state.data["consumed"]:
            continue
        counters: dict[str, int] = {}
        pairs = pairs_from_rollouts(shard, cfg.min_response_chars, cfg.max_pairs_per_group, counters)
        if pairs and "judge" not in judge_cache:
            judge_cache["judge"] = build_judge(cfg.judge, resolve_source(cfg.judge))
        judgments = [j for p in pairs for j in judge_records(judge_cache["judge"], p, principles, pset)]
        atomic_write_jsonl(work / "pairs" / rel, pairs)
        atomic_write_jsonl(work / "judgments" / rel, judgments)
        state.data["consumed"][rel] = {"pairs": len(pairs), "counters": counters,
                                       "policy_versions": sorted({p["policy"] for p in pairs})}
        state.data["pending_pairs"] += len(pairs)
        state.save()  # recorded only after both files are in place
        report["new_shards"] += 1
        report["new_pairs"] += len(pairs)
    report["pending_pairs"] = state.data["pending_pairs"]
    if state.data["pending_pairs"] >= cfg.min_new_pairs:
        report["published"] = retrain(cfg, state)
    return report


def retrain(cfg: WatchConfig, state: WatchState) -> str | None:
    """The stages after ``judge`` over every judged rollout shard; records the published version."""
    work = Path(cfg.work_dir)
    shards = sorted(state.data["consumed"])
    pairs = [p for s in shards for p in read_jsonl(work / "pairs" / s)]
    judgments = [j for s in shards for j in read_jsonl(work / "judgments" / s)]
    n = len(state.data["published"]) + 1
    round_dir = work / "datasets" / f"round-{n:04d}"

    def manifest_extra(ctx: StageContext) -> dict[str, Any]:
        agg = ctx.summaries["aggregate"]
        return {
            "trigger": "watch",
            "training_data_rollouts": [str(Path(cfg.rollouts_dir) / s) for s in shards],
            "new_rollout_shards": [s for s in shards if s not in {x for p in state.data["published"] for x in p["shards"]}],
            "policy_versions": sorted({v for s in shards for v in state.data["consumed"][s]["policy_versions"]}),
            "judge_pairs": len(pairs), "aggregate": {k: agg[k] for k in ("train", "eval", "rows")},
        }

    ctx = StageContext(config=cfg, out=round_dir, dirs={"aggregate": round_dir},
                       data={"pairs": pairs, "judgments": judgments}, manifest_extra=manifest_extra)
    result = run_stages(ctx, stages_after("judge")).data["reward_model"]
    state.data["published"].append({"version": result.version, "shards": shards, "round": n,
                                    "metrics": result.metrics})
    state.data["pending_pairs"] = 0
    state.save()
    return result.version


def watch(cfg: WatchConfig, once: bool = False) -> dict[str, Any]:
    """Run the loop (``once``: a single scan). Stops on Ctrl-C with its state saved."""
    judge_cache: dict[str, Any] = {}
    totals: dict[str, Any] = {"scans": 0, "new_shards": 0, "new_pairs": 0, "published": []}
    while True:
        rep = scan_once(cfg, judge_cache)
        totals["scans"] += 1
        totals["new_shards"] += rep["new_shards"]
        totals["new_pairs"] += rep["new_pairs"]
        totals["pending_pairs"] = rep["pending_pairs"]
        if rep["published"]:
            totals["published"].append(rep["published"])
            log.info("published %s", rep["published"])
        if once:
            return totals
        try:
            time.sleep(cfg.poll_s)
        except KeyboardInterrupt:
            return totals
