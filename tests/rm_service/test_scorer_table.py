"""The scorer table: a kind registered once is accepted by the settings, offered by --scorer and built
by ModelManager, with nothing else edited; the built-in kinds keep their rules and messages."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from pydantic import ValidationError

from rm_core import scorer_table
from rm_core.scorer_table import ScorerOptions, ScorerSpec, register, scorer_choices, unregister
from rm_core.scorers import RuleScorer
from rm_service.metrics import Metrics
from rm_service.serving import ModelManager
from rm_service.settings import ServiceSettings

BUILT: list[tuple[ScorerOptions, dict]] = []


class ToyScorer(RuleScorer):
    kind = "toy"


def build_toy(opts: ScorerOptions, common: dict) -> ToyScorer:
    BUILT.append((opts, common))
    return ToyScorer(opts.rule_pattern, opts.rule_length_penalty)


@pytest.fixture
def toy():
    BUILT.clear()
    spec = register(ScorerSpec(kind="toy", help="a test scorer.", build=build_toy))
    try:
        yield spec
    finally:
        unregister("toy")


@pytest.fixture
def needs_registry_toy():
    register(ScorerSpec(kind="toy_reg", help="a test scorer of a registry.", build=build_toy, needs_registry=True))
    try:
        yield
    finally:
        unregister("toy_reg")


def test_a_registered_kind_is_accepted_offered_and_built(toy):
    from rm_service.cli import serve

    settings = ServiceSettings(scorer="toy", rule_pattern=r"\btoy\b", rule_length_penalty=0.5)
    assert settings.scorer == "toy"

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        serve(["--help"])
    assert done.value.code == 0
    assert "{auto,shipped,contrastive,probe,trained,rule,toy}" in out.getvalue()

    mm = ModelManager(settings, Metrics())
    scorer = mm.build()
    assert isinstance(scorer, ToyScorer) and scorer.kind == "toy"
    assert scorer.score_items([], [("hi", "a toy, a toy"), ("hi", "no")]) == [2 - 0.5 * 12, -0.5 * 2]
    (opts, common), = BUILT
    assert opts.model == "embedded" and opts.registry is None and opts.version is None
    assert opts.options == mm.options and opts.contrast == "per_principle"
    assert common["prefix_cache"] is mm.prefix_cache and common["max_batch_tokens"] == settings.max_batch_tokens


def test_an_unregistered_kind_is_refused_again(toy):
    unregister("toy")
    try:
        with pytest.raises(ValidationError, match="Input should be 'auto', 'shipped', 'contrastive', 'probe', "
                                                  "'trained' or 'rule'"):
            ServiceSettings(scorer="toy")
    finally:
        register(toy)


def test_an_unknown_kind_reads_as_the_literal_error_it_always_was():
    for bad in ("bad", 5):
        with pytest.raises(ValidationError) as e:
            ServiceSettings(scorer=bad)
        (err,) = e.value.errors()
        assert err["type"] == "literal_error" and err["loc"] == ("scorer",)
        assert err["msg"] == "Input should be 'auto', 'shipped', 'contrastive', 'probe', 'trained' or 'rule'"


def test_a_kind_that_needs_a_registry_is_refused_without_one(needs_registry_toy, tmp_path):
    for kind in ("trained", "toy_reg"):
        with pytest.raises(ValidationError, match=f"scorer '{kind}' needs 'registry' \\(a registry directory\\)"):
            ServiceSettings(scorer=kind)
        assert ServiceSettings(scorer=kind, registry=tmp_path).scorer == kind


def test_the_table_refuses_auto_a_bad_name_and_a_taken_kind():
    for kind in ("auto", "Bad-Name", "rule"):
        with pytest.raises(ValueError, match=repr(kind)):
            register(ScorerSpec(kind=kind, help="x", build=build_toy))
    assert scorer_choices() == ["auto", "shipped", "contrastive", "probe", "trained", "rule"]


def test_the_settings_description_names_auto_and_every_built_in_kind():
    description = ServiceSettings.model_fields["scorer"].description
    assert description.startswith(scorer_table.AUTO_HELP)
    for spec in scorer_table.BUILTIN:
        assert f"{spec.kind}: {spec.help}" in description


def test_auto_picks_a_user_registry_current_then_the_shipped_rm_then_contrastive(monkeypatch, tmp_path):
    from rm_core import registry as registry_mod

    monkeypatch.setattr(registry_mod, "SHIPPED_REGISTRY", tmp_path / "nothing-shipped")
    user = tmp_path / "registry"
    user.mkdir()
    assert scorer_table.resolve_kind("auto", "embedded", None) == "contrastive"
    assert scorer_table.resolve_kind("auto", "embedded", user) == "contrastive"  # no CURRENT yet
    assert scorer_table.resolve_kind("probe", "embedded", user) == "probe"
    monkeypatch.setattr(registry_mod, "shipped_version", lambda model: "v0001" if model == "embedded" else None)
    assert scorer_table.resolve_kind("auto", "embedded", user) == "shipped"
    assert scorer_table.resolve_kind("auto", "other", user) == "contrastive"
    monkeypatch.setattr(registry_mod.Registry, "current", lambda self: "v0003")
    assert scorer_table.resolve_kind("auto", "embedded", user) == "trained"


def test_trained_without_a_registry_is_the_registry_error_it_was():
    from rm_core.registry import RegistryError

    with pytest.raises(RegistryError, match=r"^no registry is configured; start the service with --registry DIR$"):
        scorer_table.build_scorer("trained", ScorerOptions(registry=None), {})


def test_the_rule_kind_builds_the_rule_scorer_from_its_options():
    scorer = scorer_table.build_scorer("rule", ScorerOptions(rule_pattern="x", rule_length_penalty=0.25), {"a": 1})
    assert type(scorer) is RuleScorer and scorer.version == "rule:x" and scorer.length_penalty == 0.25


def test_importing_the_table_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, rm_core.scorer_table, rm_service.settings; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.stdout.strip() == "False", r.stderr[-800:]
