"""`salmon contrast-tune`: a LoRA adapter that makes the contrastive scorer read principles better.

The contrastive scorer's preference for response A over B under principle P is the contrast margin

    m = [log p(A | x, P) − log p(A | x, ¬P)] − [log p(B | x, P) − log p(B | x, ¬P)]

and it flips correctly on a minimal pair exactly when m > 0 for the response that follows P. This
job trains a LoRA adapter on the causal LM to raise ``softplus(−m)`` on the written minimal pairs of
``principles/pretrain/`` (whole axes held out). Anything that does not depend on the principle text
(a taste for one response, its length, its fluency) appears in both brackets and cancels, so the
only way down the loss is to make the response's likelihood follow what the principle says. That is
the inductive bias a scalar head on a one-pass model lacks (docs/principle_following.md).

The adapter is scored by the same renderer and the same summed log-probabilities the service uses;
``load_zero_shot(..., adapter=DIR)`` merges it after ``rm_core.registry.verified_contrast_adapter``
has checked the files against the manifest.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from principles.schema import Principle
from rm_core.registry import CONTRAST_ADAPTER_DIR, CONTRAST_ADAPTER_KIND, MANIFEST
from salmon.atomic import atomic_write_json, file_sha256
from salmon.errors import UserError

from .config import DType
from .pretrain import DEFAULT_HELD_OUT, Axis, load_axes
from .shards import stable_hash


class ContrastTuneConfig(BaseModel):
    """What `salmon contrast-tune` trains; the defaults run on a 2-core CPU in under an hour."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = "embedded"
    axes_files: list[str] | None = Field(default=None, description="axis YAML files (default: principles/pretrain)")
    held_out_axes: list[str] = Field(default_factory=lambda: list(DEFAULT_HELD_OUT))
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = Field(default=2e-4, gt=0)
    epochs: int = Field(default=2, ge=1)
    pairs_per_step: int = Field(default=2, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_train_pairs: int | None = Field(default=None, ge=1, description="first N shuffled pairs (smoke runs)")
    seed: int = 0
    dtype: DType = Field(default="auto", description="auto: fp32 on CPU, bf16 on CUDA")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")


Quad = tuple[str, Principle, str, str]  # prompt, principle, follows, violates


def split_pairs(axes: Sequence[Axis], held_out: Sequence[str]) -> tuple[list[Quad], list[Quad]]:
    """(training, held-out) minimal pairs; a held-out name that is no axis is an error."""
    names = {a.name for a in axes}
    unknown = sorted(set(held_out) - names)
    if unknown:
        raise UserError(f"held_out_axes names axes that do not exist: {', '.join(unknown)}")
    train = [(p.prompt, a.principle, p.follows, p.violates) for a in axes if a.name not in held_out for p in a.pairs]
    held = [(p.prompt, a.principle, p.follows, p.violates) for a in axes if a.name in held_out for p in a.pairs]
    if not train:
        raise UserError("every axis is held out: nothing left to train on")
    return train, held


class ContrastObjective:
    """Contrast margins of minimal pairs under a causal LM, rendered as the service renders them."""

    def __init__(self, model, tokenizer):
        from rm_core.render import Renderer

        self.model, self.tokenizer = model, tokenizer
        self.renderer = Renderer(tokenizer)

    def sequences(self, quad: Quad):
        from rm_core.render import principle_block

        x, pr, a, b = quad
        blocks = (principle_block([pr]), principle_block([pr], [pr.name]))
        return [self.renderer.render(s, x, y) for s in blocks for y in (a, b)]  # P·a, P·b, ¬P·a, ¬P·b

    def margins(self, quads: Sequence[Quad]):
        """m per pair (a tensor, differentiable): > 0 when the pair flips the right way."""
        import torch

        from rm_core.batching import right_pad

        seqs = [s for q in quads for s in self.sequences(q)]
        device = next(self.model.parameters()).device
        ids, mask = right_pad([s.input_ids for s in seqs], self.tokenizer.pad_token_id, device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        sums = []
        for j, s in enumerate(seqs):
            start, end = len(s.prefix_ids), len(s)
            # the response's tokens only: the full-vocabulary softmax of every position is most of the memory
            logps = torch.log_softmax(logits[j, start - 1:end - 1].float(), -1)
            sums.append(logps.gather(1, ids[j, start:end, None]).sum())
        v = torch.stack(sums)
        return (v[0::4] - v[2::4]) - (v[1::4] - v[3::4])

    def accuracy(self, quads: Sequence[Quad], batch: int = 4) -> float:
        """Share of pairs with m > 0 (the single-principle flip rate: for one principle the
        contrast under ¬P is minus the contrast under P, so flip and accuracy coincide)."""
        import torch

        if not quads:
            return float("nan")
        was_training = self.model.training
        self.model.eval()
        hits = 0
        with torch.no_grad():
            for i in range(0, len(quads), batch):
                hits += int((self.margins(quads[i:i + batch]) > 0).sum())
        self.model.train(was_training)
        return round(hits / len(quads), 4)


def _check_quads() -> list[Quad]:
    from rm_core.checkset import DEFAULT_CHECK_SET, flip_pair_principle, load_pairs

    return [(p["prompt"], flip_pair_principle(p), p["response_a"], p["response_b"])
            for p in load_pairs(DEFAULT_CHECK_SET)]


def tune(cfg: ContrastTuneConfig, out: Path, *, command: str = "", evaluate_check: bool = True,
         progress: bool = True) -> dict[str, Any]:
    """Train the adapter into ``out/adapter`` and write ``out/manifest.json``; returns the manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from salmon.modeling import ModelOptions, load_causal_lm, load_tokenizer

    axes = load_axes(cfg.axes_files)
    train, held = split_pairs(axes, cfg.held_out_axes)
    rng = random.Random(cfg.seed)
    rng.shuffle(train)
    if cfg.max_train_pairs:
        train = train[:cfg.max_train_pairs]
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.base_model)
    base = load_causal_lm(cfg.base_model, ModelOptions(dtype=cfg.dtype, device=cfg.device))
    model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=cfg.target_modules))
    objective = ContrastObjective(model, tok)
    check = _check_quads() if evaluate_check else []
    t0 = time.monotonic()
    before = {"held_out_axes": objective.accuracy(held), "check_set": objective.accuracy(check) if check else None}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=0.0)
    steps = cfg.epochs * -(-len(train) // cfg.pairs_per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    losses: list[float] = []
    epoch_loss: list[float] = []
    bar = tqdm(total=steps, desc="contrast-tune", unit="step", disable=not progress, file=sys.stderr)
    for epoch in range(cfg.epochs):
        order, first = list(train), len(losses)
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        for i in range(0, len(order), cfg.pairs_per_step):
            loss = torch.nn.functional.softplus(-objective.margins(order[i:i + cfg.pairs_per_step])).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        epoch_loss.append(round(sum(losses[first:]) / (len(losses) - first), 4))
    bar.close()
    after = {"held_out_axes": objective.accuracy(held), "check_set": objective.accuracy(check) if check else None}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / CONTRAST_ADAPTER_DIR, safe_serialization=True)
    files = sorted(p for p in (out / CONTRAST_ADAPTER_DIR).rglob("*") if p.is_file())
    manifest = {
        "kind": CONTRAST_ADAPTER_KIND, "base_model": cfg.base_model, "command": command,
        "config": cfg.model_dump(), "data_sha256": stable_hash([[x, pr.definition, pr.negative_definition, a, b] for x, pr, a, b in train], n=64),
        "train_pairs": len(train), "held_out_pairs": len(held), "steps": steps,
        "files": {str(p.relative_to(out)): file_sha256(p) for p in files},
        "metrics": {"single_flip_before": before, "single_flip_after": after,
                    "loss_by_epoch": epoch_loss},
        "seconds": round(time.monotonic() - t0, 1),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
