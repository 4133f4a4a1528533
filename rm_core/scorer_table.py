"""The scorer table: every scorer kind the service may serve, registered here and only here.

``ServiceSettings.scorer`` (rm_service.settings), ``salmon serve/score --scorer``, ``salmon demo
--scorer`` and ``ModelManager.build`` (rm_service.serving) all read this table, so a kind registered
here is accepted, offered and built everywhere. Adding one::

    def build_toy(opts: ScorerOptions, common: dict[str, Any]) -> Scorer: ...

    # in BUILTIN below, or at run time:
    register(ScorerSpec(kind="toy", help="one line for the settings description", build=build_toy))

``auto`` is not a kind but the selector in front of the table (``resolve_kind``): the registry's
CURRENT version when a registry is given and has one (trained), else the shipped RM when the model
is its base (shipped), else contrastive.

Nothing here imports torch: the table is read by ``--help`` and by settings validation. A builder
imports its heavy parts inside itself. rm_core knows nothing of the service: a builder gets plain
values (``ScorerOptions``) and the keyword arguments every model-backed scorer takes (``common``:
batch and length limits, the prefix cache).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rm_core.scorers import Scorer
    from salmon.modeling import ModelOptions

AUTO = "auto"
KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
AUTO_HELP = ("auto: the registry's CURRENT version if a registry is given and has one, else the shipped RM "
             "when the model is its base (embedded), else contrastive.")


@dataclass(frozen=True)
class ScorerOptions:
    """What a builder may read: the service's settings as plain values."""

    model: str = "embedded"                 # causal LM source of the zero-shot scorers
    options: ModelOptions | None = None     # dtype, attention, device
    registry: Path | None = None            # reward-model registry directory
    version: str | None = None              # the registry version to load; None: its CURRENT
    contrast: str = "per_principle"         # contrastive: per_principle or whole_set
    contrast_adapter: Path | None = None    # contrastive: a `salmon contrast-tune` output directory
    rule_pattern: str = r"\bplease\b"
    rule_length_penalty: float = 0.0


@dataclass(frozen=True)
class ScorerSpec:
    """One row of the scorer table."""

    kind: str                                                   # what --scorer and settings name it
    help: str                                                   # one line, for the settings description
    build: Callable[[ScorerOptions, dict[str, Any]], Scorer]    # (options, common kwargs) -> scorer
    needs_registry: bool = False                                # settings refuse it without 'registry'


# -- the built-in kinds ------------------------------------------------------------------------------------
def _no_registry_error() -> Exception:
    from rm_core.registry import RegistryError

    return RegistryError("no registry is configured; start the service with --registry DIR")


def build_shipped(opts: ScorerOptions, common: dict[str, Any]) -> Scorer:
    from rm_core.scorers import load_shipped

    return load_shipped(opts.options, **common)


def build_contrastive(opts: ScorerOptions, common: dict[str, Any]) -> Scorer:
    from rm_core.scorers import load_zero_shot

    return load_zero_shot("contrastive", opts.model, opts.options, adapter=opts.contrast_adapter,
                          contrast=opts.contrast, **common)


def build_probe(opts: ScorerOptions, common: dict[str, Any]) -> Scorer:
    from rm_core.scorers import load_zero_shot

    return load_zero_shot("probe", opts.model, opts.options, **common)


def build_trained(opts: ScorerOptions, common: dict[str, Any]) -> Scorer:
    from rm_core.scorers import load_trained

    if opts.registry is None:
        raise _no_registry_error()
    return load_trained(opts.registry, opts.version, opts.options, **common)


def build_rule(opts: ScorerOptions, common: dict[str, Any]) -> Scorer:
    from rm_core.scorers import RuleScorer

    return RuleScorer(opts.rule_pattern, opts.rule_length_penalty)  # no model: the common kwargs do not apply


BUILTIN: tuple[ScorerSpec, ...] = (
    ScorerSpec("shipped", "the principle-following RM that ships with salmon (one pass, reads plain principles).",
               build_shipped),
    ScorerSpec("contrastive", "zero-shot log p(y|x,P) - log p(y|x,P with each principle negated).",
               build_contrastive),
    ScorerSpec("probe", "zero-shot yes/no log-odds.", build_probe),
    ScorerSpec("trained", "a registry version (needs registry).", build_trained, needs_registry=True),
    ScorerSpec("rule", "regex count minus length penalty, no model (smoke runs and rule-based rewards).",
               build_rule),
)

_TABLE: dict[str, ScorerSpec] = {}


# -- the table ---------------------------------------------------------------------------------------------
def register(spec: ScorerSpec) -> ScorerSpec:
    """Add ``spec`` to the table; a kind already taken is an error (unregister it first)."""
    if not KIND_RE.match(spec.kind) or spec.kind == AUTO:
        raise ValueError(f"scorer kind {spec.kind!r} must be a lowercase identifier other than {AUTO!r}")
    if spec.kind in _TABLE:
        raise ValueError(f"scorer kind {spec.kind!r} is already registered")
    _TABLE[spec.kind] = spec
    return spec


def unregister(kind: str) -> None:
    del _TABLE[kind]


def scorer_kinds() -> list[str]:
    """Registered kinds, in registration order (the built-in ones first)."""
    return list(_TABLE)


def scorer_choices() -> list[str]:
    """What ``--scorer`` and the settings accept: the selector ``auto``, then every registered kind."""
    return [AUTO, *_TABLE]


def get_spec(kind: str) -> ScorerSpec:
    try:
        return _TABLE[kind]
    except KeyError:
        raise ValueError(f"scorer {kind!r} is not registered; choose one of: {', '.join(scorer_choices())}") from None


def describe() -> str:
    """The selector's rule and each registered kind's line: the settings field's description."""
    return " ".join([AUTO_HELP, *(f"{s.kind}: {s.help}" for s in _TABLE.values())])


def resolve_kind(kind: str, model: str, registry: Path | None) -> str:
    """``kind`` itself, or for ``auto`` the kind its rule picks (see the module docstring)."""
    if kind != AUTO:
        return kind
    from rm_core.registry import Registry, shipped_version

    if registry is not None and Registry(registry).current():
        return "trained"
    if shipped_version(model):
        return "shipped"
    return "contrastive"


def build_scorer(kind: str, opts: ScorerOptions, common: dict[str, Any]) -> Scorer:
    """The scorer of a registered ``kind`` (not ``auto``: resolve it first)."""
    return get_spec(kind).build(opts, common)


for _spec in BUILTIN:
    register(_spec)
