"""PPO end to end on CPU: tiny policy, reward services on loopback over real HTTP (contract double
and, when importable, the real rm_service with the rule scorer), as the GRPO/RLOO tests do."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_run_config
from test_pt_training import _Outage, check_rewards_match_service, scored_by_step

from policy_trainer.config import RunConfig, load_run_config
from policy_trainer.rollouts import list_shards, read_shards
from policy_trainer.train import TrainingAborted, run_training
from principles.schema import load_principle_set
from salmon.errors import UserError

PPO = {"algorithm": "ppo"}


def test_ppo_two_steps_same_rewards_shards_report_and_checkpoint(service, tiny_model_dir, tmp_path):
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, service.url, **PPO, output={"tensorboard": True},
        principles={"set": "concise", "select_k": 2, "schedule": [{"step": 1, "set": "rl"}]},
        shaping={"length_bonus": {"enabled": True}, "unfinished_penalty": 0.5}))
    result = run_training(cfg)
    assert result.algorithm == "ppo" and result.global_step == 2
    check_rewards_match_service(result, service.recorder, range(2))
    # the principle schedule and selection are GRPO's: step 1 scored against 2 inline principles of rl
    rl = load_principle_set("rl")
    for c in scored_by_step(service.recorder)[1]:
        assert len(c["request"]["principles"]) == 2
    assert [e["set"] for e in result.principle_set_timeline] == [load_principle_set("concise").ref, rl.ref]
    rows = read_shards(tmp_path / "rollouts", "t")
    assert [s for s, _ in list_shards(tmp_path / "rollouts", "t")] == [0, 1]
    assert {r["policy_version"] for r in rows} == {"t@step-0", "t@step-1"}
    for h in result.log_history:
        # total = service + shaping (the unfinished penalty bites: 8 tokens rarely end in EOS)
        assert h["reward"] == pytest.approx(h["rewards/salmon_rm/mean"] + h["rewards/shaping/mean"], abs=1e-4)
        for key in ("kl", "entropy", "loss/value_avg", "loss/policy_avg", "policy/clipfrac_avg",
                    "val/clipfrac_avg", "reward_std", "completions/mean_length", "memory/peak_rss_mb"):
            assert key in h, key
        assert h["entropy"] > 0 and h["loss/value_avg"] > 0
    assert "val/explained_variance" in result.log_history[-1]

    report = json.loads(result.report_json.read_text())
    assert report["algorithm"] == "ppo" and report["summary"]["steps"] == 2
    assert {"value_loss", "clipfrac", "entropy", "explained_variance"} <= set(report["steps"][-1])
    assert report["steps"][0]["rm_reward"] == pytest.approx(result.log_history[0]["rewards/salmon_rm/mean"])

    ckpt = result.checkpoint
    assert ckpt.name == "checkpoint-2"
    for f in ("policy/adapter_model.safetensors", "value/adapter_model.safetensors", "value_head.safetensors",
              "optimizer.pt", "rng_state.pt", "trainer_state.json", "salmon_state.json"):
        assert (ckpt / f).is_file(), f
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # no half-written checkpoint left behind

    # the policy adapter is a plain PEFT adapter: it loads onto the base and differs from it
    from peft import PeftModel

    from salmon.modeling import load_causal_lm

    policy = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), ckpt / "policy")
    assert any(("lora_B" in n) and p.abs().sum() > 0 for n, p in policy.named_parameters())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"salmon/step_time_s", "train/kl", "train/loss/value_avg", "train/policy/clipfrac_avg",
            "train/reward", "train/reward_service/wait_s"} <= tags
    assert len(acc.Scalars("train/reward")) == 2


def test_ppo_resume_continues_where_it_stopped(fake_service, tiny_model_dir, tmp_path, monkeypatch):
    base = tiny_run_config(tmp_path, tiny_model_dir, fake_service.url, **PPO, training={"max_steps": 2},
                           output={"save_steps": 1, "save_total_limit": 1})
    first = run_training(RunConfig.model_validate(base))
    assert first.global_step == 2
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]  # rotation

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from policy_trainer.ppo import PPOTrainer

    saved = load_file(str(first.checkpoint / "policy" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # trained: not the fresh init
    before = len(fake_service.recorder.scored())
    seen: dict[str, torch.Tensor] = {}
    callbacks = PPOTrainer._callbacks

    def grab(self, event):  # the policy weights in the resumed trainer's memory as its first step begins
        if event == "on_step_begin" and not seen:
            seen.update({k: v.detach().cpu().clone()
                         for k, v in get_peft_model_state_dict(self.model, adapter_name="policy").items()})
        return callbacks(self, event)

    monkeypatch.setattr(PPOTrainer, "_callbacks", grab)
    more = dict(base, training={**base["training"], "max_steps": 3})
    result = run_training(RunConfig.model_validate(more))
    assert result.global_step == 3
    steps_after = sorted({int(c["headers"]["x-salmon-step"]) for c in fake_service.recorder.scored()[before:]})
    assert steps_after == [2]  # one new step, not a restart
    assert [h["step"] for h in result.log_history] == [1, 2, 3]
    assert set(seen) == set(saved) and all(torch.equal(saved[k], seen[k]) for k in saved)
    resumed = load_file(str(result.checkpoint / "policy" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], resumed[k]) for k in saved)  # and it trained on from there


def test_ppo_long_outage_checkpoints_and_resumes(fake_service, tiny_model_dir, tmp_path):
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, fake_service.url, **PPO, training={"max_steps": 3},
        reward={"retry": {"max_attempts": 3, "initial_backoff_s": 0.1, "budget_s": 1}}, output={"save_steps": 10}))
    with pytest.raises(TrainingAborted) as ei:
        run_training(cfg, callbacks=[_Outage(fake_service, at=1, back_after_s=None)])
    err = ei.value
    assert fake_service.url in str(err) and err.global_step == 1
    assert err.checkpoint == tmp_path / "run" / "checkpoint-1"
    assert (err.checkpoint / "value_head.safetensors").is_file() and (err.checkpoint / "salmon_state.json").is_file()
    fake_service.start()
    result = run_training(cfg)
    assert result.global_step == 3
    assert [s for s, _ in list_shards(tmp_path / "rollouts", "t")] == [0, 1, 2]


def test_salmon_train_cli_runs_ppo(fake_service, tiny_model_dir, tmp_path, capsys):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from salmon_cli.main import main

    # Another training earlier in the same process left accelerate's state in bf16 (seen when the
    # suite's workers ran rm_train tests before these): PPO must still start.
    AcceleratorState._reset_state(reset_partial_state=True)
    Accelerator(cpu=True, mixed_precision="bf16")
    cfg = tiny_run_config(tmp_path, tiny_model_dir, fake_service.url, training={"max_steps": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))  # algorithm: grpo in the file, ppo from the flag
    assert main(["train", "--config", str(path), "--algorithm", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "salmon train: ppo run t finished at step 1" in out
    assert json.loads((tmp_path / "run" / "report.json").read_text())["algorithm"] == "ppo"


def test_ppo_config_section_and_demo_overrides(tmp_path):
    cfg = load_run_config(None, {"algorithm": "ppo", "ppo.kl_coef": 0.05, "ppo.adaptive_kl.enabled": True})
    assert cfg.ppo.kl_coef == 0.05 and cfg.ppo.adaptive_kl.enabled and cfg.ppo.gamma == 1.0
    with pytest.raises(UserError, match="ppo.ppo_epoch"):
        load_run_config(None, {"algorithm": "ppo", "ppo.ppo_epoch": 2})
    with pytest.raises(UserError, match="value_init"):
        load_run_config(None, {"ppo.value_init.version": "v0001"})
    # what salmon demo passes (salmon/demo.py) validates for ppo, and its batch splits in minibatches
    gens = 4
    demo = load_run_config(None, {"algorithm": "ppo", "policy.model": "embedded", "reward.url": "http://127.0.0.1:9",
                                  "training.num_generations": gens, "training.per_device_train_batch_size": 2 * gens,
                                  "training.max_completion_length": 48, "output.output_dir": str(tmp_path / "rl")})
    assert demo.algorithm == "ppo" and (2 * gens) % demo.ppo.num_minibatches == 0
    shipped = load_run_config("policy_trainer/configs/ppo.yaml")
    assert shipped.algorithm == "ppo" and shipped.ppo.vf_coef == 0.1 and shipped.ppo.kl_coef == 0.01


def _trainer(cfg: RunConfig, model_dir):
    from policy_trainer.ppo import PPOTrainer

    return PPOTrainer(cfg, model_dir=model_dir, train_dataset=[{"prompt": [{"role": "user", "content": "hi"}]}],
                      reward=None)  # type: ignore[arg-type]


def test_ppo_refuses_what_it_cannot_do(tiny_model_dir, tmp_path):
    base = tiny_run_config(tmp_path, tiny_model_dir, "http://127.0.0.1:9", **PPO)
    with pytest.raises(UserError, match="num_minibatches"):
        _trainer(RunConfig.model_validate({**base, "ppo": {"num_minibatches": 3}}), tiny_model_dir)
    with pytest.raises(UserError, match="lora.enabled"):
        _trainer(RunConfig.model_validate({**base, "policy": {**base["policy"], "lora": {"enabled": False}}}),
                 tiny_model_dir)


def _publish_rm(registry, base_model, tmp_path) -> str:
    """A tiny principle reward model (LoRA + scalar head, SEQ_CLS) published to a registry."""
    from peft import LoraConfig, get_peft_model

    from rm_core.registry import Registry
    from rm_core.render import PROMPT_FORMAT_VERSION
    from salmon.modeling import load_sequence_classifier

    torch.manual_seed(3)
    model = get_peft_model(load_sequence_classifier(str(base_model)),
                           LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "score" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "build" / "adapter")
    return Registry(registry).publish(tmp_path / "build", {
        "base_model": str(base_model), "adapter": "adapter", "reward_mean": 0.5, "reward_std": 2.0,
        "prompt_format_version": PROMPT_FORMAT_VERSION})


def test_value_adapter_and_head_from_a_registry_version(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    registry = tmp_path / "registry"
    version = _publish_rm(registry, tiny_model_dir, tmp_path)
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, "http://127.0.0.1:9", **PPO, shaping={"rm_scale": 10.0},
        ppo={"value_init": {"registry": str(registry)}}))
    trainer = _trainer(cfg, tiny_model_dir)
    saved = load_file(str(registry / version / "adapter" / "adapter_model.safetensors"))
    score = next(v for k, v in saved.items() if "score" in k)
    # service score = (raw - mean) / std * rm_scale, folded into the head
    assert torch.allclose(trainer.value_head.weight, score.float() * 10.0 / 2.0)
    assert trainer.value_head.bias.item() == pytest.approx(-0.5 * 10.0 / 2.0)
    mine = dict(trainer.model.named_parameters())
    for k, v in saved.items():
        if "lora_" in k:
            name = k.replace(".weight", ".value.weight")
            assert torch.equal(mine[name].detach(), v), k
    assert trainer.model.peft_config["value"].r == 2 and trainer.model.peft_config["policy"].r == 4

    other = tmp_path / "other-base"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg2 = RunConfig.model_validate({**cfg.model_dump(mode="json"), "policy": {"model": str(other)}})
    with pytest.raises(UserError, match="value_init.*not on the policy"):
        _trainer(cfg2, other)
