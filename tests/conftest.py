"""Shared fixtures: a tiny random-init model with the REAL tokenizer, and cache placement.

Plumbing tests use the tiny model (fast, deterministic); tests marked ``slow`` load the real
embedded SmolLM2-135M. The first run converts the embedded GGUF once (~60 s) into the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Keep the converted model between local runs; CI starts from a clean checkout and converts once.
os.environ.setdefault("SALMON_CACHE_DIR", str(REPO / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_tiny_model(out: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A LlamaConfig model small enough to run in milliseconds, saved with the embedded tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from salmon.modeling import load_tokenizer

    tok = load_tokenizer("embedded")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from salmon.modeling import load_tokenizer

    return load_tokenizer("embedded")
