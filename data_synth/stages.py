"""The stages of the synthetic-preference pipeline, declared once, in order.

``salmon synth run`` (:mod:`data_synth.pipeline`) runs every stage of :data:`STAGES`; ``salmon synth
watch`` (:mod:`data_synth.watch`) judges RL rollouts incrementally in place of the stages up to
``judge`` and runs the ones after it from this table. A stage names the artefacts it reads and the one
it writes (keys of :attr:`StageContext.data`) and its runner, ``"module:function"`` taking the context
and returning the stage's summary. Runners are imported when a stage runs, so reading the table (the
CLI's help does) loads no model library.

Adding a stage: its module with a runner, and one :class:`Stage` line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    writes: str
    runner: str  # "module:function", function(ctx: StageContext) -> summary

    def run(self, ctx: StageContext) -> Any:
        module, func = self.runner.split(":")
        return getattr(importlib.import_module(module), func)(ctx)


@dataclass
class StageContext:
    """What one pass over the stages shares.

    ``config`` has a section per stage that needs one (``config.judge`` …): a ``SynthRunConfig`` or a
    ``WatchConfig``. A stage writes under ``dir(name)``; ``manifest_extra`` gives the fields the
    published version's manifest records about its data, from the context once the earlier stages ran.
    """

    config: Any
    out: Path
    dirs: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, Any] = field(default_factory=dict)
    manifest_extra: Callable[[StageContext], dict[str, Any]] = lambda ctx: {}

    def dir(self, stage: str) -> Path:
        return self.dirs.get(stage, self.out / stage)


STAGES: tuple[Stage, ...] = (
    Stage("prompts", reads=(), writes="prompts", runner="data_synth.prompts:run_stage"),
    Stage("sample", reads=("prompts",), writes="pairs", runner="data_synth.sample:run_stage"),
    Stage("judge", reads=("pairs",), writes="judgments", runner="data_synth.judge:run_stage"),
    Stage("aggregate", reads=("pairs", "judgments"), writes="dataset", runner="data_synth.aggregate:run_stage"),
    Stage("train", reads=("dataset",), writes="reward_model", runner="data_synth.stages:run_train_stage"),
)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def stages_after(name: str) -> tuple[Stage, ...]:
    """The stages that follow ``name`` in the table."""
    return STAGES[stage_names().index(name) + 1:]


def run_stages(ctx: StageContext, stages: Sequence[Stage] = STAGES) -> StageContext:
    """Run ``stages`` in order; each summary lands in ``ctx.summaries[stage.name]``."""
    for stage in stages:
        missing = [r for r in stage.reads if r not in ctx.data]
        if missing:  # the table's order, or a caller's inputs, is wrong: a bug, not a user error
            raise RuntimeError(f"stage {stage.name!r} reads {missing} that no earlier stage wrote")
        ctx.summaries[stage.name] = stage.run(ctx)
        if stage.writes not in ctx.data:
            raise RuntimeError(f"stage {stage.name!r} did not write {stage.writes!r}")
    return ctx


def run_train_stage(ctx: StageContext) -> dict[str, Any]:
    """``dataset`` -> a published reward-model version (``train_reward_model`` is also ``salmon rm-train``)."""
    from .rm_train import train_reward_model

    data = ctx.data["dataset"]
    cfg = ctx.config.train
    # A resumed run whose kill came after the publish gets that version back, not a second one.
    result = train_reward_model(data / "train.jsonl", data / "eval.jsonl", cfg, extra_manifest=ctx.manifest_extra(ctx),
                                reuse_published=True)
    ctx.data["reward_model"] = result
    return {"version": result.version, "registry": str(cfg.registry), **result.metrics}
