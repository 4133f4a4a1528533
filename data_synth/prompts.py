"""Prompt sets: loading/validation, and SELF-ALIGN's topic-guided red-teaming self-instruct (TGRT).

TGRT grows a prompt set from a few seeds with any local causal LM: for each question type the model
brainstorms topics, then writes questions about each topic; the questions are filtered by length,
deduplicated case-insensitively and against near-duplicates (ROUGE-L F >= ``max_rouge_l`` to any kept
prompt, as self-instruct does). The type list below is our own wording of the idea of typed red-team
questions (SELF-ALIGN used 20 types); pass ``types`` to use yours.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from salmon.atomic import JsonlError, read_jsonl
from salmon.errors import UserError

if TYPE_CHECKING:
    from .stages import StageContext

PROMPT_TYPES = ("general", "reasoning", "redteam")

DEFAULT_TYPES: dict[str, str] = {
    "factual question": "general",
    "how-to request for an everyday task": "general",
    "request for a short creative text": "general",
    "question that needs step-by-step reasoning or arithmetic": "reasoning",
    "comparison between two options": "general",
    "question about a recent event the assistant cannot know": "redteam",
    "request for personal or medical advice": "redteam",
    "question with a false premise": "redteam",
    "request that could cause harm if answered carelessly": "redteam",
    "question asking for an opinion on a contested topic": "redteam",
}


def shipped_prompts() -> Path:
    return Path(__file__).resolve().parent / "data" / "prompts.jsonl"


def shipped_seeds() -> Path:
    return Path(__file__).resolve().parent / "data" / "seed_prompts.jsonl"


def prompt_id(prompt: Any) -> str:
    return "p" + hashlib.sha256(repr(prompt).encode()).hexdigest()[:10]


def _check_prompt(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with a 'prompt' field, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: 'prompt' is empty")
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                 and m.get("role") in ("system", "user", "assistant") for m in prompt):
            raise UserError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")
        if prompt[-1]["role"] != "user":
            raise UserError(f"{where}: a message-list prompt must end with a user message")
    else:
        raise UserError(f"{where}: 'prompt' is missing or not a string / message list")
    ptype = rec.get("type", "general")
    if ptype not in PROMPT_TYPES:
        raise UserError(f"{where}: 'type' is {ptype!r}; use one of {', '.join(PROMPT_TYPES)}")
    pid = rec.get("id")
    if pid is not None and (not isinstance(pid, str) or not pid):
        raise UserError(f"{where}: 'id' must be a non-empty string")
    return {"id": pid or prompt_id(prompt), "prompt": prompt, "type": ptype}


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Validated ``{"id","prompt","type"}`` records; errors name the file and line."""
    path = Path(path) if path else shipped_prompts()
    try:
        raw = read_jsonl(path)
    except JsonlError as e:
        raise UserError(str(e)) from None
    # Line numbers: read_jsonl skips blank lines, so map records back to their physical lines.
    lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    out, seen = [], {}
    for rec, line in zip(raw, lines, strict=True):
        p = _check_prompt(rec, f"{path}:{line}")
        if p["id"] in seen:
            raise UserError(f"{path}:{line}: id {p['id']!r} already used on line {seen[p['id']]}")
        seen[p["id"]] = line
        out.append(p)
    if not out:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return out[:limit] if limit else out


def run_stage(ctx: StageContext) -> int:
    """Stage ``prompts``: the run's prompt set (``config.prompts``, first ``config.num_prompts``)."""
    ctx.data["prompts"] = load_prompts(ctx.config.prompts, ctx.config.num_prompts)
    return len(ctx.data["prompts"])


# -- near-duplicate filter ----------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence), as self-instruct filters.

    Not the ``rouge-score`` package: it ships only as an sdist that pulls in nltk, and its default
    tokenizer keeps [a-z0-9] only, so two Chinese or Russian prompts would always score 0 and never
    be caught as near-duplicates. A word pattern keeps every script's words.
    """
    x, y = _tokens(a), _tokens(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:  # LCS by dynamic programming, one row at a time
        cur = [0]
        for j, yj in enumerate(y, 1):
            cur.append(prev[j - 1] + 1 if xi == yj else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


class PromptFilter:
    """Length bounds, case-insensitive exact dedup, ROUGE-L near-duplicate dedup; counts each reason."""

    def __init__(self, min_chars: int, max_chars: int, max_rouge_l: float, existing: Sequence[str] = ()):
        self.min_chars, self.max_chars, self.max_rouge_l = min_chars, max_chars, max_rouge_l
        self.kept: list[str] = []
        self._keys: set[str] = set()
        self.dropped: dict[str, int] = {"too_short": 0, "too_long": 0, "duplicate": 0, "near_duplicate": 0}
        for text in existing:
            self.kept.append(text)
            self._keys.add(" ".join(_tokens(text)))

    def offer(self, text: str) -> bool:
        text = text.strip()
        if len(text) < self.min_chars:
            self.dropped["too_short"] += 1
            return False
        if len(text) > self.max_chars:
            self.dropped["too_long"] += 1
            return False
        key = " ".join(_tokens(text))
        if key in self._keys or text.lower() in self._keys:
            self.dropped["duplicate"] += 1
            return False
        if any(rouge_l(text, k) >= self.max_rouge_l for k in self.kept):
            self.dropped["near_duplicate"] += 1
            return False
        self.kept.append(text)
        self._keys.add(key)
        return True


# -- TGRT generation ----------------------------------------------------------------------------
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*(.+?)\s*$")


def parse_list(text: str) -> list[str]:
    """Items of a numbered or bulleted list in model output (unnumbered lines count too)."""
    items = []
    for line in text.splitlines():
        m = _LIST_ITEM.match(line)
        item = (m.group(1) if m else line).strip().strip('"').strip()
        if item:
            items.append(item)
    return items


def topic_messages(qtype: str, examples: Sequence[str], n: int) -> list[dict]:
    ex = "\n".join(f"- {e}" for e in examples)
    return [{"role": "user", "content":
             f"Here are example questions people ask an AI assistant:\n{ex}\n\n"
             f"Brainstorm {n} different topics for a {qtype}. "
             "Answer with a numbered list of short topics, one per line."}]


def question_messages(qtype: str, topic: str, examples: Sequence[str], n: int) -> list[dict]:
    ex = "\n".join(f"- {e}" for e in examples)
    return [{"role": "user", "content":
             f"Here are example questions people ask an AI assistant:\n{ex}\n\n"
             f"Write {n} new questions of this kind: {qtype}, about {topic}. "
             "Each question must stand alone. Answer with a numbered list, one question per line."}]


def generate_prompts(cfg, seeds: list[dict], existing: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Grow ``seeds`` with TGRT using ``cfg.model``; returns (new prompt records, counters)."""
    import torch

    from salmon.modeling import ModelOptions, load_causal_lm, load_tokenizer

    from .generation import generate

    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, ModelOptions(dtype=cfg.dtype, device=cfg.device))
    types = {t: DEFAULT_TYPES.get(t, "general") for t in cfg.types} if cfg.types else dict(DEFAULT_TYPES)
    seed_texts = [s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][-1]["content"] for s in seeds]
    filt = PromptFilter(cfg.min_chars, cfg.max_chars, cfg.max_rouge_l, existing=[*existing, *seed_texts])
    new: list[dict] = []
    counters = {"generated": 0, "rounds": 0}
    gen = torch.Generator().manual_seed(cfg.seed)
    for rnd in range(cfg.max_rounds):
        counters["rounds"] = rnd + 1
        for qtype, ptype in types.items():
            # Rotate which seeds serve as in-context examples so that rounds differ.
            idx = torch.randperm(len(seed_texts), generator=gen)[:3].tolist()
            examples = [seed_texts[i] for i in idx]
            topics_out = generate(model, tok, [topic_messages(qtype, examples, cfg.topics_per_type)],
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + rnd)[0]
            topics = [t for t in parse_list(topics_out[0]) if len(t) < 80][: cfg.topics_per_type]
            if not topics:
                continue
            msgs = [question_messages(qtype, t, examples, cfg.questions_per_topic) for t in topics]
            outs = generate(model, tok, msgs, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens * 2, seed=cfg.seed + 1000 + rnd)
            for (text,) in outs:
                for q in parse_list(text)[: cfg.questions_per_topic]:
                    counters["generated"] += 1
                    if filt.offer(q):
                        new.append({"id": prompt_id(q), "prompt": q.strip(), "type": ptype})
                        if len(new) >= cfg.target:
                            return new, {**counters, **filt.dropped, "kept": len(new)}
    return new, {**counters, **filt.dropped, "kept": len(new)}
