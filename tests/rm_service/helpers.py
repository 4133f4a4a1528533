"""Test helpers for the service: tiny trained registry versions."""

from __future__ import annotations

from pathlib import Path

import torch

from rm_core.registry import Registry
from rm_core.render import PROMPT_FORMAT_VERSION


def publish_tiny_version(registry: Path, base_model: Path, seed: int, tmp: Path, mean: float = 0.0,
                         std: float = 1.0) -> str:
    """A LoRA + scalar head over the tiny backbone, with seeded random weights, published."""
    build, manifest = build_tiny_version(base_model, seed, tmp, mean, std)
    return Registry(registry).publish(build, manifest)


def build_tiny_version(base_model: Path, seed: int, tmp: Path, mean: float = 0.0, std: float = 1.0
                       ) -> tuple[Path, dict]:
    """The build directory and manifest of :func:`publish_tiny_version`, not yet published (so another
    process can publish it)."""
    from peft import LoraConfig, get_peft_model

    from salmon.modeling import load_sequence_classifier

    torch.manual_seed(seed)
    model = load_sequence_classifier(str(base_model))
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n or "score" in n:
                p.normal_(0, 0.5)
    build = tmp / f"build-{seed}"
    peft.save_pretrained(build / "adapter")
    return build, {
        "base_model": str(base_model), "adapter": "adapter", "reward_mean": mean, "reward_std": std,
        "prompt_format_version": PROMPT_FORMAT_VERSION, "data_hash": f"seed{seed}",
    }
