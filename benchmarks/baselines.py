"""The two reference points of `salmon bench` that are not the service: the limit and the serve_rm-style stand-in.

Both run the scorer's public forward (rm_core/scorers.py), so they compute what the service computes;
what differs is only what each one shares, batches and caches. A scorer's values are what its
``compute`` returns: Σ log p(response | prefix) for the causal-LM scorers, the score head's value
for the trained scorer (:func:`value_forwards`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


def value_forwards(scorer) -> tuple[Callable, Callable]:
    """The scorer's two forwards: ``(per_prefix(entry, responses, cascade), padded(seqs))``, the values of
    responses that follow one prefix entry and of full sequences padded together."""
    from rm_core.scorers import CausalLMScorer, TrainedScorer

    if isinstance(scorer, TrainedScorer):
        return scorer.prefix_head_values, scorer.padded_head_values
    if isinstance(scorer, CausalLMScorer):
        return scorer.prefix_response_logprobs, scorer.padded_response_logprobs
    raise TypeError(f"the {scorer.kind} scorer has no model forward to benchmark")


def limit_values(scorer, seqs, block_kv: dict, cascade: bool) -> tuple[list[float], int]:
    """The scorer's value per sequence over unique tokens only: each principle block once (kept in
    ``block_kv`` across calls, like a warm cache), each prompt prefix once, the responses of a prefix
    as batches of suffixes (the scorer's suffix forward, ``cascade`` as the service decides).
    Returns the values and the number of tokens run."""
    per_prefix, _ = value_forwards(scorer)
    by_block: dict = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(seqs):
        by_block[s.system_ids][s.prompt_ids].append(i)
    out = [0.0] * len(seqs)
    ran = 0
    for system, by_prompt in by_block.items():
        if system not in block_kv:
            block_kv[system] = scorer.extend_prefix(None, system)
            ran += len(system)
        for prompt, idx in by_prompt.items():
            entry = scorer.extend_prefix(block_kv[system], prompt) if prompt else block_kv[system]
            ran += len(prompt)
            responses = [seqs[i].response_ids for i in idx]
            ran += sum(len(r) for r in responses)
            for i, v in zip(idx, per_prefix(entry, responses, cascade), strict=True):
                out[i] = v
    return out, ran


def full_batch_values(scorer, seqs, batch_size: int = 0) -> list[float]:
    """serve_rm's model call: the request's full sequences, padded together (``batch_size`` at a time)."""
    _, padded = value_forwards(scorer)
    step = batch_size or len(seqs)
    return [v for s in range(0, len(seqs), step) for v in padded(seqs[s:s + step])]


def baseline_app(scorer, principles, batch_size: int = 0):
    """The serve_rm-style stand-in (see the package docstring, configuration 4)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from rm_core.scorers import combine_values

    app = FastAPI(title="serve_rm-style baseline (benchmark stand-in)")

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    async def score(request):
        data = await request.json()
        # As in serve_rm: tokenize and run the model right here, in the event loop, per request.
        prepared = [scorer.prepare(principles, it["prompt"], it["response"]) for it in data["items"]]
        seqs = [s for p in prepared for s in p.seqs]
        scores = combine_values(prepared, full_batch_values(scorer, seqs, batch_size))
        return JSONResponse({"scores": scores, "rewards": scores,
                             "usage": {"tokens": sum(len(s) for s in seqs), "cached_tokens": 0}})

    score.__annotations__ = {"request": Request}  # resolved here, not as a postponed string
    app.post("/v1/score")(score)
    return app

