"""Reward sources computed inside the trainer, beside the service's score: SAR and an exact-answer check.

- **SAR** (self-aligned reward): with the LIVE policy (the trainer's model as it is at this step,
  adapter on, dropout off), ``SAR = max((ppl(a) − ppl(a|q)) / ppl(a), −1)`` where ``ppl(a|q)`` is
  the answer's perplexity after the question in the policy's chat template and ``ppl(a)`` its
  perplexity after an empty question in the same template (system turns kept). An answer the
  question makes more likely than it is on its own scores up to 1; one the question makes less
  likely scores down to −1 (the clip). Written as ``1 − exp(nll(a|q) − nll(a))`` with ``nll`` the
  mean negative log-likelihood per answer token, which is the same quantity without overflowing.
- **Correctness**: 1 when the completion's answer equals the prompt's ``answer`` column, else 0. The
  answer is the number right after the last ``=`` when there is one ("7 + 5 = 12. This shows …"),
  else the last number written: small models state the result and then keep talking.

Both are TRL reward functions (sync callables with a ``__name__``), combined with the service's
score by TRL's ``reward_weights`` (``rewards:`` in the run config; the SAR paper: correctness 1 +
SAR 0.2). SAR needs the trainer's model, so it is bound to the trainer after the method built it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from salmon.errors import UserError

if TYPE_CHECKING:
    from policy_trainer.config import RunConfig

NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def sar_from_nll(nll_cond: float, nll_uncond: float) -> float:
    """SAR from the answer's mean per-token negative log-likelihoods with and without the question."""
    diff = nll_cond - nll_uncond  # log(ppl(a|q) / ppl(a))
    if diff >= math.log(2.0):  # ratio >= 2: the clip at -1 applies (and exp cannot overflow)
        return -1.0
    return max(1.0 - math.exp(diff), -1.0)


def sar_from_ppl(ppl_cond: float, ppl_uncond: float) -> float:
    """The paper's form, for perplexities given directly."""
    return max((ppl_uncond - ppl_cond) / ppl_uncond, -1.0)


def final_number(text: str) -> float | None:
    """The answer a text states: the number right after its last ``=``, else its last number (thousands
    commas dropped), or None."""
    if "=" in text:
        after = NUMBER_RE.match(text.rsplit("=", 1)[1].lstrip(" $"))
        if after:
            return float(after.group().replace(",", ""))
    found = NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(completion: str, answer: Any) -> bool:
    """Exact-answer check: the completion's stated answer (:func:`final_number`) equals ``answer``."""
    want = final_number(str(answer))
    got = final_number(completion)
    return want is not None and got is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


class CorrectnessReward:
    """TRL reward function: 1.0 when the completion states the row's ``answer`` (:func:`final_number`), else 0.0."""

    __name__ = "correctness"

    def __call__(self, prompts: list, completions: list, answer: list | None = None, **_: Any) -> list[float]:
        if answer is None:
            raise UserError("rewards.correctness needs an 'answer' field in every prompt record of data.prompts")
        return [float(is_correct(_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def empty_question(prompt: Any) -> Any:
    """The prompt with its question removed, in the same template: system turns kept, one empty user turn."""
    if isinstance(prompt, str):
        return ""
    return [*(m for m in prompt if m.get("role") == "system"), {"role": "user", "content": ""}]


def prompt_token_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """The policy's tokens before its answer: the chat template with the generation prompt, as TRL renders it."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in prompt],
                                             tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_nll(model: Any, prefixes: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
               pad_id: int, max_batch_tokens: int = 4096) -> list[float]:
    """Mean negative log-likelihood of each answer's tokens after its prefix, under ``model`` as it is.

    Right-padded batches under a token budget (longest first, so a batch's padding stays small).
    An empty answer gets 0 (its SAR is then 0).
    """
    import torch

    with torch.no_grad():
        return _answer_nll(model, prefixes, answers, pad_id, max_batch_tokens)


def _answer_nll(model: Any, prefixes: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                pad_id: int, max_batch_tokens: int) -> list[float]:
    import torch

    out = [0.0] * len(answers)
    order = sorted((i for i in range(len(answers)) if answers[i]),
                   key=lambda i: -(len(prefixes[i]) + len(answers[i])))
    device = next(model.parameters()).device
    pos = 0
    while pos < len(order):
        width = len(prefixes[order[pos]]) + len(answers[order[pos]])
        n = max(1, max_batch_tokens // max(width, 1))
        batch = order[pos:pos + n]
        pos += len(batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            row = [*prefixes[i], *answers[i]]
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for r, i in enumerate(batch):
            start, end = len(prefixes[i]) - 1, len(prefixes[i]) + len(answers[i]) - 1
            out[i] = float(-tok_lp[r, start:end].mean())
    return out


class SARReward:
    """TRL reward function: SAR of each completion under the trainer's live policy (bind it first)."""

    __name__ = "sar"

    def __init__(self, max_batch_tokens: int = 4096):
        self.max_batch_tokens = max_batch_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self.accelerator: Any = None

    def bind(self, trainer: Any) -> None:
        """Score with ``trainer``'s model (the policy being trained, LoRA adapter included)."""
        self.model, self.tokenizer = trainer.model, trainer.processing_class
        self.accelerator = getattr(trainer, "accelerator", None)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **_: Any) -> list[float]:
        if self.model is None:
            raise RuntimeError("SARReward is not bound to a trainer; call bind(trainer) after building it")
        return self.score(prompts, completion_ids)

    def score(self, prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]]) -> list[float]:
        tok = self.tokenizer
        model = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cond = [prompt_token_ids(tok, p) for p in prompts]
        uncond = [prompt_token_ids(tok, empty_question(p)) for p in prompts]
        answers = [list(a) for a in completion_ids]
        was_training = model.training
        model.eval()  # dropout off: the policy's own likelihoods, not a noisy draw of them
        try:
            both = answer_nll(model, [*cond, *uncond], [*answers, *answers], pad, self.max_batch_tokens)
        finally:
            model.train(was_training)
        n = len(answers)
        return [sar_from_nll(c, u) if answers[i] else 0.0
                for i, (c, u) in enumerate(zip(both[:n], both[n:], strict=True))]


@dataclass
class LocalRewards:
    """The in-trainer reward functions a run config turns on, with their TRL weights."""

    correctness: CorrectnessReward | None = None
    correctness_weight: float = 0.0
    sar: SARReward | None = None
    sar_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> LocalRewards:
        r = cfg.rewards
        return cls(correctness=CorrectnessReward() if r.correctness else None, correctness_weight=r.correctness,
                   sar=SARReward(max_batch_tokens=r.sar_max_batch_tokens) if r.sar else None, sar_weight=r.sar)

    def funcs_and_weights(self) -> tuple[list[Any], list[float]]:
        funcs: list[Any] = []
        weights: list[float] = []
        for f, w in ((self.correctness, self.correctness_weight), (self.sar, self.sar_weight)):
            if f is not None:
                funcs.append(f)
                weights.append(w)
        return funcs, weights

    def bind(self, trainer: Any) -> None:
        if self.sar is not None:
            self.sar.bind(trainer)
