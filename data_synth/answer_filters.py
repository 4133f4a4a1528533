"""Post-filters for generated answers (SELF-ALIGN's principle-driven answers, I-SHEEP's self-made data).

Each filter is a small pure function on one answer's text. Two kinds:

- *editing* filters return the answer changed (or the same text): ``cut_at_turn_marker`` cuts the
  answer where a small model starts writing the next turn of the dialogue itself,
  ``drop_repeated_sentences`` removes sentences said before, ``strip_thoughts`` removes an
  "internal thoughts" block that came out in the answer;
- *dropping* filters return a reason (a string) or None: ``blacklisted`` (a phrase the user does not
  want in training data, e.g. "As an AI language model"), ``too_short``, ``too_long``.

``apply_filters`` runs them in a fixed order (edits first, so that the drop filters judge the text
that would be trained on) and counts, per filter, how many answers it changed or dropped. A dropped
answer keeps its reason, so a report can say why each one went. The counts obey
``offered == kept + sum(dropped.values())`` (tested).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Lines a small chat model writes when it goes on to play both sides of the dialogue. Matched at the
# start of a line (after optional spaces, markdown bold or a hash), case-insensitively.
DEFAULT_TURN_MARKERS: tuple[str, ...] = (
    "User:", "Human:", "USER:", "Assistant:", "AI:", "### User", "### Human", "### Instruction", "Question:",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|user|>", "<|assistant|>",
)

# Phrases that mark an answer the user does not want to train on; ours, and only a default: the config
# replaces the list.
DEFAULT_BLACKLIST: tuple[str, ...] = (
    "as an ai language model",
    "i am an ai language model",
    "internal thoughts",
    "i'm sorry, but i cannot provide",
)

# A leading "internal thoughts" block: it ends at the first line break (the exemplars' thoughts are one
# line) or at an "Answer:" label on the same line; with neither, the whole text is thoughts.
THOUGHTS_RE = re.compile(r"^\s*\**\s*(?:internal\s+)?thoughts?\s*\**\s*:.*?(?:\n|\s\**\s*answer\s*\**\s*:\s*\**|\Z)",
                         re.IGNORECASE | re.DOTALL)
ANSWER_LABEL_RE = re.compile(r"^\s*\**\s*answer\s*\**\s*:\s*\**\s*", re.IGNORECASE)

# A sentence: a run up to its end marks (. ! ?) or a line end, with the whitespace after it. The three
# alternatives cover every character, so the pieces join back to the text.
SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]*\s*|[.!?]+\s*|\s+")
WORD_RE = re.compile(r"\w+")


class AnswerFilterConfig(BaseModel):
    """Settings of the post-filters (a config section of SELF-ALIGN and I-SHEEP)."""

    model_config = ConfigDict(extra="forbid")

    turn_markers: list[str] = Field(default_factory=lambda: list(DEFAULT_TURN_MARKERS), description=(
        "The answer is cut at the first line that starts with one of these (the model writing the next "
        "turn itself). [] turns the filter off."))
    strip_thoughts: bool = Field(default=True, description="Remove an 'Internal thoughts: ...' block that the "
                                 "model wrote into its answer, and an 'Answer:' label before it.")
    drop_repeats: bool = Field(default=True, description="Remove sentences that repeat an earlier sentence "
                               "of the same answer (compared on lower-cased words).")
    blacklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLACKLIST), description=(
        "Drop an answer containing any of these phrases (case-insensitive). [] turns the filter off."))
    min_words: int = Field(default=3, ge=0, description="Drop an answer with fewer words (after the edits).")
    max_words: int | None = Field(default=None, ge=1, description="Drop an answer with more words; None: no cap.")


# -- editing filters --------------------------------------------------------------------------------------
def cut_at_turn_marker(text: str, markers: Sequence[str] = DEFAULT_TURN_MARKERS) -> str:
    """``text`` up to the first line starting with a turn marker (or up to an inline chat token), stripped."""
    if not markers:
        return text.strip()
    cut = len(text)
    for marker in markers:
        if marker.startswith("<|"):  # special tokens are cut wherever they appear
            i = text.find(marker)
        else:
            m = re.search(rf"(?im)^[ \t>#*]*{re.escape(marker)}", text)
            i = m.start() if m else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, each with its end mark and the whitespace after it ("".join gives ``text`` back)."""
    return SENTENCE_RE.findall(text)


def sentence_key(sentence: str) -> str:
    return " ".join(WORD_RE.findall(sentence.lower()))


def drop_repeated_sentences(text: str) -> str:
    """``text`` without sentences whose words repeat an earlier sentence's (a small model's loops), stripped."""
    seen: set[str] = set()
    kept: list[str] = []
    for s in split_sentences(text):
        key = sentence_key(s)
        if key and key in seen:
            continue
        if key:
            seen.add(key)
        kept.append(s)
    return re.sub(r"[ \t]+\n", "\n", "".join(kept)).strip()


def strip_thoughts(text: str) -> str:
    """``text`` without a leading "Internal thoughts: ..." block and an "Answer:" label, stripped."""
    out = THOUGHTS_RE.sub("", text, count=1)
    return ANSWER_LABEL_RE.sub("", out, count=1).strip()


# -- dropping filters -------------------------------------------------------------------------------------
def blacklisted(text: str, phrases: Sequence[str] = DEFAULT_BLACKLIST) -> str | None:
    """The first phrase of ``phrases`` found in ``text`` (case-insensitive), or None."""
    low = text.lower()
    return next((p for p in phrases if p and p.lower() in low), None)


def word_count(text: str) -> int:
    return len(WORD_RE.findall(text))


def too_short(text: str, min_words: int) -> str | None:
    n = word_count(text)
    return f"{n} words < {min_words}" if n < min_words else None


def too_long(text: str, max_words: int | None) -> str | None:
    n = word_count(text)
    return f"{n} words > {max_words}" if max_words is not None and n > max_words else None


# -- the counting wrapper -------------------------------------------------------------------------------------
EDIT_FILTERS = ("strip_thoughts", "cut_at_turn_marker", "drop_repeated_sentences")
DROP_FILTERS = ("empty", "blacklisted", "too_short", "too_long")


@dataclass
class FilterCounts:
    """What the filters did to a batch of answers: ``offered == kept + sum(dropped.values())``."""

    offered: int = 0
    kept: int = 0
    changed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EDIT_FILTERS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_FILTERS, 0))
    blacklist_hits: dict[str, int] = field(default_factory=dict)  # phrase -> answers dropped for it

    def add(self, other: FilterCounts) -> FilterCounts:
        """``self`` plus ``other`` (e.g. the counts of two shards), as a new object."""
        out = FilterCounts(self.offered + other.offered, self.kept + other.kept)
        for name in EDIT_FILTERS:
            out.changed[name] = self.changed.get(name, 0) + other.changed.get(name, 0)
        for name in DROP_FILTERS:
            out.dropped[name] = self.dropped.get(name, 0) + other.dropped.get(name, 0)
        for src in (self.blacklist_hits, other.blacklist_hits):
            for k, v in src.items():
                out.blacklist_hits[k] = out.blacklist_hits.get(k, 0) + v
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"offered": self.offered, "kept": self.kept, "changed": dict(self.changed),
                "dropped": dict(self.dropped), "blacklist_hits": dict(self.blacklist_hits)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FilterCounts:
        out = cls(int(d.get("offered", 0)), int(d.get("kept", 0)))
        out.changed.update(d.get("changed", {}))
        out.dropped.update(d.get("dropped", {}))
        out.blacklist_hits.update(d.get("blacklist_hits", {}))
        return out


@dataclass(frozen=True)
class FilteredAnswer:
    """One answer after the filters: ``text`` is what would be trained on; ``dropped`` the reason it is not."""

    index: int              # position in the input
    raw: str                # as generated
    text: str               # after the edits
    dropped: str | None     # "<filter>: <detail>" or None when kept
    changed_by: tuple[str, ...] = ()


def filter_answer(text: str, cfg: AnswerFilterConfig, index: int = 0) -> FilteredAnswer:
    """The filters of ``cfg`` on one answer, edits first, then the first drop filter that fires."""
    out, changed = text, []
    edits = [("strip_thoughts", strip_thoughts if cfg.strip_thoughts else None),
             ("cut_at_turn_marker", (lambda t: cut_at_turn_marker(t, cfg.turn_markers)) if cfg.turn_markers else None),
             ("drop_repeated_sentences", drop_repeated_sentences if cfg.drop_repeats else None)]
    for name, fn in edits:
        if fn is None:
            continue
        new = fn(out)
        if new != out.strip():
            changed.append(name)
        out = new
    out = out.strip()
    reason: str | None = None
    if not out:
        reason = "empty: nothing left after the edits" if text.strip() else "empty: the model wrote nothing"
    elif (hit := blacklisted(out, cfg.blacklist)) is not None:
        reason = f"blacklisted: {hit}"
    elif (why := too_short(out, cfg.min_words)) is not None:
        reason = f"too_short: {why}"
    elif (why := too_long(out, cfg.max_words)) is not None:
        reason = f"too_long: {why}"
    return FilteredAnswer(index, text, out, reason, tuple(changed))


def filter_all(answers: Sequence[str], cfg: AnswerFilterConfig | None = None
               ) -> tuple[list[FilteredAnswer], FilterCounts]:
    """(every answer's result, kept and dropped, in input order; counts) for ``answers``."""
    cfg = cfg or AnswerFilterConfig()
    counts = FilterCounts(offered=len(answers))
    results = [filter_answer(a, cfg, i) for i, a in enumerate(answers)]
    for f in results:
        for name in f.changed_by:
            counts.changed[name] += 1
        if f.dropped is None:
            counts.kept += 1
            continue
        name, _, detail = f.dropped.partition(": ")
        counts.dropped[name] += 1
        if name == "blacklisted":
            counts.blacklist_hits[detail] = counts.blacklist_hits.get(detail, 0) + 1
    return results, counts


def apply_filters(answers: Sequence[str], cfg: AnswerFilterConfig | None = None
                  ) -> tuple[list[FilteredAnswer], FilterCounts]:
    """(the kept answers, counts) for ``answers``; each kept one has ``index`` into the input and the
    edited ``text``. :func:`filter_all` returns the dropped ones too, with their reasons."""
    results, counts = filter_all(answers, cfg)
    return [f for f in results if f.dropped is None], counts
