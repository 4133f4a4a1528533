"""Batched sampling through ``model.generate`` with the model's chat template (left padding)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch


def as_messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def left_padded(tokenizer):
    """A copy of ``tokenizer`` that pads on the left: generation continues from the last real token."""
    tok = copy.copy(tokenizer)
    tok.padding_side = "left"
    return tok


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Any], *, num_samples: int = 1, temperature: float = 0.7,
             top_p: float = 0.9, max_new_tokens: int = 48, seed: int = 0,
             stats: dict[str, int] | None = None) -> list[list[str]]:
    """``num_samples`` sampled answers for each prompt (a string or chat messages), in one batch.

    The RNG is seeded here, so the same call returns the same answers whatever ran before it.
    """
    tok = left_padded(tokenizer)
    texts = [tok.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    out = model.generate(
        **enc, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples, pad_token_id=tok.pad_token_id,
    )
    new = out[:, enc["input_ids"].shape[1]:]
    if stats is not None:
        stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + int(enc["attention_mask"].sum()) * num_samples
        stats["generated_tokens"] = stats.get("generated_tokens", 0) + int((new != tok.pad_token_id).sum())
    decoded = tok.batch_decode(new, skip_special_tokens=True)
    return [[d.strip() for d in decoded[i * num_samples:(i + 1) * num_samples]] for i in range(len(prompts))]
