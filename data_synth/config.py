"""Job configs for the synthetic-preference stages, one pydantic model a stage.

Defaults are sized so that ``salmon synth run --prompts 32`` on the embedded SmolLM2-135M finishes on a
laptop CPU in well under 15 minutes; every knob a bigger machine wants (judge endpoint, batch sizes,
LoRA rank, passes) is a field. YAML files are loaded with :func:`salmon.config.load_config`, so a typo
is a one-line error naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GeneratePromptsConfig(_Strict):
    """SELF-ALIGN's topic-guided red-teaming self-instruct: types -> topics -> questions -> filters."""

    model: str = Field(default="embedded", description="Causal LM that brainstorms topics and questions.")
    seeds: Path | None = Field(default=None, description="Seed prompt JSONL (default: the shipped seed set).")
    types: list[str] | None = Field(default=None, description="Question types (default: the built-in list).")
    topics_per_type: int = Field(default=4, ge=1)
    questions_per_topic: int = Field(default=2, ge=1)
    target: int = Field(default=32, ge=1, description="Stop once this many new prompts passed the filters.")
    min_chars: int = Field(default=12, ge=1)
    max_chars: int = Field(default=400, ge=10)
    max_rouge_l: float = Field(default=0.7, gt=0, le=1, description="Drop a prompt whose ROUGE-L F to any kept one is >= this.")
    temperature: float = Field(default=0.9, gt=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=4)
    max_rounds: int = Field(default=8, ge=1, description="Rounds over the types before giving up on `target`.")
    seed: int = 42
    dtype: DType = "auto"
    device: str = "auto"


class SampleConfig(_Strict):
    policy: str = Field(default="embedded", description="Model source of the policy that answers the prompts.")
    num_samples: int = Field(default=2, ge=2, description="Answers per prompt; consecutive answers form pairs.")
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=48, ge=1)
    min_response_chars: int = Field(default=8, ge=1, description="Pairs with a shorter (or empty) answer are dropped.")
    seed: int = 42
    batch_size: int = Field(default=16, ge=1, description="Prompts per generate() call.")
    shard_size: int = Field(default=8, ge=1, description="Prompts per output shard (the unit of resume).")
    dtype: DType = "auto"
    device: str = "auto"


class EndpointConfig(_Strict):
    """An OpenAI-compatible completions server with logprobs, e.g. ``vllm serve <70B judge>``."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8001/v1 (POST {base_url}/completions).")
    model: str = Field(description="Model name the server knows the judge by.")
    api_key_env: str | None = Field(default=None, description="Env var holding a bearer key, if the server needs one.")
    top_logprobs: int = Field(default=20, ge=2, le=20)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    tokenizer: str = Field(default="embedded", description="Local tokenizer whose chat template lays out the judge prompt.")


class JudgeConfig(_Strict):
    source: Literal["auto", "ab", "contrastive"] = Field(
        default="auto",
        description="ab: the judge LM picks Output (a)/(b), both orders. contrastive: the service's "
        "pointwise contrastive scorer. auto: whichever scores better on the labelled check set.",
    )
    backend: Literal["local", "openai"] = Field(default="local", description="Where the A/B judge runs.")
    model: str = Field(default="embedded", description="Local judge model source (backend local, and the contrastive source).")
    endpoint: EndpointConfig | None = None
    principle_set: str = Field(default="rm", description="Reward-model principle set: shipped name or YAML path.")
    principles: list[str] | None = Field(default=None, description="Judge only these principles of the set.")
    prefix_reuse: bool = Field(default=True, description="Run the shared instruction+outputs prefix once per pair and order.")
    batch_size: int = Field(default=16, ge=1, description="Principle suffixes per forward pass.")
    shard_size: int = Field(default=4, ge=1, description="Pairs per output shard (the unit of resume).")
    check_set: Path | None = Field(default=None, description="Labelled flip pairs (default: principles/checks/flip_pairs.jsonl).")
    check_limit: int | None = Field(default=14, ge=1, description="source=auto measures on N evenly spaced check pairs (None: all).")
    dtype: DType = "auto"
    device: str = "auto"

    @model_validator(mode="after")
    def _endpoint(self) -> JudgeConfig:
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend 'openai' needs 'endpoint' (base_url and model)")
        return self


class AggregateConfig(_Strict):
    passes: int = Field(default=4, ge=1, description="Passes over the pairs, each drawing fresh principles.")
    geometric_p: float = Field(default=0.2, gt=0, le=1, description="k ~ Geometric(p): principles per draw.")
    max_k: int = Field(default=8, ge=1)
    negate_prob: float = Field(default=0.5, ge=0, le=1)
    normalize: Literal["variance", "std", "none"] = Field(
        default="variance", description="Per-principle scale normalisation (SALMON divides by the variance)."
    )
    require_order_agreement: bool = Field(default=True, description="A score counts only if both orders agree in sign.")
    rule_overrides: bool = Field(default=False, description="Rule-based labels: 'As an AI language model' loses; an answer in another script than the prompt loses.")
    label_noise: float = Field(default=0.0, ge=0, le=0.5, description="Probability of flipping a label.")
    eval_fraction: float = Field(default=0.2, ge=0, lt=1, description="Share of prompts held out (split by prompt).")
    seed: int = 42


class TrainConfig(_Strict):
    base_model: str = Field(default="embedded", description="Backbone source, recorded in the manifest.")
    registry: Path = Field(default=Path("registry"), description="Registry the new version is published to.")
    init_from: Literal["base", "parent", "shipped"] = Field(
        default="base", description="Start each retrain from the base model, from the CURRENT version's adapter, "
        "or from the RM shipped with salmon (SALMON fine-tunes after preference-model pre-training)."
    )
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_layers: int | None = Field(
        default=None, ge=1,
        description="LoRA on the top N decoder layers only (None: all). The frozen layers below need no backward pass.")
    mixed_precision: Literal["no", "bf16"] = Field(
        default="no", description="bf16 autocast over fp32 weights (faster on CPUs with AVX512-BF16 or AMX).")
    learning_rate: float = Field(default=2e-4, gt=0)
    sampling: Literal["random", "sequential"] = Field(
        default="random", description="Training order: shuffled, or the dataset's own (rm-pretrain keeps the two "
        "halves of each minimal pair in one batch).")
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16, description="Pairs with a longer rendered input are dropped.")
    eval_batch_size: int = Field(default=16, ge=1)
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory (big backbones on GPU).")
    seed: int = 42
    publish: bool = True
    dtype: DType = "auto"
    device: str = "auto"


# The run and watch defaults judge 5 of the rm set's 11 principles: with the contrastive source each principle
# costs ~4 short passes per pair, and 11 of them alone would take most of the 15-minute CPU budget.
RUN_PRINCIPLES = ["concise", "honest_and_accurate", "ethical", "specific", "comprehensive"]


class WatchConfig(_Strict):
    rollouts_dir: Path = Field(description="Where the RL trainer exports <run_id>/step-*.jsonl shards.")
    work_dir: Path = Field(default=Path("runs/watch"), description="Judgments, datasets and state of the loop.")
    min_new_pairs: int = Field(default=32, ge=1, description="Retrain once this many new judged pairs arrived.")
    poll_s: float = Field(default=10.0, gt=0)
    min_response_chars: int = Field(default=8, ge=1)
    max_pairs_per_group: int = Field(default=1, ge=1, description="Pairs formed from one prompt's group.")
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(principles=list(RUN_PRINCIPLES)))
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class SynthRunConfig(_Strict):
    """``salmon synth run``: every stage of ``data_synth.stages.STAGES``, a section for each that has settings."""

    prompts: Path | None = Field(default=None, description="Prompt JSONL (default: the shipped prompt set).")
    num_prompts: int | None = Field(default=32, ge=1, description="Use the first N prompts (None: all).")
    out: Path = Field(default=Path("runs/synth"))
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(principles=list(RUN_PRINCIPLES)))
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
