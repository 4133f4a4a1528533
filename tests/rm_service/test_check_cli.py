"""`salmon check`: a scorer name it does not know is one line and exit 2, naming the valid ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_unknown_check_scorer_is_one_line_listing_the_valid_ones():
    from rm_service.cli import check_variants

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "salmon"), "check", "--scorers", "probe,bad"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-800:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert lines[0].startswith("salmon check: error: --scorers: unknown scorer 'bad'; choose from ")
    assert lines[0].endswith(", ".join(check_variants())) and "probe" in check_variants()


def test_the_scorer_flag_offers_the_scorer_table():
    import argparse

    from rm_core.scorer_table import scorer_choices
    from rm_service.cli import _settings_args

    p = argparse.ArgumentParser()
    _settings_args(p)
    (flag,) = [a for a in p._actions if a.dest == "scorer"]
    assert list(flag.choices) == scorer_choices()
    assert list(flag.choices) == ["auto", "shipped", "contrastive", "probe", "trained", "rule"]
