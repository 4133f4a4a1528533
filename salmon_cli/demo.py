"""`salmon demo` — principles steer the policy: the whole SALMON loop on one CPU machine, read top to bottom.

1. Start the reward service (`salmon serve`) on loopback, in its own process, with an empty
   registry and `--scorer auto`: it serves the RM shipped with salmon (or, for a model salmon ships
   none for, the zero-shot contrastive scorer) and watches the registry.
2. Synthetic preferences → reward model: the policy answers prompts twice, the judge labels the
   pairs against the reward-model principles, SALMON's aggregation builds a preference set, and TRL's
   RewardTrainer + LoRA fine-tunes the shipped RM on it (a fresh LoRA on the base where none is
   shipped); a registry version is published and the service switches to it by itself (registry
   watch). `--synth-prompts 0` skips this stage: the service keeps what it started with.
3. RL twice, from the same seed, prompts and initial policy, against the same served RM: once under
   a principle set (default `concise`), once under its opposite (default `detailed`). Only the
   principles the RM is asked to follow differ, so any difference between the two policies is theirs.
4. Both final policies (and the initial one) answer held-out prompts, which neither RL run nor the RM
   saw, greedily under the same length cap; the service scores every answer under both sets.
5. A report in runs/<id>/: demo_report.json + demo_report.png (both runs' reward and length curves,
   the held-out lengths and scores) and a short summary on stdout.

Defaults fit ≤ 15 min on a 2-core laptop CPU with the embedded SmolLM2-135M; every size is a flag.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from salmon.atomic import atomic_write_json, atomic_write_jsonl
from salmon.errors import UserError

# One colour per principle set, in the figure's curves and bars; the initial policy is the neutral one.
SET_COLOURS = ("tab:blue", "tab:orange")
INITIAL_COLOUR = "tab:gray"
INITIAL = "initial"
HEADLINE_STEPS = 3  # the reward headline compares the mean of this many first and last steps


def parse_args(argv: list[str]) -> argparse.Namespace:
    from policy_trainer.methods import methods  # the method table: every registered method
    from rm_core.scorer_table import scorer_choices  # the scorer table: every registered kind

    p = argparse.ArgumentParser(prog="salmon demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--model", default="embedded", help="policy, judge and reward-model backbone")
    p.add_argument("--synth-prompts", "--prompts", dest="synth_prompts", type=int, default=None,
                   help="prompts for the synthetic preferences that fine-tune the RM (0: skip that stage and "
                        "serve what the service started with; default 8 when salmon ships an RM for the model "
                        "to fine-tune, else 0)")
    p.add_argument("--principle-set", default="concise", help="principle set of the first RL run")
    p.add_argument("--opposite-set", default="detailed", help="principle set of the second RL run")
    # only methods whose steps are scored by the service: the demo compares per-step reward and length
    p.add_argument("--algorithm", choices=[m.name for m in methods() if m.step_rewards], default="grpo")
    p.add_argument("--steps", type=int, default=10, help="RL optimizer steps of each run")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt in RL (the group)")
    p.add_argument("--prompts-per-step", type=int, default=2, help="prompts per RL step")
    p.add_argument("--max-completion-length", type=int, default=128,
                   help="token cap of RL completions and of the held-out answers")
    # A LoRA policy moves little per step at the trainer's general default; ten steps need a larger one.
    p.add_argument("--learning-rate", type=float, default=5e-4)
    # No KL term: in a ten-step run it would barely bind, and beta 0 skips the reference forward pass.
    p.add_argument("--beta", type=float, default=0.0, help="KL-to-reference coefficient")
    p.add_argument("--heldout-prompts", type=int, default=8, help="held-out prompts the final policies answer")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of both RL runs (LoRA init, sampling); both runs always share it")
    p.add_argument("--scorer", choices=scorer_choices(), default="auto",
                   help="the service's scorer (rule: no model, for smoke runs)")
    p.add_argument("--port", type=int, default=0, help="service port (0: a free one)")
    args = p.parse_args(argv)
    for name in ("steps", "generations", "prompts_per_step", "max_completion_length", "heldout_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.synth_prompts is None:
        from rm_core.registry import shipped_one_pass_version

        # A fresh LoRA on a few demo prompts reads no principles (flip rate 0 on held-out pairs), while
        # the contrastive scorer does: without a shipped one-pass RM to fine-tune, RL keeps what is served.
        args.synth_prompts = 8 if shipped_one_pass_version(args.model) else 0
    if args.synth_prompts < 0:
        p.error("--synth-prompts must be 0 (skip) or more")
    if args.generations < 2:
        p.error("--generations must be at least 2 (a group needs two completions to compare)")
    return args


# -- the service ----------------------------------------------------------------------------------

def start_service(run_dir: Path, registry: Path, model: str, port: int,
                  scorer: str = "auto") -> tuple[subprocess.Popen, str]:
    from rm_service.testing import free_port

    port = port or free_port()
    log = open(run_dir / "service.log", "ab")
    cmd = [sys.executable, "-m", "salmon_cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--registry", str(registry), "--model", model, "--scorer", scorer, "--log-level", "warning"]
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


def stop_service(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def model_info(url: str) -> dict:
    return httpx.get(url + "/v1/model", timeout=10).json()


def wait_for_version(url: str, version: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    info = {}
    while time.monotonic() < deadline:
        info = model_info(url)
        if info["model_version"] == version:
            return info
        time.sleep(1)
    raise UserError(f"the service did not switch to {version} within {timeout_s:.0f} s "
                   f"(last reload error: {info.get('last_reload_error')})")


def score(url: str, set_ref: str, rows: list[dict], answers: list[str], max_items: int) -> list[float]:
    """The service's scores of ``answers`` to ``rows``' prompts under the registered set ``set_ref``."""
    items = [{"prompt": r["prompt"], "response": a} for r, a in zip(rows, answers, strict=True)]
    scores: list[float] = []
    for start in range(0, len(items), max_items):
        resp = httpx.post(url + "/v1/score", json={"items": items[start:start + max_items], "principle_set": set_ref},
                          timeout=httpx.Timeout(600, connect=10))
        if resp.status_code != 200:
            raise UserError(f"POST {url}/v1/score under {set_ref} returned {resp.status_code}: {resp.text[:300]}")
        scores += resp.json()["scores"]
    return scores


# -- the synthetic-preference stage ---------------------------------------------------------------

def build_reward_model(args: argparse.Namespace, run_dir: Path, registry: Path, url: str) -> dict[str, Any]:
    """Synthetic preferences → a published RM the service switches to; without the stage, what it serves."""
    if args.synth_prompts == 0:
        info = model_info(url)
        return {"version": info["model_version"], "scorer": info["scorer"], "init_from": None, "synth": None}
    from data_synth.config import SynthRunConfig
    from data_synth.pipeline import run_pipeline
    from rm_core.registry import shipped_one_pass_version

    synth_cfg = SynthRunConfig(num_prompts=args.synth_prompts, out=run_dir / "synth")  # the run's own defaults
    synth_cfg.sample.policy = synth_cfg.judge.model = args.model
    synth_cfg.train.base_model, synth_cfg.train.registry = args.model, registry
    # SALMON fine-tunes a pre-trained preference model; salmon ships one for the embedded base only.
    synth_cfg.train.init_from = "shipped" if shipped_one_pass_version(args.model) else "base"
    if args.model == "embedded" and synth_cfg.train.init_from == "base":
        print("      this installation ships no one-pass RM (rm_core/shipped): training a fresh LoRA on the base",
              flush=True)
    synth = run_pipeline(synth_cfg)
    version = synth["train"]["version"]
    info = wait_for_version(url, version)
    return {"version": version, "scorer": info["scorer"], "init_from": synth_cfg.train.init_from, "synth": synth}


# -- prompts --------------------------------------------------------------------------------------

def split_prompts(run_dir: Path, heldout: int) -> tuple[Path, Path]:
    """The shipped general prompts, split: the last ``heldout`` for evaluation, the rest for RL.

    General prompts only: reasoning and red-team prompts have answers whose right length is set by
    the task, not by a style principle. The held-out ones are at the end of the shipped file, so the
    synthetic-preference stage (which takes the first prompts of all types) does not see them either.
    """
    from policy_trainer.data import default_prompts_path
    from salmon.atomic import read_jsonl

    general = [r for r in read_jsonl(default_prompts_path()) if r.get("type", "general") == "general"]
    if len(general) <= heldout:
        raise UserError(f"--heldout-prompts {heldout}: the shipped set has only {len(general)} general prompts")
    rl_path, heldout_path = run_dir / "prompts" / "rl.jsonl", run_dir / "prompts" / "heldout.jsonl"
    rl_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(rl_path, general[:-heldout])
    atomic_write_jsonl(heldout_path, general[-heldout:])
    return rl_path, heldout_path


# -- RL -------------------------------------------------------------------------------------------

def set_label(principle_set: str) -> str:
    """The name a set is registered under (its file's ``name``), or the argument for a set only the
    service knows; it names the run's directory and the report's entries."""
    from principles.schema import PrincipleSetError, load_principle_set

    try:
        return load_principle_set(principle_set).name
    except PrincipleSetError:
        return Path(principle_set).stem


def run_rl(args: argparse.Namespace, principle_set: str, label: str, url: str, run_dir: Path,
           prompts: Path) -> dict[str, Any]:
    from policy_trainer.config import load_run_config
    from policy_trainer.train import run_training

    t = time.monotonic()
    gens = args.generations
    rl_cfg = load_run_config(None, {
        "algorithm": args.algorithm, "policy.model": args.model, "reward.url": url,
        "data.prompts": str(prompts),
        "principles.set": principle_set, "training.max_steps": args.steps,
        "training.num_generations": gens, "training.per_device_train_batch_size": args.prompts_per_step * gens,
        "training.max_completion_length": args.max_completion_length,
        "training.learning_rate": args.learning_rate, "training.beta": args.beta, "training.seed": args.seed,
        "output.output_dir": str(run_dir / f"rl-{label}"), "output.rollouts_dir": str(run_dir / "rollouts"),
        "output.save_steps": args.steps,
    })
    result = run_training(rl_cfg)
    gc.collect()  # the trainer and its model are gone; free them before the next run loads its own
    rl_report = json.loads(Path(result.report_json).read_text()) if result.report_json else {"steps": []}
    hist = [{"step": r["step"], "reward": r.get("reward"), "completion_length": r.get("mean_length"),
             "step_s": r.get("step_s"), "reward_wait_s": r.get("reward_wait_s")} for r in rl_report["steps"]]
    k = HEADLINE_STEPS
    timeline = result.principle_set_timeline
    return {
        "principle_set": principle_set, "set_ref": timeline[0]["set"] if timeline else label,
        "algorithm": args.algorithm, "steps": result.global_step, "history": hist,
        "summary": rl_report.get("summary", result.summary),
        "reward_first_steps": mean([h["reward"] for h in hist[:k]]),
        "reward_last_steps": mean([h["reward"] for h in hist[-k:]]),
        "length_first_steps": mean([h["completion_length"] for h in hist[:k]]),
        "length_last_steps": mean([h["completion_length"] for h in hist[-k:]]),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "report_json": str(result.report_json) if result.report_json else None,
        "time_s": round(time.monotonic() - t, 1),
    }


def mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


# -- held-out evaluation --------------------------------------------------------------------------

def generate_answers(model: Any, tok: Any, rows: list[dict], max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy answers to ``rows``' chat prompts, templated as the RL trainer templates them; lengths
    count the answer's tokens up to and including its end-of-sequence token, as the RL curves do."""
    import torch
    from transformers import GenerationConfig

    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    tok.padding_side = "left"  # a batch of prompts ends where the answers start
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=sorted(eos_ids))
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gen_cfg)
    answers, lengths = [], []
    for ids in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        lengths.append(len(ids) if end is None else end + 1)
        answers.append(tok.decode(ids if end is None else ids[:end], skip_special_tokens=True).strip())
    return answers, lengths


def evaluate_heldout(args: argparse.Namespace, runs: dict[str, dict], url: str, heldout: Path,
                     run_dir: Path) -> dict[str, Any]:
    """Each final policy (and the initial one) answers the held-out prompts; the service scores every
    answer under every run's set. One base model carries both runs' LoRA adapters."""
    from peft import PeftModel

    from policy_trainer.config import DataConfig
    from policy_trainer.data import load_prompt_rows
    from salmon.modeling import load_causal_lm, load_tokenizer

    rows = load_prompt_rows(DataConfig(prompts=str(heldout)))
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    labels = list(runs)
    for label in labels:
        ckpt = runs[label]["checkpoint"]
        if not ckpt or not (Path(ckpt) / "adapter_config.json").is_file():
            raise UserError(f"the {label} run left no LoRA adapter to evaluate (checkpoint: {ckpt})")
        if isinstance(model, PeftModel):
            model.load_adapter(ckpt, adapter_name=label)
        else:
            model = PeftModel.from_pretrained(model, ckpt, adapter_name=label)
    model.eval()
    max_items = int(model_info(url)["limits"].get("max_items", len(rows)))

    policies: dict[str, dict[str, Any]] = {}
    records = []
    for policy in [INITIAL, *labels]:
        t = time.monotonic()
        if policy == INITIAL:
            with model.disable_adapter():
                answers, lengths = generate_answers(model, tok, rows, args.max_completion_length)
        else:
            model.set_adapter(policy)
            answers, lengths = generate_answers(model, tok, rows, args.max_completion_length)
        generate_s = time.monotonic() - t
        scores = {label: score(url, runs[label]["set_ref"], rows, answers, max_items) for label in labels}
        policies[policy] = {"mean_length": mean(lengths), "lengths": lengths,
                            "truncated": sum(n >= args.max_completion_length for n in lengths),
                            "mean_score": {label: mean(s) for label, s in scores.items()},
                            "generate_s": round(generate_s, 1), "score_s": round(time.monotonic() - t - generate_s, 1)}
        records += [{"policy": policy, "prompt_id": r["prompt_id"], "prompt": r["prompt"][-1]["content"],
                     "answer": a, "tokens": n, "scores": {label: s[i] for label, s in scores.items()}}
                    for i, (r, a, n) in enumerate(zip(rows, answers, lengths, strict=True))]
    atomic_write_jsonl(run_dir / "heldout_answers.jsonl", records)
    return {"prompts": [r["prompt_id"] for r in rows], "max_new_tokens": args.max_completion_length,
            "decoding": "greedy", "policies": policies, "answers": str(run_dir / "heldout_answers.jsonl")}


# -- the report -----------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["sets"]
    colours = dict(zip(labels, SET_COLOURS, strict=False)) | {INITIAL: INITIAL_COLOUR}
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.4))
    for label, run in report["runs"].items():
        steps = [h["step"] for h in run["history"]]
        ax[0].plot(steps, [_nan(h["reward"]) for h in run["history"]], marker="o", color=colours[label], label=label)
        ax[1].plot(steps, [_nan(h["completion_length"]) for h in run["history"]], marker="o", color=colours[label],
                   label=label)
    ax[0].set(title="RL reward (service score)", xlabel="step")
    ax[1].set(title="RL completion length (tokens)", xlabel="step")
    for a in ax[:2]:
        a.legend(title="principle set")
    policies = report["heldout"]["policies"]
    names = [INITIAL, *labels]
    ax[2].bar(names, [_nan(policies[n]["mean_length"]) for n in names], color=[colours[n] for n in names])
    ax[2].axhline(report["heldout"]["max_new_tokens"], color="black", linestyle=":", linewidth=1)
    ax[2].set(title="held-out answer length (tokens; dotted: cap)", xlabel="policy")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
        ax[3].bar(xs, [_nan(policies[name]["mean_score"][s]) for s in labels], width, color=colours[name],
                  label=f"{name} policy")
    ax[3].set_xticks(range(len(labels)), [f"scored under {s}" for s in labels])
    ax[3].axhline(0, color="black", linewidth=0.5)
    ax[3].set(title="held-out mean service score")
    ax[3].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    head = report["headline"]
    ratio = head["heldout_length_ratio"]
    fig.suptitle(f"salmon demo {report['run_id']}: {report['algorithm']} under '{labels[0]}' vs '{labels[-1]}', "
                 f"RM {report['reward_model']['version']}; held-out length ratio "
                 + (f"{ratio:.2f}" if ratio is not None else "n/a"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def headline(labels: list[str], runs: dict[str, dict], heldout: dict) -> dict[str, Any]:
    first, second = labels
    policies = heldout["policies"]
    lengths = {p: v["mean_length"] for p, v in policies.items()}
    ratio = lengths[first] / lengths[second] if lengths[first] is not None and lengths[second] else None
    margin = {s: _minus(policies[first]["mean_score"][s], policies[second]["mean_score"][s]) for s in labels}
    return {
        "heldout_length_ratio": round(ratio, 3) if ratio is not None else None,
        "heldout_length_ratio_of": f"{first}/{second}",
        "heldout_mean_length": lengths,
        # Under each set, how much better the first run's policy scores than the second's: steering
        # shows as a positive margin under the first set and a negative one under the second.
        "heldout_score_margin": margin,
        "heldout_score_margin_of": f"{first} policy - {second} policy",
        "reward_first_vs_last_steps": {label: [r["reward_first_steps"], r["reward_last_steps"]]
                                       for label, r in runs.items()},
        "reward_steps_averaged": HEADLINE_STEPS,
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def print_summary(report: dict) -> None:
    head, runs = report["headline"], report["runs"]
    rm = report["reward_model"]
    lines = [f"salmon demo: {report['run_dir']} ({report['total_s']:.0f} s)",
             f"  reward model {rm['version']} ({rm['scorer']}" + (f", fine-tuned from {rm['init_from']})"
                                                                   if rm["init_from"] else ")")]
    for label in report["sets"]:
        run = runs[label]
        lines.append(f"  RL under {label:<10} reward first {HEADLINE_STEPS} steps {_fmt(run['reward_first_steps'])}"
                     f" -> last {HEADLINE_STEPS} {_fmt(run['reward_last_steps'])}; length "
                     f"{_fmt(run['length_first_steps'], 1)} -> {_fmt(run['length_last_steps'], 1)} tokens")
    for policy in [INITIAL, *report["sets"]]:
        ev = report["heldout"]["policies"][policy]
        scores = ", ".join(f"{s} {_fmt(ev['mean_score'][s])}" for s in report["sets"])
        lines.append(f"  held-out {policy:<10} {_fmt(ev['mean_length'], 1)} tokens; scored under {scores}")
    lines.append(f"  held-out length ratio {head['heldout_length_ratio_of']}: {_fmt(head['heldout_length_ratio'], 2)}")
    margins = ", ".join(f"under {s} {_fmt(v)}" for s, v in head["heldout_score_margin"].items())
    lines.append(f"  held-out score margin ({head['heldout_score_margin_of']}): {margins}")
    lines.append(f"  report: {report['report_png']}")
    print("\n".join(lines), flush=True)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# -- the whole demo -------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    sets = [args.principle_set, args.opposite_set]
    labels = [set_label(s) for s in sets]
    if labels[0] == labels[1]:
        raise UserError(f"--principle-set and --opposite-set name the same set ({labels[0]!r}); the demo "
                        "compares two sets")
    run_id = Path(args.out).name if args.out else time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = Path(args.out or Path("runs") / run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    registry = run_dir / "registry"
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    # 1. The reward service: the shipped RM (or zero-shot) until a fine-tuned one is published.
    print(f"[1/5] starting the reward service (log: {run_dir / 'service.log'})", flush=True)
    proc, url = start_service(run_dir, registry, args.model, args.port, args.scorer)
    timings["service_start_s"] = round(time.monotonic() - t0, 1)
    try:
        # 2. Synthetic principle preferences → a fine-tuned, published reward model.
        t = time.monotonic()
        if args.synth_prompts:
            print(f"[2/5] synthetic preferences on {args.synth_prompts} prompts → reward model", flush=True)
        else:
            print("[2/5] no synthetic-preference stage (--synth-prompts 0; salmon ships no one-pass RM for this "
                  "model to fine-tune): serving the scorer the service started with", flush=True)
        rm = build_reward_model(args, run_dir, registry, url)
        timings["synth_and_rm_train_s"] = round(time.monotonic() - t, 1)
        print(f"      the service scores with {rm['version']} ({rm['scorer']})", flush=True)

        # 3. RL twice, the same in all but the principle set the RM is asked to follow.
        rl_prompts, heldout_prompts = split_prompts(run_dir, args.heldout_prompts)
        runs: dict[str, dict] = {}
        for n, (pset, label) in enumerate(zip(sets, labels, strict=True), 1):
            print(f"[3/5] RL {n}/2: {args.algorithm} for {args.steps} steps under '{label}'", flush=True)
            runs[label] = run_rl(args, pset, label, url, run_dir, rl_prompts)
            timings[f"rl_{label}_s"] = runs[label]["time_s"]

        # 4. The final policies on prompts neither run trained on.
        print(f"[4/5] held-out evaluation on {args.heldout_prompts} prompts (greedy, ≤ "
              f"{args.max_completion_length} tokens)", flush=True)
        t = time.monotonic()
        heldout = evaluate_heldout(args, runs, url, heldout_prompts, run_dir)
        timings["heldout_eval_s"] = round(time.monotonic() - t, 1)
    finally:
        stop_service(proc)

    # 5. The report.
    print("[5/5] writing the report", flush=True)
    report = {
        "run_id": run_id, "run_dir": str(run_dir), "model": args.model, "algorithm": args.algorithm,
        "total_s": round(time.monotonic() - t0, 1), "timings": timings,
        "settings": {k: getattr(args, k) for k in ("synth_prompts", "steps", "generations", "prompts_per_step",
                                                    "max_completion_length", "learning_rate", "beta",
                                                    "heldout_prompts", "seed", "scorer")},
        "synth": rm["synth"],
        "reward_model": {"version": rm["version"], "scorer": rm["scorer"], "init_from": rm["init_from"],
                         "registry": str(registry)},
        "prompts": {"rl": str(rl_prompts), "heldout": str(heldout_prompts)},
        "sets": labels,  # the runs' order (JSON objects here are written with sorted keys)
        "runs": runs,
        "heldout": heldout,
        "headline": headline(labels, runs, heldout),
        "report_png": str(run_dir / "demo_report.png"),
    }
    atomic_write_json(run_dir / "demo_report.json", report)
    plot(report, run_dir / "demo_report.png")
    print_summary(report)
    return 0
