"""Supervised fine-tuning (``algorithm: sft``) on TRL's SFTTrainer with a PEFT LoRA adapter.

The rows are {prompt, completion}. Each is rendered with the policy's own chat template as a user
turn (or the prompt's messages) and an assistant turn, with no system prompt of ours: the model learns
to answer the bare prompt as it will be asked at inference (a template that adds its own default
system line, as SmolLM2's does, adds it in both places). The loss is on the completion's tokens only
(TRL's prompt-completion format).

Two ways in:

- ``salmon train --config x.yaml`` with ``algorithm: sft`` and ``sft.data`` (the runner: resume from
  the newest checkpoint, report);
- :func:`train_sft` for orchestrators (SELF-ALIGN's principle engraving, I-SHEEP's rounds): rows in,
  a merged model directory out, through the same runner and the same trainer.

After training the adapter is merged into the base and saved to ``output_dir/merged`` (``sft.merge``),
a plain Hugging Face directory that salmon.modeling loads like any local model. ``trained_on.jsonl``
beside it holds what the loss saw of each row (the completion tokens, decoded), so a caller can check
that exactly its rows were trained on.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from policy_trainer.config import LoraSettings
from policy_trainer.section import Section
from salmon.atomic import JsonlError, atomic_write_jsonl, read_jsonl
from salmon.errors import UserError

if TYPE_CHECKING:
    from policy_trainer.config import RunConfig

MERGED = "merged"
DATA_FILE = "sft_data.jsonl"
TRAINED_ON = "trained_on.jsonl"


# -- rows --------------------------------------------------------------------------------------------------
def sft_example(rec: Any, where: str) -> dict[str, list[dict[str, str]]]:
    """One {prompt, completion} record as TRL's conversational prompt-completion example."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object with 'prompt' and 'completion'")
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                       and isinstance(m.get("content"), str) for m in prompt)
          and prompt[-1]["role"] == "user"):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise UserError(f"{where}: field 'prompt' must be non-empty text or {{role, content}} messages ending "
                        "with a user message")
    if not isinstance(completion, str) or not completion.strip():
        raise UserError(f"{where}: field 'completion' must be non-empty text (the answer to learn)")
    return {"prompt": messages, "completion": [{"role": "assistant", "content": completion}]}


def load_sft_rows(path: str | Path) -> list[dict[str, Any]]:
    """The {prompt, completion} records of a JSONL file, validated (errors name the file and line)."""
    try:
        records = read_jsonl(Path(path))
    except JsonlError as e:
        raise UserError(f"sft.data: {e}") from None
    for n, rec in enumerate(records, 1):
        sft_example(rec, f"{path}:{n}")
    if not records:
        raise UserError(f"sft.data: {path} has no rows; give at least one {{prompt, completion}}")
    return records


# -- the trainer -------------------------------------------------------------------------------------------
def save_merged(model: Any, tokenizer: Any, target: Path) -> Path:
    """``model`` (a PEFT model: merged first) and ``tokenizer`` saved whole to ``target``: written beside
    it and renamed, so a reader never sees half a model."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def completion_texts(dataset: Any, tokenizer: Any) -> list[str]:
    """What the loss sees of each tokenized row: its tokens with a label (not -100), decoded (special tokens
    dropped)."""
    out = []
    for ex in dataset:
        ids = [t for t in ex["labels"] if t != -100]
        out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def build_sft_trainer(cfg: RunConfig, model_dir: Path, callbacks: list[Any] | None = None) -> Any:
    """TRL's SFTTrainer for ``cfg`` (``sft.data`` rows, LoRA of ``policy.lora``); its ``train`` also merges."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from policy_trainer.methods.trl_args import common_args, peft_config
    from salmon.modeling import load_tokenizer

    if not cfg.sft.data:
        raise UserError("sft.data: algorithm sft needs a JSONL of {prompt, completion}; set sft.data")
    records = load_sft_rows(cfg.sft.data)
    rows = [sft_example(r, f"{cfg.sft.data}:{n}") for n, r in enumerate(records, 1)]
    out = Path(cfg.output.output_dir)
    tokenizer = load_tokenizer(model_dir)
    args = SFTConfig(**{**common_args(cfg), "disable_tqdm": False}, max_length=cfg.sft.max_length,
                     completion_only_loss=True, packing=False, dataset_num_proc=None)
    merge = cfg.sft.merge

    class MergingSFTTrainer(SFTTrainer):
        """SFTTrainer whose ``train`` ends by saving the merged policy (and what each row trained on)."""

        def train(self, *a: Any, **kw: Any) -> Any:
            result = super().train(*a, **kw)
            if self.accelerator.is_main_process:
                atomic_write_jsonl(out / TRAINED_ON, [{"completion": c}
                                                      for c in completion_texts(self.train_dataset, tokenizer)])
                if merge:
                    save_merged(self.model, tokenizer, out / MERGED)
            return result

    return MergingSFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config(cfg), callbacks=callbacks)


# -- for orchestrators -------------------------------------------------------------------------------------
class SFTTrainSettings(Section):
    """What :func:`train_sft` takes (a config section of SELF-ALIGN and I-SHEEP)."""

    epochs: float = Field(default=2.0, gt=0, description="Passes over the rows (sets the step count).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; None: from epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="LoRA takes a larger rate than full tuning.")
    per_device_train_batch_size: int = Field(default=4, ge=2, description="Rows per micro-step (at least 2: "
                                             "the run config's group check).")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    max_length: int = Field(default=512, ge=8, description="Tokens per rendered row; longer ones are cut.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dtype: str = Field(default="auto", description="auto | float32 | bfloat16 | float16.")
    precision: str = Field(default="auto", description="auto | fp32 | bf16 | fp16 (mixed precision).")
    use_cpu: bool | None = Field(default=None, description="Force CPU; None: CPU when no CUDA device is visible.")
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (None: torch's default).")
    save_steps: int = Field(default=10, ge=1, description="Checkpoint every N steps (the unit of resume).")
    seed: int = 42

    @model_validator(mode="after")
    def _dtypes(self) -> SFTTrainSettings:
        if self.dtype not in {"auto", "float32", "bfloat16", "float16"}:
            raise ValueError(f"dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.precision not in {"auto", "fp32", "bf16", "fp16"}:
            raise ValueError(f"precision {self.precision!r}: use auto, fp32, bf16 or fp16")
        return self

    def steps_for(self, n_rows: int) -> int:
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        return self.max_steps or max(1, math.ceil(n_rows * self.epochs / per_step))


def sft_run_config(base_model: str | Path, data: Path, out_dir: Path, settings: SFTTrainSettings,
                   n_rows: int) -> RunConfig:
    """The run config :func:`train_sft` runs: the same runner and trainer as ``salmon train``."""
    from policy_trainer.config import RunConfig

    s = settings
    per_step = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return RunConfig.model_validate({
        "algorithm": "sft",
        "policy": {"model": str(base_model), "dtype": s.dtype, "lora": s.lora.model_dump()},
        "training": {"max_steps": s.steps_for(n_rows), "learning_rate": s.learning_rate,
                     "per_device_train_batch_size": s.per_device_train_batch_size,
                     "gradient_accumulation_steps": s.gradient_accumulation_steps, "num_generations": per_step,
                     "warmup_steps": s.warmup_steps, "seed": s.seed, "precision": s.precision},
        "output": {"output_dir": str(out_dir), "rollouts_dir": None, "tensorboard": False,
                   "save_steps": s.save_steps, "save_total_limit": 2},
        "distributed": {"use_cpu": s.use_cpu, "num_threads": s.num_threads},
        "sft": {"data": str(data), "max_length": s.max_length, "merge": True},
    })


def train_sft(base_model: str | Path, rows: Sequence[dict[str, Any]], out_dir: str | Path,
              settings: SFTTrainSettings | None = None) -> Path:
    """Fine-tune ``base_model`` on ``rows`` ({prompt, completion}) with LoRA; returns ``out_dir/merged``,
    a model directory salmon.modeling loads.

    Resumable: the rows are kept in ``out_dir/sft_data.jsonl``; a rerun with the same rows resumes from
    the newest checkpoint (or returns at once when the merged model is there), and a rerun with other
    rows into the same ``out_dir`` is refused.
    """
    from policy_trainer.train import run_training

    settings = settings or SFTTrainSettings()
    out = Path(out_dir)
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} if isinstance(r, dict) else r for r in rows]
    for n, r in enumerate(rows, 1):
        sft_example(r, f"row {n}")
    if not rows:
        raise UserError("train_sft: no rows to train on (every answer was filtered out?)")
    data = out / DATA_FILE
    merged = out / MERGED
    if data.is_file():
        if read_jsonl(data) != json.loads(json.dumps(rows)):
            raise UserError(f"{out} holds SFT of other rows; use another output directory or remove it")
        if (merged / "config.json").is_file():
            return merged
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_jsonl(data, rows)
    run_training(sft_run_config(base_model, data, out, settings, len(rows)))
    return merged
