"""The method table (policy_trainer.methods): one registration offers a method to the config, the CLI
and the demo; a method without the reward service runs without contacting it; TRL arguments split
into the common ones and each method's own."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import free_port

from policy_trainer import methods as table
from policy_trainer.config import RunConfig, load_run_config
from policy_trainer.methods import BuildContext, Method, get_method, method_names
from policy_trainer.section import Section
from salmon.errors import UserError

REPO = Path(__file__).resolve().parents[2]


class ToySettings(Section):
    steps_per_call: int = 1


class ToyTrainer:
    """Just enough of a trainer for the runner: counts steps through the callbacks, saves checkpoints."""

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx
        self.state = SimpleNamespace(global_step=0, max_steps=ctx.cfg.training.max_steps, log_history=[],
                                     is_world_process_zero=True)
        self.accelerator = SimpleNamespace(process_index=0, is_main_process=True)
        self.model = None
        self.args = SimpleNamespace(output_dir=str(ctx.cfg.output.output_dir))
        self.resumed_from: str | None = None

    def _each(self, event: str) -> SimpleNamespace:
        control = SimpleNamespace(should_save=False)
        for cb in self.ctx.callbacks:
            getattr(cb, event)(self.args, self.state, control)
        return control

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        self.resumed_from = resume_from_checkpoint
        if resume_from_checkpoint:
            st = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())
            self.state.global_step = st["global_step"]
        while self.state.global_step < self.state.max_steps:
            self._each("on_step_begin")
            self.state.global_step += 1
            self.state.log_history.append({"loss": 1.0 / self.state.global_step, "step": self.state.global_step})
            if self._each("on_step_end").should_save:
                self._save_checkpoint(self.model, trial=None)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": self.state.global_step}))
        self._each("on_save")


@pytest.fixture
def toy_method():
    """A method registered for one test, as a new method's module would register it."""
    built: list[ToyTrainer] = []

    def build(ctx: BuildContext) -> ToyTrainer:
        assert ctx.reward is None  # it said it needs no reward service, so it gets none
        built.append(ToyTrainer(ctx))
        return built[-1]

    method = table.register(Method(name="toy", summary="a test method without the reward service", build=build,
                                   uses_reward_service=False))
    yield SimpleNamespace(method=method, built=built)
    table.unregister("toy")


def test_builtin_methods_in_order_and_all_on_the_reward_service():
    assert method_names()[:3] == ["grpo", "rloo", "ppo"]
    assert [m.name for m in table.BUILTIN] == ["grpo", "rloo", "ppo", "sami", "dno", "savi", "sft"]
    # sami too: it is evaluated by the service; sft alone learns from given rows
    assert [m.name for m in table.BUILTIN if not m.uses_reward_service] == ["sft"]
    assert get_method("ppo").section == "ppo"
    assert (get_method("sami").section, get_method("dno").section) == ("sami", "dno")


def test_every_method_section_is_the_run_config_field_of_its_model():
    for m in table.methods():
        if m.section is not None:
            assert RunConfig.model_fields[m.section].annotation is m.settings, m.name
            assert isinstance(getattr(RunConfig(), m.section), m.settings)


def test_unknown_algorithm_is_one_line_listing_the_registered_methods(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: dpo\n")
    with pytest.raises(UserError) as ei:
        load_run_config(path)
    msg = str(ei.value)
    assert "\n" not in msg and "field 'algorithm'" in msg and "'dpo' is not a registered method" in msg
    assert ", ".join(method_names()) in msg
    with pytest.raises(UserError, match=r"^algorithm: 'dpo' is not a registered method; choose one of: grpo, "):
        get_method("dpo")


def test_a_method_registered_later_is_offered_by_config_cli_and_demo(toy_method, tmp_path, capsys):
    assert load_run_config(None, {"algorithm": "toy"}).algorithm == "toy"
    with pytest.raises(UserError, match=r"choose one of: grpo, rloo, ppo, sami, dno, savi, sft, toy"):
        load_run_config(None, {"algorithm": "toy2"})

    from policy_trainer.cli import _parser
    from policy_trainer.cli import main as train_main

    choices = next(a.choices for a in _parser()._actions if a.dest == "algorithm")
    assert list(choices) == ["grpo", "rloo", "ppo", "sami", "dno", "savi", "sft", "toy"]
    assert train_main(["train", "--algorithm", "toy", "--print-config"]) == 0
    assert "algorithm: toy" in capsys.readouterr().out
    assert "a test method without the reward service" in _parser().format_help()

    from salmon_cli.demo import parse_args

    assert parse_args(["--algorithm", "toy"]).algorithm == "toy"


@pytest.mark.parametrize("name", ["sami", "dno", "savi", "sft"])
def test_the_demo_refuses_methods_that_report_per_round(name, capsys):
    """The demo compares two runs by per-step reward and length; an iterated method has neither, so it is
    refused up front with the methods it does take, not after minutes of synthesis."""
    from salmon_cli.demo import parse_args

    with pytest.raises(SystemExit) as ei:
        parse_args(["--algorithm", name])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{name}'" in err and "'grpo', 'rloo', 'ppo'" in err


def test_unregistered_methods_are_gone_and_names_are_unique(toy_method):
    with pytest.raises(ValueError, match="already registered"):
        table.register(toy_method.method)
    table.unregister("toy")
    try:
        with pytest.raises(UserError):
            load_run_config(None, {"algorithm": "toy"})
    finally:
        table.register(toy_method.method)  # the fixture unregisters it


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"name": "Toy"}, "must match"),
    ({"name": "toy", "section": "toy"}, "both or neither"),
    ({"name": "toy", "settings": ToySettings}, "both or neither"),
])
def test_method_records_are_checked(kwargs, why):
    with pytest.raises(ValueError, match=why):
        Method(summary="x", build=lambda ctx: None, **kwargs)


def test_a_method_without_the_reward_service_never_contacts_it(toy_method, tiny_model_dir, tmp_path):
    """reward.url names a port nobody listens on: a method on the service would abort at once."""
    from policy_trainer.train import STATE_FILE, run_training

    cfg = {"algorithm": "toy", "policy": {"model": str(tiny_model_dir)},
           "reward": {"url": f"http://127.0.0.1:{free_port()}", "retry": {"max_attempts": 1}},
           "training": {"max_steps": 2}, "principles": {"set": "no-such-set"},
           "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": str(tmp_path / "rollouts"),
                      "tensorboard": False, "run_id": "toy"}}
    result = run_training(RunConfig.model_validate(cfg))

    assert result.algorithm == "toy" and result.global_step == 2 and result.principle_set_timeline == []
    assert result.rollouts_dir is None and not (tmp_path / "rollouts").exists()
    report = json.loads(result.report_json.read_text())
    assert report["reward_url"] is None and report["summary"]["steps"] == 2
    assert report["summary"]["reward_wait_s"] == 0
    state = json.loads((result.checkpoint / STATE_FILE).read_text())
    assert set(state) == {"run_id", "steps"} and [r["step"] for r in state["steps"]] == [0, 1]

    # resume: the runner's own state comes back from beside the checkpoint
    cfg["training"]["max_steps"] = 3
    result = run_training(RunConfig.model_validate(cfg))
    assert toy_method.built[-1].resumed_from == str(tmp_path / "run" / "checkpoint-2")
    assert result.global_step == 3 and json.loads(result.report_json.read_text())["summary"]["steps"] == 3


# -- TRL arguments: common ones, the online RL ones, each method's own --------------------------

def _fields(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


# What GRPO/RLOO got before the split (one GRPO-shaped dict for both): the split must not change it.
ONLINE_TRL_ARGS = {
    "output_dir", "max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
    "num_generations", "max_completion_length", "temperature", "top_p", "beta", "num_iterations", "epsilon",
    "mask_truncated_completions", "seed", "warmup_steps", "max_grad_norm", "logging_steps", "save_strategy",
    "save_steps", "save_total_limit", "report_to", "use_cpu", "gradient_checkpointing", "log_completions",
    "remove_unused_columns", "dataloader_num_workers", "disable_tqdm", "model_init_kwargs", "bf16", "fp16",
}


def test_common_trl_args_fit_every_trl_config_and_online_ones_fit_grpo_and_rloo():
    import trl
    from transformers import TrainingArguments

    from policy_trainer.methods.grpo import grpo_args
    from policy_trainer.methods.rloo import rloo_args
    from policy_trainer.methods.trl_args import common_args, online_args

    cfg = RunConfig.model_validate({"training": {"loss_type": "dapo"}})
    common, online = common_args(cfg), online_args(cfg)
    assert set(common) <= _fields(TrainingArguments) | {"model_init_kwargs"}
    for name in ("GRPOConfig", "RLOOConfig", "DPOConfig", "SFTConfig"):  # a DPO or SFT method starts here too
        assert set(common) <= _fields(getattr(trl, name)), name
    assert set(online) <= _fields(trl.GRPOConfig) & _fields(trl.RLOOConfig)
    assert not set(common) & set(online)
    ctx = BuildContext(cfg, Path("."))
    assert grpo_args(ctx) == {"scale_rewards": "group", "loss_type": "dapo"}
    assert rloo_args(ctx) == {"normalize_advantages": False}
    assert set(common) | set(online) == ONLINE_TRL_ARGS


def test_forced_cpu_trains_in_fp32_even_where_cuda_has_bf16(monkeypatch):
    import torch

    from policy_trainer.methods.trl_args import common_args
    from salmon.modeling import pick_device_and_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_device_and_precision("cpu") == (torch.device("cpu"), "fp32")
    assert pick_device_and_precision("auto") == (torch.device("cuda"), "bf16")
    assert pick_device_and_precision("cpu", "fp16") == (torch.device("cpu"), "fp16")
    forced = common_args(RunConfig.model_validate({"distributed": {"use_cpu": True}}))
    assert forced["use_cpu"] is True and not forced["bf16"] and forced["model_init_kwargs"]["dtype"] == "float32"
    gpu = common_args(RunConfig())
    assert gpu["use_cpu"] is False and gpu["bf16"] and gpu["model_init_kwargs"]["dtype"] == "bfloat16"


def test_method_table_config_and_help_load_no_torch():
    code = ("import sys\n"
            "from policy_trainer.cli import _parser\n"
            "from policy_trainer.config import load_run_config\n"
            "_parser().format_help(); load_run_config(None, {'algorithm': 'ppo'})\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
