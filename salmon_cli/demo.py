"""`salmon demo` — the whole SALMON loop on one CPU machine, read top to bottom.

1. Start the reward service (`salmon serve`) on loopback, in its own process, with an empty
   registry: it serves the zero-shot contrastive scorer and watches the registry.
2. Synthetic preferences → reward model: the policy answers prompts twice, the judge labels the
   pairs against the reward-model principles, SALMON's aggregation builds a preference set, TRL's
   RewardTrainer + LoRA trains a principle-following reward model, and a registry version is
   published. The service switches to it by itself (registry watch).
3. RL: a short GRPO (or RLOO/PPO) run of the policy under a principle set (default `concise`),
   rewards from the service over HTTP, rollouts exported for on-policy retraining.
4. A report in runs/<id>/: demo_report.json + demo_report.png with what changed.

Defaults fit ≤ 15 min on a 2-core laptop CPU with the embedded SmolLM2-135M; every size is a flag.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from salmon.atomic import atomic_write_json
from salmon.errors import UserError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="salmon demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--model", default="embedded", help="policy, judge and reward-model backbone")
    p.add_argument("--prompts", type=int, default=16, help="prompts for the synthetic preferences")
    p.add_argument("--principle-set", default="concise", help="principle set for the RL run")
    from policy_trainer.methods import method_names  # the method table: every registered method

    p.add_argument("--algorithm", choices=method_names(), default="grpo")
    p.add_argument("--steps", type=int, default=10, help="RL optimizer steps")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt in RL")
    p.add_argument("--max-completion-length", type=int, default=48)
    p.add_argument("--port", type=int, default=0, help="service port (0: a free one)")
    return p.parse_args(argv)


def start_service(run_dir: Path, registry: Path, model: str, port: int) -> tuple[subprocess.Popen, str]:
    from rm_service.testing import free_port

    port = port or free_port()
    log = open(run_dir / "service.log", "ab")
    cmd = [sys.executable, "-m", "salmon_cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--registry", str(registry), "--model", model, "--scorer", "auto", "--log-level", "warning"]
    # The demo's service is private to this run on loopback: keys from the caller's shell do not apply.
    env = {k: v for k, v in os.environ.items() if k not in {"SALMON_API_KEY", "SALMON_ADMIN_KEY"}}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the reward service exited during start; see {run_dir / 'service.log'}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise UserError(f"the reward service at {url} was not ready after 600 s; see {run_dir / 'service.log'}")


def wait_for_version(url: str, version: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    info = {}
    while time.monotonic() < deadline:
        info = httpx.get(url + "/v1/model", timeout=10).json()
        if info["model_version"] == version:
            return info
        time.sleep(1)
    raise UserError(f"the service did not switch to {version} within {timeout_s:.0f} s "
                   f"(last reload error: {info.get('last_reload_error')})")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["rl"]["history"]
    steps = [h["step"] for h in hist]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(steps, [h.get("reward") for h in hist], marker="o")
    ax[0].set(title="RL reward (service score, shaped)", xlabel="step")
    ax[1].plot(steps, [h.get("completion_length") for h in hist], marker="o", color="tab:orange")
    ax[1].set(title="completion length (tokens)", xlabel="step")
    syn = report["synth"]
    labels = ["held-out acc", "flip rate"]
    vals = [syn.get("train", {}).get("accuracy") or 0, syn.get("train", {}).get("flip_rate") or 0]
    ax[2].bar(labels, vals, color=["tab:green", "tab:purple"])
    ax[2].set(title=f"reward model {report['reward_model']['version']}", ylim=(0, 1))
    fig.suptitle(f"salmon demo {report['run_id']}: {report['rl']['algorithm']} under '{report['rl']['principle_set']}'")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    run_id = Path(args.out).name if args.out else time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = Path(args.out or Path("runs") / run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    registry = run_dir / "registry"
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    # 1. The reward service, zero-shot until the first reward model is published.
    print(f"[1/4] starting the reward service (log: {run_dir / 'service.log'})", flush=True)
    proc, url = start_service(run_dir, registry, args.model, args.port)
    timings["service_start_s"] = round(time.monotonic() - t0, 1)
    try:
        # 2. Synthetic principle preferences → a trained, published reward model.
        print(f"[2/4] synthetic preferences on {args.prompts} prompts → reward model", flush=True)
        from data_synth.config import SynthRunConfig
        from data_synth.pipeline import run_pipeline

        t = time.monotonic()
        synth_cfg = SynthRunConfig(num_prompts=args.prompts, out=run_dir / "synth")  # the run's own defaults
        synth_cfg.sample.policy = synth_cfg.judge.model = args.model
        synth_cfg.train.base_model, synth_cfg.train.registry = args.model, registry
        synth = run_pipeline(synth_cfg)
        timings["synth_and_rm_train_s"] = round(time.monotonic() - t, 1)
        version = synth["train"]["version"]
        info = wait_for_version(url, version)
        print(f"      service now scores with {version} ({info['scorer']})", flush=True)

        # 3. RL under a principle set, rewards from the service over HTTP.
        print(f"[3/4] {args.algorithm} for {args.steps} steps under '{args.principle_set}'", flush=True)
        from policy_trainer.config import load_run_config
        from policy_trainer.train import run_training

        t = time.monotonic()
        gens = args.generations
        rl_cfg = load_run_config(None, {
            "algorithm": args.algorithm, "policy.model": args.model, "reward.url": url,
            "principles.set": args.principle_set, "training.max_steps": args.steps,
            "training.num_generations": gens, "training.per_device_train_batch_size": 2 * gens,
            "training.max_completion_length": args.max_completion_length,
            "output.output_dir": str(run_dir / "rl"), "output.rollouts_dir": str(run_dir / "rollouts"),
            "output.save_steps": max(args.steps, 1),
        })
        result = run_training(rl_cfg)
        timings["rl_s"] = round(time.monotonic() - t, 1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    # 4. The report: what the run did and what changed.
    print("[4/4] writing the report", flush=True)
    rl_report = json.loads(Path(result.report_json).read_text()) if result.report_json else {"steps": []}
    hist = [{"step": r["step"], "reward": r.get("reward"), "completion_length": r.get("mean_length"),
             "step_s": r.get("step_s"), "reward_wait_s": r.get("reward_wait_s")} for r in rl_report["steps"]]
    k = max(1, len(hist) // 3)

    def mean(key: str, rows: list[dict]) -> float | None:
        xs = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(xs) / len(xs), 4) if xs else None

    report = {
        "run_id": run_id, "model": args.model, "total_s": round(time.monotonic() - t0, 1), "timings": timings,
        "synth": synth,
        "reward_model": {"version": version, "registry": str(registry)},
        "rl": {
            "algorithm": args.algorithm, "principle_set": args.principle_set, "steps": result.global_step,
            "history": hist, "summary": rl_report.get("summary", result.summary),
            "reward_first_third": mean("reward", hist[:k]), "reward_last_third": mean("reward", hist[-k:]),
            "length_first_third": mean("completion_length", hist[:k]),
            "length_last_third": mean("completion_length", hist[-k:]),
            "report_json": str(result.report_json) if result.report_json else None,
        },
    }
    atomic_write_json(run_dir / "demo_report.json", report)
    plot(report, run_dir / "demo_report.png")
    rl = report["rl"]
    print(json.dumps({"run_dir": str(run_dir), "reward_model": version,
                      "rm_eval_accuracy": synth["train"].get("accuracy"),
                      "rm_flip_rate": synth["train"].get("flip_rate"),
                      "reward": [rl["reward_first_third"], rl["reward_last_third"]],
                      "length": [rl["length_first_third"], rl["length_last_third"]],
                      "total_s": report["total_s"]}, indent=2))
    return 0
