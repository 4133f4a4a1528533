"""Bad inputs end as one line naming the file/line or URL, exit 2, and damage nothing already written."""

from __future__ import annotations

import json

import pytest

from data_synth.shards import ShardedStage
from salmon_cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_malformed_and_empty_prompt_files(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{nope\n")
    rc, _, err = run(capsys, "synth", "sample", "--prompts", str(bad), "--out", str(tmp_path / "out"))
    assert rc == 2 and f"{bad}:2: not valid JSON" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    rc, _, err = run(capsys, "synth", "prompts", "--prompts", str(empty))
    assert rc == 2 and "no prompts" in err


def test_config_typos_and_unknown_principles(tmp_path, capsys):
    cfg = tmp_path / "j.yaml"
    cfg.write_text("sorce: ab\n")
    rc, _, err = run(capsys, "synth", "judge-check", "--config", str(cfg))
    assert rc == 2 and "field 'sorce'" in err and str(cfg) in err
    cfg.write_text("principles: [concise, made_up]\n")
    pairs = tmp_path / "pairs"
    ShardedStage(pairs, "sample", {"x": 1}).run(
        [{"pair_id": "a#0", "prompt_id": "a", "prompt": "q", "response_a": "x" * 9, "response_b": "y" * 9}], 1,
        lambda i, c: (list(c), {}))
    rc, _, err = run(capsys, "synth", "judge", "--pairs", str(pairs), "--out", str(tmp_path / "j"),
                     "--config", str(cfg), "--source", "ab")
    assert rc == 2 and "unknown principle 'made_up'" in err


def test_unreachable_judge_endpoint_names_the_url_and_keeps_finished_shards(tmp_path, capsys, tiny_model_dir):
    from rm_service.testing import free_port

    pairs = tmp_path / "pairs"
    recs = [{"pair_id": f"a{i}#0", "prompt_id": f"a{i}", "prompt": "q", "response_a": "x" * 9,
             "response_b": "y" * 9} for i in range(2)]
    ShardedStage(pairs, "sample", {"x": 1}).run(recs, 1, lambda i, c: (list(c), {}))
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = tmp_path / "j.yaml"
    cfg.write_text(f"source: ab\nbackend: openai\nprinciple_set: concise\nshard_size: 1\n"
                   f"endpoint: {{base_url: '{url}', model: m, max_retries: 0, timeout_s: 2, "
                   f"tokenizer: '{tiny_model_dir}'}}\n")
    out = tmp_path / "judged"
    rc, _, err = run(capsys, "synth", "judge", "--pairs", str(pairs), "--out", str(out), "--config", str(cfg))
    assert rc == 2 and f"{url}/completions: unreachable" in err
    assert not list(out.glob("shard-*"))  # nothing half-written


def test_stage_dir_must_be_finished_before_the_next_stage_reads_it(tmp_path, capsys):
    rc, _, err = run(capsys, "synth", "judge", "--pairs", str(tmp_path / "missing"), "--out", str(tmp_path / "j"),
                     "--source", "ab")
    assert rc == 2 and "no manifest.json" in err


@pytest.mark.parametrize("argv", [["synth"], ["synth", "nope"], ["rm-train"]])
def test_usage_errors_are_one_line(capsys, argv):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and err.strip().count("\n") == 0
