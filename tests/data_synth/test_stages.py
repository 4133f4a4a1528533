"""The stage table: declared once, read by `synth run` (every stage) and `synth watch` (those after judge)."""

from __future__ import annotations

import json

import pytest

from data_synth.config import AggregateConfig, JudgeConfig, SampleConfig, SynthRunConfig, TrainConfig
from data_synth.pipeline import run_pipeline
from data_synth.stages import STAGES, Stage, StageContext, run_stages, stage_names, stages_after
from rm_core.registry import Registry


def test_every_stage_reads_only_what_an_earlier_stage_wrote_and_its_runner_resolves():
    import importlib

    written: set[str] = set()
    for stage in STAGES:
        assert set(stage.reads) <= written, stage
        module, func = stage.runner.split(":")
        assert callable(getattr(importlib.import_module(module), func)), stage
        written.add(stage.writes)
    assert len(set(stage_names())) == len(STAGES)
    assert stage_names() == ["prompts", "sample", "judge", "aggregate", "train"]
    assert [s.name for s in stages_after("judge")] == ["aggregate", "train"]


def test_a_stage_whose_input_no_earlier_stage_wrote_is_refused(tmp_path):
    lonely = Stage("lonely", reads=("nothing",), writes="x", runner="data_synth.stages:run_train_stage")
    with pytest.raises(RuntimeError, match="reads \\['nothing'\\]"):
        run_stages(StageContext(config=None, out=tmp_path), [lonely])


def test_synth_run_runs_the_table_in_order_and_records_its_data(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: name a colour."}) + "\n"
                               for i in range(4)))
    model = str(tiny_model_dir)
    cfg = SynthRunConfig(
        prompts=prompts, num_prompts=3, out=tmp_path / "run",
        sample=SampleConfig(policy=model, max_new_tokens=8, min_response_chars=1),
        judge=JudgeConfig(model=model, source="ab", principle_set="concise"),
        aggregate=AggregateConfig(require_order_agreement=False, eval_fraction=0.34),
        train=TrainConfig(base_model=model, registry=tmp_path / "registry", batch_size=4, lora_r=2),
    )
    summary = run_pipeline(cfg)
    assert list(summary) == [*stage_names(), "time_s"] and summary["prompts"] == 3
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["train"] == summary["train"]
    for name in ("sample", "judge", "aggregate"):
        assert (tmp_path / "run" / name / "summary.json").is_file()
    version = summary["train"]["version"]
    m = Registry(cfg.train.registry).manifest(version).model_dump()
    assert m["judge_source"] == "ab" and m["policy"] == model
    assert m["training_shards"]["sample"] == [str(tmp_path / "run" / "sample" / "shard-00000.jsonl")]
    assert m["training_shards"]["judge"][0].startswith(str(tmp_path / "run" / "judge"))
