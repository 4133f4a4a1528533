"""SFT (``algorithm: sft``, ``train_sft``): what is trained on is exactly the rows given, completion only; the
result loads through salmon's one loader; reruns resume or refuse; bad rows are one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from policy_trainer.sft import MERGED, TRAINED_ON, SFTTrainSettings, load_sft_rows, sft_example, train_sft
from salmon.errors import UserError

ROWS = [{"prompt": f"What is {i} plus one?", "completion": f"It is {i + 1}, since {i} and one more make it."}
        for i in range(4)]
TINY = SFTTrainSettings(epochs=1, per_device_train_batch_size=2, lora={"r": 4, "alpha": 8}, num_threads=1)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_sft_trains_on_exactly_the_completions_and_merges(tiny_model_dir, tmp_path):
    from salmon.modeling import load_causal_lm

    merged = train_sft(tiny_model_dir, ROWS, tmp_path / "sft", TINY)
    assert merged == tmp_path / "sft" / MERGED
    # What the loss saw of each row, decoded from the trainer's own tokenized dataset: the completion and
    # nothing of the prompt.
    assert [r["completion"] for r in read(tmp_path / "sft" / TRAINED_ON)] == [r["completion"] for r in ROWS]
    model = load_causal_lm(merged)
    assert not hasattr(model, "peft_config")  # plain weights: the adapter is merged in
    # Done: a rerun returns at once (no checkpoint is written again); other rows are refused.
    before = sorted(p.name for p in (tmp_path / "sft").iterdir())
    assert train_sft(tiny_model_dir, ROWS, tmp_path / "sft", TINY) == merged
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == before
    with pytest.raises(UserError, match="holds SFT of other rows"):
        train_sft(tiny_model_dir, ROWS[:2], tmp_path / "sft", TINY)


def test_salmon_train_with_algorithm_sft(tiny_model_dir, tmp_path):
    from policy_trainer.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    cfg = {"algorithm": "sft", "policy": {"model": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
           "sft": {"data": str(data), "max_length": 64},
           "training": {"max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 2},
           "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": None, "tensorboard": False},
           "distributed": {"num_threads": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "run" / MERGED / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoint-1" / "adapter_config.json").is_file()
    assert len(read(tmp_path / "run" / TRAINED_ON)) == 2


def test_bad_rows_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="'completion' must be non-empty"):
        sft_example({"prompt": "hi", "completion": " "}, "row 1")
    with pytest.raises(UserError, match="ending with a user message"):
        sft_example({"prompt": [{"role": "assistant", "content": "x"}], "completion": "y"}, "row 1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": "", "completion": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'prompt'"):
        load_sft_rows(bad)
    with pytest.raises(UserError, match="no rows to train on"):
        train_sft("embedded", [], tmp_path / "none", TINY)


def test_a_run_config_without_sft_data_says_what_to_set(tiny_model_dir, tmp_path):
    from policy_trainer.config import load_run_config
    from policy_trainer.sft import build_sft_trainer

    cfg = load_run_config(None, {"algorithm": "sft", "output.output_dir": str(tmp_path)})
    with pytest.raises(UserError, match="sft.data"):
        build_sft_trainer(cfg, tiny_model_dir)
