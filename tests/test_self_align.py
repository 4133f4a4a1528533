"""`salmon self-align` end to end on a tiny random-init model: the report holds every condition's score
(mean ± sd) and length; what the filters kept is exactly what the SFT trained on; held-out prompts are
never trained on; a rerun reads everything back; a SIGKILL inside the filter stage's write resumes to
the same data; the shipped CPU config validates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from salmon.atomic import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_config(tmp: Path, model: Path, out: Path, **extra) -> Path:
    prompts = jsonl(REPO / "data_synth" / "data" / "prompts.jsonl")
    (tmp / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:5]))
    (tmp / "held.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[40:44]))
    cfg = {"model": str(model), "output_dir": str(out), "num_threads": 1,
           "prompts": {"source": "file", "file": str(tmp / "train.jsonl")},
           "answers": {"max_new_tokens": 12, "batch_size": 4, "shard_size": 2},
           "filters": {"min_words": 1},
           "engrave": {"epochs": 1, "per_device_train_batch_size": 2, "lora": {"r": 4, "alpha": 8},
                       "max_length": 256, "num_threads": 1},
           "eval": {"prompts": str(tmp / "held.jsonl"), "num_prompts": 4, "scorer_model": str(model),
                    "max_new_tokens": 12, "thoughts_tokens": 4}, **extra}
    path = tmp / f"cfg-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def clean_run(tiny_model_dir, tmp_path_factory):
    from salmon_cli.main import main

    tmp = tmp_path_factory.mktemp("self-align")
    out = tmp / "out"
    # With verbose cloning, so its pass (engraved model under the verbose prompt, filtered, distilled) runs too.
    verbose = {"enabled": True, "max_new_tokens": 12,
               "sft": {"epochs": 1, "per_device_train_batch_size": 2, "lora": {"r": 4, "alpha": 8}, "num_threads": 1}}
    cfg = write_config(tmp, tiny_model_dir, out, verbose=verbose)
    assert main(["self-align", "--config", str(cfg)]) == 0
    return tmp, out, cfg


def test_report_has_every_condition_with_spread_and_the_filter_counts(clean_run):
    _, out, _ = clean_run
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["conditions"]) == ["base", "base_rules", "engraved", "verbose"]
    for c in rep["conditions"].values():
        assert c["score"]["n"] == 4 and c["score"]["sd"] is not None and len(c["scores"]) == 4
        assert c["length_tokens"]["mean"] > 0
    assert rep["scorer_kind"] == "contrastive" and rep["principle_set"].startswith("self_align@")
    f = rep["filters"]
    assert f["offered"] == 5 == f["kept"] + sum(f["dropped"].values())
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_what_is_kept_is_exactly_what_is_trained_on_and_heldout_never(clean_run):
    _, out, _ = clean_run
    kept = jsonl(out / "filter" / "kept.jsonl")
    rows = jsonl(out / "engrave" / "sft_data.jsonl")
    assert rows == [{"prompt": k["prompt"], "completion": k["completion"]} for k in kept]
    # What the loss saw, decoded from the SFT trainer's own tokenized rows.
    assert [r["completion"] for r in jsonl(out / "engrave" / "trained_on.jsonl")] == [k["completion"] for k in kept]
    answers = {r["id"]: r for r in jsonl(out / "answers" / "shard-00000.jsonl")
               + jsonl(out / "answers" / "shard-00001.jsonl") + jsonl(out / "answers" / "shard-00002.jsonl")}
    assert set(answers) == {k["id"] for k in kept} | {d["id"] for d in jsonl(out / "filter" / "dropped.jsonl")}
    held = {h["prompt"] for h in jsonl(out / "heldout.jsonl")}
    assert held and not held & {r["prompt"] for r in rows}
    # Verbose cloning: its kept answers are what the second SFT trained on, starting from the engraved model.
    vkept = jsonl(out / "verbose_filter" / "kept.jsonl")
    assert jsonl(out / "verbose_engrave" / "sft_data.jsonl") == [{"prompt": k["prompt"], "completion": k["completion"]}
                                                                  for k in vkept]
    adapter = json.loads(next((out / "verbose_engrave").glob("checkpoint-*/adapter_config.json")).read_text())
    assert adapter["base_model_name_or_path"] == str(out / "engrave" / "merged")


def test_a_rerun_reads_everything_back(clean_run):
    from salmon_cli.main import main

    _, out, cfg = clean_run
    before = json.loads((out / "report.json").read_text())
    ckpts = sorted(p.name for p in (out / "engrave").glob("checkpoint-*"))
    assert main(["self-align", "--config", str(cfg)]) == 0
    after = json.loads((out / "report.json").read_text())
    assert after["conditions"] == before["conditions"] and after["filters"] == before["filters"]
    assert sorted(p.name for p in (out / "engrave").glob("checkpoint-*")) == ckpts


def test_sigkill_inside_the_filter_write_resumes_to_the_same_data(clean_run, tiny_model_dir):
    tmp, clean_out, _ = clean_run
    out = tmp / "killed"
    cfg = write_config(tmp, tiny_model_dir, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           FAULT_ENV: f"{out}/filter/kept.jsonl:1"}
    cmd = [str(Path(sys.executable).parent / "salmon"), "self-align", "--config", str(cfg)]
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "filter" / "kept.jsonl").exists() and list((out / "filter").glob(".*.tmp"))
    env.pop(FAULT_ENV)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out scores" in done.stdout
    for rel in ("filter/kept.jsonl", "filter/dropped.jsonl", "engrave/sft_data.jsonl", "engrave/trained_on.jsonl"):
        assert (out / rel).read_bytes() == (clean_out / rel).read_bytes(), rel


def test_shipped_cpu_config_validates_and_bad_fields_are_one_line(tmp_path, capsys):
    from salmon_cli.main import main
    from salmon_cli.self_align import SHIPPED_CONFIG, load_self_align_config

    cfg = load_self_align_config(SHIPPED_CONFIG)
    assert cfg.model == "embedded" and cfg.eval.scorer == "auto" and cfg.answers.principle_set == "self_align"
    bad = tmp_path / "bad.yaml"
    bad.write_text("engrave: {epoch: 2}\n")
    assert main(["self-align", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'engrave.epoch': is not a known field" in err
