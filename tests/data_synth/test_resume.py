"""Kill -9 a stage mid-way, rerun it, and get byte-for-byte what a clean run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def salmon(*args: str, wait: bool = True):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The installed entry point, as a user runs it.
    cmd = [str(Path(sys.executable).parent / "salmon"), *args]
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finished_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["done"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_midway(args: list[str], out: Path, total: int) -> int:
    """Start the stage, SIGKILL it once at least one shard (but not all) is recorded."""
    proc = salmon(*args, wait=False)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if finished_shards(out) >= 1:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = finished_shards(out)
    assert 1 <= done < total, f"the kill did not land mid-way ({done}/{total} shards)"
    return done


def stage_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "summary.json"}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}: name a colour."}) + "\n"
                         for i in range(16)))
    return p


def test_sample_and_judge_resume_after_sigkill_to_identical_bytes(tmp_path, tiny_model_dir, prompt_file):
    scfg = tmp_path / "sample.yaml"
    scfg.write_text(f"policy: {tiny_model_dir}\nmax_new_tokens: 24\nmin_response_chars: 1\nshard_size: 1\n"
                    "batch_size: 1\n")
    sample_args = ["synth", "sample", "--prompts", str(prompt_file), "--config", str(scfg)]
    r = salmon(*sample_args, "--out", str(tmp_path / "clean"))
    assert r.returncode == 0, r.stderr[-2000:]
    kill_midway([*sample_args, "--out", str(tmp_path / "killed")], tmp_path / "killed", 16)
    r = salmon(*sample_args, "--out", str(tmp_path / "killed"))
    assert r.returncode == 0, r.stderr[-2000:]
    clean = stage_bytes(tmp_path / "clean")
    assert stage_bytes(tmp_path / "killed") == clean and len(clean) == 17  # 16 shards + manifest
    assert not list((tmp_path / "killed").glob(".*.tmp"))

    jcfg = tmp_path / "judge.yaml"
    jcfg.write_text(f"model: {tiny_model_dir}\nsource: ab\nprinciple_set: concise\nshard_size: 1\n")
    pairs = json.loads((tmp_path / "clean" / "summary.json").read_text())["pairs_kept"]
    assert pairs >= 4
    judge_args = ["synth", "judge", "--pairs", str(tmp_path / "clean"), "--config", str(jcfg)]
    r = salmon(*judge_args, "--out", str(tmp_path / "jclean"))
    assert r.returncode == 0, r.stderr[-2000:]
    kill_midway([*judge_args, "--out", str(tmp_path / "jkilled")], tmp_path / "jkilled", pairs)
    r = salmon(*judge_args, "--out", str(tmp_path / "jkilled"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert stage_bytes(tmp_path / "jkilled") == stage_bytes(tmp_path / "jclean")
    # A rerun with different settings into the same directory is refused, and leaves it as it was.
    before = stage_bytes(tmp_path / "jclean")
    r = salmon("synth", "judge", "--pairs", str(tmp_path / "clean"), "--config", str(jcfg), "--no-prefix-reuse",
               "--out", str(tmp_path / "jclean"))
    assert r.returncode == 2 and "different inputs or settings" in r.stderr
    assert stage_bytes(tmp_path / "jclean") == before
