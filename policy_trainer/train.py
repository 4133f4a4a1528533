"""``run_training(config) -> RunResult``: one training run of the method ``algorithm:`` names.

What it does, in order:

1. Looks the method up in the method table (policy_trainer.methods).
2. For a method that uses the reward service only: talks to it first (limits, principle sets), so
   a wrong URL, key or set name fails in seconds with one line instead of after the model is
   loaded, and builds the reward callables (policy_trainer.reward_service). Any other method
   never contacts ``reward.url``.
3. Builds the method's trainer (``Method.build``) with the runner's callbacks: the step timer and
   the state saved beside each checkpoint (principle timeline, normaliser, step timings).
4. Trains, resuming from the newest checkpoint in ``output.output_dir`` when there is one.
5. If the service stays unreachable past the retry budget: saves a checkpoint and raises
   :class:`TrainingAborted` (``salmon train`` exits 3 with the URL and the last error).
6. Writes report.json + report.png and returns a :class:`RunResult`.

``salmon demo`` and tests call this directly; ``salmon train --config run.yaml`` wraps it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from policy_trainer.config import RunConfig
from policy_trainer.methods import BuildContext, get_method
from policy_trainer.report import StepTimer, build_report, write_report
from policy_trainer.reward_service import RewardService, TrainingAborted, connect
from policy_trainer.self_reward import LocalRewards
from salmon.atomic import atomic_write_json
from salmon.errors import UserError
from salmon_client.client import RewardServiceError

__all__ = ["STATE_FILE", "RunResult", "TrainingAborted", "run_training"]

log = logging.getLogger(__name__)

STATE_FILE = "salmon_state.json"


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


class _SalmonState(TrainerCallback):
    """Saves what a trainer's checkpoint lacks beside it: the step timings and, for a method on the
    reward service, its principle timeline and score normaliser."""

    def __init__(self, timer: StepTimer, run_id: str, reward: RewardService | None):
        self.timer, self.run_id, self.reward = timer, run_id, reward

    def state(self) -> dict[str, Any]:
        reward = self.reward.state_dict() if self.reward is not None else {}
        return {"run_id": self.run_id, **reward, "steps": self.timer.state_dict()}

    def write(self, ckpt: Path) -> None:
        if ckpt.is_dir():
            atomic_write_json(ckpt / STATE_FILE, self.state())

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _last_checkpoint(cfg: RunConfig) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    out = cfg.output.output_dir
    if cfg.output.resume != "auto" or not out.is_dir():
        return None
    last = get_last_checkpoint(str(out))
    return Path(last) if last else None


def _checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])


def _policy_dir(cfg: RunConfig) -> Path:
    from salmon.modeling import ModelSourceError, resolve_model_dir

    try:
        return resolve_model_dir(cfg.policy.model)
    except ModelSourceError as e:
        raise UserError(f"policy.model: {e}") from None


def _resume(ckpt: Path | None, run_id: str, timer: StepTimer, reward: RewardService | None) -> None:
    """Restore the runner's own state saved beside ``ckpt`` (the trainer restores its own)."""
    if ckpt is None:
        return
    step = _checkpoint_step(ckpt)
    state_path = ckpt / STATE_FILE
    if state_path.is_file():
        st = json.loads(state_path.read_text())
        if reward is not None:
            reward.load_state_dict(st, step)
        timer.load_state_dict(st.get("steps", []), step)
    log.warning("resuming run %s from %s (step %d)", run_id, ckpt, step)


def _train(trainer: Any, ckpt: Path | None, out: Path, saver: _SalmonState) -> None:
    """``trainer.train``; when the reward service stays away, checkpoint and raise TrainingAborted."""
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


def run_training(config: RunConfig, *, callbacks: list[TrainerCallback] | None = None) -> RunResult:
    """Run ``config.algorithm`` as ``config`` says. Raises UserError for bad input, TrainingAborted when
    the reward service stays away past the retry budget (after saving a checkpoint to resume from)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # salmon never downloads; fail instead of fetching
    cfg = config
    method = get_method(cfg.algorithm)
    if cfg.generation.use_vllm and importlib.util.find_spec("vllm") is None:
        # Checked here, not when validating: a GPU config must still validate on a CPU laptop.
        raise UserError("generation.use_vllm: vllm is not installed (pip install vllm on the GPU machine)")
    if cfg.distributed.num_threads:
        import torch

        torch.set_num_threads(cfg.distributed.num_threads)
    run_id = cfg.run_id
    out = cfg.output.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model_dir = _policy_dir(cfg)
    reward = connect(cfg, model_dir, run_id) if method.uses_reward_service and cfg.rewards.service else None
    local = LocalRewards.from_config(cfg)

    timer = StepTimer(reward.score.wait_by_step, reward.score.set_by_step) if reward else StepTimer({}, {})
    saver = _SalmonState(timer, run_id, reward)
    ckpt = _last_checkpoint(cfg)
    _resume(ckpt, run_id, timer, reward)

    ctx = BuildContext(cfg, model_dir, callbacks=[timer, saver, *(callbacks or [])], reward=reward, local=local)
    trainer = method.build(ctx)
    if local.funcs_and_weights()[0] and not ctx.local_taken:
        # A method with its own reward plumbing (ppo, sami, dno) would silently drop them otherwise.
        raise UserError(f"algorithm {cfg.algorithm} does not take rewards.correctness or rewards.sar; "
                        "use grpo or rloo, or set them to 0")
    if reward is not None:
        reward.bind(trainer)
    local.bind(trainer)  # SAR scores with this trainer's live policy
    handler = getattr(trainer, "callback_handler", None)
    if handler is not None:  # a TRL trainer; ours (PPO) hands the timer its own writer when training starts
        from transformers.integrations import TensorBoardCallback

        timer.tb_callback = next((c for c in handler.callbacks if isinstance(c, TensorBoardCallback)), None)

    try:
        _train(trainer, ckpt, out, saver)
    finally:
        if reward is not None:
            reward.close(trainer)

    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out))
    final = Path(last) if last else None
    timeline_events = reward.events() if reward is not None else []
    report = build_report(run_id=run_id, algorithm=cfg.algorithm, rows=timer.rows,
                          log_history=trainer.state.log_history, timeline=timeline_events,
                          url=cfg.reward.url if reward is not None else None,
                          extra={"policy": str(cfg.policy.model), "max_steps": cfg.training.max_steps})
    rj = rp = None
    if cfg.output.report and trainer.accelerator.is_main_process:
        rj, rp = write_report(report, out)
    rollouts = cfg.output.rollouts_dir / run_id if reward is not None and cfg.output.rollouts_dir else None
    return RunResult(run_id=run_id, algorithm=cfg.algorithm, output_dir=out, global_step=trainer.state.global_step,
                     checkpoint=final, report_json=rj, report_png=rp, rollouts_dir=rollouts,
                     summary=report["summary"], principle_set_timeline=timeline_events,
                     log_history=list(trainer.state.log_history))
