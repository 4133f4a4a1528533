"""`salmon bench`'s processes: one worker subprocess per configuration, the HTTP client, the timing.

A worker is ``python -m benchmarks.runner --worker CONFIG SPEC_PATH``: it loads the model, then either
runs the limit and prints its result, or serves /v1/score (the service or the stand-in) until the
parent closes its stdin. Each configuration thus starts from the same conditions and has its own peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.baselines import baseline_app, limit_values
from benchmarks.report import LABELS, workload_flops
from benchmarks.workload import SET_NAME, items
from salmon.errors import UserError


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
    from rm_core.scorers import load_shipped, load_trained, load_zero_shot
    from salmon.modeling import ModelOptions

    options = ModelOptions(dtype=spec["dtype"], device=spec["device"])
    common = dict(max_batch_tokens=spec["max_batch_tokens"], max_padding=spec["max_padding"],
                  max_response_tokens=max(1024, spec["max_response_tokens"] + 16), prefix_cache=None)
    if spec["scorer"] == "trained":
        if spec.get("registry"):
            return load_trained(spec["registry"], spec.get("version"), options, **common)
        return load_shipped(options, **common)
    return load_zero_shot(spec["scorer"], spec["model"], options, contrast=spec["contrast"], **common)


def _service_scorer(spec: dict) -> dict:
    """The service settings that make it serve the benchmarked scorer."""
    if spec["scorer"] != "trained":
        return {"scorer": spec["scorer"], "contrast": spec["contrast"]}
    if spec.get("registry"):
        return {"scorer": "trained", "registry": Path(spec["registry"]), "watch_registry": False}
    return {"scorer": "shipped"}


def worker(config: str, spec_path: str) -> int:
    """The body of a worker subprocess (see the module docstring)."""
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
        warm = [scorer.prepare(principles, p, r) for p, r in items(wl["warmup"])]
        limit_values(scorer, [s for p in warm for s in p.seqs], block_kv, cascade)
        timed = [scorer.prepare(principles, p, r) for rnd in wl["rounds"] for p, r in items(rnd)]
        seqs = [s for p in timed for s in p.seqs]
        _sync(scorer.device)
        t0 = time.perf_counter()
        values, ran = limit_values(scorer, seqs, block_kv, cascade)
        _sync(scorer.device)
        wall = time.perf_counter() - t0
        scores = combine_values(timed, values)
        kv_bytes = sum(e.nbytes for e in block_kv.values())
        groups = [[s for p in timed[g:g + spec["generations"]] for s in p.seqs]
                  for g in range(0, len(timed), spec["generations"])]  # one request = one prompt's G items
        flops = workload_flops(scorer.model.config, groups, "scalar" if scorer.kind == "trained" else "lm")
        _emit({"event": "result", "wall_s": wall, "scores": scores, "tokens": sum(len(s) for s in seqs),
               "flops": flops,
               "unique_tokens": ran, "sequences": len(seqs), "block_kv_bytes": kv_bytes,
               "peak_rss_mib": _peak_rss_mib(), "torch_threads": torch.get_num_threads(),
               "model_version": scorer.version})
        return 0

    from rm_service.settings import ServiceSettings
    from rm_service.testing import ServerThread

    settings = ServiceSettings(
        port=0, model=spec["model"], **_service_scorer(spec), prefix_cache=config == "service", max_batch_tokens=spec["max_batch_tokens"],
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
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.runner", "--worker", config, str(spec_path)],
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



def run_config(config: str, spec: dict, spec_path: Path, tmp: Path) -> dict:
    """Run one configuration in its own worker; its timed result with the load around it."""
    load_before = os.getloadavg()
    w = _Worker(config, spec_path, tmp / f"{config}.log", spec["timeout_s"])
    try:
        ev = w.event()
        if config == "limit":
            w.close()
            res = {k: ev[k] for k in ("wall_s", "scores", "tokens", "unique_tokens", "sequences",
                                      "block_kv_bytes", "peak_rss_mib", "torch_threads", "flops",
                                      "model_version")}
            res["latencies_s"] = []
        else:
            driven = asyncio.run(_drive(ev["url"], spec["workload"], spec["timeout_s"]))
            stopped = w.finish()
            res = {**driven, "peak_rss_mib": stopped["peak_rss_mib"], "torch_threads": ev.get("torch_threads")}
            info = res.pop("model_info") or {}
            res["model_version"] = info.get("model_version")
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


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m benchmarks.runner --worker CONFIG SPEC_PATH (started by `salmon bench`)")
    sys.exit(worker(sys.argv[2], sys.argv[3]))
