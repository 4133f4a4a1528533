"""I-SHEEP's data side (iterative self-enhancement): self-instruct, answer, self-assess, select.

One iteration's data, made by the current model alone (``salmon isheep``, salmon_cli/isheep.py, runs
the loop and the training):

1. **self-instruct**: the model is shown a few seed prompts and asked for new ones; a candidate is kept
   when its ROUGE-L F to every prompt kept so far (seeds, earlier iterations, held-out prompts) is
   below ``max_rouge_l`` (:class:`data_synth.prompts.PromptFilter`, the one near-duplicate filter);
   candidates that talk about the list instead of being an instruction are dropped first (:func:`is_meta`);
2. **answer**: the model answers each new prompt (:func:`data_synth.generation.generate`);
3. the rule post-filters of :mod:`data_synth.answer_filters` clean or drop each answer;
4. **self-assess**: the same model rates each answer twice on 1-10, for quality and for following the
   instruction. The rating is the expected value of its next-token distribution over "1".."10" after
   "Rating: ", not a sampled number: a 135M model's sampled digit is mostly noise, its distribution
   still orders answers;
5. **select**: an answer is kept when both ratings reach their thresholds; drops are counted by axis.

Every stage's result is one file written atomically (:func:`run_once`), so a run killed at any point
resumes at the first stage whose file is missing.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from salmon.atomic import atomic_write_json

from .answer_filters import AnswerFilterConfig, apply_filters
from .generation import as_messages, generate, left_padded
from .prompts import PromptFilter, parse_list, prompt_id

AXES = ("quality", "following")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelfInstructSettings(_Strict):
    """Few-shot self-instruct: seeds as examples, new prompts out, near-duplicates dropped."""

    prompts_per_iteration: int = Field(default=12, ge=1, description="Stop once this many new prompts passed the filters.")
    examples: int = Field(default=3, ge=1, description="Seed prompts shown as examples in each request.")
    per_request: int = Field(default=5, ge=1, description="New prompts asked for in each request.")
    requests_per_round: int = Field(default=4, ge=1, description="Requests generated together in one batch.")
    max_rounds: int = Field(default=4, ge=1, description="Batches of requests before giving up on the target.")
    min_chars: int = Field(default=12, ge=1)
    max_chars: int = Field(default=300, ge=10)
    max_rouge_l: float = Field(default=0.7, gt=0, le=1, description="Drop a prompt whose ROUGE-L F to any kept "
                               "one (seeds, earlier iterations, held-out prompts) is >= this.")
    temperature: float = Field(default=0.9, gt=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=96, ge=8)


class AnswerSettings(_Strict):
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=96, ge=1)
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate() call.")


class AssessSettings(_Strict):
    """The model's own 1-10 ratings, and the thresholds an answer must reach on both."""

    # An expected rating is pulled to the middle of the scale by the model's uncertainty: SmolLM2-135M's sit
    # between about 2.5 and 4.5, so a threshold meant for a sampled rating (the paper's) would keep nothing.
    min_quality: float = Field(default=3.5, ge=1, le=10, description="Keep an answer only when its self-assessed "
                               "quality (expected rating, 1-10) is at least this.")
    min_following: float = Field(default=3.5, ge=1, le=10, description="... and its self-assessed instruction "
                                 "following is at least this.")
    batch_size: int = Field(default=8, ge=1, description="Ratings per forward pass.")
    max_response_tokens: int = Field(default=256, ge=8, description="Longer answers are cut to this for rating.")


# -- resumable stages ---------------------------------------------------------------------------------
def run_once(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stage result stored at ``path``, computing and writing it (atomically) only when absent.

    A kill before the write leaves no file and the rerun computes it again from the same seeds; a
    kill inside it leaves only a temp file, which the caller's ``remove_stale_temps`` clears.
    """
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    atomic_write_json(path, result)
    return result


def prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# -- 1. self-instruct ---------------------------------------------------------------------------------
# A small model often answers the request instead of writing instructions ("Here are five new
# instructions:", "Sure, ..."), or talks about the list itself; such lines are not prompts.
_META = re.compile(r"^(?:here (?:are|is)|sure\b|okay\b|ok\b|certainly\b)|\binstructions?\b|:$", re.IGNORECASE)


def is_meta(candidate: str) -> bool:
    """True for a line about the list rather than an instruction a user would give."""
    return bool(_META.search(candidate.strip()))


def self_instruct_messages(examples: Sequence[str], n: int) -> list[dict]:
    ex = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
    return [{"role": "user", "content":
             f"Here are instructions that people gave an AI assistant:\n{ex}\n\n"
             f"Write {n} new instructions of the same kind, each on a different subject. Each must stand alone. "
             "Answer with a numbered list, one instruction per line."}]


def self_instruct(model, tokenizer, seeds: Sequence[str], existing: Sequence[str], settings: SelfInstructSettings,
                  seed: int) -> tuple[list[dict], dict[str, int]]:
    """New prompt records ``{"id","prompt"}`` written by ``model`` from few-shot ``seeds``; and counters.

    ``existing`` (earlier iterations' prompts, held-out prompts) joins the seeds in the near-duplicate
    filter, so no new prompt is within ``max_rouge_l`` of anything kept before or evaluated on.
    """
    if not seeds:
        raise ValueError("self_instruct needs at least one seed prompt")
    filt = PromptFilter(settings.min_chars, settings.max_chars, settings.max_rouge_l, existing=[*seeds, *existing])
    rng = random.Random(seed)
    new: list[dict] = []
    counters = {"requests": 0, "generated": 0, "not_a_prompt": 0}
    for rnd in tqdm(range(settings.max_rounds), desc="self-instruct", unit="round", dynamic_ncols=True, leave=False):
        # Each request shows its own random draw of seeds, so that requests and rounds differ.
        requests = [self_instruct_messages(rng.sample(list(seeds), min(settings.examples, len(seeds))),
                                           settings.per_request) for _ in range(settings.requests_per_round)]
        outs = generate(model, tokenizer, requests, temperature=settings.temperature, top_p=settings.top_p,
                        max_new_tokens=settings.max_new_tokens, seed=seed + rnd)
        counters["requests"] += len(requests)
        for (text,) in outs:
            for cand in parse_list(text)[: settings.per_request]:
                counters["generated"] += 1
                if is_meta(cand):
                    counters["not_a_prompt"] += 1
                elif filt.offer(cand):
                    new.append({"id": prompt_id(cand.strip()), "prompt": cand.strip()})
                    if len(new) >= settings.prompts_per_iteration:
                        return new, {**counters, **filt.dropped, "kept": len(new)}
    return new, {**counters, **filt.dropped, "kept": len(new)}


# -- 2. answer ----------------------------------------------------------------------------------------
def answer(model, tokenizer, prompts: Sequence[dict], settings: AnswerSettings, seed: int) -> list[dict]:
    """``{"id","prompt","response"}`` for each prompt record: one sampled answer of ``model``."""
    rows = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc="answer", unit="batch", dynamic_ncols=True,
                      leave=False):
        batch = prompts[start:start + settings.batch_size]
        outs = generate(model, tokenizer, [p["prompt"] for p in batch], temperature=settings.temperature,
                        top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, seed=seed + start)
        rows += [{"id": p["id"], "prompt": p["prompt"], "response": o[0]} for p, o in zip(batch, outs, strict=True)]
    return rows


# -- 3. rule post-filters ----------------------------------------------------------------------------
def rule_filter(rows: Sequence[dict], cfg: AnswerFilterConfig) -> tuple[list[dict], dict[str, Any]]:
    """(rows whose answer passed :mod:`data_synth.answer_filters`, ``response`` the edited text and ``raw``
    the generated one; the filters' own counts: offered, kept, changed and dropped by filter)."""
    kept, counts = apply_filters([r["response"] for r in rows], cfg)
    return [{**rows[f.index], "raw": f.raw, "response": f.text} for f in kept], counts.as_dict()


# -- 4. self-assess -----------------------------------------------------------------------------------
RATING_PREFIX = "Rating: "
_QUESTIONS = {
    "quality": "How good is the response: helpful, correct, clear and well written?",
    "following": "How well does the response do exactly what the instruction asks, no more and no less?",
}


def rating_messages(axis: Literal["quality", "following"], prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content":
             f"Rate an AI assistant's response.\n\nInstruction: {prompt}\n\nResponse: {response}\n\n"
             f"{_QUESTIONS[axis]} Answer with one number from 1 (very poor) to 10 (excellent)."}]


def digit_ids(tokenizer) -> list[int]:
    """Token ids of "0".."9"; the ratings are read from them, so each digit must be one token."""
    ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("self-assessment needs a tokenizer with one token per digit")
    return [i[0] for i in ids]


def rating_distribution(first: torch.Tensor, after_one: torch.Tensor, digits: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """p(rating = 1..10) from the log-probs of the first rating token and of the token after a "1".

    "10" is the tokens "1","0", so p(10) = p("1")·p("0"|"1") and p(1) = p("1")·(1 - p("0"|"1"));
    2..9 are one digit each. Returns (distribution renormalised over the ten ratings, the probability
    mass the model put on them at all).
    """
    p = first.exp()
    p0 = after_one.exp()[..., digits[0]]
    p1 = p[..., digits[1]]
    mass = torch.stack([p1 * (1 - p0), *(p[..., digits[k]] for k in range(2, 10)), p1 * p0], dim=-1)
    total = mass.sum(-1, keepdim=True)
    return mass / total.clamp_min(1e-30), total.squeeze(-1)


@torch.no_grad()
def self_assess(model, tokenizer, rows: Sequence[dict], settings: AssessSettings) -> list[dict]:
    """``rows`` with ``quality`` and ``following`` (expected 1-10 ratings by ``model``) and ``rating_mass``."""
    tok = left_padded(tokenizer)
    digits = digit_ids(tok)
    levels = torch.arange(1, 11, dtype=torch.float32)
    jobs = []  # (row index, axis, token ids ending in "Rating: 1")
    for i, r in enumerate(rows):
        resp_ids = tok.encode(r["response"], add_special_tokens=False)[: settings.max_response_tokens]
        response = tok.decode(resp_ids)
        for axis in AXES:
            text = tok.apply_chat_template(as_messages(rating_messages(axis, prompt_text(r["prompt"]), response)),
                                           tokenize=False, add_generation_prompt=True) + RATING_PREFIX
            # The prefill plus a "1": one forward gives the first digit's distribution (at -2) and
            # whether a "0" follows the "1" (at -1), i.e. a rating of 10.
            jobs.append((i, axis, [*tok.encode(text, add_special_tokens=False), digits[1]]))
    out = [dict(r) for r in rows]
    for start in tqdm(range(0, len(jobs), settings.batch_size), desc="self-assess", unit="batch",
                      dynamic_ncols=True, leave=False):
        batch = jobs[start:start + settings.batch_size]
        width = max(len(ids) for _, _, ids in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (_, _, seq) in enumerate(batch):
            ids[b, width - len(seq):] = torch.tensor(seq)
            mask[b, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions start at each row's first token
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=positions.to(model.device)).logits[:, -2:].float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        dist, mass = rating_distribution(logp[:, 0], logp[:, 1], digits)
        expected = (dist * levels).sum(-1)
        for b, (i, axis, _) in enumerate(batch):
            out[i][axis] = round(float(expected[b]), 4)
            out[i].setdefault("rating_mass", {})[axis] = round(float(mass[b]), 4)
    return out


# -- 5. select ----------------------------------------------------------------------------------------
def select(rows: Sequence[dict], settings: AssessSettings) -> tuple[list[dict], dict[str, int]]:
    """(rows whose ratings reach both thresholds, counts of kept and of each drop reason)."""
    kept, counts = [], {"kept": 0, "low_quality": 0, "low_following": 0, "low_both": 0}
    for r in rows:
        low_q, low_f = r["quality"] < settings.min_quality, r["following"] < settings.min_following
        reason = "low_both" if low_q and low_f else "low_quality" if low_q else "low_following" if low_f else None
        if reason:
            counts[reason] += 1
        else:
            counts["kept"] += 1
            kept.append(r)
    return kept, counts
