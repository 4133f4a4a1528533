"""Prompts for RL: JSONL ``{"id", "prompt", "type"}`` -> rows TRL takes (conversational prompts).

Prompts become chat messages so TRL applies the policy's own chat template; ``prompt_id`` and
``prompt_type`` ride along as dataset columns, which TRL hands to the reward functions (principle
selection and the length-bonus multiplier depend on the type; rollouts carry the id).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from policy_trainer.config import DataConfig
from salmon.atomic import JsonlError, read_jsonl
from salmon.errors import UserError

PROMPT_TYPES = ("general", "reasoning", "redteam")


def default_prompts_path() -> Path:
    """data_synth's shipped prompts (package data of the same distribution as this package).

    Looked up beside this package first: both are installed side by side (site-packages or a
    checkout), and that cannot be shadowed by another ``data_synth`` earlier on sys.path (a test
    package of that name, for instance). importlib.resources is the fallback for other layouts.
    """
    sibling = Path(__file__).resolve().parent.parent / "data_synth" / "data" / "prompts.jsonl"
    if sibling.is_file():
        return sibling
    try:
        return Path(str(resources.files("data_synth") / "data" / "prompts.jsonl"))
    except ModuleNotFoundError:
        raise UserError("data.prompts is not set and data_synth's shipped prompts are not installed; "
                       "give data.prompts: a JSONL of {id, prompt, type}") from None


def _messages(prompt: Any, where: str, system: str | None) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: field 'prompt' is empty")
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if msgs[-1]["role"] != "user":
            raise UserError(f"{where}: field 'prompt' must end with a user message (the policy answers it)")
    else:
        raise UserError(f"{where}: field 'prompt' must be text or a list of {{role, content}} messages")
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def load_prompt_rows(cfg: DataConfig, require_answer: bool = False) -> list[dict[str, Any]]:
    """Rows of {prompt, prompt_id, prompt_type}, plus ``answer`` (text) when the records give one: the
    exact-answer reward reads it (``require_answer``: every record must have it)."""
    path = Path(cfg.prompts) if cfg.prompts else default_prompts_path()
    try:
        records = read_jsonl(path)
    except JsonlError as e:
        raise UserError(f"data.prompts: {e}") from None
    rows = []
    for n, rec in enumerate(records, 1):
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object with 'prompt'")
        if "prompt" not in rec:
            raise UserError(f"{where}: field 'prompt' is required")
        ptype = rec.get("type") or "general"
        if not isinstance(ptype, str):
            raise UserError(f"{where}: field 'type' must be one of {', '.join(PROMPT_TYPES)}")
        if cfg.types and ptype not in cfg.types:
            continue
        if require_answer and rec.get("answer") is None:
            raise UserError(f"{where}: field 'answer' is required by rewards.correctness (the exact answer "
                            "the completion's last number must equal)")
        row = {"prompt": _messages(rec["prompt"], where, cfg.system_prompt),
               "prompt_id": str(rec.get("id", f"line-{n}")), "prompt_type": ptype}
        if rec.get("answer") is not None:
            row["answer"] = str(rec["answer"])
        rows.append(row)
        if cfg.max_prompts and len(rows) >= cfg.max_prompts:
            break
    if any("answer" in r for r in rows):  # one schema for the dataset: a column every row has
        for r in rows:
            r.setdefault("answer", None)
    if not rows:
        raise UserError(f"data.prompts: {path} has no prompts" + (f" of types {cfg.types}" if cfg.types else ""))
    return rows


def load_prompt_dataset(cfg: DataConfig, require_answer: bool = False):
    from datasets import Dataset

    return Dataset.from_list(load_prompt_rows(cfg, require_answer))
