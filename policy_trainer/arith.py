"""A toy arithmetic prompt set of our own for exact-answer rewards (SAR comparisons): small sums,
differences and products, with held-out questions never trained on.

The shipped files (``policy_trainer/toydata/arith_{train,heldout}.jsonl``) are this generator's
output; ``python -m policy_trainer.arith`` writes them again and a test checks they still match.
Records are prompt JSONL (``{"id", "prompt", "type", "answer"}``), so ``data.prompts`` takes them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from salmon.atomic import atomic_write_jsonl

TOYDATA = Path(__file__).resolve().parent / "toydata"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def arith_questions(n_train: int = 64, n_heldout: int = 32, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint train and held-out questions ``What is a <op> b?`` (operands 2-20, products up to 12 x 12)."""
    rng = random.Random(seed)
    pool = sorted({(a, op, b) for op in OPS for a in range(2, 21) for b in range(2, 21)
                   if (op != "×" or (a <= 12 and b <= 12)) and (op != "-" or a >= b)})
    rng.shuffle(pool)
    picked = pool[:n_train + n_heldout]

    def record(split: str, i: int, a: int, op: str, b: int) -> dict[str, Any]:
        return {"id": f"arith-{split}-{i:03d}", "prompt": f"What is {a} {op} {b}?", "type": "reasoning",
                "answer": str(OPS[op](a, b))}

    train = [record("train", i, *q) for i, q in enumerate(picked[:n_train])]
    held = [record("heldout", i, *q) for i, q in enumerate(picked[n_train:])]
    return train, held


def write_arith(out_dir: Path = TOYDATA) -> tuple[Path, Path]:
    train, held = arith_questions()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "arith_train.jsonl", out_dir / "arith_heldout.jsonl"
    atomic_write_jsonl(paths[0], train)
    atomic_write_jsonl(paths[1], held)
    return paths


if __name__ == "__main__":
    for p in write_arith():
        print(p)
