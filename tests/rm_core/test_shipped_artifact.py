"""The reward model committed in rm_core/shipped: it verifies, it was built from what the repository
ships by the command its manifest names, `scorer: auto` serves it, and (slow) it reads principles.

The slow test is CI's guard on the shipped RM: on a subset of the check set (pairs and axes it never
trained on) it must keep flipping with the principle, or the build fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rm_core.registry import CONTRAST_ADAPTER_KIND, SHIPPED_REGISTRY, Registry

# Lower bounds for the slow check on 14 pairs: the shipped v0001 measured 10 / 7 / 5 of 14 flips
# (single / set / plain; the evaluation is deterministic), and each bound allows one pair less.
SINGLE_BOUND, SET_BOUND, PLAIN_BOUND = 9 / 14, 6 / 14, 4 / 14


def shipped_manifest():
    reg = Registry(SHIPPED_REGISTRY)
    assert reg.current() == "v0001", "salmon ships its reward model as rm_core/shipped/v0001"
    return reg.manifest("v0001", verify=True)  # every file against its sha256; no pickle files


def test_the_shipped_rm_verifies_against_its_manifest():
    m = shipped_manifest()
    assert m.base_model == "embedded" and m.kind == CONTRAST_ADAPTER_KIND
    assert any(f.endswith(".safetensors") for f in m.files)
    total = sum((SHIPPED_REGISTRY / "v0001" / f).stat().st_size for f in m.files)
    assert total < 8 * 2**20, f"{total} bytes: the shipped RM should stay a few MB"
    extra = m.model_extra
    assert extra["command"].startswith("salmon contrast-tune ") and "--ship" in extra["command"]
    assert {"held_out_axes", "check_set", "single_flip_before", "single_flip_after"} <= set(m.eval_metrics)


def test_it_was_trained_on_the_repositorys_own_axes_with_the_held_out_axes_left_out():
    """Rebuilding the manifest's training plan from the committed axis files gives its data hash, and
    no held-out or check-set axis is among the trained ones."""
    from data_synth.contrast_tune import ContrastTuneConfig, data_hash, training_plan
    from rm_core.checkset import DEFAULT_CHECK_SET, flip_pair_principle, load_pairs

    extra = shipped_manifest().model_extra
    cfg = ContrastTuneConfig(**extra["config"])
    train_axes, held_axes, epochs = training_plan(cfg)
    assert data_hash(epochs) == extra["data_sha256"], "the axis files changed since the shipped RM was built"
    trained = {e.axis for batches in epochs for b in batches for e in b}
    assert trained == {a.name for a in train_axes} and not trained & set(extra["held_out_axes"])
    assert not trained & {flip_pair_principle(p).name for p in load_pairs(DEFAULT_CHECK_SET)}
    assert ContrastTuneConfig().model_dump() == cfg.model_dump(), (
        "the shipped RM was built with other settings than `salmon contrast-tune`'s defaults")


def test_auto_serves_the_shipped_rm_for_the_embedded_model():
    from rm_core.scorer_table import resolve_kind

    assert resolve_kind("auto", "embedded", None) == "shipped"
    assert resolve_kind("auto", "some/other/model", None) == "contrastive"


@pytest.mark.slow
def test_the_shipped_rm_reads_principles_on_check_pairs_it_never_trained_on(tmp_path):
    """`salmon check --scorers shipped` as a user runs it, on one check pair per axis (14), all three
    columns. Bounds sit below the measured figures (README) by a margin for 14-pair noise; a scorer
    that stopped reading its principles (chance is 25%) fails them."""
    out = tmp_path / "check.json"
    r = subprocess.run([str(Path(sys.executable).parent / "salmon"), "check", "--scorers", "shipped",
                        "--limit", "14", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads(out.read_text())["scorers"]["shipped"]
    print(r.stdout)
    assert table["version"] == "shipped:v0001"
    assert table["single"]["flip_rate"] >= SINGLE_BOUND, table
    assert table["set"]["flip_rate"] >= SET_BOUND, table
    assert table["plain"]["flip_rate"] >= PLAIN_BOUND, table
