"""Correctness-only vs correctness + SAR: two GRPO runs from the same seed, then held-out questions.

    python -m policy_trainer.sar_compare --out runs/sar_compare            # the config's sizes
    python -m policy_trainer.sar_compare --steps 4 --out runs/sar_smoke     # a quick look

Both runs take ``--config`` (default ``policy_trainer/configs/sar_arith.yaml``) and differ only in
``rewards.sar`` (0 vs ``--sar-weight``). The initial policy and both final ones answer the held-out
questions greedily under the same token cap; the report (``sar_compare.{json,png}`` in ``--out``)
gives each one's accuracy (the same exact-answer check the reward uses) and answer length in tokens
(mean, and the standard deviation over questions).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from policy_trainer.arith import TOYDATA
from policy_trainer.config import load_run_config
from policy_trainer.data import load_prompt_rows
from policy_trainer.self_reward import is_correct
from salmon.atomic import atomic_write_bytes, atomic_write_json

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sar_arith.yaml"


def answer_heldout(model_dir: Path, adapter: Path | None, rows: list[dict[str, Any]], max_new_tokens: int,
                   batch_size: int = 8) -> list[dict[str, Any]]:
    """Greedy answers of the base policy (``adapter`` None) or of a trained LoRA checkpoint."""
    import torch
    from tqdm import tqdm

    from salmon.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tok.padding_side = "left"  # generation continues every row from its own last token
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"held-out ({adapter.name if adapter else 'initial'})"):
        batch = rows[i:i + batch_size]
        texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for r, ids in zip(batch, gen[:, enc["input_ids"].shape[1]:], strict=True):
            ids = ids.tolist()
            n = next((k + 1 for k, t in enumerate(ids) if t == tok.eos_token_id), len(ids))
            text = tok.decode(ids[:n], skip_special_tokens=True)
            out.append({"id": r["prompt_id"], "answer": r["answer"], "completion": text, "tokens": n,
                        "correct": is_correct(text, r["answer"])})
    return out


def summarize(answers: list[dict[str, Any]]) -> dict[str, float]:
    lengths = [a["tokens"] for a in answers]
    return {"accuracy": sum(a["correct"] for a in answers) / len(answers), "n": len(answers),
            "mean_tokens": statistics.mean(lengths), "sd_tokens": statistics.pstdev(lengths)}


def _figure(report: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["heldout"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [report["heldout"][n]["accuracy"] for n in names], color="tab:blue")
    axes[0].set_title("held-out accuracy")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [report["heldout"][n]["mean_tokens"] for n in names],
                yerr=[report["heldout"][n]["sd_tokens"] for n in names], color="tab:green", capsize=4)
    axes[1].set_title("held-out answer length (tokens, ± sd)")
    for name, hist in report["train_reward"].items():
        axes[2].plot([h["step"] for h in hist], [h["correctness"] for h in hist], marker=".", label=name)
    axes[2].set_title("training correctness (mean per step)")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def compare(config: Path, out: Path, *, steps: int | None, sar_weight: float, seed: int | None,
            heldout: Path, max_new_tokens: int | None) -> dict[str, Any]:
    from policy_trainer.train import run_training

    correctness = load_run_config(config).rewards.correctness or 1.0  # the exact answer carries both runs
    runs: dict[str, Any] = {}
    for name, w in (("correctness", 0.0), ("correctness+sar", sar_weight)):
        cfg = load_run_config(config, {
            "rewards.sar": w, "rewards.service": 0, "rewards.correctness": correctness,
            "output.output_dir": str(out / name), "output.rollouts_dir": None,
            "training.max_steps": steps, "training.seed": seed})
        runs[name] = (cfg, run_training(cfg))
    cfg0 = runs["correctness"][0]
    cap = max_new_tokens or cfg0.training.max_completion_length
    rows = load_prompt_rows(cfg0.data.model_copy(update={"prompts": str(heldout), "max_prompts": None}),
                            require_answer=True)
    from salmon.modeling import resolve_model_dir

    model_dir = resolve_model_dir(cfg0.policy.model)
    answers = {"initial": answer_heldout(model_dir, None, rows, cap)}
    for name, (_cfg, result) in runs.items():
        answers[name] = answer_heldout(model_dir, result.checkpoint, rows, cap)
    report = {
        "config": str(config), "steps": cfg0.training.max_steps, "seed": cfg0.training.seed,
        "sar_weight": sar_weight, "heldout_file": str(heldout), "max_new_tokens": cap,
        "heldout": {n: summarize(a) for n, a in answers.items()},
        "train_reward": {n: [{"step": h["step"], "correctness": h.get("rewards/correctness/mean"),
                              "sar": h.get("rewards/sar/mean"), "length": h.get("completions/mean_length")}
                             for h in r.log_history if "rewards/correctness/mean" in h]
                         for n, (_c, r) in runs.items()},
        "answers": answers,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sar_compare.json", report)
    atomic_write_bytes(out / "sar_compare.png", _figure(report))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m policy_trainer.sar_compare", description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--out", type=Path, default=Path("runs/sar_compare"))
    ap.add_argument("--steps", type=int, default=None, help="training.max_steps of both runs")
    ap.add_argument("--seed", type=int, default=None, help="training.seed of both runs")
    ap.add_argument("--sar-weight", type=float, default=0.2, help="SAR's weight in the second run (paper: 0.2)")
    ap.add_argument("--heldout", type=Path, default=TOYDATA / "arith_heldout.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="held-out cap (default: the config's)")
    a = ap.parse_args(argv)
    rep = compare(a.config, a.out, steps=a.steps, sar_weight=a.sar_weight, seed=a.seed, heldout=a.heldout,
                  max_new_tokens=a.max_new_tokens)
    for name, s in rep["heldout"].items():
        print(f"{name:>16}: accuracy {s['accuracy']:.1%} of {s['n']}, "
              f"{s['mean_tokens']:.1f} ± {s['sd_tokens']:.1f} tokens")
    print(f"report: {a.out / 'sar_compare.json'}, {a.out / 'sar_compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
