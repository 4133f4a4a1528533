"""SELF-ALIGN's data side (Sun et al., 2023, "Dromedary"): principle-driven answers to self-made prompts.

1. Prompts: topic-guided red-teaming self-instruct (:func:`data_synth.prompts.generate_prompts`), run as a
   resumable stage (:func:`run_prompts`). Held-out prompts are passed in as ``existing``, so TGRT never
   keeps one of them or a near-duplicate: they stay unseen by training.
2. Principle-driven answers (:func:`run_answers`, mode ``rules``): the base model answers each prompt
   with the principle set's rules and a few exemplars in its context. The exemplars (a YAML file the
   user edits, :func:`load_exemplars`) show the assistant naming the rules that apply ("Thoughts:")
   before its answer ("Answer:"), so the model does the same.
3. Post-filters (:func:`filter_answers`, the functions of :mod:`data_synth.answer_filters`): the thoughts
   are stripped, the answer is cut at the next turn marker, repeated sentences and blacklisted answers
   go; every filter is counted. The kept rows are what principle engraving trains on.

Modes of :func:`run_answers`: ``rules`` (the above), ``plain`` (the bare prompt, as the engraved model
is asked and as the evaluation asks every model) and ``verbose`` (a system prompt asking for thorough
answers, for the optional verbose-cloning pass). Each run is a :class:`~data_synth.shards.ShardedStage`:
a rerun after a kill skips finished shards and writes the same bytes, and a rerun with other settings
into the same directory is refused.

The training and the evaluation (policy_trainer's SFT, rm_core's scorer) are put together by
``salmon self-align`` (salmon_cli/self_align.py), because data_synth does not import policy_trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from principles.schema import PrincipleSet
from salmon.atomic import atomic_write_json, atomic_write_jsonl
from salmon.config import format_validation_error, yaml_error_line
from salmon.errors import UserError

from .answer_filters import AnswerFilterConfig, FilterCounts, filter_all
from .config import DType, GeneratePromptsConfig
from .generation import as_messages
from .shards import ShardedStage, counters_total, derive_seed, iter_stage, stable_hash, write_summary

Mode = Literal["rules", "plain", "verbose"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- exemplars ---------------------------------------------------------------------------------------------
class Exemplar(_Strict):
    prompt: str = Field(min_length=1)
    thoughts: str = Field(min_length=1, description="Which rules apply, and why, in a line.")
    answer: str = Field(min_length=1)


class Exemplars(_Strict):
    intro: str = Field(min_length=1, description="What the system turn says before the rules.")
    exemplars: list[Exemplar] = Field(default_factory=list)
    verbose_system: str = Field(min_length=1, description="System prompt of the verbose-cloning pass.")


def shipped_exemplars() -> Path:
    return Path(__file__).resolve().parent / "data" / "self_align_exemplars.yaml"


def load_exemplars(path: str | Path | None = None) -> Exemplars:
    """The exemplar file (default: the shipped one), validated; errors name the file and the field."""
    p = Path(path) if path else shipped_exemplars()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"answers.exemplars: {p}: file not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"answers.exemplars: {p}: {yaml_error_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"answers.exemplars: {p}: expected a mapping with intro, exemplars and verbose_system")
    try:
        return Exemplars.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"answers.exemplars: {p}", Exemplars)) from None


# -- what each mode shows the model ------------------------------------------------------------------------
def rules_text(pset: PrincipleSet) -> str:
    """The set's rules as a numbered list, each by its name (the exemplars' thoughts name them)."""
    return "Rules:\n" + "\n".join(f"{i}. {p.name}: {p.definition}" for i, p in enumerate(pset.principles, 1))


def exemplar_reply(ex: Exemplar) -> str:
    return f"Thoughts: {ex.thoughts.strip()}\nAnswer: {ex.answer.strip()}"


def rules_messages(prompt: Any, pset: PrincipleSet, ex: Exemplars) -> list[dict[str, str]]:
    """The rules and the exemplars in context, then the prompt (SELF-ALIGN's principle-driven answering)."""
    msgs = [{"role": "system", "content": f"{ex.intro.strip()}\n\n{rules_text(pset)}"}]
    for e in ex.exemplars:
        msgs += [{"role": "user", "content": e.prompt.strip()}, {"role": "assistant", "content": exemplar_reply(e)}]
    return msgs + [m for m in as_messages(prompt) if m["role"] != "system"]


def verbose_messages(prompt: Any, ex: Exemplars) -> list[dict[str, str]]:
    return [{"role": "system", "content": ex.verbose_system.strip()},
            *[m for m in as_messages(prompt) if m["role"] != "system"]]


def messages_for(mode: Mode, prompt: Any, pset: PrincipleSet | None, ex: Exemplars | None) -> list[dict[str, str]]:
    if mode == "plain":
        return as_messages(prompt)
    if ex is None or (mode == "rules" and pset is None):
        raise ValueError(f"mode {mode} needs the exemplars (and the principle set for rules)")
    return rules_messages(prompt, pset, ex) if mode == "rules" else verbose_messages(prompt, ex)


# -- configs -----------------------------------------------------------------------------------------------
class PromptsConfig(_Strict):
    """Where the training prompts come from."""

    source: Literal["tgrt", "file"] = Field(default="tgrt", description="tgrt: grow them from seeds with the "
                                            "model (data_synth.prompts); file: read them from 'file'.")
    file: Path | None = Field(default=None, description="JSONL of {id, prompt, type} (source: file).")
    max_prompts: int | None = Field(default=None, ge=1, description="Use at most this many (source: file).")
    tgrt: GeneratePromptsConfig = Field(default_factory=GeneratePromptsConfig, description="TGRT settings "
                                        "(source: tgrt); its 'model' is replaced by the run's model.")


class AnswerConfig(_Strict):
    """How a model answers prompts (principle-driven, plain or verbose)."""

    principle_set: str = Field(default="self_align", description="The rules in context: a shipped set name "
                               "or a YAML path.")
    exemplars: Path | None = Field(default=None, description="Exemplar YAML (default: "
                                   "data_synth/data/self_align_exemplars.yaml).")
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=128, ge=1)
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate() call.")
    shard_size: int = Field(default=8, ge=1, description="Prompts per output shard (the unit of resume).")
    seed: int = 42
    dtype: DType = "auto"
    device: str = "auto"


# -- stages ------------------------------------------------------------------------------------------------
def prompt_texts(rows: Sequence[dict]) -> list[str]:
    return [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows]


def run_prompts(cfg: PromptsConfig, model: str, out_dir: str | Path, heldout: Sequence[dict]) -> list[dict]:
    """The training prompts, none of them (nor a near-duplicate, for TGRT) a held-out one; resumable."""
    from .prompts import generate_prompts, load_prompts, shipped_seeds

    out = Path(out_dir)
    held = prompt_texts(heldout)
    if cfg.source == "file":
        if cfg.file is None:
            raise UserError("prompts.file: source 'file' needs a JSONL of {id, prompt, type}")
        rows = [r for r in load_prompts(cfg.file) if prompt_texts([r])[0] not in set(held)]
        rows = rows[:cfg.max_prompts] if cfg.max_prompts else rows
        atomic_write_jsonl(out / "prompts.jsonl", rows)
        write_summary(out, {"stage": "prompts", "source": "file", "kept": len(rows)})
        return rows
    tgrt = cfg.tgrt.model_copy(update={"model": model})
    stage = ShardedStage(out, "prompts", {"config": tgrt.model_dump(mode="json"), "heldout": stable_hash(held)})

    def shard(_index: int, _units: Sequence[Any]) -> tuple[list[dict], dict[str, int]]:
        seeds = load_prompts(tgrt.seeds or shipped_seeds())
        return generate_prompts(tgrt, seeds, existing=held)

    manifest = stage.run([0], 1, shard, desc="prompts (TGRT)", unit_name="run")
    rows = list(iter_stage(out))
    write_summary(out, {"stage": "prompts", "source": "tgrt", **counters_total(manifest)})
    return rows


def run_answers(model: str | Path, rows: Sequence[dict], out_dir: str | Path, cfg: AnswerConfig, mode: Mode,
                loaded: dict[str, Any] | None = None) -> list[dict]:
    """``model``'s answer to each of ``rows`` (prompt records) under ``mode``: records {id, prompt, type,
    mode, raw} in the rows' order; resumable (finished shards are skipped). ``loaded`` caches models
    across calls: {source: (model, tokenizer)}."""
    from salmon.modeling import ModelOptions, load_causal_lm, load_tokenizer

    from .generation import generate

    ex = load_exemplars(cfg.exemplars) if mode != "plain" else None
    pset = None
    if mode == "rules":
        from principles.schema import load_principle_set

        pset = load_principle_set(cfg.principle_set)
    fingerprint = {"config": cfg.model_dump(mode="json"), "model": str(model), "mode": mode,
                   "prompts": stable_hash(list(rows)),
                   "context": stable_hash([ex.model_dump() if ex else None, pset.ref if pset else None])}
    stage = ShardedStage(out_dir, f"answers-{mode}", fingerprint)
    cache = loaded if loaded is not None else {}

    def shard(index: int, chunk: Sequence[dict]) -> tuple[list[dict], dict[str, int]]:
        key = str(model)
        if key not in cache:  # loaded lazily: a finished stage reruns without loading a model
            cache[key] = (load_causal_lm(model, ModelOptions(dtype=cfg.dtype, device=cfg.device)),
                          load_tokenizer(model))
        lm, tok = cache[key]
        counters: dict[str, int] = {"prompts": len(chunk)}
        records: list[dict] = []
        for b in range(0, len(chunk), cfg.batch_size):
            batch = chunk[b:b + cfg.batch_size]
            outs = generate(lm, tok, [messages_for(mode, r["prompt"], pset, ex) for r in batch], num_samples=1,
                            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=derive_seed(cfg.seed, mode, index, b), stats=counters)
            for r, (text,) in zip(batch, outs, strict=True):
                records.append({"id": r["id"], "prompt": r["prompt"], "type": r.get("type", "general"),
                                "mode": mode, "raw": text})
        return records, counters

    manifest = stage.run(list(rows), cfg.shard_size, shard, desc=f"answers ({mode})", unit_name="prompt")
    write_summary(out_dir, {"stage": f"answers-{mode}", "model": str(model), **counters_total(manifest)})
    return list(iter_stage(out_dir))


def filter_answers(records: Sequence[dict], cfg: AnswerFilterConfig, out_dir: str | Path | None = None
                   ) -> tuple[list[dict], FilterCounts]:
    """(kept rows {id, prompt, type, completion}, counts) of answer ``records``; with ``out_dir``, also
    ``kept.jsonl``, ``dropped.jsonl`` (each with its reason) and ``counts.json`` there. Pure and
    deterministic, so a rerun rewrites the same files."""
    results, counts = filter_all([rec["raw"] for rec in records], cfg)
    kept, dropped = [], []
    for rec, f in zip(records, results, strict=True):
        if f.dropped is None:
            kept.append({"id": rec["id"], "prompt": rec["prompt"], "type": rec.get("type", "general"),
                         "completion": f.text})
        else:
            dropped.append({"id": rec["id"], "raw": rec["raw"], "text": f.text, "reason": f.dropped})
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_jsonl(out / "kept.jsonl", kept)
        atomic_write_jsonl(out / "dropped.jsonl", dropped)
        atomic_write_json(out / "counts.json", counts.as_dict())
    return kept, counts
