"""The ``ppo:`` section of the run config (read only when ``algorithm: ppo``).

Defaults are SALMON's PPO (AlpacaFarm-derived, as IBM/SALMON releases it) where it states
them: KL 0.01 with k1 clamped at 0, GAE gamma = lambda = 1, clip 0.2, vf_coef 0.1. The rest of a
PPO run (policy, data, reward service, principles, shaping, generation, output) uses the same
sections as GRPO: ``training.per_device_train_batch_size * gradient_accumulation_steps``
completions are generated per step (``num_generations`` per prompt), ``training.learning_rate``,
``temperature``, ``max_completion_length``, ``max_grad_norm`` and ``seed`` mean what they mean there.

    algorithm: ppo
    ppo: {ppo_epochs: 4, num_minibatches: 2, kl_coef: 0.01, vf_coef: 0.1,
          value_init: {registry: runs/registry}}
"""

from __future__ import annotations

from pydantic import Field, model_validator

from policy_trainer.section import Section


class AdaptiveKLSettings(Section):
    enabled: bool = Field(default=False, description="Adapt kl_coef so the per-sequence KL tracks target "
                          "(Ziegler et al.'s proportional controller). Off: kl_coef is fixed (SALMON).")
    target: float = Field(default=6.0, gt=0, description="Target KL per sequence (nats).")
    horizon: int = Field(default=10000, ge=1, description="Sequences over which the coefficient may move by ~20%.")


class ValueLoraSettings(Section):
    r: int | None = Field(default=None, ge=1, description="Rank of the value adapter (None: policy.lora.r).")
    alpha: int | None = Field(default=None, ge=1, description="None: policy.lora.alpha.")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="None: policy.lora.dropout.")
    target_modules: list[str] | str | None = Field(default=None, description="None: policy.lora.target_modules.")


class ValueInitSettings(Section):
    registry: str | None = Field(default=None, description="Reward-model registry to initialise the value "
                                 "adapter and head from (SALMON initialised its value model from the RM). "
                                 "The version's base model must be the policy's. None: a fresh adapter, zero head.")
    version: str | None = Field(default=None, description="Registry version (None: the registry's CURRENT).")


class PPOSettings(Section):
    ppo_epochs: int = Field(default=4, ge=1, description="Optimisation passes over each rollout batch.")
    num_minibatches: int = Field(default=2, ge=1, description="Minibatches per pass (one optimizer step each); "
                                 "must divide the rollout batch.")
    kl_coef: float = Field(default=0.01, ge=0, description="Per-token KL penalty coefficient (SALMON: 0.01); "
                           "the initial value when adaptive_kl is on.")
    clamp_kl: bool = Field(default=True, description="Clamp the per-token k1 estimate at 0 (AlpacaFarm/SALMON).")
    adaptive_kl: AdaptiveKLSettings = Field(default_factory=AdaptiveKLSettings)
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount (SALMON: 1).")
    lam: float = Field(default=1.0, ge=0, le=1, description="GAE lambda (SALMON: 1).")
    cliprange: float = Field(default=0.2, gt=0, description="Policy ratio clip (SALMON: 0.2).")
    cliprange_value: float = Field(default=0.2, gt=0, description="Value clip around the rollout values.")
    vf_coef: float = Field(default=0.1, ge=0, description="Weight of the value loss (SALMON: 0.1).")
    whiten_rewards: bool = Field(default=False, description="Whiten per-token rewards before GAE (keeps the "
                                 "mean: only rescales); advantages are always whitened.")
    value_learning_rate: float | None = Field(default=None, gt=0, description="None: training.learning_rate.")
    value_lora: ValueLoraSettings = Field(default_factory=ValueLoraSettings)
    value_init: ValueInitSettings = Field(default_factory=ValueInitSettings)

    @model_validator(mode="after")
    def _version_needs_registry(self) -> PPOSettings:
        if self.value_init.version and not self.value_init.registry:
            raise ValueError("value_init.version needs value_init.registry")
        return self
