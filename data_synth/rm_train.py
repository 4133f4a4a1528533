"""Stage 5: train a principle-following reward model and publish it as a registry version.

TRL's RewardTrainer (Bradley-Terry loss) over LoRA on the backbone plus the scalar ``score`` head
(PEFT task SEQ_CLS saves the head through ``modules_to_save``). Inputs are rendered by the service's
renderer and handed to TRL pre-tokenized (``chosen_ids``/``rejected_ids``), so the model is trained on
exactly the token ids the service will score; ``max_length`` drops over-long pairs rather than letting
anything truncate them differently from serving.

After training: held-out accuracy; the principle-flip rate (on held-out pairs, how often the model's
preference reverses when the dominant principle is negated: a reward model that reads its principles
should reverse); reward mean/std over the training inputs (the service normalises with them). Then
``adapter/`` is saved and published with a manifest saying which data, which base and which parent.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from principles.schema import Principle
from salmon.atomic import JsonlError, file_sha256, read_jsonl
from salmon.errors import UserError

from .config import TrainConfig
from .shards import stable_hash

log = logging.getLogger(__name__)

REQUIRED = ("prompt", "chosen", "rejected", "principles", "negated")
# (principles, negated names, [(prompt, response)]) -> one raw score per item
ScoreFn = Callable[[Sequence[Principle], Sequence[str], Sequence[tuple[Any, str]]], list[float]]


def load_rm_rows(path: str | Path) -> list[dict]:
    """Rows of an aggregate output file; errors name the file and line."""
    path = Path(path)
    try:
        rows = read_jsonl(path)
    except JsonlError as e:
        raise UserError(str(e)) from None
    for n, r in enumerate(rows, 1):
        missing = [k for k in REQUIRED if not isinstance(r, dict) or k not in r]
        if missing:
            raise UserError(f"{path}: record {n}: missing field(s) {', '.join(missing)} "
                           "(expected an aggregate output row)")
    return rows


def row_principles(row: dict) -> list[Principle]:
    return [Principle.model_validate(p) for p in row["principles"]]


def render_row(renderer, row: dict, response: str, negated: Sequence[str] | None = None) -> list[int]:
    negated = row["negated"] if negated is None else negated
    return renderer.render_principles(row_principles(row), row["prompt"], response, negated=negated).input_ids


def toggled(negated: Sequence[str], name: str) -> list[str]:
    return [n for n in negated if n != name] if name in negated else [*negated, name]


def render_dataset(renderer, rows: Sequence[dict], max_length: int) -> tuple[list[dict], int]:
    """``chosen_ids``/``rejected_ids`` per row (the serving renderer's ids); drops over-long pairs."""
    out, dropped = [], 0
    for r in rows:
        c, j = render_row(renderer, r, r["chosen"]), render_row(renderer, r, r["rejected"])
        if len(c) > max_length or len(j) > max_length:
            dropped += 1
            continue
        out.append({"chosen_ids": c, "rejected_ids": j})
    return out, dropped


@torch.no_grad()
def rewards(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Raw head outputs at the last token, right-padded batches (as the service computes them)."""
    from rm_core.batching import right_pad

    model.eval()
    dev = next(model.parameters()).device
    out: list[float] = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = right_pad([seqs[i] for i in idx], pad_id, dev)
        vals = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        for j, i in enumerate(idx):
            out[i] = vals[j]
    return out


def _negatable_dominant(row: dict) -> bool:
    dom = row.get("dominant")
    return bool(dom) and any(p["name"] == dom and p.get("negative_definition") for p in row["principles"])


def evaluate(model, renderer, rows: Sequence[dict], pad_id: int, batch_size: int) -> dict[str, Any]:
    """Held-out accuracy and principle-flip rate (negating the dominant principle should reverse it)."""
    if not rows:
        return {"eval_pairs": 0, "accuracy": None, "flip_rate": None}
    flip_idx = [i for i, r in enumerate(rows) if _negatable_dominant(r)]
    seqs = []
    for r in rows:
        seqs += [render_row(renderer, r, r["chosen"]), render_row(renderer, r, r["rejected"])]
    for i in flip_idx:
        r = rows[i]
        neg = toggled(r["negated"], r["dominant"])
        seqs += [render_row(renderer, r, r["chosen"], neg), render_row(renderer, r, r["rejected"], neg)]
    vals = rewards(model, seqs, pad_id, batch_size)
    n = len(rows)
    margins = [vals[2 * i] - vals[2 * i + 1] for i in range(n)]
    flipped = [vals[2 * n + 2 * k] - vals[2 * n + 2 * k + 1] for k in range(len(flip_idx))]
    flips = sum((margins[i] > 0) != (m > 0) for i, m in zip(flip_idx, flipped, strict=True))
    return {"eval_pairs": n, "accuracy": sum(m > 0 for m in margins) / n, "mean_margin": sum(margins) / n,
            "flip_pairs": len(flip_idx), "flip_rate": flips / len(flip_idx) if flip_idx else None}


def _init_version(cfg: TrainConfig, registry, parent: str | None):
    """(registry, version) whose adapter training starts from, or None for a fresh LoRA on the base."""
    from rm_core.registry import SHIPPED_REGISTRY, Registry, shipped_one_pass_version, shipped_version

    if cfg.init_from == "parent" and parent:
        return registry, parent
    if cfg.init_from == "shipped":
        version = shipped_one_pass_version(cfg.base_model)
        if version is None:
            what = ("is a contrast adapter for the contrastive scorer, not a one-pass RM with a head to fine-tune"
                    if shipped_version(cfg.base_model) else f"does not exist for base {cfg.base_model!r}")
            raise UserError(f"init_from shipped: the reward model shipped with salmon {what}; use init_from: base")
        return Registry(SHIPPED_REGISTRY), version
    return None


@dataclass
class TrainResult:
    version: str | None
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    build_dir: Path | None = None
    train_dataset: Any = field(default=None, repr=False)  # what TRL trained on (for the render test)
    model: Any = field(default=None, repr=False)  # the trained PeftModel, in eval mode


def _sort_target_modules(config_path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in string-hash order, which differs per process: sorted,
    the same training gives the same bytes (and manifest sha256), so a resumed run equals a clean one."""
    import json

    cfg = json.loads(config_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _published_with(registry, fingerprint: str) -> TrainResult | None:
    """The version whose manifest records ``fingerprint``, made CURRENT if a kill came between its
    rename into place and the CURRENT switch (it is then the newest version), or None."""
    versions = registry.versions()
    for version in reversed(versions):
        m = registry.manifest(version, verify=False)
        if (m.model_extra or {}).get("train_fingerprint") == fingerprint:
            registry.manifest(version)  # verify its files before serving it
            if version == versions[-1] and registry.current() != version:
                registry.set_current(version)
            log.info("%s was already trained from this data and config; not training again", version)
            return TrainResult(version, m.model_dump(mode="json"), {**m.eval_metrics, "reused": True})
    return None


def train_reward_model(train_path: str | Path, eval_path: str | Path | None, cfg: TrainConfig,
                       extra_manifest: dict[str, Any] | None = None, keep_build: Path | None = None,
                       extra_eval: Callable[[ScoreFn], dict[str, Any]] | None = None,
                       reuse_published: bool = False) -> TrainResult:
    """Train on ``train_path`` rows, evaluate on ``eval_path``, publish to ``cfg.registry``.

    ``extra_eval`` receives a scoring function over the trained model (principles, negate, items) and
    returns more metrics for the manifest (e.g. the held-out flip table of ``rm-pretrain``).
    ``reuse_published``: when the registry already holds a version trained from these very files with
    this config and extra manifest (its ``train_fingerprint``), return it instead of training again —
    the rerun of a run killed after its publish (``synth run``, ``rm-train``) must not publish a
    duplicate. Training is seeded, so that version is what training again would give.
    """
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, TaskType
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from rm_core.registry import Registry
    from rm_core.render import PROMPT_FORMAT_VERSION, Renderer
    from salmon.modeling import (
        ModelOptions,
        load_sequence_classifier,
        load_tokenizer,
        pick_device,
        pick_dtype,
    )

    t0 = time.monotonic()
    train_rows = load_rm_rows(train_path)
    eval_rows = load_rm_rows(eval_path) if eval_path and Path(eval_path).is_file() else []
    if not train_rows:
        raise UserError(f"{train_path}: no training pairs")
    data_files = [train_path] + ([eval_path] if eval_rows else [])
    fingerprint = stable_hash({"data": [file_sha256(Path(f)) for f in data_files],
                               "train_config": cfg.model_dump(mode="json"), "extra": extra_manifest or {}})
    if reuse_published and cfg.publish and (done := _published_with(Registry(cfg.registry), fingerprint)):
        return done
    tok = load_tokenizer(cfg.base_model)
    renderer = Renderer(tok)
    rendered, too_long = render_dataset(renderer, train_rows, cfg.max_length)
    if not rendered:
        raise UserError(f"{train_path}: every pair renders longer than max_length={cfg.max_length}")
    registry = Registry(cfg.registry)
    parent = registry.current()

    torch.manual_seed(cfg.seed)  # the fresh score head is random: seed before building it
    model = load_sequence_classifier(cfg.base_model, ModelOptions(dtype=cfg.dtype, device=cfg.device))
    peft_config = None
    init = _init_version(cfg, registry, parent)
    if init is not None:
        init_reg, init_version = init
        pm = init_reg.manifest(init_version)
        if pm.base_model != cfg.base_model:
            raise UserError(f"init_from {cfg.init_from}: {init_version} was trained on {pm.base_model!r}, "
                            f"not {cfg.base_model!r}")
        model = PeftModel.from_pretrained(model, init_reg.path(init_version) / (pm.adapter or "adapter"),
                                          is_trainable=True)
    else:
        n_layers = model.config.num_hidden_layers
        layers = (list(range(max(0, n_layers - cfg.lora_layers), n_layers)) if cfg.lora_layers else None)
        peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules),
                                 layers_to_transform=layers)

    work = Path(tempfile.mkdtemp(prefix="salmon-rm-train-"))
    try:
        device = pick_device(cfg.device)
        on_cpu = device.type == "cpu"
        args = RewardConfig(
            output_dir=str(work / "trainer"), num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
            logging_steps=max(1, len(rendered) // (cfg.batch_size * 5)), save_strategy="no",
            report_to="none", seed=cfg.seed, data_seed=cfg.seed, use_cpu=on_cpu,
            max_length=None,  # already filtered above with the same limit: nothing is truncated
            dataloader_num_workers=0, disable_tqdm=False, train_sampling_strategy=cfg.sampling,
            # TRL defaults to bf16 autocast and gradient checkpointing (GPU memory savers). On CPU bf16
            # autocast is slower and makes the trained model's outputs differ from the served fp32 ones;
            # checkpointing recomputes activations a 135M model does not need to drop.
            bf16=pick_dtype(cfg.dtype, device) == torch.bfloat16 or cfg.mixed_precision == "bf16",
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
        train_ds = Dataset.from_list(rendered)
        hf_logging.set_verbosity_error()
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                                peft_config=peft_config)
        t_train = time.monotonic()
        # The trainer prints its log dicts to stdout; the CLI's stdout is the JSON result, so divert them.
        with contextlib.redirect_stdout(sys.stderr):
            train_out = trainer.train()
        train_s = time.monotonic() - t_train
        model = trainer.model
        pad_id = tok.pad_token_id

        metrics = evaluate(model, renderer, eval_rows, pad_id, cfg.eval_batch_size)
        if extra_eval is not None:
            def score_fn(principles, negate, items):
                seqs = [renderer.render_principles(principles, p, r, negated=negate).input_ids for p, r in items]
                return rewards(model, seqs, pad_id, cfg.eval_batch_size)

            metrics.update(extra_eval(score_fn))
        # Reward scale over training inputs: 64 sequences estimate a mean/std well enough, and on CPU
        # every extra forward pass over the whole set costs a third of an epoch.
        sample = rendered[:32]
        vals = rewards(model, [s for r in sample for s in (r["chosen_ids"], r["rejected_ids"])], pad_id,
                       cfg.eval_batch_size)
        reward_mean = float(torch.tensor(vals).mean())
        reward_std = float(torch.tensor(vals).std()) if len(vals) > 1 else 1.0
        train_acc = sum(vals[2 * i] > vals[2 * i + 1] for i in range(len(sample))) / len(sample)
        metrics.update({"train_pairs": len(rendered), "dropped_too_long": too_long,
                        "train_accuracy": train_acc, "train_loss": float(train_out.training_loss),
                        "train_time_s": round(train_s, 1)})

        build = keep_build or work / "build"
        build.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(build / "adapter", safe_serialization=True)
        _sort_target_modules(build / "adapter" / "adapter_config.json")
        manifest = {
            "base_model": cfg.base_model, "adapter": "adapter",
            "reward_mean": reward_mean, "reward_std": reward_std if reward_std > 1e-8 else 1.0,
            "prompt_format_version": PROMPT_FORMAT_VERSION,
            "data_hash": stable_hash([file_sha256(Path(f)) for f in data_files]),
            "parent_version": parent,
            "init_from": cfg.init_from if init is not None else "base",
            "init_version": init[1] if init is not None else None,
            "eval_metrics": metrics,
            "training_data": [str(Path(f).resolve()) for f in data_files],
            "train_config": cfg.model_dump(mode="json"),
            "principle_set": sorted({r.get("principle_set", "") for r in train_rows} - {""}),
            **(extra_manifest or {}),
            "train_fingerprint": fingerprint,
        }
        version = registry.publish(build, manifest) if cfg.publish else None
        metrics["total_time_s"] = round(time.monotonic() - t0, 1)
        return TrainResult(version, manifest, metrics, build if keep_build else None, trainer.train_dataset,
                           model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
