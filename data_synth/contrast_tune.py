"""`salmon contrast-tune`: a LoRA adapter that makes the contrastive scorer read principles better.

The contrastive scorer's preference for response A over B under principle P is the contrast margin

    m = [log p(A | x, P) − log p(A | x, ¬P)] − [log p(B | x, P) − log p(B | x, ¬P)]

and it flips correctly on a minimal pair exactly when m > 0 for the response that follows P. This
job trains a LoRA adapter on the causal LM to lower ``softplus(−m)`` on the written minimal pairs of
``principles/pretrain/`` (whole axes held out). Anything that does not depend on the principle text
(a taste for one response, its length, its fluency) appears in both brackets and cancels, so the
only way down the loss is to make the response's likelihood follow what the principle says. That is
the inductive bias a scalar head on a one-pass model lacks (docs/principle_following.md).

Each written pair is trained in one of three forms, the three ways the scorer is asked (and the three
columns of ``salmon check``):

- ``single``: the principle against its negation (the margin above);
- ``set``: the principle inside a set of 5 with 4 distractors of other families. The scorer sums one
  contrast term per principle, so besides the target's term being right, a distractor's term must not
  separate two responses that do not differ along its axis: that term's squared A−B difference is
  penalised (``distractor_weight``). Half the sets hold the target negated;
- ``plain``: the plain instruction and its opposite instruction, each contrasted with a generic
  instruction in its place (``rm_core.render.REFERENCE_INSTRUCTIONS``), as the scorer reads a
  principle that has no negation.

The adapter is scored by the same renderer and the same summed log-probabilities the service uses;
``load_zero_shot(..., adapter=DIR)`` merges it after ``rm_core.registry.verified_contrast_adapter``
has checked the files against the manifest.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from principles.axes import DEFAULT_HELD_OUT, Axis, heldout_flip_pairs, load_axes
from principles.schema import Principle
from rm_core.registry import CONTRAST_ADAPTER_DIR, CONTRAST_ADAPTER_KIND, MANIFEST
from rm_core.render import PROMPT_FORMAT_VERSION
from salmon.atomic import atomic_write_json, file_sha256
from salmon.errors import UserError

from .config import DType
from .shards import stable_hash

FORMS = ("single", "set", "plain")


class ContrastTuneConfig(BaseModel):
    """What `salmon contrast-tune` trains; the defaults run on a 2-core CPU in under two hours."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = "embedded"
    axes_files: list[str] | None = Field(default=None, description="axis YAML files (default: principles/pretrain)")
    held_out_axes: list[str] = Field(default_factory=lambda: list(DEFAULT_HELD_OUT))
    forms: list[str] = Field(default_factory=lambda: list(FORMS),
                             description="how a written pair is trained: single, set, plain (one form per pair "
                                         "per epoch, in turn)")
    distractors: int = Field(default=4, ge=1, description="distractor principles in the 'set' form (a set of 5)")
    distractor_weight: float = Field(default=0.25, ge=0,
                                     description="weight of a distractor term's squared A-B difference in 'set'")
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_layers: int | None = Field(default=15, ge=1, description="LoRA on the top N layers only (None: all)")
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = Field(default=2e-4, gt=0)
    epochs: int = Field(default=1, ge=1)
    pairs_per_step: int = Field(default=2, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_train_pairs: int | None = Field(default=None, ge=1, description="first N shuffled pairs (smoke runs)")
    eval_pairs_per_axis: int = Field(default=3, ge=1, description="held-out pairs per held-out axis in the "
                                     "manifest's flip tables (single / set / plain, the served scorer)")
    ship_min_flip: float = Field(default=0.5, ge=0, le=1, description="--ship refuses an adapter whose held-out "
                                 "single flip rate is lower, or not above the zero-shot scorer's")
    seed: int = 0
    dtype: DType = Field(default="auto", description="auto: fp32 on CPU, bf16 on CUDA")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")

    @field_validator("forms")
    @classmethod
    def _known_forms(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in FORMS]
        if unknown or not v:
            raise ValueError(f"forms must be a non-empty list of {list(FORMS)}; unknown: {unknown}")
        return v


Quad = tuple[str, Principle, str, str]  # prompt, principle, follows, violates


@dataclass(frozen=True)
class Example:
    """One written pair in one form: the principle blocks it is scored under and what they should say.

    ``margins``: (block i, reference block j, sign) — sign·([a|i − a|j] − [b|i − b|j]) should be > 0,
    where a is the response that follows the axis and x|i is its summed log-probability under block i.
    ``ties``: (block i, reference block j) — that contrast should not separate a from b.
    """

    form: str
    axis: str
    prompt: str
    follows: str
    violates: str
    blocks: tuple[str, ...]
    margins: tuple[tuple[int, int, int], ...]
    ties: tuple[tuple[int, int], ...] = ()


def _toggled(negated: frozenset[str], name: str) -> frozenset[str]:
    return negated - {name} if name in negated else negated | {name}


def single_example(ax: Axis, prompt: str, follows: str, violates: str) -> Example:
    from rm_core.render import principle_block

    p = ax.principle
    return Example("single", ax.name, prompt, follows, violates,
                   (principle_block([p]), principle_block([p], [p.name])), ((0, 1, 1),))


def plain_example(ax: Axis, prompt: str, follows: str, violates: str, reference: str) -> Example:
    from rm_core.render import principle_block

    def block(text: str) -> str:
        return principle_block([Principle(name="p1", definition=text)])

    return Example("plain", ax.name, prompt, follows, violates,
                   (block(ax.plain), block(ax.opposite), block(reference)), ((0, 2, 1), (1, 2, -1)))


def set_example(ax: Axis, prompt: str, follows: str, violates: str, distractors: Sequence[Axis],
                rng: random.Random) -> Example:
    from rm_core.render import principle_block

    members = [ax.principle, *(d.principle for d in distractors)]
    rng.shuffle(members)
    negated = frozenset(d.name for d in distractors if rng.random() < 0.25)
    if rng.random() < 0.5:  # half the sets hold the target negated: then the violating response should win
        negated |= {ax.name}
    sign = -1 if ax.name in negated else 1
    d = rng.choice(list(distractors)).name
    blocks = (principle_block(members, negated), principle_block(members, _toggled(negated, ax.name)),
              principle_block(members, _toggled(negated, d)))
    return Example("set", ax.name, prompt, follows, violates, blocks, ((0, 1, sign),), ((0, 2),))


def build_examples(axes: Sequence[Axis], pool: Sequence[Axis], forms: Sequence[str], epoch: int, seed: int,
                   distractors: int = 4) -> list[Example]:
    """Every written pair of ``axes`` once, in one of ``forms`` (taken in turn, shifted each epoch so that
    a pair meets every form over the epochs); deterministic under (seed, epoch), shuffled."""
    from rm_core.render import REFERENCE_INSTRUCTIONS

    rng = random.Random(f"{seed}:{epoch}")
    out, k = [], 0
    for ax in axes:
        others = [o for o in pool if o.family != ax.family and o.name != ax.name]
        for pair in ax.pairs:
            form = forms[(k + epoch) % len(forms)]
            k += 1
            if form == "set" and len(others) < distractors:
                form = "single"
            args = (ax, pair.prompt, pair.follows, pair.violates)
            if form == "single":
                out.append(single_example(*args))
            elif form == "plain":
                out.append(plain_example(*args, rng.choice(REFERENCE_INSTRUCTIONS)))
            else:
                out.append(set_example(*args, rng.sample(others, distractors), rng))
    rng.shuffle(out)
    return out


def training_steps(examples: Sequence[Example], step: int, seed: int | str) -> list[list[Example]]:
    """``examples`` in batches of up to ``step``, each batch of one form, the batches shuffled: a step's
    rows are then of similar length (a set's block is several times one principle's), so little of the
    batch is padding."""
    batches = [c[i:i + step] for f in FORMS for c in [[e for e in examples if e.form == f]]
               for i in range(0, len(c), step)]
    random.Random(seed).shuffle(batches)
    return batches


def split_axes(axes: Sequence[Axis], held_out: Sequence[str]) -> tuple[list[Axis], list[Axis]]:
    """(training, held-out) axes; a held-out name that is no axis is an error."""
    names = {a.name for a in axes}
    unknown = sorted(set(held_out) - names)
    if unknown:
        raise UserError(f"held_out_axes names axes that do not exist: {', '.join(unknown)}")
    train = [a for a in axes if a.name not in held_out]
    if not train:
        raise UserError("every axis is held out: nothing left to train on")
    return train, [a for a in axes if a.name in held_out]


def split_pairs(axes: Sequence[Axis], held_out: Sequence[str]) -> tuple[list[Quad], list[Quad]]:
    """(training, held-out) minimal pairs as single-principle quads."""
    train, held = split_axes(axes, held_out)
    return ([(p.prompt, a.principle, p.follows, p.violates) for a in train for p in a.pairs],
            [(p.prompt, a.principle, p.follows, p.violates) for a in held for p in a.pairs])


class ContrastObjective:
    """Contrast margins of minimal pairs under a causal LM, rendered as the service renders them.

    Both responses of a pair share their block's prefix (principles + prompt), so each block is one
    packed row: the prefix, then response a, then response b, with b attending to the prefix and to
    itself only and positioned as if it followed the prefix directly. Its log-probabilities equal those
    of the two rows scored apart (tests/data_synth/test_contrast_tune.py) at about half the tokens.
    """

    def __init__(self, model, tokenizer):
        from rm_core.render import Renderer

        self.model, self.tokenizer = model, tokenizer
        self.renderer = Renderer(tokenizer)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder, self.lm_head = base.get_decoder(), base.get_output_embeddings()

    def packed_rows(self, example: Example) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(prefix, response a, response b) token ids for each block of ``example``."""
        rows = []
        for block in example.blocks:
            a = self.renderer.render(block, example.prompt, example.follows)
            b = self.renderer.render(block, example.prompt, example.violates)
            if a.prefix_ids != b.prefix_ids:  # the renderer tokenizes its segments apart: cannot happen
                raise AssertionError("two renders of one prefix differ")
            rows.append((a.prefix_ids, a.response_ids, b.response_ids))
        return rows

    def logprob_sums(self, rows):
        """[len(rows), 2] summed log-probabilities of responses a and b of each packed row."""
        import torch

        device = next(self.model.parameters()).device
        width = max(len(p) + len(a) + len(b) for p, a, b in rows)
        n = len(rows)
        ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        seg = torch.full((n, width), -1, dtype=torch.long)  # 0 prefix, 1 a, 2 b, -1 padding
        for j, (p, a, b) in enumerate(rows):
            P, A, B = len(p), len(a), len(b)
            ids[j, :P + A + B] = torch.tensor(p + a + b)
            pos[j, :P + A + B] = torch.cat([torch.arange(P + A), torch.arange(P, P + B)])
            seg[j, :P] = 0
            seg[j, P:P + A] = 1
            seg[j, P + A:P + A + B] = 2
        idx = torch.arange(width)
        causal = idx[None, :, None] >= idx[None, None, :]
        sq, sk = seg[:, :, None], seg[:, None, :]
        mask = causal & (sk >= 0) & ((sk == 0) | (sk == sq))
        mask |= torch.eye(width, dtype=torch.bool)[None]  # a padding row attends to itself (no empty row)
        hidden = self.decoder(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                              position_ids=pos.to(device)).last_hidden_state
        sums = []
        for j, (p, a, b) in enumerate(rows):
            P, A, B = len(p), len(a), len(b)
            at_a = list(range(P - 1, P + A - 1))
            at_b = [P - 1, *range(P + A, P + A + B - 1)]
            # the responses' tokens only: a full-vocabulary softmax at every position is most of the memory
            logp = torch.log_softmax(self.lm_head(hidden[j, at_a + at_b]).float(), -1)
            tok = ids[j, list(range(P, P + A)) + list(range(P + A, P + A + B))].to(device)
            lp = logp.gather(1, tok[:, None])[:, 0]
            sums.append(torch.stack([lp[:A].sum(), lp[A:].sum()]))
        return torch.stack(sums)

    def terms(self, examples: Sequence[Example]):
        """(margins, ties): 1-d tensors over all examples' margin and tie terms (differentiable)."""
        import torch

        rows, starts = [], []
        for e in examples:
            starts.append(len(rows))
            rows += self.packed_rows(e)
        v = self.logprob_sums(rows)
        margins, ties = [], []
        for e, s in zip(examples, starts, strict=True):
            def contrast(i: int, j: int, s: int = s):
                return (v[s + i, 0] - v[s + j, 0]) - (v[s + i, 1] - v[s + j, 1])
            margins += [sign * contrast(i, j) for i, j, sign in e.margins]
            ties += [contrast(i, j) for i, j in e.ties]
        zero = v.new_zeros(0)
        return (torch.stack(margins) if margins else zero), (torch.stack(ties) if ties else zero)

    def loss(self, examples: Sequence[Example], distractor_weight: float):
        import torch

        margins, ties = self.terms(examples)
        loss = torch.nn.functional.softplus(-margins).sum()
        if len(ties):
            loss = loss + distractor_weight * ties.pow(2).sum()
        return loss / len(examples)

    def margins(self, quads: Sequence[Quad]):
        """The single-principle margin m of each (prompt, principle, follows, violates) quad."""
        from rm_core.render import principle_block

        examples = [Example("single", pr.name, x, a, b, (principle_block([pr]), principle_block([pr], [pr.name])),
                            ((0, 1, 1),)) for x, pr, a, b in quads]
        return self.terms(examples)[0]

    def accuracy(self, quads: Sequence[Quad], batch: int = 8) -> float:
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


def training_plan(cfg: ContrastTuneConfig) -> tuple[list[Axis], list[Axis], list[list[list[Example]]]]:
    """(training axes, held-out axes, each epoch's training steps) of ``cfg``: what `tune` trains on,
    deterministic under its seed, so that a shipped adapter's data can be checked without training."""
    train_axes, held_axes = split_axes(load_axes(cfg.axes_files), cfg.held_out_axes)
    epochs = []
    for epoch in range(cfg.epochs):
        ex = build_examples(train_axes, train_axes, cfg.forms, epoch, cfg.seed, cfg.distractors)
        epochs.append(training_steps(ex[:cfg.max_train_pairs] if cfg.max_train_pairs else ex, cfg.pairs_per_step,
                                     f"{cfg.seed}:{epoch}:steps"))
    return train_axes, held_axes, epochs


def trained_pairs(epochs: list[list[list[Example]]]) -> list[tuple[str, str, str, str]]:
    return sorted({(e.axis, e.prompt, e.follows, e.violates) for batches in epochs for b in batches for e in b})


def data_hash(epochs: list[list[list[Example]]]) -> str:
    """The manifest's ``data_sha256``: the written pairs trained on, whatever their forms."""
    return stable_hash([list(t) for t in trained_pairs(epochs)], n=64)


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

    train_axes, held_axes, epochs = training_plan(cfg)
    held = [(p.prompt, a.principle, p.follows, p.violates) for a in held_axes for p in a.pairs]
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.base_model)
    base = load_causal_lm(cfg.base_model, ModelOptions(dtype=cfg.dtype, device=cfg.device))
    n_layers = base.config.num_hidden_layers
    layers = list(range(max(0, n_layers - cfg.lora_layers), n_layers)) if cfg.lora_layers else None
    model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=cfg.target_modules, layers_to_transform=layers))
    objective = ContrastObjective(model, tok)
    check = _check_quads() if evaluate_check else []
    t0 = time.monotonic()
    before = {"held_out_axes": objective.accuracy(held), "check_set": objective.accuracy(check) if check else None}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=0.0)
    steps = sum(len(batches) for batches in epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    losses: list[float] = []
    epoch_loss: list[float] = []
    bar = tqdm(total=steps, desc="contrast-tune", unit="step", disable=not progress, file=sys.stderr)
    for batches in epochs:
        first = len(losses)
        for batch in batches:
            loss = objective.loss(batch, cfg.distractor_weight)
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
    train_s = time.monotonic() - t0
    after = {"held_out_axes": objective.accuracy(held), "check_set": objective.accuracy(check) if check else None}
    out.mkdir(parents=True, exist_ok=True)
    # The base as the user named it, not the cache path it resolved to on this machine.
    model.peft_config["default"].base_model_name_or_path = cfg.base_model
    model.save_pretrained(out / CONTRAST_ADAPTER_DIR, safe_serialization=True)
    files = sorted(p for p in (out / CONTRAST_ADAPTER_DIR).rglob("*") if p.is_file())
    tables = flip_tables(model.merge_and_unload().eval(), tok, cfg.base_model, held_axes, cfg.eval_pairs_per_axis,
                         cfg.seed, check=evaluate_check, progress=progress)
    manifest = {
        "kind": CONTRAST_ADAPTER_KIND, "base_model": cfg.base_model, "command": command,
        "config": cfg.model_dump(), "data_sha256": data_hash(epochs),
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "train_axes": [a.name for a in train_axes], "held_out_axes": [a.name for a in held_axes],
        "train_pairs": len(trained_pairs(epochs)), "train_examples": sum(len(b) for batches in epochs for b in batches),
        "held_out_pairs": len(held), "steps": steps,
        "files": {str(p.relative_to(out)): file_sha256(p) for p in files},
        "metrics": {"single_flip_before": before, "single_flip_after": after, **tables,
                    "loss_by_epoch": epoch_loss, "train_seconds": round(train_s, 1)},
        "seconds": round(time.monotonic() - t0, 1),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def flip_tables(model, tokenizer, base_model: str, held_axes: Sequence[Axis], per_axis: int, seed: int, *,
                check: bool = True, progress: bool = True) -> dict[str, Any]:
    """The flip table (single / set / plain) of the contrastive scorer over ``model`` — the served
    scorer's own path — on the held-out axes' written pairs and, with ``check``, on the check set."""
    from rm_core.checkset import DEFAULT_CHECK_SET, check_pairs, flip_table, scorer_score_fn
    from rm_core.scorers import ContrastiveScorer

    scorer = ContrastiveScorer(model, tokenizer, version="contrast-tune", base_model=base_model)
    score_fn = scorer_score_fn(scorer)
    held = heldout_flip_pairs(held_axes, per_axis)
    out = {"held_out_axes": flip_table(score_fn, held, seed=seed, desc="held-out axes") if held else {}}
    if check:
        out["check_set"] = flip_table(score_fn, check_pairs(DEFAULT_CHECK_SET), seed=seed, desc="check set")
    return out


def ship_refusal(manifest: dict[str, Any], min_flip: float) -> str | None:
    """Why a `salmon contrast-tune` result must not ship, or None: shipping replaces what every `scorer:
    auto` service serves, so the adapter must read held-out axes at least ``min_flip`` of the time and
    better than the zero-shot scorer on the same pairs."""
    m = manifest.get("metrics", {})
    before = m.get("single_flip_before", {}).get("held_out_axes")
    after = m.get("single_flip_after", {}).get("held_out_axes")
    if after is None or before is None:
        return "the manifest has no held-out flip rates before and after training"
    if after < min_flip or after <= before:
        return (f"held-out single-principle flip rate {after} (zero-shot {before}) is under {min_flip} "
                "or no better than zero-shot")
    return None


def ship_adapter(out: Path, target: Path | None = None) -> Path:
    """Make the `salmon contrast-tune` output ``out`` the RM shipped with the package (rm_core/shipped):
    its manifest's ``kind`` makes `scorer: auto` serve the contrastive scorer with this adapter merged.
    The files are verified against ``out``'s manifest first, and again where they land."""
    import json
    import shutil
    import tempfile

    from rm_core.registry import ship, verified_contrast_adapter

    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    verified_contrast_adapter(out, manifest.get("base_model", ""))
    build = Path(tempfile.mkdtemp(prefix="salmon-ship-"))
    try:
        shutil.copytree(out / CONTRAST_ADAPTER_DIR, build / CONTRAST_ADAPTER_DIR)
        return ship(build, {**manifest, "adapter": CONTRAST_ADAPTER_DIR, "eval_metrics": manifest.get("metrics", {})},
                    target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
