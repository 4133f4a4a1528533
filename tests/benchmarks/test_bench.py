"""`salmon bench` end to end on the tiny model: all four configurations, ratios, JSON and BENCHMARKS.md.

No timing assertions: this checks the benchmark runs and reports, not how fast anything is.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main, parse_args
from benchmarks.report import CONFIGS, workload_flops
from rm_core.render import RenderedInput
from salmon.errors import UserError


def test_bench_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    argv = ["bench", "--model", str(tiny_model_dir), "--prompts", "2", "--generations", "2", "--rounds", "1",
            "--prefix-tokens", "80", "--min-response-tokens", "4", "--max-response-tokens", "12",
            "--max-batch-tokens", "512", "--threads", "1", "--out", str(out), "--benchmarks-md", str(md)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["summary"]["configurations"]
    assert set(rows) == set(CONFIGS)
    for name, r in rows.items():
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
        if name != "limit":
            assert r["requests"] == 2 and r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"]
            # Every configuration computes the same scores as the limit (fp32, same sequences).
            assert r["max_abs_score_diff_vs_limit"] < 1e-2
    assert rows["service"]["cached_tokens"] > 0 and rows["service_no_cache"]["cached_tokens"] == 0
    assert rows["service"]["tokens_reported"] == rows["limit"]["tokens_reported"] == report["summary"]["tokens"]
    ratios = report["summary"]["ratios"]
    assert set(ratios) == {"service_vs_limit_time", "speedup_vs_no_cache", "speedup_vs_baseline"}
    assert all(v > 0 for v in ratios.values())
    assert report["summary"]["targets"]["cache_within_bound"] is True
    work = report["summary"]["work_ratios"]
    assert work["baseline_vs_service"] >= work["no_cache_vs_service"] > 1  # padding only adds work
    assert all(rows[n]["gflop"] > 0 and rows[n]["gflop_per_s"] > 0 for n in CONFIGS)
    assert report["workload"]["prefix_tokens_actual"] >= 80
    text = md.read_text()
    assert text.startswith("# Benchmarks") and text.count("## ") == 1 and "(2) vs (1)" in text
    assert "| (4) serve_rm-style stand-in (not OpenRLHF) |" in text
    # A second run appends below the first.
    assert main(argv[:-4] + ["--configs", "limit,service", "--benchmarks-md", str(md)]) == 0
    assert md.read_text().count("## ") == 2


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--min-response-tokens", "10", "--max-response-tokens", "5"],
                                 ["--configs", "limit,nope"]])
def test_bad_arguments_are_user_errors(bad):
    with pytest.raises(UserError):
        parse_args(bad)


def test_workload_flops_match_a_hand_count():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=2, vocab_size=10)
    # linear 2·(4·2·2·2 + 4·1·2·2 + 3·4·8) = 288 per token, 16 per (query, key) pair, lm_head 80 per token.
    a = RenderedInput((1, 2, 3), (4, 5), (6, 7, 8, 9))
    b = RenderedInput((1, 2, 3), (4, 5), (6, 7))
    f = workload_flops(cfg, [[a, b]])
    # service: a's 4 response tokens see 6..9 keys, b's 2 see 6..7; the prompt once sees 4..5 keys.
    assert f["service"] == 4 * 368 + 16 * 30 + 2 * 368 + 16 * 13 + 2 * 288 + 16 * 9
    # no cache: every full sequence, causal; baseline: both padded to 9 tokens.
    assert f["no_cache"] == (9 * 288 + 16 * 45 + 4 * 80) + (7 * 288 + 16 * 28 + 2 * 80)
    assert f["baseline"] == (9 * 288 + 16 * 45 + 4 * 80) + (9 * 288 + 16 * 45 + 2 * 80)
