"""`salmon bench`: the scoring fast path against its limit, the no-cache path and a serve_rm-style baseline.

Workload (GRPO-shaped, seeded): B prompts × G responses per round, R rounds, one principle set for the
whole run. A trainer sends one request per prompt group (G items sharing a prompt), the B requests of
a round concurrently, and waits for the round before the next (a training step). Every round has new
prompts; the principle block is the same throughout, so cross-request reuse of its key/value cache
shows. Each configuration is warmed up once, not timed, with one request of the same shape and another
prompt (it also puts the principle block in the service's cache, as in a long run).

- Principle set: shipped principles (rm, then self_align, harmless, honest, rl, ...) taken in order
  until the system segment (the principle block through the chat template) reaches
  ``--prefix-tokens``; synthetic numbered principles only if the shipped ones run out.
- Prompts: data_synth/data/prompts.jsonl, shuffled with the seed (synthetic ones if it is missing).
- Responses: sentences from a fixed pool, cut to a seeded length in
  [--min-response-tokens, --max-response-tokens] tokens.
- Scorer: the contrastive scorer (``--contrast whole_set`` by default: 2 sequences per item, the set
  and the set negated; ``per_principle`` is k+1 sequences per item and k+1 principle blocks). The
  probe and trained scorers do not take the prefix-cache path, so there is nothing to compare there.

Configurations, each in its own subprocess (same start conditions; per-configuration peak RSS):

1. ``limit``: the same scorer sequences run directly on the model, no HTTP, no queue, no cache
   bookkeeping: each unique principle block once (during warm-up, as the service's warm cache), each
   (block, prompt) prefix once, then all responses of that prefix as one batch of suffixes against
   its key/value cache (split by the same ``max_batch_tokens``), through the causal-LM scorer's own
   prefix and suffix forwards (the service's code, without its cache bookkeeping). Rendering is not
   timed. This is the floor for the work the service must do.
2. ``service``: this service end to end over HTTP on loopback (uvicorn, /v1/score), prefix cache on.
3. ``service_no_cache``: the same with ``prefix_cache=False`` (every sequence in full).
4. ``baseline``: a small stand-in written here with the design of OpenRLHF's ``serve_rm``, NOT
   OpenRLHF itself: FastAPI + uvicorn, the model call inside the async handler (blocking the event
   loop, as serve_rm's ``get_reward`` does), one padded forward over the request's full sequences
   (serve_rm's ``batch_size=None``), no cross-request batching, no prefix reuse. It computes the same
   contrastive values (lm_head on response positions only) and speaks the same /v1/score body, so
   the client side is identical.

Reported: wall time of the R timed rounds, tokens/s (the full-sequence tokens of the workload, the
same numerator for every configuration, so tokens/s ratios are time ratios), per-request p50/p99
latency, peak RSS of the configuration's process (VmHWM), prefix-cache bytes against its bound, the
largest score difference from the limit's values, and the ratios
``service/limit`` (time; target ≤ 1.25), ``no_cache/service`` (speed-up; target ≥ 3) and
``baseline/service`` (speed-up; target ≥ 4). Printed as a table, written as JSON (``--out``) and
appended as a markdown table to BENCHMARKS.md (``--benchmarks-md``; ``''`` skips) with the machine,
versions, date and load average. A GPU run is ``--device cuda`` (and ``--dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from salmon.errors import UserError

log = logging.getLogger("salmon.bench")

CONFIGS = ("limit", "service", "service_no_cache", "baseline")
LABELS = {
    "limit": "(1) limit: unique tokens, direct on the model",
    "service": "(2) service, HTTP, prefix cache on",
    "service_no_cache": "(3) service, HTTP, prefix cache off",
    "baseline": "(4) serve_rm-style stand-in (not OpenRLHF)",
}
TARGETS = {"service_vs_limit_time": 1.25, "speedup_vs_no_cache": 3.0, "speedup_vs_baseline": 4.0}
SET_NAME = "bench"
POOL_ORDER = ("rm", "self_align", "harmless", "honest", "rl", "hhh", "concise", "intervention")
SENTENCES = (
    "The first step is to look at what the question actually asks for.",
    "In short, the answer depends on how much time and money you can spend.",
    "A simple way to check the result is to work it out a second time by hand.",
    "Water expands when it freezes, which is why pipes can burst in winter.",
    "Most people find it easier to start with a small goal and build from there.",
    "If you are unsure, a pharmacist or a doctor can give advice for your case.",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
    "Interest is charged on the balance, so paying early lowers the total cost.",
    "Here is a short example that shows the idea in practice.",
    "Keep the soil moist but not wet, and give the plant plenty of light.",
    "This works because each step only depends on the one before it.",
    "To be honest, I do not know the exact figure, but it is roughly a third.",
    "Let us break the problem into three parts and solve each one in turn.",
    "The main risk is overheating, so leave space around the device for air.",
    "Many cities now offer free maps and timetables online.",
    "Finally, remember to save your work and to take a short break now and then.",
    "The poem uses rain as a picture of a slow and quiet start to the week.",
    "Multiplying both sides by four gives the same answer as before.",
    "A good interview answer names a real situation, what you did and what happened.",
    "Climate is the average over many years, while weather is what happens today.",
)


# -- arguments ------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="salmon bench",
        description="Benchmark /v1/score (prefix cache on/off) against its limit and a serve_rm-style "
        "baseline on a GRPO-shaped workload; see rm_service/bench.py for the method.")
    p.add_argument("--model", default="embedded", help="causal LM: 'embedded', a .gguf, or a local HF dir")
    p.add_argument("--scorer", default="contrastive", choices=["contrastive"],
                   help="the scorer whose sequences are run (the probe and trained scorers have no prefix path)")
    p.add_argument("--contrast", default="whole_set", choices=["whole_set", "per_principle"],
                   help="whole_set: 2 sequences per item (default); per_principle: k+1")
    p.add_argument("--prompts", "-B", type=int, default=4, help="prompts per round (B; concurrent requests)")
    p.add_argument("--generations", "-G", type=int, default=8, help="responses per prompt (G; items per request)")
    p.add_argument("--rounds", "-R", type=int, default=1,
                   help="timed rounds (training steps); 1 keeps the default run within 10 min on a 2-core CPU")
    p.add_argument("--prefix-tokens", type=int, default=600, help="target length of the principle block, in tokens")
    p.add_argument("--min-response-tokens", type=int, default=64)
    p.add_argument("--max-response-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="the service's padded-token budget per forward")
    p.add_argument("--max-padding", type=float, default=0.25,
                   help="the service's pad share before a length-sorted batch is split (also used by (1))")
    p.add_argument("--prefix-attention", default="auto", choices=["auto", "expanded"],
                   help="how (1) and (2) attend to a cached prefix (the service's prefix_attention setting)")
    p.add_argument("--baseline-batch-size", type=int, default=0,
                   help="sequences per forward in the baseline (serve_rm's --batch_size); 0: the whole request")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per configuration (default: torch's)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list, subset of {','.join(CONFIGS)}")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--benchmarks-md", default="BENCHMARKS.md", help="append the markdown table here ('' skips)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up on a configuration after this long")
    args = p.parse_args(argv)
    for name in ("prompts", "generations", "rounds", "prefix_tokens", "min_response_tokens", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_response_tokens < args.min_response_tokens:
        raise UserError("--max-response-tokens must be at least --min-response-tokens")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise UserError(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    args.configs = [c for c in CONFIGS if c in configs]
    return args


# -- workload -------------------------------------------------------------------------------------

def build_principles(renderer, target_tokens: int) -> tuple[list, int]:
    """Shipped principles in POOL_ORDER until the system segment reaches ``target_tokens``."""
    from principles.schema import Principle, load_builtin_sets
    from rm_core.render import principle_block

    sets = load_builtin_sets()
    pool, seen = [], set()
    for name in POOL_ORDER:
        for pr in sets[name].principles if name in sets else ():
            if pr.name not in seen and pr.negative_definition:
                seen.add(pr.name)
                pool.append(pr)
    i = 0
    while True:  # synthetic filler only once the shipped principles run out
        i += 1
        pool.append(Principle(
            name=f"bench_filler_{i}",
            definition=f"The response keeps rule {i} of the house style: it is clear, polite and well organised.",
            negative_definition=f"The response breaks rule {i} of the house style: it is muddled, rude and disorganised."))
        if len(pool) >= 64:
            break
    chosen: list = []
    length = 0
    for pr in pool:
        chosen.append(pr)
        length = len(renderer.render(principle_block(chosen), "x", "y").system_ids)
        if length >= target_tokens:
            break
    return chosen, length


def _prompt_pool(rng: random.Random, n: int) -> list[str]:
    path = Path(__file__).resolve().parents[1] / "data_synth" / "data" / "prompts.jsonl"
    prompts = []
    if path.is_file():
        prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng.shuffle(prompts)
    while len(prompts) < n:
        prompts.append(f"Question {len(prompts) + 1}: explain step by step how to plan a small garden.")
    return prompts[:n]


def _response(tokenizer, rng: random.Random, n_tokens: int) -> str:
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text = (text + " " + rng.choice(SENTENCES)).strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids).strip()


def build_workload(tokenizer, args) -> dict:
    """Groups of (prompt, responses): ``{"warmup": [group], "rounds": [[group × B] × R]}``."""
    rng = random.Random(args.seed)
    prompts = _prompt_pool(rng, 1 + args.prompts * args.rounds)

    def group(prompt: str) -> list:
        lens = [rng.randint(args.min_response_tokens, args.max_response_tokens) for _ in range(args.generations)]
        return [prompt, [_response(tokenizer, rng, n) for n in lens]]

    # One short item: it loads the kernels and (in (1) and (2)) the principle block, as the first step
    # of a run does. A whole group here would cost the full-sequence configurations ~1 min each and
    # measure nothing.
    warmup = [[prompts[0], [_response(tokenizer, rng, args.min_response_tokens)]]]
    rounds = [[group(prompts[1 + r * args.prompts + b]) for b in range(args.prompts)] for r in range(args.rounds)]
    return {"warmup": warmup, "rounds": rounds}


# -- the limit and the baseline's model call ------------------------------------------------------

def limit_logprobs(scorer, seqs, block_kv: dict, cascade: bool) -> tuple[list[float], int]:
    """Σ log p(response | prefix) per sequence over unique tokens only: each principle block once
    (kept in ``block_kv`` across calls, like a warm cache), each prompt prefix once, the responses of
    a prefix as batches of suffixes (the scorer's suffix forward, ``cascade`` as the service decides).
    Returns the values and the number of tokens run."""
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
            for i, v in zip(idx, scorer.prefix_response_logprobs(entry, responses, cascade), strict=True):
                out[i] = v
    return out, ran


def full_batch_logprobs(scorer, seqs, batch_size: int = 0) -> list[float]:
    """serve_rm's model call: the request's full sequences, padded together (``batch_size`` at a time)."""
    step = batch_size or len(seqs)
    return [v for s in range(0, len(seqs), step) for v in scorer.padded_response_logprobs(seqs[s:s + step])]


def workload_flops(config, groups: list[list]) -> dict[str, float]:
    """FLOPs each configuration must do for ``groups`` (a request's sequences each), from the model's
    shapes: linear layers per token, attention per (query, key) pair, lm_head per response token.

    service: the responses as suffixes against their prefix, plus each prompt once per principle
    block (the blocks themselves are warm); no_cache: every full sequence, unpadded; baseline: every
    full sequence padded to its request's longest. The ratios of these are the most a speed-up can be
    when every configuration runs its kernels equally well.
    """
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = 2 * layers * (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter)
    attn_pair = layers * 4 * heads * head_dim
    head = 2 * hidden * config.vocab_size

    def causal(start: int, n: int) -> int:  # Σ context over n tokens whose first sees start + 1 keys
        return n * start + n * (n + 1) // 2

    out = {"service": 0.0, "no_cache": 0.0, "baseline": 0.0}
    for seqs in groups:
        for x in seqs:
            p, r = len(x.prefix_ids), len(x.response_ids)
            out["service"] += r * (linear + head) + attn_pair * causal(p, r)
            out["no_cache"] += len(x) * linear + attn_pair * causal(0, len(x)) + r * head
        for system, prompt in {(x.system_ids, x.prompt_ids) for x in seqs}:
            out["service"] += len(prompt) * linear + attn_pair * causal(len(system), len(prompt))
        width = max(len(x) for x in seqs)
        out["baseline"] += sum(width * linear + attn_pair * causal(0, width) + len(x.response_ids) * head
                               for x in seqs)
    return out


def baseline_app(scorer, principles, batch_size: int = 0):
    """The serve_rm-style stand-in (see the module docstring)."""
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
        scores = combine_values(prepared, full_batch_logprobs(scorer, seqs, batch_size))
        return JSONResponse({"scores": scores, "rewards": scores,
                             "usage": {"tokens": sum(len(s) for s in seqs), "cached_tokens": 0}})

    score.__annotations__ = {"request": Request}  # resolved here, not as a postponed string
    app.post("/v1/score")(score)
    return app


# -- worker subprocesses --------------------------------------------------------------------------

def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _load_scorer(spec: dict):
    from rm_core.scorers import load_zero_shot
    from salmon.modeling import ModelOptions

    return load_zero_shot(spec["scorer"], spec["model"], ModelOptions(dtype=spec["dtype"], device=spec["device"]),
                          contrast=spec["contrast"], max_batch_tokens=spec["max_batch_tokens"],
                          max_padding=spec["max_padding"],
                          max_response_tokens=max(1024, spec["max_response_tokens"] + 16), prefix_cache=None)


def _items(groups: list) -> list[tuple[str, str]]:
    return [(prompt, r) for prompt, responses in groups for r in responses]


def _worker(config: str, spec_path: str) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from principles.schema import load_principle_set

    principles = list(load_principle_set(spec["set_path"]).principles)
    wl = spec["workload"]
    if config == "limit":
        from rm_core.scorers import combine_values

        scorer = _load_scorer(spec)
        cascade = scorer.uses_cascade(spec["prefix_attention"])
        block_kv: dict = {}
        warm = [scorer.prepare(principles, p, r) for p, r in _items(wl["warmup"])]
        limit_logprobs(scorer, [s for p in warm for s in p.seqs], block_kv, cascade)
        timed = [scorer.prepare(principles, p, r) for rnd in wl["rounds"] for p, r in _items(rnd)]
        seqs = [s for p in timed for s in p.seqs]
        _sync(scorer.device)
        t0 = time.perf_counter()
        values, ran = limit_logprobs(scorer, seqs, block_kv, cascade)
        _sync(scorer.device)
        wall = time.perf_counter() - t0
        scores = combine_values(timed, values)
        kv_bytes = sum(e.nbytes for e in block_kv.values())
        groups = [[s for p in timed[g:g + spec["generations"]] for s in p.seqs]
                  for g in range(0, len(timed), spec["generations"])]  # one request = one prompt's G items
        flops = workload_flops(scorer.model.config, groups)
        _emit({"event": "result", "wall_s": wall, "scores": scores, "tokens": sum(len(s) for s in seqs),
               "flops": flops,
               "unique_tokens": ran, "sequences": len(seqs), "block_kv_bytes": kv_bytes,
               "peak_rss_mib": _peak_rss_mib(), "torch_threads": torch.get_num_threads()})
        return 0

    from rm_service.settings import ServiceSettings
    from rm_service.testing import ServerThread

    settings = ServiceSettings(
        port=0, scorer=spec["scorer"], model=spec["model"], contrast=spec["contrast"],
        prefix_cache=config == "service", max_batch_tokens=spec["max_batch_tokens"],
        max_padding=spec["max_padding"], prefix_attention=spec["prefix_attention"], dtype=spec["dtype"],
        device=spec["device"], num_threads=spec.get("threads"), principle_sets_dir=Path(spec["set_path"]).parent,
        default_principle_set=SET_NAME, max_response_tokens=max(1024, spec["max_response_tokens"] + 16),
        request_timeout_s=spec["timeout_s"], max_items=max(256, spec["generations"]))
    app = None
    if config == "baseline":
        scorer = _load_scorer(spec)
        app = baseline_app(scorer, principles, spec["baseline_batch_size"])
    server = ServerThread(settings, app=app).start(timeout_s=spec["timeout_s"])
    _emit({"event": "ready", "url": server.url, "torch_threads": torch.get_num_threads()})
    sys.stdin.readline()  # the parent closes stdin (or writes a line) when its client is done
    rss = _peak_rss_mib()
    server.stop()
    _emit({"event": "stopped", "peak_rss_mib": rss})
    return 0


def _sync(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


# -- parent: client and orchestration -------------------------------------------------------------

class _Worker:
    def __init__(self, config: str, spec_path: Path, log_path: Path, timeout_s: float):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rm_service.bench", "--worker", config, str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env)
        self.timeout_s = timeout_s

    def event(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise UserError(f"the {self.config} worker exited (code {self.proc.returncode}) without a result; "
                               f"its log ends:\n{tail}")
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    pass

    def finish(self) -> dict:
        self.proc.stdin.close()
        try:
            return self.event()
        finally:
            self.close()

    def close(self) -> None:
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def _drive(url: str, workload: dict, timeout_s: float) -> dict:
    """Send the warm-up request, then the timed rounds: B concurrent requests per round, round after round."""
    import httpx

    async def one(client, prompt, responses) -> tuple[float, dict]:
        body = {"items": [{"prompt": prompt, "response": r} for r in responses], "principle_set": SET_NAME}
        t0 = time.perf_counter()
        resp = await client.post(url + "/v1/score", json=body)
        dt = time.perf_counter() - t0
        if resp.status_code != 200:
            raise UserError(f"{url}/v1/score answered {resp.status_code}: {resp.text[:500]}")
        return dt, resp.json()

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(one(client, p, rs) for p, rs in workload["warmup"]))
        latencies, scores, tokens, cached = [], [], 0, 0
        t0 = time.perf_counter()
        for rnd in workload["rounds"]:
            results = await asyncio.gather(*(one(client, p, rs) for p, rs in rnd))
            for dt, body in results:
                latencies.append(dt)
                scores.extend(body["scores"])
                tokens += body["usage"]["tokens"]
                cached += body["usage"].get("cached_tokens", 0)
        wall = time.perf_counter() - t0
        info = None
        r = await client.get(url + "/v1/model")
        if r.status_code == 200:
            info = r.json()
    return {"wall_s": wall, "latencies_s": latencies, "scores": scores, "tokens": tokens,
            "cached_tokens": cached, "model_info": info}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_config(config: str, spec: dict, spec_path: Path, tmp: Path) -> dict:
    load_before = os.getloadavg()
    w = _Worker(config, spec_path, tmp / f"{config}.log", spec["timeout_s"])
    try:
        ev = w.event()
        if config == "limit":
            w.close()
            res = {k: ev[k] for k in ("wall_s", "scores", "tokens", "unique_tokens", "sequences",
                                      "block_kv_bytes", "peak_rss_mib", "torch_threads", "flops")}
            res["latencies_s"] = []
        else:
            driven = asyncio.run(_drive(ev["url"], spec["workload"], spec["timeout_s"]))
            stopped = w.finish()
            res = {**driven, "peak_rss_mib": stopped["peak_rss_mib"], "torch_threads": ev.get("torch_threads")}
            info = res.pop("model_info") or {}
            if config == "service":
                res["prefix_cache"] = info.get("prefix_cache")
    except BaseException:
        if w.proc.poll() is None:
            w.proc.kill()
        w.close()
        raise
    res["config"] = config
    res["label"] = LABELS[config]
    res["load_before"] = [round(x, 2) for x in load_before]
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(results: dict[str, dict], spec: dict) -> dict:
    lim = results.get("limit")
    tokens = lim["tokens"] if lim else next((r["tokens"] for r in results.values()), 0)
    rows = {}
    for name, r in results.items():
        lat = r.get("latencies_s") or []
        diff = None
        if lim and name != "limit" and len(r["scores"]) == len(lim["scores"]):
            diff = max((abs(a - b) for a, b in zip(r["scores"], lim["scores"], strict=True)), default=0.0)
        rows[name] = {
            "label": r["label"], "wall_s": r["wall_s"], "tokens_per_s": tokens / r["wall_s"] if r["wall_s"] else None,
            "p50_ms": _ms(_percentile(lat, 0.5)), "p99_ms": _ms(_percentile(lat, 0.99)), "requests": len(lat),
            "peak_rss_mib": r["peak_rss_mib"], "max_abs_score_diff_vs_limit": diff,
            "tokens_reported": r["tokens"], "cached_tokens": r.get("cached_tokens"),
            "load_before": r["load_before"], "load_after": r["load_after"], "torch_threads": r.get("torch_threads"),
        }
        for k in ("unique_tokens", "sequences", "block_kv_bytes", "prefix_cache"):
            if k in r:
                rows[name][k] = r[k]
    t = {k: results[k]["wall_s"] if k in results else None for k in CONFIGS}
    ratios = {
        "service_vs_limit_time": _ratio(t["service"], t["limit"]),
        "speedup_vs_no_cache": _ratio(t["service_no_cache"], t["service"]),
        "speedup_vs_baseline": _ratio(t["baseline"], t["service"]),
    }
    flops = (lim or {}).get("flops") or {}
    work = {
        "no_cache_vs_service": _ratio(flops.get("no_cache"), flops.get("service")),
        "baseline_vs_service": _ratio(flops.get("baseline"), flops.get("service")),
    }
    for name, key in (("limit", "service"), ("service", "service"), ("service_no_cache", "no_cache"),
                      ("baseline", "baseline")):
        if name in rows and flops.get(key) and rows[name]["wall_s"]:
            rows[name]["gflop"] = flops[key] / 1e9
            rows[name]["gflop_per_s"] = flops[key] / 1e9 / rows[name]["wall_s"]
    pc = (results.get("service") or {}).get("prefix_cache") or {}
    targets = {
        "service_within_1.25x_of_limit": None if ratios["service_vs_limit_time"] is None
        else ratios["service_vs_limit_time"] <= TARGETS["service_vs_limit_time"],
        "service_3x_faster_than_no_cache": None if ratios["speedup_vs_no_cache"] is None
        else ratios["speedup_vs_no_cache"] >= TARGETS["speedup_vs_no_cache"],
        "service_4x_faster_than_baseline": None if ratios["speedup_vs_baseline"] is None
        else ratios["speedup_vs_baseline"] >= TARGETS["speedup_vs_baseline"],
        "cache_within_bound": (pc["bytes"] <= pc["max_bytes"]) if pc else None,
    }
    return {"configurations": rows, "ratios": ratios, "work_ratios": work, "targets": targets, "tokens": tokens}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def environment(args) -> dict:
    import torch
    import transformers

    from salmon import __version__

    cpu, mem = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    sha = None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(), "cpu": cpu,
            "ram_gib": mem, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "salmon": __version__, "git": sha,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:,.{nd}f}"


def table(report: dict) -> str:
    rows = report["summary"]["configurations"]
    lines = ["| configuration | time (s) | tokens/s | GFLOP | GFLOP/s | p50 (ms) | p99 (ms) | peak RSS (MiB) "
             "| max |Δscore| vs (1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in CONFIGS:
        if name in rows:
            r = rows[name]
            lines.append(f"| {r['label']} | {_fmt(r['wall_s'], 2)} | {_fmt(r['tokens_per_s'], 0)} | "
                         f"{_fmt(r.get('gflop'), 0)} | {_fmt(r.get('gflop_per_s'), 1)} | "
                         f"{_fmt(r['p50_ms'], 0)} | {_fmt(r['p99_ms'], 0)} | {_fmt(r['peak_rss_mib'], 0)} | "
                         f"{_fmt(r['max_abs_score_diff_vs_limit'], 4)} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    env, wl, s = report["environment"], report["workload"], report["summary"]
    ra, tg = s["ratios"], s["targets"]
    pc = s["configurations"].get("service", {}).get("prefix_cache") or {}
    out = [
        f"## {env['date']} — `salmon bench` ({wl['scorer']}, {wl['contrast']}, model {wl['model']})", "",
        f"- Machine: {env['nproc']} CPU ({env['cpu']}), {env['ram_gib']} GiB RAM"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"; device {wl['device']}, dtype {wl['dtype']}, "
        f"torch threads {s['configurations'].get('service', {}).get('torch_threads', '–')}.",
        f"- Load average (1/5/15 min) at start: {env['load_average']}; at end: {report['load_average_end']} "
        "(the machine was shared; see per-configuration loads in the JSON).",
        f"- Command: `{wl['command']}`.",
        f"- Versions: salmon {env['salmon']} (git {env['git']}), torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}.",
        f"- Workload: B={wl['prompts']} prompts × G={wl['generations']} responses × R={wl['rounds']} timed rounds "
        f"(+1 warm-up item), principle block {wl['prefix_tokens_actual']} tokens ({wl['num_principles']} "
        f"principles), responses {wl['min_response_tokens']}–{wl['max_response_tokens']} tokens "
        f"(mean {wl['mean_response_tokens']:.0f}), seed {wl['seed']}, max_batch_tokens {wl['max_batch_tokens']}, "
        f"max_padding {wl.get('max_padding', '–')}; "
        f"{s['tokens']:,} full-sequence tokens scored per configuration"
        + (f", {s['configurations']['limit']['unique_tokens']:,} unique" if "limit" in s["configurations"] else "")
        + ".",
        "",
        table(report),
        "",
        f"- (2) vs (1), time: **{_fmt(ra['service_vs_limit_time'], 2)}×** (target ≤ 1.25: "
        f"{_fmt(tg['service_within_1.25x_of_limit'])})",
        f"- (2) vs (3), speed-up: **{_fmt(ra['speedup_vs_no_cache'], 2)}×** (target ≥ 3: "
        f"{_fmt(tg['service_3x_faster_than_no_cache'])})",
        f"- (2) vs (4), speed-up: **{_fmt(ra['speedup_vs_baseline'], 2)}×** (target ≥ 4: "
        f"{_fmt(tg['service_4x_faster_than_baseline'])})",
        (f"- Work (FLOPs counted from the model's shapes and the workload's lengths): (3) is "
         f"{_fmt(s.get('work_ratios', {}).get('no_cache_vs_service'), 2)}× and (4) "
         f"{_fmt(s.get('work_ratios', {}).get('baseline_vs_service'), 2)}× the work of (2): the speed-ups "
         "(2) could reach if every configuration ran its kernels equally well."),
        (f"- Prefix cache after the run: {pc.get('bytes', 0) / 2**20:.1f} MiB in {pc.get('entries')} entries, "
         f"bound {pc.get('max_bytes', 0) / 2**20:.0f} MiB (within: {_fmt(tg['cache_within_bound'])}); "
         f"hits {pc.get('hits')}, misses {pc.get('misses')}, evictions {pc.get('evictions')}.") if pc else
        "- Prefix cache: not measured.",
        "",
    ]
    return "\n".join(out) + "\n"


MD_HEADER = """# Benchmarks

Appended by `salmon bench` (rm_service/bench.py documents the method). Each entry is one run: the
ratios in it were measured in that run, on the machine and under the load it names.

"""


def append_markdown(path: Path, text: str) -> None:
    from salmon.atomic import atomic_write_text

    old = path.read_text(encoding="utf-8") if path.is_file() else MD_HEADER
    atomic_write_text(path, old.rstrip("\n") + "\n\n" + text)


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rm_core.render import Renderer
    from salmon.modeling import ModelSourceError, load_tokenizer

    try:
        tok = load_tokenizer(args.model)
    except (ModelSourceError, OSError) as e:
        raise UserError(str(e)) from None
    renderer = Renderer(tok)
    principles, block_tokens = build_principles(renderer, args.prefix_tokens)
    workload = build_workload(tok, args)
    resp_tokens = [len(tok(r, add_special_tokens=False)["input_ids"])
                   for rnd in workload["rounds"] for _, rs in rnd for r in rs]
    env = environment(args)
    wl_info = {"model": args.model, "scorer": args.scorer, "contrast": args.contrast, "prompts": args.prompts,
               "generations": args.generations, "rounds": args.rounds, "prefix_tokens": args.prefix_tokens,
               "prefix_tokens_actual": block_tokens, "num_principles": len(principles),
               "min_response_tokens": args.min_response_tokens, "max_response_tokens": args.max_response_tokens,
               "mean_response_tokens": statistics.fmean(resp_tokens), "seed": args.seed,
               "max_batch_tokens": args.max_batch_tokens, "max_padding": args.max_padding,
               "prefix_attention": args.prefix_attention, "baseline_batch_size": args.baseline_batch_size,
               "dtype": args.dtype, "device": args.device, "threads": args.threads,
               "command": "salmon " + " ".join(argv)}
    print(f"salmon bench: {args.prompts}×{args.generations} items × {args.rounds} rounds, principle block "
          f"{block_tokens} tokens ({len(principles)} principles), load {env['load_average']}", file=sys.stderr)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="salmon-bench-") as tmpd:
        tmp = Path(tmpd)
        import yaml

        set_dir = tmp / "sets"
        set_dir.mkdir()
        set_path = set_dir / f"{SET_NAME}.yaml"
        set_path.write_text(yaml.safe_dump({
            "name": SET_NAME, "description": "salmon bench: shipped principles up to the target block length",
            "principles": [pr.model_dump(mode="json", exclude_defaults=True) for pr in principles]}, sort_keys=False))
        spec = {"model": args.model, "scorer": args.scorer, "contrast": args.contrast, "dtype": args.dtype,
                "device": args.device, "threads": args.threads, "max_batch_tokens": args.max_batch_tokens,
                "max_padding": args.max_padding, "prefix_attention": args.prefix_attention,
                "max_response_tokens": args.max_response_tokens, "generations": args.generations,
                "baseline_batch_size": args.baseline_batch_size, "timeout_s": args.timeout_s,
                "set_path": str(set_path), "workload": workload}
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for config in args.configs:
            t0 = time.perf_counter()
            print(f"salmon bench: running {LABELS[config]} ...", file=sys.stderr, flush=True)
            results[config] = run_config(config, spec, spec_path, tmp)
            print(f"salmon bench:   {results[config]['wall_s']:.2f} s timed ({time.perf_counter() - t0:.0f} s "
                  "with start and warm-up)", file=sys.stderr, flush=True)
    report = {"environment": env, "workload": wl_info, "summary": summarize(results, spec),
              "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    print(table(report))
    print(json.dumps({"ratios": report["summary"]["ratios"], "targets": report["summary"]["targets"]}, indent=2))
    if args.out:
        from salmon.atomic import atomic_write_json

        atomic_write_json(args.out, report)
    if args.benchmarks_md:
        append_markdown(Path(args.benchmarks_md), markdown(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit(main(["bench", *sys.argv[1:]]))
