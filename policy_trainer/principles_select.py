"""RL-time principle selection (SALMON) and the per-run set timeline (schedule + user switches).

SALMON does not score RL rollouts against a fixed list: for every prompt it draws a few principles
by weight from a larger RL set, boosted towards the prompt's kind (reasoning prompts get the
reasoning/numerical principles, red-team prompts the ethical/harmless ones), and always adds the
intervention principles that close reward hacks seen during RL. This module does that, with no
HTTP and no TRL, so PPO (and tests) reuse it.

Every draw is a pure function of (seed, set hash, step, prompt id): a resumed run, or a second
rank, selects exactly what the interrupted one would have.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from principles.schema import Principle, PrincipleSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The principles one prompt is scored against.

    ``inline`` False means "the whole named set": requests then name it (``name@hash``) instead of
    carrying the text, which lets the service reuse its cached principle prefix for the whole run.
    """

    set_ref: str
    principles: tuple[Principle, ...]
    inline: bool

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """Requests group items whose selections share this key."""
        return (self.set_ref, tuple(p.name for p in self.principles))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.principles]


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass
class PrincipleSelector:
    """Per-prompt selection: k of the set by (boosted) weight, without replacement, + intervention."""

    k: int | None = None
    intervention: PrincipleSet | None = None
    type_boost: float = 128.0
    type_tags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    seed: int = 0

    def weights(self, pset: PrincipleSet, prompt_type: str | None) -> np.ndarray:
        boosted = set(self.type_tags.get(prompt_type or "", ()))
        w = np.array([p.weight for p in pset.principles], dtype=np.float64)
        if boosted:
            hit = np.array([bool(boosted & ({p.name} | set(p.tags))) for p in pset.principles])
            w = w + hit * self.type_boost
        return w

    def select(self, pset: PrincipleSet, *, step: int, prompt_id: str, prompt_type: str | None) -> Selection:
        extra = self.intervention.principles if self.intervention else ()
        if self.k is None or (self.k >= len(pset.principles) and not extra):
            return Selection(pset.ref, pset.principles, inline=False)
        chosen: tuple[Principle, ...]
        if self.k >= len(pset.principles):
            chosen = pset.principles
        else:
            w = self.weights(pset, prompt_type)
            positive = np.flatnonzero(w > 0)
            if len(positive) <= self.k:  # fewer drawable principles than k: all of them
                idx = positive
            else:
                rng = _rng(self.seed, pset.hash, step, prompt_id)
                idx = rng.choice(positive, size=self.k, replace=False, p=w[positive] / w[positive].sum())
            # Set order, not draw order: equal selections then share one request and one cached prefix.
            chosen = tuple(pset.principles[i] for i in sorted(int(i) for i in idx))
        names = {p.name for p in chosen}
        chosen += tuple(p for p in extra if p.name not in names)
        return Selection(pset.ref, chosen, inline=True)


@dataclass(frozen=True)
class SetEvent:
    step: int
    ref: str
    source: str  # "start" | "schedule" | "control_file" | "resume"

    def as_dict(self) -> dict:
        return {"step": self.step, "set": self.ref, "source": self.source}


class SetTimeline:
    """Which principle set is active at each step: the start set, scheduled switches, and switches the
    user asks for mid-run by writing a set name/path into ``control_file``. Every switch is logged."""

    def __init__(self, start: PrincipleSet, schedule: Sequence[tuple[int, PrincipleSet]] = (),
                 control_file: str | Path | None = None):
        self.sets: dict[str, PrincipleSet] = {start.ref: start}
        self._schedule = sorted(schedule, key=lambda s: s[0])
        for _, s in self._schedule:
            self.sets[s.ref] = s
        self.control_file = Path(control_file) if control_file else None
        self._control_seen: str | None = None
        self.events: list[SetEvent] = [SetEvent(0, start.ref, "start")]
        self._scheduled_done = 0

    @property
    def current(self) -> PrincipleSet:
        return self.sets[self.events[-1].ref]

    def switch(self, step: int, pset: PrincipleSet, source: str) -> None:
        self.sets[pset.ref] = pset
        if pset.ref != self.events[-1].ref:
            log.warning("principle set switch at step %d: %s -> %s (%s)", step, self.events[-1].ref, pset.ref, source)
        self.events.append(SetEvent(step, pset.ref, source))

    def at_step(self, step: int) -> PrincipleSet:
        """Advance to ``step`` (monotonic) through the schedule and return the set that scores it."""
        while self._scheduled_done < len(self._schedule) and self._schedule[self._scheduled_done][0] <= step:
            s_step, pset = self._schedule[self._scheduled_done]
            self._scheduled_done += 1
            self.switch(max(s_step, 0), pset, "schedule")
        return self.current

    def poll_control(self) -> str | None:
        """A set source the user newly wrote into ``control_file`` (the caller loads and registers it,
        then calls :meth:`switch`); None when there is nothing new."""
        if self.control_file is None or not self.control_file.is_file():
            return None
        text = self.control_file.read_text(encoding="utf-8").strip()
        if not text or text == self._control_seen:
            return None
        self._control_seen = text
        return text

    def state_dict(self) -> dict:
        return {"events": [e.as_dict() for e in self.events], "control_seen": self._control_seen,
                "scheduled_done": self._scheduled_done,
                "sets": {ref: s.canonical() for ref, s in self.sets.items()}}

    def load_state_dict(self, state: dict, resume_step: int) -> None:
        """Restore the timeline up to ``resume_step`` (events after it were never trained on)."""
        for ref, data in state.get("sets", {}).items():
            self.sets.setdefault(ref, PrincipleSet.model_validate(data))
        events = [SetEvent(e["step"], e["set"], e["source"]) for e in state.get("events", [])
                  if e["step"] <= resume_step and e["set"] in self.sets]
        if events:
            self.events = events
        self._control_seen = state.get("control_seen")
        self._scheduled_done = sum(1 for s, _ in self._schedule if s <= resume_step)
