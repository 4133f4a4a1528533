"""I-SHEEP's data side (data_synth/isheep.py): every filter can drop, and each drop is counted by reason.

Self-instruct's near-duplicate filter and the self-assessment thresholds are driven with crafted model
outputs or crafted ratings, so a test knows which candidate must go; the tiny random-init model with
the real tokenizer checks the plumbing (batching, left padding, the rating read-out).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import data_synth.isheep as isheep
from data_synth.answer_filters import AnswerFilterConfig
from data_synth.isheep import (
    AnswerSettings,
    AssessSettings,
    SelfInstructSettings,
    answer,
    digit_ids,
    rating_distribution,
    rule_filter,
    run_once,
    select,
    self_assess,
    self_instruct,
)
from data_synth.prompts import rouge_l

SEEDS = ["How do I keep my houseplants healthy during winter?",
         "Explain in simple words why the Moon has phases."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from salmon.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def fake_generate(outputs: list[str]):
    """A stand-in for data_synth.generation.generate that returns ``outputs`` as each request's answer."""
    def gen(model, tokenizer, prompts, **kw):
        return [[outputs[i % len(outputs)]] for i in range(len(prompts))]
    return gen


# -- self-instruct -----------------------------------------------------------------------------------
def test_self_instruct_drops_near_duplicates_at_the_rouge_threshold(monkeypatch):
    near = "How do I keep my houseplants healthy during the winter?"       # ROUGE-L vs seed >= 0.7
    far = "How do I keep a bicycle chain clean after riding in rain?"      # shares words, below 0.7
    assert rouge_l(near, SEEDS[0]) >= 0.7 > rouge_l(far, SEEDS[0])
    listing = "\n".join(f"{i}. {q}" for i, q in enumerate(
        [near, far, far.upper(), "Hi?", "Write a limerick about a cat who learns to swim."], 1))
    monkeypatch.setattr(isheep, "generate", fake_generate([listing]))
    s = SelfInstructSettings(prompts_per_iteration=10, requests_per_round=1, max_rounds=1, min_chars=8)
    rows, counts = self_instruct(None, None, SEEDS, [], s, seed=0)
    assert [r["prompt"] for r in rows] == [far, "Write a limerick about a cat who learns to swim."]
    assert counts["near_duplicate"] == 1 and counts["duplicate"] == 1 and counts["too_short"] == 1
    assert counts["generated"] == 5 and counts["kept"] == 2
    # The threshold is the setting: above the near-duplicate's ROUGE-L, it passes.
    s_loose = s.model_copy(update={"max_rouge_l": 0.99})
    rows, counts = self_instruct(None, None, SEEDS, [], s_loose, seed=0)
    assert near in [r["prompt"] for r in rows] and counts["near_duplicate"] == 0


def test_self_instruct_drops_lines_about_the_list(monkeypatch):
    listing = ("Here are five new instructions for this topic:\n1. Sure, I can write more.\n"
               "2. Write more instructions like these.\n3. How do volcanoes erupt?\n4. Topics:")
    monkeypatch.setattr(isheep, "generate", fake_generate([listing]))
    rows, counts = self_instruct(None, None, SEEDS, [], SelfInstructSettings(requests_per_round=1, max_rounds=1), seed=0)
    assert [r["prompt"] for r in rows] == ["How do volcanoes erupt?"] and counts["not_a_prompt"] == 4


def test_self_instruct_avoids_earlier_and_heldout_prompts(monkeypatch):
    earlier = "Write a limerick about a cat who learns to swim."
    monkeypatch.setattr(isheep, "generate", fake_generate([f"1. {earlier}\n2. Write a limerick about a cat that learns to swim."]))
    s = SelfInstructSettings(requests_per_round=1, max_rounds=1)
    rows, counts = self_instruct(None, None, SEEDS, [earlier], s, seed=0)
    assert rows == [] and counts["duplicate"] == 1 and counts["near_duplicate"] == 1


def test_self_instruct_stops_at_the_target_and_shows_seeds(monkeypatch):
    seen = []
    fresh = iter(["Why do rivers bend?", "Name three mountain birds.", "How are lakes formed?",
                  "Write a haiku about snow.", "What is a glacier made of?", "Describe a desert at night."])

    def gen(model, tokenizer, prompts, **kw):
        seen.extend(p[0]["content"] for p in prompts)
        return [[f"1. {next(fresh)}\n2. {next(fresh)}"] for _ in prompts]

    monkeypatch.setattr(isheep, "generate", gen)
    s = SelfInstructSettings(prompts_per_iteration=3, requests_per_round=2, max_rounds=5, examples=2)
    rows, counts = self_instruct(None, None, SEEDS, [], s, seed=1)
    assert len(rows) == 3 and counts["kept"] == 3
    assert all(SEEDS[0] in text and SEEDS[1] in text for text in seen)  # few-shot: the seeds are the examples


def test_self_instruct_with_a_model(tiny):
    model, tok = tiny
    s = SelfInstructSettings(prompts_per_iteration=50, requests_per_round=2, max_rounds=1, max_new_tokens=24, min_chars=1)
    rows, counts = self_instruct(model, tok, SEEDS, [], s, seed=3)
    again, _ = self_instruct(model, tok, SEEDS, [], s, seed=3)
    assert rows == again  # seeded: a resumed run regenerates the same prompts
    assert counts["requests"] == 2 and counts["kept"] == len(rows)
    assert counts["generated"] == counts["kept"] + sum(counts[k] for k in ("not_a_prompt", "too_short", "too_long",
                                                                            "duplicate", "near_duplicate"))


# -- answer + rule filter ----------------------------------------------------------------------------
def test_answer_keeps_ids_and_prompts(tiny):
    model, tok = tiny
    prompts = [{"id": f"x{i}", "prompt": q} for i, q in enumerate(SEEDS * 2)]
    rows = answer(model, tok, prompts, AnswerSettings(max_new_tokens=6, batch_size=3), seed=5)
    assert [(r["id"], r["prompt"]) for r in rows] == [(p["id"], p["prompt"]) for p in prompts]
    assert all(isinstance(r["response"], str) for r in rows)


def test_rule_filter_edits_drops_and_counts():
    rows = [{"id": "a", "prompt": "q", "response": "Plants need light. Water them weekly.\nUser: thanks!"},
            {"id": "b", "prompt": "q", "response": "As an AI language model I cannot help with plants."},
            {"id": "c", "prompt": "q", "response": "Ok."},
            {"id": "d", "prompt": "q", "response": "Keep them warm. Keep them warm. Mist the leaves often."}]
    kept, counts = rule_filter(rows, AnswerFilterConfig(min_words=2))
    assert [r["id"] for r in kept] == ["a", "d"]
    assert kept[0]["response"] == "Plants need light. Water them weekly." and kept[0]["raw"] == rows[0]["response"]
    assert kept[1]["response"] == "Keep them warm. Mist the leaves often."
    assert counts["offered"] == 4 and counts["kept"] == 2
    assert counts["dropped"]["blacklisted"] == 1 and counts["dropped"]["too_short"] == 1
    assert counts["changed"]["cut_at_turn_marker"] == 1 and counts["changed"]["drop_repeated_sentences"] == 1


# -- self-assessment ---------------------------------------------------------------------------------
def logp_with(mass: dict[int, float], vocab: int = 50) -> torch.Tensor:
    """Log-probs over a toy vocabulary: ``mass`` on the given token ids, the rest spread evenly."""
    rest = (1 - sum(mass.values())) / (vocab - len(mass))
    p = torch.full((vocab,), rest)
    for i, m in mass.items():
        p[i] = m
    return p.log()


def test_rating_distribution_reads_one_to_ten():
    digits = list(range(10, 20))  # token ids of "0".."9" in the toy vocabulary
    levels = torch.arange(1, 11, dtype=torch.float32)
    sure_7 = logp_with({digits[7]: 0.999})
    dist, mass = rating_distribution(sure_7, logp_with({}), digits)
    assert float((dist * levels).sum()) == pytest.approx(7, abs=0.01) and float(mass) == pytest.approx(0.999, abs=1e-3)
    # A "1" followed by "0" is a 10; a "1" followed by anything else is a 1.
    one = logp_with({digits[1]: 0.9})
    dist10, _ = rating_distribution(one, logp_with({digits[0]: 0.99}), digits)
    dist1, _ = rating_distribution(one, logp_with({digits[0]: 0.01}), digits)
    assert float((dist10 * levels).sum()) > 9.8 and float((dist1 * levels).sum()) < 1.2
    assert float(dist10.sum()) == pytest.approx(1.0)


def test_self_assess_rates_both_axes_batch_invariant(tiny):
    model, tok = tiny
    rows = [{"id": "a", "prompt": "Name a fruit.", "response": "An apple."},
            {"id": "b", "prompt": [{"role": "user", "content": "Explain rain in one long sentence, please."}],
             "response": "Water evaporates, rises, cools into clouds and falls back down as drops of rain."},
            {"id": "c", "prompt": "Hi", "response": "Hello! How can I help you today?"}]
    one = self_assess(model, tok, rows, AssessSettings(batch_size=1))
    many = self_assess(model, tok, rows, AssessSettings(batch_size=8))
    for a, b in zip(one, many, strict=True):
        for axis in ("quality", "following"):
            assert 1 <= a[axis] <= 10
            # Left padding with real positions: a row's rating does not depend on its batch-mates.
            assert a[axis] == pytest.approx(b[axis], abs=1e-3)
            assert 0 < a["rating_mass"][axis] <= 1
    assert [r["id"] for r in many] == ["a", "b", "c"] and "quality" not in rows[0]  # input untouched


def test_self_assess_asks_each_axis_its_own_question(tiny, monkeypatch):
    """The two ratings come from two prompts (quality, following), read at the digit after "Rating: "."""
    model, tok = tiny
    digits = digit_ids(tok)
    target = {"quality": 8, "following": 3}

    class Rater(torch.nn.Module):
        """Puts all mass on the digit its axis question asks for: 8 for quality, 3 for following."""

        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask, position_ids):
            logits = torch.full((*input_ids.shape, len(tok)), -30.0)
            for b, row in enumerate(input_ids):
                text = tok.decode(row[attention_mask[b].bool()])
                axis = "quality" if "helpful, correct" in text else "following"
                logits[b, -2, digits[target[axis]]] = 30.0
            return type("Out", (), {"logits": logits})()

    out = self_assess(Rater(), tok, [{"id": "a", "prompt": "p", "response": "r"}], AssessSettings())
    assert out[0]["quality"] == pytest.approx(8, abs=1e-3) and out[0]["following"] == pytest.approx(3, abs=1e-3)


@pytest.mark.parametrize(("quality", "following", "reason"), [
    (7.0, 7.0, "kept"), (6.0, 6.0, "kept"),          # at the threshold: kept
    (5.99, 9.0, "low_quality"), (9.0, 5.5, "low_following"), (2.0, 3.0, "low_both"),
])
def test_select_each_threshold_can_drop(quality, following, reason):
    rows = [{"id": "a", "quality": quality, "following": following}]
    kept, counts = select(rows, AssessSettings(min_quality=6.0, min_following=6.0))
    assert counts[reason] == 1 and sum(counts.values()) == 1
    assert kept == (rows if reason == "kept" else [])


# -- resumable stage files ---------------------------------------------------------------------------
def test_run_once_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"rows": [1, 2]}

    path = tmp_path / "stage.json"
    assert run_once(path, compute) == {"rows": [1, 2]}
    assert run_once(path, compute) == {"rows": [1, 2]} and len(calls) == 1
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert not list(tmp_path.glob(".*.tmp"))


# (question, a right answer, an off-topic one)
RATED_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.",
     "Bananas are yellow and my cat likes to sleep on the sofa."),
    ("How many legs does a spider have?", "A spider has eight legs.",
     "I like to watch movies on Sunday evenings with friends."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'.",
     "The weather tomorrow will be cloudy with some rain."),
    ("What is 7 times 8?", "7 times 8 is 56.", "Purple elephants dance quietly under the old bridge."),
    ("Name a primary colour.", "Red is a primary colour.", "My computer needs a new keyboard because the old one broke."),
]


@pytest.mark.slow
def test_real_model_rates_right_answers_above_off_topic_ones_on_average():
    """SmolLM2-135M's own expected 1-10 rating, on both axes, is higher for right answers than for off-topic
    ones on average over five questions. The signal is weak: single pairs go the wrong way (README)."""
    from salmon.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer("embedded"), load_causal_lm("embedded").eval()
    rows = [{"id": f"{k}{i}", "prompt": q, "response": a}
            for i, (q, good, bad) in enumerate(RATED_PAIRS) for k, a in (("good", good), ("bad", bad))]
    out = self_assess(model, tok, rows, AssessSettings())
    for axis in ("quality", "following"):
        diffs = [out[2 * i][axis] - out[2 * i + 1][axis] for i in range(len(RATED_PAIRS))]
        assert sum(diffs) / len(diffs) > 0, (axis, diffs)
    assert all(r["rating_mass"][a] > 0.5 for r in out for a in ("quality", "following"))  # it does answer a digit
    assert not any(math.isnan(r[a]) for r in out for a in ("quality", "following"))
