"""The written axes of principles/pretrain/*.yaml: their schema, their one loader, the axes held out
of training by default, and held-out axes as flip-check pairs.

Each axis is a principle (definition, negative definition, plain instruction and its opposite) with
minimal pairs (prompt, a response that follows it, one that violates it). The reward-model stages of
data_synth train on them; ``salmon check --held-out-axes`` measures on the held-out ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from principles.schema import Principle
from salmon.config import format_validation_error
from salmon.errors import UserError

AXES_DIR = Path(str(resources.files("principles"))) / "pretrain"
# Held out of training by default (the check set's 14 axes are never in the training files at all):
# - three axes of each of the first four family files, picked to span them;
# - the written axes closest to a check-set axis (so that the check set stays unseen in substance too:
#   a numbered procedure is nearly a bullet list, a child's register nearly plain language, ...);
# - ten more across the later files, so that held-out figures rest on about 250 pairs.
DEFAULT_HELD_OUT = (
    "ends_with_summary", "uses_table", "closing_question",          # format
    "humorous", "uses_emoji", "speaks_in_first_person",             # tone
    "uses_analogy", "pros_and_cons", "asks_clarifying_question",    # content
    "corrects_false_premise", "uses_metric_units", "written_in_spanish",  # values
    "numbered_procedure", "written_for_young_child", "one_syllable_words", "idiom_free_for_learners",
    "avoids_flattery", "gentle_about_mistakes", "even_tempered_with_angry_user", "unsnobbish_about_tastes",
    "em_dash_asides", "pirate_voice", "alliteration", "offers_mnemonic", "considers_animal_welfare",
    "iso_8601_dates", "opens_with_greeting", "skeptical_of_reported_claims", "mentions_monetary_cost",
    "inclusive_we",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AxisPair(_Strict):
    prompt: str = Field(min_length=1)
    follows: str = Field(min_length=1, description="Satisfies the definition (and the plain instruction).")
    violates: str = Field(min_length=1, description="Satisfies the negative definition (and the opposite).")


class Axis(_Strict):
    name: str
    family: str
    definition: str
    negative_definition: str
    plain: str = Field(description="The definition as a plain instruction to the assistant.")
    opposite: str = Field(description="A plain instruction pointing the other way, worded positively.")
    pairs: list[AxisPair] = Field(min_length=1)

    @property
    def principle(self) -> Principle:
        return Principle(name=self.name, definition=self.definition, negative_definition=self.negative_definition)


def load_axes(paths: Sequence[str | Path] | None = None) -> list[Axis]:
    """Axes from YAML files (default: the shipped principles/pretrain/*.yaml); errors name file and field."""
    files = [Path(p) for p in paths] if paths else sorted(AXES_DIR.glob("*.yaml"))
    if not files:
        raise UserError(f"no axis files found in {AXES_DIR}")
    axes: list[Axis] = []
    for f in files:
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{f}: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict) or not isinstance(data.get("axes"), list):
            raise UserError(f"{f}: expected a mapping with a list under 'axes'")
        for i, a in enumerate(data["axes"]):
            try:
                axes.append(Axis.model_validate(a))
            except ValidationError as e:
                raise UserError(format_validation_error(e, f"{f}: axes[{i}]", Axis)) from None
    names = [a.name for a in axes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"axis names must be unique; repeated: {', '.join(dup)}")
    return axes


def heldout_flip_pairs(axes: Sequence[Axis], per_axis: int) -> list[dict[str, Any]]:
    """Held-out axes as flip-check pairs (the check set's format plus the plain/opposite forms)."""
    out = []
    for ax in axes:
        for k, pair in enumerate(ax.pairs[:per_axis]):
            out.append({"id": f"{ax.name}-{k}", "prompt": pair.prompt, "response_a": pair.follows,
                        "response_b": pair.violates, "plain": ax.plain, "opposite": ax.opposite,
                        "principle": ax.principle.model_dump(exclude_defaults=True), "axis": ax.name})
    return out
