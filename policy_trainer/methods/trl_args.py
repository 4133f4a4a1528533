"""RunConfig -> TRL config arguments, in the groups TRL's configs share.

- ``common_args``: what every TRL trainer takes (transformers' TrainingArguments plus TRL's
  ``model_init_kwargs``): steps, optimiser, batch, checkpoints, logging, placement and precision.
  A method on any TRL trainer (GRPO, RLOO, DPO, SFT) starts from these.
- ``online_args``: what TRL's online RL trainers (GRPOConfig, RLOOConfig) add: the group of
  completions per prompt, sampling, the KL and clipping terms, vLLM generation.
- Each method adds its own fields (e.g. GRPO's ``scale_rewards``) in its own module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from policy_trainer.config import RunConfig


def common_args(cfg: RunConfig) -> dict[str, Any]:
    """The TrainingArguments fields (and ``model_init_kwargs``) every TRL config accepts."""
    from salmon.modeling import pick_attention, pick_device_and_precision, pick_dtype

    t, o = cfg.training, cfg.output
    use_cpu = cfg.distributed.use_cpu
    device, precision = pick_device_and_precision("cpu" if use_cpu else "auto", t.precision)
    args: dict[str, Any] = dict(
        output_dir=str(o.output_dir), max_steps=t.max_steps, learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        seed=t.seed, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm, logging_steps=o.logging_steps,
        save_strategy="steps", save_steps=o.save_steps, save_total_limit=o.save_total_limit,
        report_to=["tensorboard"] if o.tensorboard else "none", use_cpu=device.type == "cpu" if use_cpu is None else use_cpu,
        gradient_checkpointing=cfg.policy.gradient_checkpointing,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        # Strings, not torch dtypes: TRL stores these args in every checkpoint as JSON.
        model_init_kwargs={"dtype": str(pick_dtype(cfg.policy.dtype, device)).removeprefix("torch."),
                           "attn_implementation": pick_attention(cfg.policy.attention, device)},
        bf16=precision == "bf16", fp16=precision == "fp16",
    )
    if cfg.distributed.deepspeed:
        args["deepspeed"] = cfg.distributed.deepspeed
    return args


def online_args(cfg: RunConfig) -> dict[str, Any]:
    """The fields GRPOConfig and RLOOConfig share beyond ``common_args``."""
    t, g = cfg.training, cfg.generation
    args: dict[str, Any] = dict(
        num_generations=t.num_generations, max_completion_length=t.max_completion_length,
        temperature=t.temperature, top_p=t.top_p, beta=t.beta, num_iterations=t.num_iterations,
        epsilon=t.epsilon, mask_truncated_completions=t.mask_truncated_completions,
        log_completions=cfg.output.log_completions,
    )
    if g.use_vllm:
        args.update(use_vllm=True, vllm_mode=g.vllm_mode, vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                    vllm_tensor_parallel_size=g.vllm_tensor_parallel_size)
        if g.vllm_server_base_url:
            args["vllm_server_base_url"] = g.vllm_server_base_url
    return args


def peft_config(cfg: RunConfig) -> Any:
    """PEFT's LoraConfig for ``policy.lora`` (None when LoRA is off: all weights train)."""
    if not cfg.policy.lora.enabled:
        return None
    from peft import LoraConfig

    lc = cfg.policy.lora
    return LoraConfig(task_type="CAUSAL_LM", r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                      target_modules=lc.target_modules)
