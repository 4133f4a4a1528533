"""Resume, proven: SIGKILL every synth stage at seeded points (inside a shard write, inside a manifest
write, inside the publish, at a random moment), rerun it, and require that

- finished shards are skipped: a shard the manifest listed before a rerun keeps its inode and mtime
  (an atomic write would give it a new inode), so a rerun that recomputed everything fails here;
- the final bytes equal a clean run's (the registry manifest up to its clock fields);
- no temp file or staging directory is left.

Kills inside a write use the ``SALMON_FAULT_KILL_WRITE`` hook of :mod:`salmon.atomic` (the process kills
itself halfway through the n-th write of a matching path; the half-written temp file it leaves is
asserted, so the kill provably landed inside the write). Kills at a moment come from outside, after a
seeded delay within a clean run's duration.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from salmon.atomic import FAULT_ENV

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SALMON_RESUME_SEED", "15"))
CLOCK_FIELDS = ("created_at",)  # registry manifest fields that are the time of the run, not its result
METRIC_CLOCK_FIELDS = ("train_time_s",)


def salmon(*args: str, fault: str | None = None, wait: bool = True):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    # The installed entry point, as a user runs it.
    cmd = [str(Path(sys.executable).parent / "salmon"), *args]
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def temps(root: Path) -> list[Path]:
    return sorted([*root.rglob(".*.tmp"), *root.rglob(".staging-*")])


def recorded_shards(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every shard the stage's manifest lists as finished."""
    try:
        done = json.loads((stage_dir / "manifest.json").read_text())["done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    out = {}
    for name in done:
        st = (stage_dir / name).stat()
        out[str(stage_dir / name)] = (st.st_ino, st.st_mtime_ns)
    return out


def snapshot(stage_dirs: list[Path]) -> dict[str, tuple[int, int]]:
    return {k: v for d in stage_dirs for k, v in recorded_shards(d).items()}


def assert_untouched(before: dict[str, tuple[int, int]]) -> None:
    for path, (ino, mtime) in before.items():
        st = Path(path).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{path} was finished but the rerun rewrote it"


def tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes, summaries (which hold timings) left out, registry manifests without clocks."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name in ("summary.json", "run_summary.json"):
            continue
        data = p.read_bytes()
        if p.name == "manifest.json" and re.fullmatch(r"v\d{4}", p.parent.name):  # a registry version's
            m = json.loads(data)
            for k in CLOCK_FIELDS:
                m.pop(k)
            for k in METRIC_CLOCK_FIELDS:
                m["eval_metrics"].pop(k)
            data = json.dumps(m, sort_keys=True).encode()
        out[str(p.relative_to(root))] = data
    return out


def kill_inside_write(args: list[str], fault: str) -> None:
    """Run with the write hook armed; it must die by SIGKILL leaving the half-written temp file."""
    r = salmon(*args, fault=fault)
    assert r.returncode == -signal.SIGKILL, f"{fault}: the hook did not fire (rc {r.returncode}) {r.stderr[-1500:]}"


def kill_after(args: list[str], delay: float) -> int:
    proc = salmon(*args, wait=False)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


def run_ok(args: list[str]) -> subprocess.CompletedProcess:
    r = salmon(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def resume_through_kills(args: list[str], root: Path, stage_dirs: list[Path], kills: list[tuple[str, object]],
                         ) -> list[int]:
    """Run ``args`` killed as ``kills`` say (("write", hook spec) or ("at", seconds)), each run resuming
    the last, then once to the end. After each rerun the shards finished before it are unchanged.
    Returns how many finished shards each rerun found (and so had to skip)."""
    skipped: list[int] = []
    finished_first: list[object] = []
    for kind, what in kills:
        before = snapshot(stage_dirs)
        if kind == "write":
            kill_inside_write(args, str(what))
            assert [p for p in temps(root) if p.name.endswith(".tmp")], f"{what}: no half-written temp file"
        elif kill_after(args, float(what)) != -signal.SIGKILL:
            finished_first.append(what)  # it ended before the moment came: a clean rerun, still checked
        assert_untouched(before)
        skipped.append(len(before))
    before = snapshot(stage_dirs)
    run_ok(args)
    assert_untouched(before)
    skipped.append(len(before))
    assert not temps(root), temps(root)
    if finished_first and len(kills) == 1:  # a fresh start killed at a moment within a clean run's time
        raise AssertionError(f"the kill at {finished_first[0]:.1f} s came after the run had finished")
    return skipped


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}: name a colour."}) + "\n"
                         for i in range(8)))
    return p


def timed(args: list[str]) -> float:
    t0 = time.monotonic()
    run_ok(args)
    return time.monotonic() - t0


def test_sample_and_judge_resume_after_kills_inside_writes_and_at_random_moments(tmp_path, tiny_model_dir,
                                                                                 prompt_file):
    rng = random.Random(SEED)
    scfg = tmp_path / "sample.yaml"
    scfg.write_text(f"policy: {tiny_model_dir}\nmax_new_tokens: 16\nmin_response_chars: 1\nshard_size: 1\n"
                    "batch_size: 1\n")
    sample_args = ["synth", "sample", "--prompts", str(prompt_file), "--config", str(scfg)]
    clean_s = timed([*sample_args, "--out", str(tmp_path / "clean")])
    killed = tmp_path / "killed"
    skipped = resume_through_kills([*sample_args, "--out", str(killed)], killed, [killed], [
        ("write", f"*/shard-*.jsonl:{rng.randint(2, 4)}"),
        ("write", f"*/manifest.json:{rng.randint(2, 4)}"),
        ("at", rng.uniform(0.5, 0.9) * clean_s),
    ])
    assert skipped[-1] >= 2, skipped  # the last rerun had finished shards to skip, and kept them
    clean = tree(tmp_path / "clean")
    assert tree(killed) == clean and len(clean) == 9  # 8 shards + manifest

    jcfg = tmp_path / "judge.yaml"
    jcfg.write_text(f"model: {tiny_model_dir}\nsource: ab\nprinciple_set: concise\nshard_size: 1\n")
    pairs = json.loads((tmp_path / "clean" / "summary.json").read_text())["pairs_kept"]
    assert pairs >= 4
    judge_args = ["synth", "judge", "--pairs", str(tmp_path / "clean"), "--config", str(jcfg)]
    clean_s = timed([*judge_args, "--out", str(tmp_path / "jclean")])
    jkilled = tmp_path / "jkilled"
    skipped = resume_through_kills([*judge_args, "--out", str(jkilled)], jkilled, [jkilled], [
        ("write", f"*/shard-*.jsonl:{rng.randint(2, pairs - 1)}"),
        ("write", f"*/manifest.json:{rng.randint(1, 2)}"),
        ("at", rng.uniform(0.5, 0.9) * clean_s),  # last: wherever it lands, no later kill misses its write
    ])
    assert max(skipped) >= 1, skipped
    assert tree(jkilled) == tree(tmp_path / "jclean")
    # A rerun with different settings into the same directory is refused, and leaves it as it was.
    before = tree(tmp_path / "jclean")
    r = salmon("synth", "judge", "--pairs", str(tmp_path / "clean"), "--config", str(jcfg), "--no-prefix-reuse",
               "--out", str(tmp_path / "jclean"))
    assert r.returncode == 2 and "different inputs or settings" in r.stderr
    assert tree(tmp_path / "jclean") == before


def run_config(tmp_path: Path, model: Path, prompts: Path, work: Path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({
        "prompts": str(prompts), "num_prompts": 4, "out": str(work / "run"),
        "sample": {"policy": str(model), "max_new_tokens": 8, "min_response_chars": 1, "shard_size": 1,
                   "batch_size": 1},
        "judge": {"model": str(model), "source": "ab", "principle_set": "concise", "shard_size": 1},
        "aggregate": {"require_order_agreement": False, "eval_fraction": 0.34},
        "train": {"base_model": str(model), "registry": str(work / "registry"), "batch_size": 4, "lora_r": 2},
    }))
    return cfg


def test_synth_run_resumes_every_stage_to_a_clean_runs_bytes_and_one_version(tmp_path, tiny_model_dir,
                                                                             prompt_file):
    """`salmon synth run` killed in each stage in turn (sample, judge, aggregate, the publish's staging
    manifest, the CURRENT switch after the version is in place), then, from scratch, at a random moment.
    The clean run and the killed ones use the same paths (the clean tree is moved away), so manifests
    that record paths compare byte for byte."""
    rng = random.Random(SEED + 1)
    work = tmp_path / "w"
    args = ["synth", "run", "--config", str(run_config(tmp_path, tiny_model_dir, prompt_file, work))]
    clean_s = timed(args)
    shutil.move(work, tmp_path / "clean")
    stage_dirs = [work / "run" / "sample", work / "run" / "judge"]
    skipped = resume_through_kills(args, work, stage_dirs, [
        ("write", f"*/sample/shard-*.jsonl:{rng.randint(1, 2)}"),
        ("write", f"*/judge/shard-*.jsonl:{rng.randint(1, 3)}"),
        ("write", f"*/aggregate/{rng.choice(['train', 'eval'])}.jsonl:1"),
        ("write", "*/registry/.staging-*/manifest.json:1"),
        ("write", "*/registry/CURRENT:1"),
    ])
    # From the publish kill on, every sample and judge shard was finished and each rerun kept it.
    shards = len(list((tmp_path / "clean" / "run").glob("*/shard-*.jsonl")))
    assert shards >= 6 and skipped[3:] == [shards] * 3, skipped
    clean = tree(tmp_path / "clean")
    assert tree(work) == clean
    assert sorted(p.name for p in (work / "registry").iterdir()) == ["CURRENT", "v0001"]
    assert (work / "registry" / "CURRENT").read_text() == "v0001\n"
    # A kill at a random moment, on a fresh start of its own (wherever it lands, the rerun finishes).
    shutil.rmtree(work)
    resume_through_kills(args, work, stage_dirs, [("at", rng.uniform(0.3, 0.9) * clean_s)])
    assert tree(work) == clean


def test_aggregate_and_rm_train_resume_alone(tmp_path, tiny_model_dir, prompt_file):
    """The stage commands on their own: `synth aggregate` killed inside each of its writes, and
    `salmon rm-train` killed inside the publish and inside the CURRENT switch (the rerun after the last
    finds its version published and does not publish a second), then, from scratch, at a random moment."""
    rng = random.Random(SEED + 2)
    work = tmp_path / "w"
    run_ok(["synth", "run", "--config", str(run_config(tmp_path, tiny_model_dir, prompt_file, work))])
    run = work / "run"
    acfg = tmp_path / "aggregate.yaml"
    acfg.write_text("require_order_agreement: false\neval_fraction: 0.34\n")
    agg_args = ["synth", "aggregate", "--pairs", str(run / "sample"), "--judgments", str(run / "judge"),
                "--principle-set", "concise", "--config", str(acfg)]
    run_ok([*agg_args, "--out", str(tmp_path / "agg_clean")])
    agg = tmp_path / "agg"
    resume_through_kills([*agg_args, "--out", str(agg)], agg, [], [
        ("write", "*/agg/train.jsonl:1"), ("write", "*/agg/eval.jsonl:1"), ("write", "*/agg/summary.json:1"),
    ])
    assert tree(agg) == tree(tmp_path / "agg_clean") and set(tree(agg)) == {"train.jsonl", "eval.jsonl"}

    tcfg = tmp_path / "train.yaml"
    tcfg.write_text(f"batch_size: 4\nlora_r: 2\nbase_model: {tiny_model_dir}\n")
    train_args = ["rm-train", "--data", str(agg), "--config", str(tcfg)]
    reg = tmp_path / "reg"  # the manifest records the config, registry path included: clean runs there too
    clean_s = timed([*train_args, "--registry", str(reg)])
    shutil.move(reg, tmp_path / "reg_clean")
    resume_through_kills([*train_args, "--registry", str(reg)], reg, [], [
        ("write", "*/.staging-*/manifest.json:1"),
        ("write", "*/reg/CURRENT:1"),
    ])
    assert sorted(p.name for p in reg.iterdir()) == ["CURRENT", "v0001"]
    r = run_ok([*train_args, "--registry", str(reg)])  # once more: the same version, nothing new
    assert json.loads(r.stdout)["version"] == "v0001" and json.loads(r.stdout)["reused"] is True
    clean = tree(tmp_path / "reg_clean")
    assert tree(reg) == clean
    # A kill at a random moment (training, most likely), on a fresh registry of its own.
    shutil.rmtree(reg)
    resume_through_kills([*train_args, "--registry", str(reg)], reg, [], [("at", rng.uniform(0.3, 0.9) * clean_s)])
    assert tree(reg) == clean
