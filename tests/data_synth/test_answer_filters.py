"""Every answer post-filter, alone and through the counting wrapper: each one can fire, and each is counted."""

from __future__ import annotations

import pytest

from data_synth.answer_filters import (
    AnswerFilterConfig,
    FilterCounts,
    apply_filters,
    blacklisted,
    cut_at_turn_marker,
    drop_repeated_sentences,
    filter_answer,
    split_sentences,
    strip_thoughts,
    too_long,
    too_short,
)


@pytest.mark.parametrize("text,want", [
    ("Paris is the capital.\nUser: and Spain?\nAssistant: Madrid.", "Paris is the capital."),
    ("Use a spoon.\n### Instruction\nnext", "Use a spoon."),
    ("Fine.<|im_end|>\n<|im_start|>user", "Fine."),
    ("  **Human:** hi", ""),
    ("The user asked about User: fields in forms.", "The user asked about User: fields in forms."),  # not at a line start
    ("No marker here.", "No marker here."),
])
def test_cut_at_turn_marker(text, want):
    assert cut_at_turn_marker(text) == want


def test_cut_at_turn_marker_with_own_markers_and_off():
    assert cut_at_turn_marker("a\nQ: b", ["Q:"]) == "a"
    assert cut_at_turn_marker(" a\nUser: b ", []) == "a\nUser: b"


def test_split_sentences_is_lossless():
    text = "One. Two!  Three?\nFour"
    assert "".join(split_sentences(text)) == text
    assert len(split_sentences(text)) == 4


@pytest.mark.parametrize("text,want", [
    ("Cats purr. Dogs bark. Cats purr!", "Cats purr. Dogs bark."),
    ("Step one.\nStep one.\nStep two.", "Step one.\nStep two."),
    ("No repeats here. None at all.", "No repeats here. None at all."),
    ("a. b. a. b. a. b.", "a. b."),
])
def test_drop_repeated_sentences(text, want):
    assert drop_repeated_sentences(text) == want


@pytest.mark.parametrize("text,want", [
    ("Internal thoughts: candor applies.\n\nI cannot browse the web.", "I cannot browse the web."),
    ("Thoughts: helpful applies. Answer: Use a spoon.", "Use a spoon."),
    ("**Internal thoughts:** x.\n**Answer:** Use a spoon.", "Use a spoon."),
    ("Answer: Use a spoon.", "Use a spoon."),
    ("Use a spoon. Thoughts: later.", "Use a spoon. Thoughts: later."),  # only a leading block is thoughts
    ("Thoughts: step_by_step applies.\nFirst boil the water.", "First boil the water."),  # thoughts are one line
    ("Thoughts: it never got to an answer", ""),
])
def test_strip_thoughts(text, want):
    assert strip_thoughts(text) == want


def test_blacklisted_and_lengths():
    assert blacklisted("Well, AS AN AI LANGUAGE MODEL, I ...") == "as an ai language model"
    assert blacklisted("A normal answer.") is None
    assert blacklisted("anything", []) is None
    assert too_short("two words", 3) == "2 words < 3"
    assert too_short("three whole words", 3) is None
    assert too_long("one two three", 2) == "3 words > 2"
    assert too_long("one two three", None) is None


def test_each_drop_filter_fires_and_is_counted():
    cfg = AnswerFilterConfig(blacklist=["forbidden phrase"], min_words=3, max_words=8)
    answers = [
        "This answer is fine and kept.",                # kept
        "",                                             # empty: the model wrote nothing
        "User: only the next turn",                     # empty after the cut
        "It has a forbidden phrase in it.",             # blacklisted
        "Too short",                                    # too_short
        "one two three four five six seven eight nine",  # too_long
        "Kept again. Kept again. Still good here.\nUser: more",  # kept, after two edits
    ]
    kept, counts = apply_filters(answers, cfg)
    assert [k.index for k in kept] == [0, 6]
    assert kept[1].text == "Kept again. Still good here."
    assert counts.offered == 7 and counts.kept == 2
    assert counts.dropped == {"empty": 2, "blacklisted": 1, "too_short": 1, "too_long": 1}
    assert counts.offered == counts.kept + sum(counts.dropped.values())
    assert counts.changed["cut_at_turn_marker"] == 2 and counts.changed["drop_repeated_sentences"] == 1
    assert counts.blacklist_hits == {"forbidden phrase": 1}
    assert filter_answer("", cfg).dropped == "empty: the model wrote nothing"
    assert filter_answer("User: x", cfg).dropped == "empty: nothing left after the edits"


def test_filters_can_be_turned_off():
    cfg = AnswerFilterConfig(turn_markers=[], strip_thoughts=False, drop_repeats=False, blacklist=[], min_words=0)
    text = "Thoughts: x.\n\nA. A.\nUser: as an ai language model"
    kept, counts = apply_filters([text], cfg)
    assert kept[0].text == text and counts.kept == 1 and not any(counts.changed.values())


def test_filter_all_keeps_every_result_in_order_with_its_reason():
    from data_synth.answer_filters import filter_all

    results, counts = filter_all(["a fine answer here", "no"], AnswerFilterConfig(min_words=2))
    assert [(r.index, r.dropped) for r in results] == [(0, None), (1, "too_short: 1 words < 2")]
    assert counts.kept == 1 and counts.dropped["too_short"] == 1


def test_counts_add_and_round_trip():
    _, a = apply_filters(["one fine answer", ""])
    _, b = apply_filters(["as an ai language model I say", "another fine answer"])
    total = a.add(b)
    assert total.offered == 4 and total.kept == 2 and total.dropped["empty"] == 1 and total.dropped["blacklisted"] == 1
    assert FilterCounts.from_dict(total.as_dict()) == total
