"""`salmon rm-pretrain`: the principle-following reward model that ships for the embedded base.

SALMON pre-trains its preference model before fine-tuning it on synthetic preferences (PMP). We
cannot use its data here, so this stage builds data that can only be fitted by READING the
principle: minimal pairs in which the two responses differ along one axis, and the label follows
the principle text. Each written pair (principles/pretrain/*.yaml: an axis with its definition,
negative definition, plain instruction, opposite instruction and (prompt, follows, violates)
triples) yields, for the same two responses:

- ``single``: the principle alone prefers *follows*; its negation alone prefers *violates*;
- ``set``: the same inside a set with distractor principles from other families, on which the two
  responses do not differ, so the label follows the one principle they do differ on;
- ``plain``: the plain instruction prefers *follows*; the opposite instruction prefers *violates*
  (plain strings, no negative definition, as users send them).

A fixed response preference cannot fit both halves of a minimal pair, so the only way down the loss
is to read the principle. Whole axes are held out (``held_out_axes``): the reported flip rates are
measured on axes the model never saw (those and the check set's 14 axes, which are never trained
on). Training is data_synth's reward-model trainer (TRL RewardTrainer + LoRA) with the same renderer
the service uses; the result is published as a registry version that ships with the package and
that ``scorer: auto`` serves when no registry version exists.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from principles.axes import AXES_DIR, DEFAULT_HELD_OUT, Axis, heldout_flip_pairs, load_axes
from principles.schema import Principle
from salmon.atomic import atomic_write_json, atomic_write_jsonl, file_sha256
from salmon.errors import UserError

from .config import TrainConfig
from .shards import stable_hash

VARIANTS = ("single", "set", "plain")


def _row(prompt: str, chosen: str, rejected: str, principles: Sequence[Principle], negated: Sequence[str],
         dominant: str, axis: str, variant: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "principles": [p.model_dump(exclude_defaults=True) for p in principles],
            "negated": list(negated), "dominant": dominant, "axis": axis, "variant": variant}


def build_rows(axes: Sequence[Axis], *, distractor_pool: Sequence[Axis], distractors: int = 4,
               variants: Sequence[str] = VARIANTS, variants_per_pair: int | None = None,
               seed: int = 0) -> list[dict[str, Any]]:
    """Both halves of each minimal pair for each of its variants; deterministic under ``seed``.

    ``variants_per_pair`` draws that many of ``variants`` for each written pair (None: all), which
    spreads a fixed compute budget over every pair and axis instead of every variant of fewer pairs.
    The minimal pairs are shuffled, but the two halves of each stay adjacent: trained in order (even
    batch size), they share a batch, so their gradients' main effects (a fixed taste for one
    response) cancel inside the step and what is left is the principle x response interaction.

    Distractors come from ``distractor_pool`` axes of other families than the pair's own (so the two
    responses are unlikely to differ on them); in the ``set`` variant a distractor is itself negated
    at random, so that negation as such carries no label.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown pretraining variants {unknown}; choose from {list(VARIANTS)}")
    rng = random.Random(seed)
    groups: list[list[dict[str, Any]]] = []  # the two halves of one minimal pair stay adjacent
    for ax in axes:
        p = ax.principle
        others = [o for o in distractor_pool if o.family != ax.family and o.name != ax.name]
        for pair in ax.pairs:
            f, v = pair.follows, pair.violates
            chosen = set(rng.sample(list(variants), variants_per_pair)
                         if variants_per_pair and variants_per_pair < len(variants) else variants)
            if "single" in chosen:
                groups.append([_row(pair.prompt, f, v, [p], [], p.name, ax.name, "single"),
                               _row(pair.prompt, v, f, [p], [p.name], p.name, ax.name, "single")])
            if "set" in chosen and len(others) >= distractors:
                ds = [o.principle for o in rng.sample(others, distractors)]
                members = [p, *ds]
                rng.shuffle(members)
                neg_ds = [d.name for d in ds if rng.random() < 0.25]
                groups.append([_row(pair.prompt, f, v, members, neg_ds, p.name, ax.name, "set"),
                               _row(pair.prompt, v, f, members, [*neg_ds, p.name], p.name, ax.name, "set")])
            if "plain" in chosen:
                groups.append([
                    _row(pair.prompt, f, v, [Principle(name="p1", definition=ax.plain)], [], "p1", ax.name, "plain"),
                    _row(pair.prompt, v, f, [Principle(name="p1", definition=ax.opposite)], [], "p1", ax.name,
                         "plain")])
    rng.shuffle(groups)
    return [r for g in groups for r in g]


class PretrainConfig(BaseModel):
    """``salmon rm-pretrain``: which axes, how the minimal pairs are built, and the trainer's settings."""

    model_config = ConfigDict(extra="forbid")

    axes: list[Path] = Field(default_factory=list, description="Axis YAML files (default: the shipped set).")
    held_out_axes: list[str] = Field(default_factory=lambda: list(DEFAULT_HELD_OUT),
                                     description="Whole axes kept out of training and used for the held-out flip rates.")
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS))
    variants_per_pair: int | None = Field(default=2, ge=1, description="Variants drawn per written pair (None: all).")
    distractors: int = Field(default=4, ge=1, description="Distractor principles in the 'set' variant (a set of 5).")
    seed: int = 0
    out: Path = Field(default=Path("runs/rm-pretrain"), description="Datasets and the report.")
    eval_pairs_per_axis: int = Field(default=3, ge=1, description="Held-out pairs per held-out axis in the manifest's table.")
    ship_min_flip: float = Field(default=0.5, ge=0, le=1,
                                 description="--ship refuses a result whose held-out single flip rate is lower.")
    max_train_pairs: int | None = Field(default=None, ge=1, description="Train on the first N built pairs (smoke runs).")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        registry=Path("runs/rm-pretrain/registry"), lora_r=16, lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_layers=8, learning_rate=1e-3, epochs=1.0, batch_size=8, grad_accum=2, max_length=384,
        mixed_precision="bf16", sampling="sequential", seed=0))


def run_pretrain(cfg: PretrainConfig, command: str | None = None) -> dict[str, Any]:
    """Build the minimal-pair data, train, measure the flip table on held-out axes, publish."""
    from rm_core.checkset import flip_table

    from .rm_train import train_reward_model

    t0 = time.monotonic()
    axes = load_axes(cfg.axes or None)
    names = {a.name for a in axes}
    missing = [n for n in cfg.held_out_axes if n not in names]
    if missing:
        raise UserError(f"held_out_axes names unknown axes {missing}; known: {sorted(names)}")
    train_axes = [a for a in axes if a.name not in cfg.held_out_axes]
    held_axes = [a for a in axes if a.name in cfg.held_out_axes]
    if not train_axes:
        raise UserError("every axis is held out; leave some for training")
    rows = build_rows(train_axes, distractor_pool=train_axes, distractors=cfg.distractors,
                      variants=cfg.variants, variants_per_pair=cfg.variants_per_pair, seed=cfg.seed)
    if cfg.max_train_pairs:
        rows = rows[:cfg.max_train_pairs]
    cfg.out.mkdir(parents=True, exist_ok=True)
    train_path = cfg.out / "pretrain_train.jsonl"
    atomic_write_jsonl(train_path, rows)
    axis_files = [Path(p) for p in cfg.axes] if cfg.axes else sorted(AXES_DIR.glob("*.yaml"))
    print(f"rm-pretrain: {len(train_axes)} training axes, {len(rows)} training pairs; "
          f"{len(held_axes)} held-out axes", file=sys.stderr)
    held_pairs = heldout_flip_pairs(held_axes, cfg.eval_pairs_per_axis)

    def held_out_table(score_fn) -> dict[str, Any]:
        return {"held_out_axes": flip_table(score_fn, held_pairs, seed=cfg.seed) if held_pairs else {}}

    extra = {"built_by": command or "salmon rm-pretrain",
             "pretrain": {"axes_hash": stable_hash([file_sha256(f) for f in axis_files]),
                          "train_axes": [a.name for a in train_axes], "held_out_axes": [a.name for a in held_axes],
                          "variants": cfg.variants, "train_pairs": len(rows), "seed": cfg.seed}}
    result = train_reward_model(train_path, None, cfg.train, extra_manifest=extra, extra_eval=held_out_table)
    report = {"version": result.version, "registry": str(cfg.train.registry), "metrics": result.metrics,
              "seconds": round(time.monotonic() - t0, 1)}
    atomic_write_json(cfg.out / "pretrain_report.json", report)
    return report


def ship(registry: Path, version: str | None, target: Path | None = None) -> Path:
    """Make ``version`` of ``registry`` the RM shipped with the package (rm_core.registry.ship)."""
    from rm_core.registry import MANIFEST, Registry
    from rm_core.registry import ship as ship_tree

    if not version:
        raise UserError("nothing to ship: the run published no version (publish: false?)")
    src = Registry(registry)
    manifest = src.manifest(version, verify=True).model_dump(mode="json")
    build = Path(tempfile.mkdtemp(prefix="salmon-ship-"))
    try:
        shutil.copytree(src.path(version), build / "v", ignore=shutil.ignore_patterns(MANIFEST))
        return ship_tree(build / "v", manifest, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
