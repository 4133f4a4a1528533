"""VideoSAVi's prompts and data step as pure functions (no model): the text a policy is asked at each stage,
how its questions are read back, the grounding similarity and the pair rule.

The same prompts serve the text-only variant (a passage) and the video one (frames): ``source`` names what
the model was shown, and for frames the prompt says "the video" while the images travel beside the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("what", "why", "how")
# VideoSAVi asks about both what the frames show and how it changes between them.
ASPECTS = {"spatial": "what is where in a frame", "temporal": "what changes from one frame to the next"}
# Used when the policy's own question is unusable (no question mark, or empty): the round still gets
# a question of that kind, and the stage counts how often this happened.
FALLBACK_QUESTIONS = {
    "what": "What is the main thing the {source} describes?",
    "why": "Why does the {source} say this happens?",
    "how": "How does the {source} describe the way it happens?",
}
SYSTEM = "You answer questions about a {source} using only what the {source} shows."
_WORD = re.compile(r"[a-z0-9]+")
# Words that carry no content: leaving them out keeps the similarity about what the answer claims.
_STOP = frozenset("""a an the and or but of to in on at for from by with as is are was were be been it its this that
these those there their they them he she his her we you i not no so do does did has have had which who what why how
when where than then into over about after before also can could will would should may might very more most""".split())


def context(passage: str | None, source: str) -> str:
    """The block that shows the model its source: the passage text, or a line for frames given as images."""
    if passage is None:
        return f"Look at the frames of the {source}."
    return f"{source.capitalize()}:\n{passage}"


def question_prompt(passage: str | None, kind: str, source: str = "passage", aspect: str | None = None) -> str:
    about = f" about {ASPECTS[aspect]}" if aspect else ""
    return (f"{context(passage, source)}\n\nWrite one question{about} that begins with \"{kind.capitalize()}\" and "
            f"that the {source} answers. Reply with the question only.")


def answer_prompt(passage: str | None, question: str, source: str = "passage") -> str:
    return f"{context(passage, source)}\n\nQuestion: {question}\nAnswer using only the {source}."


def critique_prompt(passage: str | None, question: str, answer: str, source: str = "passage") -> str:
    return (f"{context(passage, source)}\n\nQuestion: {question}\nAnswer: {answer}\n\nCheck the answer against the "
            f"{source}. List (1) inconsistencies with the {source}, (2) claims the {source} does not support, "
            f"(3) what the answer leaves out.")


def refine_prompt(passage: str | None, question: str, answer: str, critique: str, source: str = "passage") -> str:
    return (f"{context(passage, source)}\n\nQuestion: {question}\nDraft answer: {answer}\nProblems found: "
            f"{critique}\n\nWrite a better answer that fixes these problems and uses only the {source}. Reply "
            f"with the answer only.")


def parse_question(text: str, kind: str, source: str = "passage") -> tuple[str, bool]:
    """(question, generated): the first line of ``text`` that ends in '?', else the kind's fallback."""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if "?" in line:
            q = line[:line.index("?") + 1].strip()
            if len(q) > 3:
                return q, True
    return FALLBACK_QUESTIONS[kind].format(source=source), False


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def grounding(answer: str, passage: str) -> float:
    """The share of the answer's content words that occur in the passage (0 for an answer with none):
    a cheap lexical stand-in for "the answer says what the passage says"."""
    words = content_words(answer)
    if not words:
        return 0.0
    vocab = set(content_words(passage))
    return sum(w in vocab for w in words) / len(words)


@dataclass(frozen=True)
class Verdict:
    kept: bool
    reason: str  # "kept" | "ungrounded" | "not_preferred" | "identical"


def judge_pair(initial: str, refined: str, initial_score: float, refined_score: float, margin: float,
               refined_grounding: float | None, grounding_min: float | None) -> Verdict:
    """Whether (refined ≻ initial) becomes a DPO pair; the reason is what the report counts."""
    if refined.strip() == initial.strip():
        return Verdict(False, "identical")  # DPO would learn nothing from two equal texts
    if grounding_min is not None and (refined_grounding or 0.0) < grounding_min:
        return Verdict(False, "ungrounded")
    diff = refined_score - initial_score
    if diff <= 0 or diff < margin:
        return Verdict(False, "not_preferred")
    return Verdict(True, "kept")
