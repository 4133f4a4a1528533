"""The run config of `salmon train --config run.yaml`: every field documented, defaults that run on a CPU.

One YAML file says everything about a run; a GPU run changes fields (precision, vLLM generation,
DeepSpeed), never code. Unknown fields are errors (typos must not silently fall back to defaults).
Loading goes through ``salmon.config`` so every error is one line naming the file and the field.

    algorithm: grpo            # a method of policy_trainer.methods (grpo, rloo, ppo, sami, dno, savi, sft: knobs in ppo:, sami:, dno:, savi:, sft:)
    policy: {model: embedded}
    reward: {url: http://127.0.0.1:8000}
    principles: {set: rl, intervention: intervention, select_k: 3, schedule: [{step: 50, set: harmless}]}
    training: {max_steps: 20, num_generations: 4}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from policy_trainer.iterative_config import DNOSettings, SAMISettings
from policy_trainer.methods import method_names
from policy_trainer.ppo_config import PPOSettings
from policy_trainer.savi_config import SAVISettings
from policy_trainer.section import Section
from policy_trainer.sft_config import SFTSettings
from salmon.config import load_yaml, validate_config


class LoraSettings(Section):
    enabled: bool = Field(default=True, description="Train a LoRA adapter (PEFT) instead of all weights; the "
                          "reference model for the KL term is then the base with the adapter disabled (no copy).")
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(default="all-linear", description="Module names, or 'all-linear'.")


class PolicyConfig(Section):
    model: str = Field(default="embedded", description="Policy to train: 'embedded' (SmolLM2-135M-Instruct shipped "
                       "with salmon), a .gguf file or a local Hugging Face directory. Never downloaded.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype when loading; auto = bf16 on CUDA, fp32 on CPU.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto", description="Attention kernel; auto = flash-attn on CUDA when installed, else sdpa.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory (large policies).")


class DataConfig(Section):
    prompts: str | None = Field(default=None, description="JSONL of {id, prompt, type}; prompt is text or chat "
                                "messages; type is general | reasoning | redteam. Default: the prompts shipped "
                                "with data_synth (data_synth/data/prompts.jsonl).")
    max_prompts: int | None = Field(default=None, ge=1, description="Use only the first N prompts.")
    types: list[str] | None = Field(default=None, description="Keep only prompts of these types.")
    system_prompt: str | None = Field(default=None, description="System message put before every prompt.")


class RetryConfig(Section):
    max_attempts: int | None = Field(default=None, ge=1, description="At most this many tries per request "
                                     "(1 = no retry; unset: no count, budget_s alone decides). Retried: 429, "
                                     "5xx, connection errors and timeouts; never other 4xx.")
    initial_backoff_s: float = Field(default=0.5, gt=0, description="First wait; doubles per retry.")
    max_backoff_s: float = Field(default=10.0, gt=0, description="Cap on one wait (before jitter).")
    jitter: float = Field(default=0.5, ge=0, le=1, description="Fraction of each wait drawn at random, so that "
                          "replicas and ranks do not retry in lockstep.")
    budget_s: float = Field(default=120.0, gt=0, description="Keep retrying for this many seconds since the "
                            "first failed try (a service restart that ends within it is ridden out; a Retry-After "
                            "past it gives up at once); then the step fails, the trainer checkpoints and "
                            "exits non-zero.")


class RewardConfig(Section):
    url: str = Field(default="http://127.0.0.1:8000", description="Base URL of the reward service "
                     "(salmon rm_service, or any OpenRLHF-style /get_reward server with protocol: openrlhf).")
    protocol: Literal["salmon", "openrlhf"] = Field(
        default="salmon", description="salmon: POST /v1/score with per-prompt principles. openrlhf: POST "
        "/get_reward with chat-templated text; the principle set goes in the X-Principle-Set header.")
    mode: Literal["pointwise", "rubric", "listwise"] = Field(
        default="pointwise", description="How the service scores (protocol salmon; sent as X-Score-Mode): "
        "pointwise, one score per completion; rubric, the mean of per-principle ratings on the set's scale "
        "(the set needs a 'rubric'); listwise, a prompt's completions ranked together, each scored with the "
        "others shown.")
    api_key_env: str = Field(default="SALMON_API_KEY", description="Env var holding the Bearer key (unset: none).")
    admin_key_env: str = Field(default="SALMON_ADMIN_KEY", description="Env var holding the key for registering "
                               "principle sets (unset: the API key is used).")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0, description="Per request; a slow batch is retried after it.")
    max_connections: int = Field(default=8, ge=1, description="Pooled keep-alive connections to the service.")
    max_concurrent_requests: int = Field(default=4, ge=1, description="Requests of one batch in flight at once.")
    max_items_per_request: int | None = Field(
        default=None, ge=1, description="Items per request. None: the server's own limit (GET /v1/model "
        "limits.max_items) for salmon, 64 for openrlhf.")
    register_sets: bool = Field(default=True, description="PUT the run's principle sets to the service at start "
                                "and on every switch (needs the admin key when the service has one).")
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in {"http", "https"} or not u.netloc:
            raise ValueError(f"{v!r} is not an http(s) URL such as http://127.0.0.1:8000")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _mode_needs_salmon(self) -> RewardConfig:
        if self.mode != "pointwise" and self.protocol != "salmon":
            raise ValueError(f"mode {self.mode} needs protocol salmon (/get_reward scores pointwise)")
        return self


class SwitchConfig(Section):
    step: int = Field(ge=0, description="Global step from which the set applies.")
    set: str = Field(description="Principle set: a shipped name, a YAML path, or a name registered on the service.")


class PrinciplesConfig(Section):
    set: str = Field(default="concise", description="Principle set for the run: shipped name (principles/*.yaml), "
                     "a YAML path, or a name already registered on the service. Registered at start and "
                     "referred to as name@hash.")
    schedule: list[SwitchConfig] = Field(default_factory=list, description="Switch sets at given steps "
                                         "(hot-swap mid-run); each switch is logged and in the report.")
    control_file: str | None = Field(default=None, description="A file the user may write a set (name or path) "
                                     "into while the run goes; read before every step, a change switches sets.")
    select_k: int | None = Field(default=None, ge=1, description="SALMON's RL-time selection: per prompt, sample "
                                 "k principles of the set without replacement by weight. None: the whole set.")
    intervention: str | None = Field(default=None, description="Set whose principles are added to every "
                                     "prompt's selection (SALMON's intervention principles), e.g. 'intervention'.")
    type_boost: float = Field(default=128.0, ge=0, description="Added to the weight of principles whose tags or "
                              "name match the prompt's type (see type_tags); SALMON uses +128.")
    type_tags: dict[str, list[str]] = Field(
        default_factory=lambda: {"reasoning": ["reasoning", "numerical"],
                                 "redteam": ["redteam", "safety", "ethical", "harmless"]},
        description="Prompt type -> tags (or principle names) boosted for prompts of that type.")
    seed: int = Field(default=0, description="Selection seed; with the step and prompt id it fixes every draw, "
                      "so a resumed run selects exactly what the interrupted one would have.")

    @field_validator("schedule")
    @classmethod
    def _increasing(cls, v: list[SwitchConfig]) -> list[SwitchConfig]:
        steps = [s.step for s in v]
        if steps != sorted(set(steps)):
            raise ValueError("steps must be strictly increasing")
        return v


class LengthBonusConfig(Section):
    enabled: bool = Field(default=False, description="SALMON's capped length bonus: "
                          "scale * min(tokens / per_tokens * multiplier[type], cap).")
    scale: float = Field(default=5.0, description="SALMON: 5.")
    per_tokens: int = Field(default=1024, ge=1, description="SALMON: 1024.")
    cap: float = Field(default=0.8, description="SALMON: 0.8.")
    multipliers: dict[str, float] = Field(default_factory=lambda: {"general": 1.0, "reasoning": -0.4, "redteam": 1.0},
                                          description="Per prompt type; SALMON: general 1.0, reasoning -0.4.")
    default_multiplier: float = Field(default=1.0, description="For prompt types not listed.")


class ShapingConfig(Section):
    rm_scale: float = Field(default=1.0, description="Multiplies the service's score (SALMON's PPO used 10).")
    normalize: Literal["none", "running"] = Field(
        default="none", description="running: whiten service scores with a running mean/std kept in the "
        "checkpoint. (Group/batch scaling of advantages is TRL's: training.scale_rewards / normalize_advantages.)")
    length_bonus: LengthBonusConfig = Field(default_factory=LengthBonusConfig)
    unfinished_penalty: float = Field(default=0.0, ge=0, description="Subtracted when a completion hits "
                                      "max_completion_length without an end-of-sequence token.")


class RewardsConfig(Section):
    """Which reward functions TRL combines, and their weights (TRL's reward_weights)."""

    service: float = Field(default=1.0, ge=0, description="Weight of the reward service's score; 0: the run "
                           "never contacts reward.url (the shaping terms come with the service's score).")
    correctness: float = Field(default=0.0, ge=0, description="Weight of the exact-answer check (1 when the "
                               "completion's answer, the number after its last '=' else its last number, equals "
                               "the prompt's 'answer', else 0); needs 'answer' in every prompt record. 0: off.")
    sar: float = Field(default=0.0, ge=0, description="Weight of SAR, the self-aligned reward computed with the "
                       "live policy: max((ppl(a) - ppl(a|q)) / ppl(a), -1). The SAR paper: correctness 1, sar 0.2. "
                       "0: off. GRPO and RLOO only.")
    sar_max_batch_tokens: int = Field(default=4096, ge=1, description="Token budget of one SAR forward batch.")

    @model_validator(mode="after")
    def _some_reward(self) -> RewardsConfig:
        if not (self.service or self.correctness or self.sar):
            raise ValueError("every weight is 0; give service, correctness or sar a weight above 0")
        return self


class TrainingConfig(Section):
    max_steps: int = Field(default=20, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(default=5e-5, gt=0)
    per_device_train_batch_size: int = Field(default=4, ge=1, description="Completions per device per micro-step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    num_generations: int = Field(default=4, ge=2, description="Completions per prompt (the group).")
    max_completion_length: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.7, gt=0, description="SALMON sampled at 0.7.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=0.01, ge=0, description="KL-to-reference coefficient, as TRL computes it "
                        "(GRPO: in the loss; RLOO: in the reward). SALMON: 0.01. 0 skips the reference pass.")
    num_iterations: int = Field(default=1, ge=1, description="Optimisation passes per generation batch.")
    epsilon: float = Field(default=0.2, gt=0, description="Clipping range (SALMON: 0.2).")
    scale_rewards: Literal["group", "batch", "none"] = Field(default="group", description="GRPO only (TRL).")
    loss_type: str | None = Field(default=None, description="GRPO only: TRL's loss_type (None: TRL's default).")
    normalize_advantages: bool = Field(default=False, description="RLOO only (TRL).")
    mask_truncated_completions: bool = Field(default=False, description="TRL: exclude truncated completions "
                                             "from the loss (an alternative to shaping.unfinished_penalty).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(default="auto", description="Mixed precision; "
                                                               "auto = bf16 on CUDA, fp32 on CPU.")
    seed: int = 42
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _groups_fit(self) -> TrainingConfig:
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * gradient_accumulation_steps ({per_step}) must be a multiple of "
                f"num_generations ({self.num_generations}) so that every prompt's group is complete"
            )
        return self


class GenerationConfig(Section):
    use_vllm: bool = Field(default=False, description="Generate with vLLM through TRL (GPU; `pip install vllm`).")
    vllm_mode: Literal["colocate", "server"] = Field(default="colocate", description="colocate: vLLM in the "
                                                     "trainer processes; server: a `trl vllm-serve` process.")
    vllm_server_base_url: str | None = Field(default=None, description="server mode, e.g. http://gen:8000.")
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0, le=1, description="colocate mode.")
    vllm_tensor_parallel_size: int = Field(default=1, ge=1, description="colocate mode.")


class OutputConfig(Section):
    output_dir: Path = Field(default=Path("runs/train"), description="Checkpoints, TensorBoard logs, report.")
    run_id: str | None = Field(default=None, description="Names the run in rollouts and logs (default: the "
                               "output_dir's name, so a rerun with the same config resumes the same run).")
    rollouts_dir: Path | None = Field(default=Path("runs/rollouts"), description="Rollout shards go to "
                                      "<rollouts_dir>/<run_id>/step-XXXXXXXX.jsonl; None disables export.")
    save_steps: int = Field(default=10, ge=1, description="Checkpoint every N steps (and at the end).")
    save_total_limit: int | None = Field(default=3, ge=1, description="Keep the newest N checkpoints.")
    logging_steps: int = Field(default=1, ge=1)
    tensorboard: bool = Field(default=True, description="Write TensorBoard logs under output_dir/runs.")
    report: bool = Field(default=True, description="Write report.json and report.png at the end.")
    resume: Literal["auto", "never"] = Field(default="auto", description="auto: continue from the newest "
                                            "checkpoint in output_dir if there is one.")
    log_completions: bool = Field(default=False, description="TRL: print a sample of completions when logging.")


class DistributedConfig(Section):
    deepspeed: str | None = Field(default=None, description="DeepSpeed JSON passed to the trainer (or use an "
                                  "accelerate config from policy_trainer/configs/accelerate/ at launch).")
    use_cpu: bool | None = Field(default=None, description="Force CPU; None: CPU when no CUDA device is visible.")
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (None: torch's "
                                    "default). On a shared CPU, 1 avoids OpenMP threads spinning against "
                                    "other processes: measured 8 s/step with 1 thread vs 13-50 s with 2.")


class RunConfig(Section):
    """Everything about one RL run. See docs/scaling.md for multi-GPU launches."""

    algorithm: str = Field(
        default="grpo", description="The training method: a name in the method table (policy_trainer.methods; "
        "`salmon train --help` lists them). A method with settings of its own reads them from the section "
        "of its name (ppo: for ppo).")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    principles: PrinciplesConfig = Field(default_factory=PrinciplesConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    ppo: PPOSettings = Field(default_factory=PPOSettings, description="PPO only (algorithm: ppo).")
    sami: SAMISettings = Field(default_factory=SAMISettings, description="SAMI only (algorithm: sami).")
    dno: DNOSettings = Field(default_factory=DNOSettings, description="DNO only (algorithm: dno).")
    savi: SAVISettings = Field(default_factory=SAVISettings, description="VideoSAVi only (algorithm: savi).")
    sft: SFTSettings = Field(default_factory=SFTSettings, description="Supervised fine-tuning only (algorithm: sft).")

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, v: str) -> str:
        names = method_names()  # read at validation time, so a method registered later is offered too
        if v not in names:
            raise ValueError(f"{v!r} is not a registered method; choose one of: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _shaping_needs_service(self) -> RunConfig:
        sh = self.shaping
        if not self.rewards.service and (sh.length_bonus.enabled or sh.unfinished_penalty):
            raise ValueError("shaping: the length bonus and unfinished penalty come with the service's score; "
                             "set rewards.service above 0 or turn them off")
        return self

    @property
    def run_id(self) -> str:
        return self.output.run_id or self.output.output_dir.resolve().name


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "reward.url", u)``: command-line overrides of nested fields."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[leaf] = value


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from YAML (or defaults) with dotted ``overrides``; errors are one line (UserError)."""
    data = load_yaml(path) if path else {}
    if isinstance(data, dict):
        for k, v in (overrides or {}).items():
            if v is not None:
                set_dotted(data, k, v)
    return validate_config(RunConfig, data, str(path) if path else "config")
