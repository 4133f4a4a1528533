"""Reward-model pretraining teaches a small pretrained model to read a principle it never saw.

A seeded learning test of the rm-pretrain path end to end: minimal pairs from ``build_rows`` (both
halves), ``train_reward_model`` (TRL RewardTrainer + LoRA) and the ``single`` column of
``flip_table``, on toy axes whose words are held out: no held-out word appears anywhere in the
training rows, neither in a principle nor in a response.

The backbone is the embedded SmolLM2-135M cut to its first few decoder layers. Pretrained early
layers carry duplicate-token features, so "does the response contain the word the principle names"
transfers to unseen words; a random-init model cannot learn it in a CPU test's budget.

What this does and does not show, honestly: each toy axis is "The response mentions <word>." with
the negative definition "The response mentions <other word>.", and the two responses are one
template filled with either word. Flipping therefore takes finding the principle's word in the
response (a copy/match skill, applied to new words), not understanding a negation word: with
"does not mention <word>" / "leaves out <word>" the same budget leaves the loss flat at chance,
because negation is not linearly readable from these early layers and LoRA does not learn it in a
few dozen steps.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

# Single-token nouns of the embedded tokenizer (checked below), so that matching a word is
# matching one token; the split between training and held-out words is fixed.
TRAIN_WORDS = (
    "mouse nose map paper school salt snow anchor engine storm wheel wolf flower house lion train apple "
    "river robot radio sugar bridge table snake farm owl button shirt iron orange clock wine finger wallet "
    "ring star planet ocean wood rain"
).split()
HELD_OUT_WORDS = (
    "castle sand cloud forest tooth nest plate flag meat cookie stone gold milk moon chair window horse "
    "tree sock fox"
).split()
PROMPTS = ("Name one thing.", "Pick an object.", "Say a word.", "What do you see?")
TEMPLATES = ("I pick {}.", "My answer is {}.", "It is {}.", "{}.")
KEPT_LAYERS = 4
HELD_OUT_PAIRS_PER_AXIS = 2


def truncated_embedded(out: Path, layers: int) -> Path:
    """The embedded model's first ``layers`` decoder layers (and its tokenizer) saved as a local model dir."""
    from salmon.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm("embedded")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer("embedded").save_pretrained(out)
    return out


def word_axes(words: list[str], rng: random.Random, pairs_per_axis: int = len(TEMPLATES)):
    """One axis per word: follows mentions the word, violates mentions another word of ``words``."""
    from principles.axes import Axis, AxisPair

    axes = []
    for word in words:
        other = rng.choice([w for w in words if w != word])
        pairs = [AxisPair(prompt=PROMPTS[k % len(PROMPTS)], follows=TEMPLATES[k].format(word),
                          violates=TEMPLATES[k].format(other)) for k in range(pairs_per_axis)]
        axes.append(Axis(name=f"mentions_{word}", family=word, definition=f"The response mentions {word}.",
                         negative_definition=f"The response mentions {other}.", plain=f"Mention {word}.",
                         opposite=f"Mention {other}.", pairs=pairs))
    return axes


def untrained_flip(base: Path, seed: int, pairs: list[dict], tokenizer) -> dict:
    """The ``single`` flip row of the reward model exactly as training starts from it: the score head
    is drawn under the trainer's seed, and a fresh LoRA adds nothing until it is trained."""
    import torch

    from data_synth.rm_train import rewards
    from rm_core.checkset import flip_table
    from rm_core.render import Renderer
    from salmon.modeling import load_sequence_classifier

    renderer = Renderer(tokenizer)
    torch.manual_seed(seed)
    model = load_sequence_classifier(str(base))

    def score_fn(principles, negate, items):
        seqs = [renderer.render_principles(principles, p, r, negated=negate).input_ids for p, r in items]
        return rewards(model, seqs, tokenizer.pad_token_id)

    return flip_table(score_fn, pairs, modes=("single",))["single"]


@pytest.mark.slow
def test_pretraining_lifts_the_flip_rate_on_held_out_words(tmp_path, embedded_tokenizer):
    import torch

    from data_synth.config import TrainConfig
    from data_synth.pretrain import build_rows
    from data_synth.rm_train import train_reward_model
    from principles.axes import heldout_flip_pairs
    from rm_core.checkset import flip_table
    from salmon.atomic import atomic_write_jsonl

    for w in TRAIN_WORDS + HELD_OUT_WORDS:
        assert len(embedded_tokenizer.encode(" " + w)) == 1, w
    assert not set(TRAIN_WORDS) & set(HELD_OUT_WORDS)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the figures below are for one thread, and CI shares its CPUs
    try:
        rng = random.Random(0)
        train_axes, held_axes = word_axes(TRAIN_WORDS, rng), word_axes(HELD_OUT_WORDS, rng)
        rows = build_rows(train_axes, distractor_pool=train_axes, variants=["single"], seed=0)
        seen = {w for r in rows for text in (r["chosen"], r["rejected"], r["principles"][0]["definition"],
                                             r["principles"][0]["negative_definition"]) for w in re.findall(r"[a-z]+", text)}
        assert not seen & set(HELD_OUT_WORDS)
        train_path = tmp_path / "train.jsonl"
        atomic_write_jsonl(train_path, rows)
        held_pairs = heldout_flip_pairs(held_axes, HELD_OUT_PAIRS_PER_AXIS)

        base = truncated_embedded(tmp_path / "base", KEPT_LAYERS)
        cfg = TrainConfig(base_model=str(base), registry=tmp_path / "registry", lora_r=8, lora_alpha=16,
                          learning_rate=3e-3, epochs=1.0, batch_size=8, seed=0, publish=False)

        before = untrained_flip(base, cfg.seed, held_pairs, embedded_tokenizer)

        result = train_reward_model(
            train_path, None, cfg,
            extra_eval=lambda score_fn: {"held_out": flip_table(score_fn, held_pairs, modes=("single",))["single"]})
    finally:
        torch.set_num_threads(threads)
    after = result.metrics["held_out"]
    print(f"held-out single flip rate: before {before}, after {after}")

    assert before["pairs"] == after["pairs"] == len(HELD_OUT_WORDS) * HELD_OUT_PAIRS_PER_AXIS
    assert before["flip_rate"] <= 0.5, before
    assert after["flip_rate"] >= 0.9, (before, after)
