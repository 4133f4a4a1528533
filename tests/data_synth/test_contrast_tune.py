"""`salmon contrast-tune`: the contrast-margin objective, its adapter and manifest, and the scorer that loads it.

Plumbing on the tiny random-init model with the real tokenizer; the learning test on the embedded
model's first layers is in this file too (see ``test_training_lifts_a_held_out_toy_axis``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from salmon.errors import UserError


def write_axes(path: Path, names: list[str]) -> Path:
    axes = [{"name": n, "family": f"f{i}", "definition": f"The response mentions {n}.",
             "negative_definition": f"The response never mentions {n}.", "plain": f"Mention {n}.",
             "opposite": f"Do not mention {n}.",
             "pairs": [{"prompt": "Say something.", "follows": f"I like {n}.", "violates": "I like nothing."},
                       {"prompt": "Pick one.", "follows": f"{n}.", "violates": "None."}]}
            for i, n in enumerate(names)]
    path.write_text(yaml.safe_dump({"axes": axes}), encoding="utf-8")
    return path


def tiny_config(tiny_model_dir: Path, axes_file: Path, **kw):
    from data_synth.contrast_tune import ContrastTuneConfig

    return ContrastTuneConfig(base_model=str(tiny_model_dir), axes_files=[str(axes_file)], held_out_axes=["cat"],
                              lora_r=2, lora_alpha=4, learning_rate=1e-2, pairs_per_step=2, **kw)


def test_margin_is_the_contrastive_scorers_own_preference(tiny_model_dir, tmp_path):
    """The objective's margin is what the served contrastive scorer's scores imply for the pair:
    (score of a − score of b) under P, both computed from the same rendered sequences."""
    import torch

    from data_synth.contrast_tune import ContrastObjective
    from principles.schema import Principle
    from rm_core.scorers import load_zero_shot

    scorer = load_zero_shot("contrastive", str(tiny_model_dir), max_batch_tokens=4096)
    pr = Principle(name="p", definition="The response is short.", negative_definition="The response is long.")
    a, b = "Yes.", "Well, let me think about that for quite a while before I answer."
    sa, sb = scorer.score_items([pr], [("Is it?", a), ("Is it?", b)])
    with torch.no_grad():
        margin = float(ContrastObjective(scorer.model, scorer.tokenizer).margins([("Is it?", pr, a, b)])[0])
    assert margin == pytest.approx(sa - sb, abs=1e-3)


def test_packed_rows_score_as_the_rows_apart(tiny_model_dir):
    """A packed row (prefix, a, b with b blind to a) gives each response the log-probability it gets
    scored on its own after the prefix: the served scorer's number."""
    import torch

    from data_synth.contrast_tune import ContrastObjective, build_examples
    from principles.axes import load_axes
    from rm_core.batching import right_pad
    from salmon.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir)).eval()
    axes = load_axes()[::17]  # one axis of each file or so: several families, so sets can be built
    examples = build_examples(axes, axes, ["single", "set", "plain"], epoch=0, seed=0)[:9]
    assert {e.form for e in examples} == {"single", "set", "plain"}
    obj = ContrastObjective(model, tok)
    rows = [r for e in examples for r in obj.packed_rows(e)]
    with torch.no_grad():
        packed = obj.logprob_sums(rows)
        apart = []
        for p, a, b in rows:
            for y in (a, b):
                ids, mask = right_pad([p + y], tok.pad_token_id)
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0].float(), -1)
                apart.append(float(logp[len(p) - 1:len(p) + len(y) - 1].gather(1, torch.tensor(y)[:, None]).sum()))
    assert packed.flatten().tolist() == pytest.approx(apart, abs=1e-3)


def test_each_form_asks_what_the_scorer_is_asked(tiny_model_dir):
    """single: the principle vs its negation; set: the target toggled (sign − when the set holds it
    negated) and one distractor toggled as a tie; plain: instruction and opposite vs a generic one."""
    from data_synth.contrast_tune import build_examples
    from principles.axes import load_axes
    from rm_core.render import PRINCIPLE_HEADER, REFERENCE_INSTRUCTIONS

    axes = load_axes()
    by_name = {a.name: a for a in axes}
    examples = build_examples(axes, axes, ["single", "set", "plain"], epoch=1, seed=3)
    assert len(examples) == sum(len(a.pairs) for a in axes)
    signs = set()
    for e in examples:
        ax = by_name[e.axis]
        lines = [b.split("\n")[1:] for b in e.blocks]
        if e.form == "single":
            assert lines == [[f"- {ax.definition}"], [f"- {ax.negative_definition}"]] and e.margins == ((0, 1, 1),)
        elif e.form == "plain":
            assert lines[:2] == [[f"- {ax.plain}"], [f"- {ax.opposite}"]] and lines[2][0][2:] in REFERENCE_INSTRUCTIONS
            assert e.margins == ((0, 2, 1), (1, 2, -1)) and not e.ties
        else:
            assert all(b.startswith(PRINCIPLE_HEADER) for b in e.blocks) and len(lines[0]) == 5
            (i, j, sign), = e.margins
            changed = [k for k, (x, y) in enumerate(zip(lines[0], lines[1], strict=True)) if x != y]
            assert len(changed) == 1 and {lines[0][changed[0]], lines[1][changed[0]]} == {
                f"- {ax.definition}", f"- {ax.negative_definition}"}
            assert sign == (1 if lines[0][changed[0]] == f"- {ax.definition}" else -1)
            signs.add(sign)
            tie_changed = [k for k, (x, y) in enumerate(zip(lines[0], lines[2], strict=True)) if x != y]
            assert e.ties == ((0, 2),) and len(tie_changed) == 1 and tie_changed != changed
    assert signs == {1, -1}
    # every pair meets each form over three epochs
    forms = {}
    for epoch in range(3):
        for e in build_examples(axes, axes, ["single", "set", "plain"], epoch=epoch, seed=3):
            forms.setdefault((e.axis, e.prompt, e.follows), set()).add(e.form)
    assert all(f == {"single", "set", "plain"} for f in forms.values())


def test_tune_writes_a_verified_adapter_that_the_scorer_merges(tiny_model_dir, tmp_path):
    from data_synth.contrast_tune import tune
    from principles.schema import Principle
    from rm_core.registry import MANIFEST
    from rm_core.scorers import load_zero_shot

    axes = write_axes(tmp_path / "axes.yaml", ["dog", "cat", "sun", "tea"])
    out = tmp_path / "run"
    manifest = tune(tiny_config(tiny_model_dir, axes, epochs=2), out, command="salmon contrast-tune --out run",
                    evaluate_check=False, progress=False)
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["train_pairs"] == 6 and manifest["held_out_pairs"] == 2
    assert manifest["train_examples"] == 12 and manifest["steps"] >= 6  # 2 epochs; a step holds one form
    tables = manifest["metrics"]["held_out_axes"]
    assert set(tables) == {"single", "set", "plain"} and tables["single"]["pairs"] == 2
    assert manifest["command"] == "salmon contrast-tune --out run" and len(manifest["data_sha256"]) == 64
    assert any(f.endswith(".safetensors") for f in manifest["files"])
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)  # as named, no machine's cache path
    # lr 1e-2 on six pairs: the training pairs' loss falls from the first epoch to the second
    first, second = manifest["metrics"]["loss_by_epoch"]
    assert second < first

    pr = Principle(name="p", definition="The response mentions dog.", negative_definition="The response never mentions dog.")
    items = [("Say something.", "I like dog."), ("Say something.", "I like nothing.")]
    plain = load_zero_shot("contrastive", str(tiny_model_dir))
    tuned = load_zero_shot("contrastive", str(tiny_model_dir), adapter=out)
    assert tuned.version.startswith(f"contrastive:{tiny_model_dir.name}+adapter-")
    before, after = plain.score_items([pr], items), tuned.score_items([pr], items)
    assert after != pytest.approx(before, abs=1e-4)  # the LoRA was merged (a fresh LoRA adds nothing)
    assert after[0] - after[1] > before[0] - before[1]  # and moved a trained pair the trained way

    # the same seed, the same adapter bytes
    again = tune(tiny_config(tiny_model_dir, axes, epochs=2), tmp_path / "again", evaluate_check=False, progress=False)
    assert again["files"] == manifest["files"] and again["data_sha256"] == manifest["data_sha256"]


def test_a_tampered_or_foreign_adapter_is_refused(tiny_model_dir, tmp_path):
    from data_synth.contrast_tune import tune
    from rm_core.registry import MANIFEST, verified_contrast_adapter

    axes = write_axes(tmp_path / "axes.yaml", ["dog", "cat", "sun"])
    out = tmp_path / "run"
    manifest = tune(tiny_config(tiny_model_dir, axes, max_train_pairs=2), out, evaluate_check=False, progress=False)
    verified_contrast_adapter(out, str(tiny_model_dir))  # as written: accepted
    (out / "adapter" / "extra.bin").write_bytes(b"pickle")  # the registry's rule: safetensors only
    with pytest.raises(UserError, match="pickle-format"):
        verified_contrast_adapter(out, str(tiny_model_dir))
    (out / "adapter" / "extra.bin").unlink()
    with pytest.raises(UserError, match="trained on"):
        verified_contrast_adapter(out, "embedded")
    weights = next(f for f in manifest["files"] if f.endswith(".safetensors"))
    blob = bytearray((out / weights).read_bytes())
    blob[-1] ^= 0xFF
    (out / weights).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        verified_contrast_adapter(out, str(tiny_model_dir))
    (out / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="manifest"):
        verified_contrast_adapter(out, str(tiny_model_dir))
    with pytest.raises(UserError, match="manifest"):
        verified_contrast_adapter(tmp_path / "nowhere", str(tiny_model_dir))


def test_bad_held_out_axes_and_a_used_out_dir_are_one_line_errors(tiny_model_dir, tmp_path):
    from data_synth.cli import main
    from data_synth.contrast_tune import split_pairs
    from principles.axes import load_axes

    axes = load_axes([write_axes(tmp_path / "axes.yaml", ["dog", "cat"])])
    with pytest.raises(UserError, match="do not exist: cow"):
        split_pairs(axes, ["cow"])
    with pytest.raises(UserError, match="every axis is held out"):
        split_pairs(axes, ["dog", "cat"])
    used = tmp_path / "used"
    used.mkdir()
    (used / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="already holds a trained adapter"):
        main(["contrast-tune", "--out", str(used)])
    assert (used / "manifest.json").read_text() == "{}"  # nothing already written is touched
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(UserError, match="learning_rat"):
        main(["contrast-tune", "--out", str(tmp_path / "new"), "--config", str(cfg)])


@pytest.mark.slow
def test_training_lifts_a_held_out_toy_axis(tmp_path):
    """Seeded: on the embedded model cut to its first layers, contrast-tuning on word axes lifts the
    single-principle flip rate on axes whose words never appear in training."""
    from data_synth.contrast_tune import ContrastTuneConfig, tune
    from tests.data_synth.test_pretrain_learning import (
        HELD_OUT_WORDS,
        KEPT_LAYERS,
        TRAIN_WORDS,
        truncated_embedded,
        word_axes,
    )

    base = truncated_embedded(tmp_path / "base", KEPT_LAYERS)
    rng = random.Random(0)
    axes = word_axes(TRAIN_WORDS, rng) + word_axes(HELD_OUT_WORDS, rng)
    doc = {"axes": [a.model_dump() for a in axes]}
    (tmp_path / "axes.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    cfg = ContrastTuneConfig(base_model=str(base), axes_files=[str(tmp_path / "axes.yaml")],
                             held_out_axes=[a.name for a in axes if a.family in HELD_OUT_WORDS],
                             learning_rate=1e-3, max_train_pairs=80, pairs_per_step=4)
    manifest = tune(cfg, tmp_path / "run", evaluate_check=False, progress=False)
    before = manifest["metrics"]["single_flip_before"]["held_out_axes"]
    after = manifest["metrics"]["single_flip_after"]["held_out_axes"]
    print(f"held-out toy axes: single flip {before:.2f} before, {after:.2f} after")
    assert after >= 0.8 and after >= before + 0.2, (before, after)


def test_the_service_settings_and_salmon_check_load_the_adapter(tiny_model_dir, tmp_path, capsys):
    """The setting reaches the scorer the service builds, and `salmon check --contrast-adapter`
    scores with it; a path that is no adapter is a one-line error, not a silent zero-shot scorer."""
    from data_synth.contrast_tune import tune
    from rm_core.scorer_table import ScorerOptions, build_scorer
    from rm_service.cli import check
    from rm_service.settings import ServiceSettings

    axes = write_axes(tmp_path / "axes.yaml", ["dog", "cat", "sun"])
    out = tmp_path / "run"
    tune(tiny_config(tiny_model_dir, axes, max_train_pairs=2), out, evaluate_check=False, progress=False)
    st = ServiceSettings(model=str(tiny_model_dir), scorer="contrastive", contrast_adapter=out)
    scorer = build_scorer("contrastive", ScorerOptions(model=st.model, contrast_adapter=st.contrast_adapter), {})
    assert "+adapter-" in scorer.version
    assert check(["--model", str(tiny_model_dir), "--scorers", "contrastive", "--modes", "single",
                  "--limit", "2", "--contrast-adapter", str(out)]) == 0
    assert "+adapter-" in capsys.readouterr().out
    with pytest.raises(UserError, match="cannot read manifest.json"):
        build_scorer("contrastive", ScorerOptions(model=str(tiny_model_dir), contrast_adapter=tmp_path), {})
