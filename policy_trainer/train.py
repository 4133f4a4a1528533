"""``run_training(config) -> RunResult``: one RL run (GRPO or RLOO on TRL, or our PPO), rewards over HTTP.

What it does, in order:

1. Talks to the reward service first (limits, principle sets), so a wrong URL, key or set name
   fails in seconds with one line instead of after the model is loaded.
2. Registers the run's principle sets (start, scheduled, intervention) and refers to each as
   ``name@hash`` from then on.
3. Builds the TRL trainer (LoRA via PEFT, policy from salmon.modeling) with two reward functions:
   the service's score and SALMON's shaping terms (see policy_trainer.rewards); for PPO, our
   PPOTrainer (policy_trainer.ppo) over the same reward callables, callbacks and checkpoint layout.
4. Trains, resuming from the newest checkpoint in ``output.output_dir`` when there is one.
5. If the service stays unreachable past the retry budget: saves a checkpoint and raises
   :class:`TrainingAborted` (``salmon train`` exits 3 with the URL and the last error).
6. Writes report.json + report.png and returns a :class:`RunResult`.

``salmon demo`` and tests call this directly; ``salmon train --config run.yaml`` wraps it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from policy_trainer.config import RunConfig
from policy_trainer.principles_select import PrincipleSelector, SetTimeline
from policy_trainer.report import StepTimer, build_report, write_report
from policy_trainer.rewards import ServiceReward, ShapingReward
from policy_trainer.rm_client import RetryPolicy, RewardClient, RewardServiceError
from policy_trainer.rollouts import RolloutWriter
from policy_trainer.shaping import RunningNormalizer
from principles.schema import NAME_RE, PrincipleSet, PrincipleSetError, load_principle_set
from salmon.atomic import atomic_write_json
from salmon.errors import Unavailable, UserError

log = logging.getLogger(__name__)

STATE_FILE = "salmon_state.json"


class TrainingAborted(Unavailable):
    """The run stopped because the reward service stayed unreachable; a checkpoint was saved."""

    def __init__(self, message: str, *, url: str, checkpoint: Path | None, global_step: int):
        super().__init__(message)
        self.url, self.checkpoint, self.global_step = url, checkpoint, global_step


@dataclass
class RunResult:
    run_id: str
    algorithm: str
    output_dir: Path
    global_step: int
    checkpoint: Path | None
    report_json: Path | None
    report_png: Path | None
    rollouts_dir: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    principle_set_timeline: list[dict] = field(default_factory=list)
    log_history: list[dict] = field(default_factory=list)


def make_client(cfg: RunConfig, render_query=None) -> RewardClient:
    r = cfg.reward
    return RewardClient(
        r.url, protocol=r.protocol, api_key=os.environ.get(r.api_key_env) or None,
        admin_key=os.environ.get(r.admin_key_env) or None, connect_timeout_s=r.connect_timeout_s,
        read_timeout_s=r.read_timeout_s, max_connections=r.max_connections,
        max_concurrent_requests=r.max_concurrent_requests, max_items=r.max_items_per_request,
        retry=RetryPolicy.from_config(r.retry), render_query=render_query)


class SetResolver:
    """Set source (shipped name, YAML path, or a name registered on the service) -> registered set."""

    def __init__(self, cfg: RunConfig, client: RewardClient):
        self.cfg, self.client = cfg, client

    async def __call__(self, source: str, field_name: str = "principles.set") -> PrincipleSet:
        try:
            pset = load_principle_set(source)
        except PrincipleSetError as e:
            bare = NAME_RE.match(source) and not Path(source).suffix and "/" not in source
            if not (bare and self.cfg.reward.protocol == "salmon"):
                raise UserError(f"{field_name}: {e}") from None
            try:
                pset = await self.client.fetch_set(source)
            except RewardServiceError as e2:
                if e2.status == 404:
                    raise UserError(f"{field_name}: {e}; nor is {source!r} registered on {self.cfg.reward.url}") from None
                raise
        if self.cfg.reward.register_sets and self.cfg.reward.protocol == "salmon":
            await self.client.register_set(pset)
        return pset


async def _setup(cfg: RunConfig, client: RewardClient) -> tuple[SetTimeline, PrincipleSelector]:
    resolve = SetResolver(cfg, client)
    try:
        await client.limits()
        start = await resolve(cfg.principles.set)
        schedule = [(s.step, await resolve(s.set, f"principles.schedule.{i}.set"))
                    for i, s in enumerate(cfg.principles.schedule)]
        intervention = (await resolve(cfg.principles.intervention, "principles.intervention")
                        if cfg.principles.intervention else None)
    finally:
        await client.aclose()
    p = cfg.principles
    selector = PrincipleSelector(k=p.select_k, intervention=intervention, type_boost=p.type_boost,
                                 type_tags=p.type_tags, seed=p.seed)
    return SetTimeline(start, schedule, control_file=p.control_file), selector


class _SalmonState(TrainerCallback):
    """Saves what TRL's checkpoint lacks (principle timeline, normaliser, step timings) beside it."""

    def __init__(self, timeline: SetTimeline, normalizer: RunningNormalizer, timer: StepTimer, run_id: str):
        self.timeline, self.normalizer, self.timer, self.run_id = timeline, normalizer, timer, run_id

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "timeline": self.timeline.state_dict(),
                "normalizer": self.normalizer.state_dict(), "steps": self.timer.state_dict()}

    def write(self, ckpt: Path) -> None:
        if ckpt.is_dir():
            atomic_write_json(ckpt / STATE_FILE, self.state())

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _precision(cfg: RunConfig) -> dict[str, bool]:
    import torch

    p = cfg.training.precision
    if p == "auto":
        p = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def trl_common_args(cfg: RunConfig) -> dict[str, Any]:
    """The GRPOConfig/RLOOConfig fields both algorithms share."""
    import torch

    from salmon.modeling import pick_attention, pick_device, pick_dtype

    t, o, g = cfg.training, cfg.output, cfg.generation
    use_cpu = cfg.distributed.use_cpu if cfg.distributed.use_cpu is not None else not torch.cuda.is_available()
    device = pick_device("cpu" if use_cpu else "auto")
    args: dict[str, Any] = dict(
        output_dir=str(o.output_dir), max_steps=t.max_steps, learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_generations=t.num_generations,
        max_completion_length=t.max_completion_length, temperature=t.temperature, top_p=t.top_p, beta=t.beta,
        num_iterations=t.num_iterations, epsilon=t.epsilon, mask_truncated_completions=t.mask_truncated_completions,
        seed=t.seed, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm, logging_steps=o.logging_steps,
        save_strategy="steps", save_steps=o.save_steps, save_total_limit=o.save_total_limit,
        report_to=["tensorboard"] if o.tensorboard else "none", use_cpu=use_cpu,
        gradient_checkpointing=cfg.policy.gradient_checkpointing, log_completions=o.log_completions,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        # Strings, not torch dtypes: TRL stores these args in every checkpoint as JSON.
        model_init_kwargs={"dtype": str(pick_dtype(cfg.policy.dtype, device)).removeprefix("torch."),
                           "attn_implementation": pick_attention(cfg.policy.attention, device)},
        **_precision(cfg),
    )
    if cfg.distributed.deepspeed:
        args["deepspeed"] = cfg.distributed.deepspeed
    if g.use_vllm:
        args.update(use_vllm=True, vllm_mode=g.vllm_mode, vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                    vllm_tensor_parallel_size=g.vllm_tensor_parallel_size)
        if g.vllm_server_base_url:
            args["vllm_server_base_url"] = g.vllm_server_base_url
    return args


def _peft_config(cfg: RunConfig):
    if not cfg.policy.lora.enabled:
        return None
    from peft import LoraConfig

    lc = cfg.policy.lora
    return LoraConfig(task_type="CAUSAL_LM", r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                      target_modules=lc.target_modules)


def _last_checkpoint(cfg: RunConfig) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    out = cfg.output.output_dir
    if cfg.output.resume != "auto" or not out.is_dir():
        return None
    last = get_last_checkpoint(str(out))
    return Path(last) if last else None


def _checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])


def run_training(config: RunConfig, *, callbacks: list[TrainerCallback] | None = None) -> RunResult:
    """Run RL as ``config`` says. Raises UserError for bad input, TrainingAborted when the reward
    service stays away past the retry budget (after saving a checkpoint to resume from)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # salmon never downloads; fail instead of fetching
    from salmon.modeling import ModelSourceError, load_tokenizer, resolve_model_dir

    cfg = config
    if cfg.generation.use_vllm and importlib.util.find_spec("vllm") is None:
        # Checked here, not when validating: a GPU config must still validate on a CPU laptop.
        raise UserError("generation.use_vllm: vllm is not installed (pip install vllm on the GPU machine)")
    if cfg.distributed.num_threads:
        import torch

        torch.set_num_threads(cfg.distributed.num_threads)
    run_id = cfg.run_id
    out = cfg.output.output_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = resolve_model_dir(cfg.policy.model)
    except ModelSourceError as e:
        raise UserError(f"policy.model: {e}") from None

    render_query = None
    if cfg.reward.protocol == "openrlhf":
        tok = load_tokenizer(model_dir)

        def render_query(prompt: Any, response: str) -> str:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if response:
                return tok.apply_chat_template([*msgs, {"role": "assistant", "content": response}], tokenize=False)
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    client = make_client(cfg, render_query)
    try:
        timeline, selector = asyncio.run(_setup(cfg, client))
    except RewardServiceError as e:
        if not e.retryable:  # a wrong key, path or set: the user fixes the config
            raise UserError(f"reward.url: {e}") from None
        raise TrainingAborted(f"{e}; no step had run", url=e.url, checkpoint=None, global_step=0) from e

    from policy_trainer.data import load_prompt_dataset

    dataset = load_prompt_dataset(cfg.data)
    normalizer = RunningNormalizer()
    writer = RolloutWriter(cfg.output.rollouts_dir, run_id) if cfg.output.rollouts_dir else None
    rm = ServiceReward(client, timeline, selector, cfg.shaping, run_id=run_id, writer=writer,
                       normalizer=normalizer, resolve_set=SetResolver(cfg, client))
    reward_funcs: list[Any] = [rm]
    shaping = None
    if cfg.shaping.length_bonus.enabled or cfg.shaping.unfinished_penalty:
        shaping = ShapingReward(cfg.shaping)
        reward_funcs.append(shaping)

    timer = StepTimer(rm.wait_by_step, rm.set_by_step)
    saver = _SalmonState(timeline, normalizer, timer, run_id)
    ckpt = _last_checkpoint(cfg)
    if ckpt is not None:
        step = _checkpoint_step(ckpt)
        state_path = ckpt / STATE_FILE
        if state_path.is_file():
            st = json.loads(state_path.read_text())
            timeline.load_state_dict(st.get("timeline", {}), step)
            normalizer.load_state_dict(st.get("normalizer", normalizer.state_dict()))
            timer.load_state_dict(st.get("steps", []), step)
        log.warning("resuming run %s from %s (step %d)", run_id, ckpt, step)

    trainer: Any
    if cfg.algorithm == "ppo":  # ours (TRL has no PPO any more); same rewards, callbacks and report
        from policy_trainer.ppo import PPOTrainer

        trainer = PPOTrainer(cfg, model_dir=model_dir, train_dataset=dataset, reward=rm, shaping=shaping,
                             callbacks=[timer, saver, *(callbacks or [])])
    else:
        builder = {"grpo": "policy_trainer.grpo", "rloo": "policy_trainer.rloo"}[cfg.algorithm]
        trainer = importlib.import_module(builder).build_trainer(
            cfg, model=str(model_dir), common=trl_common_args(cfg), reward_funcs=reward_funcs,
            train_dataset=dataset, peft_config=_peft_config(cfg), callbacks=[timer, saver, *(callbacks or [])])
    eos = list(getattr(trainer, "eos_token_ids", None) or [trainer.processing_class.eos_token_id])
    rm.eos_token_ids = eos
    if shaping is not None:
        shaping.eos_token_ids = eos
    if writer is not None:
        writer.rank = trainer.accelerator.process_index
    if cfg.algorithm != "ppo":  # PPOTrainer hands the timer its own writer when training starts
        from transformers.integrations import TensorBoardCallback

        timer.tb_callback = next((c for c in trainer.callback_handler.callbacks
                                  if isinstance(c, TensorBoardCallback)), None)

    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except RewardServiceError as e:
        step = trainer.state.global_step
        saved = None
        if step > 0:
            # Nothing of the failed step was applied (its generation batch never got rewards), so
            # the weights, optimizer and data position are exactly "after step N": resumable.
            trainer._save_checkpoint(trainer.model, trial=None)
            saved = out / f"checkpoint-{step}"
            saver.write(saved)
        where = f"checkpoint {saved} (step {step}); rerun the same command to resume" if saved else \
            "no step had finished, so there is nothing to resume"
        raise TrainingAborted(f"{e}; {where}", url=e.url, checkpoint=saved, global_step=step) from e
    finally:
        loop = getattr(trainer, "async_loop", None)
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=10)

    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out))
    final = Path(last) if last else None
    timeline_events = [e.as_dict() for e in timeline.events]
    report = build_report(run_id=run_id, algorithm=cfg.algorithm, rows=timer.rows,
                          log_history=trainer.state.log_history, timeline=timeline_events, url=cfg.reward.url,
                          extra={"policy": str(cfg.policy.model), "max_steps": cfg.training.max_steps})
    rj = rp = None
    if cfg.output.report and trainer.accelerator.is_main_process:
        rj, rp = write_report(report, out)
    return RunResult(run_id=run_id, algorithm=cfg.algorithm, output_dir=out, global_step=trainer.state.global_step,
                     checkpoint=final, report_json=rj, report_png=rp,
                     rollouts_dir=(cfg.output.rollouts_dir / run_id) if cfg.output.rollouts_dir else None,
                     summary=report["summary"], principle_set_timeline=timeline_events,
                     log_history=list(trainer.state.log_history))
