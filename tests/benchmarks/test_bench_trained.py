"""`salmon bench --scorer trained` on a tiny registry version: the four configurations, the trained
scorer's own target and FLOP count, and its argument errors. No timing assertions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks.cli import main, parse_args, resolve_trained
from benchmarks.report import CONFIGS, workload_flops
from rm_core.render import RenderedInput
from salmon.errors import UserError
from tests.rm_service.helpers import publish_tiny_version


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("bench-trained")
    reg = tmp / "registry"
    version = publish_tiny_version(reg, tiny_model_dir, seed=5, tmp=tmp, mean=0.1, std=1.5)
    return reg, version


def test_bench_of_the_trained_scorer_end_to_end(registry, tmp_path):
    reg, version = registry
    out, md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    argv = ["bench", "--scorer", "trained", "--registry", str(reg), "--prompts", "2", "--generations", "3",
            "--rounds", "1", "--prefix-tokens", "80", "--min-response-tokens", "4", "--max-response-tokens", "16",
            "--max-batch-tokens", "512", "--threads", "1", "--out", str(out), "--benchmarks-md", str(md)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["scorer"] == "trained" and report["workload"]["scorer_version"] == version
    rows = report["summary"]["configurations"]
    assert set(rows) == set(CONFIGS)
    for name in ("limit", "service", "service_no_cache"):
        assert rows[name]["model_version"] == version  # every configuration scored with that version
    for name, r in rows.items():
        assert r["wall_s"] > 0 and r["gflop"] > 0 and r["peak_rss_mib"] > 0
        if name != "limit":
            assert r["requests"] == 2
            # The cached path, the full path and the stand-in's padded forward give the limit's scores.
            assert r["max_abs_score_diff_vs_limit"] <= 1e-4
    assert rows["service"]["cached_tokens"] > 0 and rows["service_no_cache"]["cached_tokens"] == 0
    assert rows["limit"]["sequences"] == 2 * 3  # one sequence per item
    targets = report["summary"]["targets"]
    assert "service_within_1.15x_of_limit" in targets and targets["cache_within_bound"] is True
    work = report["summary"]["work_ratios"]
    assert work["baseline_vs_service"] >= work["no_cache_vs_service"] > 1
    text = md.read_text()
    assert f"(trained {version}, model {report['workload']['model']})" in text and "target ≤ 1.15" in text


def test_trained_arguments_that_cannot_work_are_user_errors(tmp_path, registry):
    with pytest.raises(UserError):
        parse_args(["--registry", str(tmp_path)])  # a registry is for the trained scorer only
    with pytest.raises(UserError):
        parse_args(["--scorer", "trained", "--version", "v0001"])  # the shipped RM serves its CURRENT
    empty = tmp_path / "empty-registry"
    empty.mkdir()
    with pytest.raises(UserError, match="no CURRENT"):
        resolve_trained(parse_args(["--scorer", "trained", "--registry", str(empty)]))
    reg, version = registry
    with pytest.raises(UserError, match="base model"):
        resolve_trained(parse_args(["--scorer", "trained", "--registry", str(reg), "--model", "elsewhere"]))
    args = parse_args(["--scorer", "trained", "--registry", str(reg)])
    assert resolve_trained(args) == version and args.version == version and args.model


def test_trained_flops_count_a_scalar_head_not_the_vocabulary():
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=2, vocab_size=10)
    # linear 288 per token, 16 per (query, key) pair, the head 2·4·1 = 8 per token it is applied to.
    a = RenderedInput((1, 2, 3), (4, 5), (6, 7, 8, 9))
    b = RenderedInput((1, 2, 3), (4, 5), (6, 7))
    f = workload_flops(cfg, [[a, b]], value_head="scalar")
    # service: the head at each response's last token only; the prompt once.
    assert f["service"] == (4 * 288 + 8 + 16 * 30) + (2 * 288 + 8 + 16 * 13) + (2 * 288 + 16 * 9)
    # full forwards apply the head at every (padded) position, as transformers' classifier does.
    assert f["no_cache"] == (9 * 288 + 16 * 45 + 9 * 8) + (7 * 288 + 16 * 28 + 7 * 8)
    assert f["baseline"] == 2 * (9 * 288 + 16 * 45 + 9 * 8)
    with pytest.raises(ValueError):
        workload_flops(cfg, [[a]], value_head="vocab")


def test_sweep_runs_each_point_once_and_writes_table_png_and_markdown(registry, tmp_path):
    reg, version = registry
    out, md, png = tmp_path / "sweep.json", tmp_path / "BENCH.md", tmp_path / "sweep.png"
    argv = ["bench", "--scorer", "trained", "--registry", str(reg), "--sweep", "--sweep-generations", "2,3",
            "--sweep-prefix-tokens", "60,100", "--generations", "2", "--prefix-tokens", "60", "--prompts", "1",
            "--min-response-tokens", "4", "--max-response-tokens", "8", "--threads", "1",
            "--out", str(out), "--benchmarks-md", str(md), "--sweep-png", str(png)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    points = [(p["generations"], p["prefix_tokens"]) for p in result["points"]]
    assert points == [(2, 60), (3, 60), (2, 100)]  # (2, 60) lies on both axes and runs once
    assert result["points"][0]["axes"] == ["generations", "prefix_tokens"]
    for p in result["points"]:
        assert set(p["ms_per_item"]) == {"limit", "service"} and p["service_vs_limit_time"] > 0
        assert p["max_abs_score_diff_vs_limit"] <= 1e-4
    assert result["points"][2]["prefix_tokens_actual"] > result["points"][0]["prefix_tokens_actual"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert f"`salmon bench --sweep` (trained {version}" in text and text.count("| G, block | 2 |") == 1


def test_sweep_arguments_that_cannot_work_are_user_errors():
    with pytest.raises(UserError):
        parse_args(["--sweep"])  # the sweep is of the trained scorer
    with pytest.raises(UserError):
        parse_args(["--scorer", "trained", "--sweep", "--configs", "service"])
    with pytest.raises(UserError):
        parse_args(["--scorer", "trained", "--sweep", "--sweep-generations", "4,x"])
    assert parse_args(["--scorer", "trained", "--sweep"]).configs == ["limit", "service"]
    assert parse_args([]).configs == list(CONFIGS)
