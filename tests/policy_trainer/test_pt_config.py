"""Run config: defaults valid, one-line errors naming the field, shipped configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_trainer.config import RunConfig, load_run_config
from policy_trainer.data import load_prompt_rows
from salmon.errors import UserError
from salmon_cli.main import main

CONFIGS = Path(__file__).resolve().parents[2] / "policy_trainer" / "configs"


def test_defaults_validate_and_run_on_cpu():
    cfg = RunConfig()
    assert cfg.algorithm == "grpo" and cfg.policy.model == "embedded" and not cfg.generation.use_vllm
    assert cfg.training.precision == "auto" and cfg.run_id == "train"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_validate(path):
    cfg = load_run_config(path)
    assert cfg.training.max_steps >= 1


@pytest.mark.parametrize(("yaml_text", "field", "why"), [
    ("algorithm: ppo2\n", "algorithm", "grpo"),
    ("training: {num_generations: 1}\n", "training.num_generations", "greater than or equal to 2"),
    ("training: {per_device_train_batch_size: 3, num_generations: 2}\n", "training", "multiple of num_generations"),
    ("reward: {url: localhost:8000}\n", "reward.url", "http(s) URL"),
    ("principles: {schedule: [{step: 5, set: a}, {step: 2, set: b}]}\n", "principles.schedule", "increasing"),
    ("reward: {retry: {max_atempts: 3}}\n", "reward.retry.max_atempts", "not a known field"),
])
def test_bad_fields_give_one_line_naming_the_field(tmp_path, yaml_text, field, why):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as ei:
        load_run_config(path)
    msg = str(ei.value)
    assert "\n" not in msg and f"field '{field}'" in msg and why in msg and str(path) in msg


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("training: {max_steps: 0}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.max_steps" in err


def test_cli_overrides_nested_fields(tmp_path, capsys):
    from policy_trainer.cli import main as train_main

    assert train_main(["train", "--rm-url", "http://10.0.0.2:9000", "--max-steps", "7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "url: http://10.0.0.2:9000" in out and "max_steps: 7" in out


def test_prompts_jsonl_rows_and_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "hi", "type": "reasoning"}\n'
                 '{"prompt": [{"role": "user", "content": "yo"}]}\n')
    cfg = RunConfig.model_validate({"data": {"prompts": str(p), "system_prompt": "Be brief."}}).data
    rows = load_prompt_rows(cfg)
    assert rows[0] == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                       "prompt_id": "a", "prompt_type": "reasoning"}
    assert rows[1]["prompt_id"] == "line-2" and rows[1]["prompt_type"] == "general"
    p.write_text('{"id": "a", "text": "hi"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:1: field 'prompt' is required"):
        load_prompt_rows(cfg)


def test_default_prompts_come_from_data_synth():
    rows = load_prompt_rows(RunConfig().data)
    assert len(rows) > 10 and {r["prompt_type"] for r in rows} >= {"general"}
