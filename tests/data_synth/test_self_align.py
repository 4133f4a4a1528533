"""SELF-ALIGN's data side: what each mode shows the model, the exemplar file, the filter stage's files,
the held-out prompts kept out of TGRT, and the answers stage resumed after a SIGKILL inside a shard write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_synth.answer_filters import AnswerFilterConfig
from data_synth.self_align import (
    AnswerConfig,
    PromptsConfig,
    exemplar_reply,
    filter_answers,
    load_exemplars,
    messages_for,
    rules_text,
    run_prompts,
)
from principles.schema import load_principle_set
from salmon.atomic import FAULT_ENV
from salmon.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_rules_mode_shows_rules_then_exemplars_then_the_prompt():
    pset, ex = load_principle_set("self_align"), load_exemplars()
    msgs = messages_for("rules", "Why is the sky blue?", pset, ex)
    assert msgs[0]["role"] == "system" and rules_text(pset) in msgs[0]["content"]
    assert all(f"{p.name}: {p.definition}" in msgs[0]["content"] for p in pset.principles)
    assert len(msgs) == 2 + 2 * len(ex.exemplars) and ex.exemplars
    assert msgs[2]["content"] == exemplar_reply(ex.exemplars[0]) and msgs[2]["content"].startswith("Thoughts: ")
    assert msgs[-1] == {"role": "user", "content": "Why is the sky blue?"}
    # The thoughts of every shipped exemplar name rules of the set (what the model is shown to do).
    names = {p.name for p in pset.principles}
    assert all(any(n in e.thoughts for n in names) for e in ex.exemplars)
    # The plain mode is the bare prompt (how the engraved model and the evaluation ask); verbose its system.
    assert messages_for("plain", "Why is the sky blue?", None, None) == [{"role": "user", "content": "Why is the sky blue?"}]
    verbose = messages_for("verbose", [{"role": "user", "content": "Hi"}], None, ex)
    assert verbose == [{"role": "system", "content": ex.verbose_system.strip()}, {"role": "user", "content": "Hi"}]


def test_exemplar_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "ex.yaml"
    bad.write_text("intro: hi\nverbose_system: be thorough\nexemplars:\n  - {prompt: q, answer: a}\n")
    with pytest.raises(UserError, match=r"ex.yaml: field 'exemplars.0.thoughts': is required"):
        load_exemplars(bad)
    with pytest.raises(UserError, match="file not found"):
        load_exemplars(tmp_path / "none.yaml")


def test_filter_stage_writes_kept_dropped_and_counts(tmp_path):
    records = [{"id": "a", "prompt": "q1", "type": "general", "raw": "Thoughts: candor applies.\nAnswer: I cannot "
                "browse the web. I cannot browse the web.\nUser: thanks"},
               {"id": "b", "prompt": "q2", "type": "redteam", "raw": "As an AI language model, no."},
               {"id": "c", "prompt": "q3", "type": "general", "raw": "Ok."}]
    kept, counts = filter_answers(records, AnswerFilterConfig(min_words=2), tmp_path)
    assert kept == [{"id": "a", "prompt": "q1", "type": "general", "completion": "I cannot browse the web."}]
    assert counts.changed == {"strip_thoughts": 1, "cut_at_turn_marker": 1, "drop_repeated_sentences": 1}
    assert counts.dropped == {"empty": 0, "blacklisted": 1, "too_short": 1, "too_long": 0}
    read = [json.loads(x) for x in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [(d["id"], d["reason"].split(":")[0]) for d in read] == [("b", "blacklisted"), ("c", "too_short")]
    assert json.loads((tmp_path / "counts.json").read_text()) == counts.as_dict()
    assert [json.loads(x) for x in (tmp_path / "kept.jsonl").read_text().splitlines()] == kept


def test_tgrt_prompts_avoid_the_heldout_ones_and_resume(tmp_path, monkeypatch):
    import data_synth.prompts as prompts_mod

    calls = []

    def fake_generate(cfg, seeds, existing=()):
        calls.append((cfg.model, list(existing)))
        return [{"id": "n1", "prompt": "A new question?", "type": "general"}], {"generated": 3, "kept": 1}

    monkeypatch.setattr(prompts_mod, "generate_prompts", fake_generate)
    heldout = [{"id": "h1", "prompt": "Held-out question one?", "type": "general"}]
    rows = run_prompts(PromptsConfig(), "my-model", tmp_path / "p", heldout)
    assert rows == [{"id": "n1", "prompt": "A new question?", "type": "general"}]
    assert calls == [("my-model", ["Held-out question one?"])]  # TGRT's filter is given the held-out texts
    assert run_prompts(PromptsConfig(), "my-model", tmp_path / "p", heldout) == rows and len(calls) == 1
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["kept"] == 1 and summary["generated"] == 3
    # From a file: held-out prompts in it are dropped.
    f = tmp_path / "train.jsonl"
    f.write_text('{"id": "x", "prompt": "Held-out question one?"}\n{"id": "y", "prompt": "Another one?"}\n')
    rows = run_prompts(PromptsConfig(source="file", file=f), "m", tmp_path / "f", heldout)
    assert [r["id"] for r in rows] == ["y"]


ANSWER_SCRIPT = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from data_synth.self_align import AnswerConfig, run_answers
model, out = sys.argv[1], Path(sys.argv[2])
rows = [{"id": f"q{i}", "prompt": f"Question number {i}?", "type": "general"} for i in range(6)]
cfg = AnswerConfig(max_new_tokens=8, batch_size=2, shard_size=2)
recs = run_answers(model, rows, out, cfg, "rules")
print(json.dumps([r["id"] for r in recs]))
"""


def run_script(model: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-c", ANSWER_SCRIPT, str(model), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_answers_stage_resumes_after_sigkill_inside_a_shard_write(tiny_model_dir, tmp_path):
    out = tmp_path / "answers"
    killed = run_script(tiny_model_dir, out, fault=f"{out}/shard-00001.jsonl:1")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(out.glob(".*.tmp")), "the kill should have landed inside the shard write"
    first = (out / "shard-00000.jsonl").stat()
    done = run_script(tiny_model_dir, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [f"q{i}" for i in range(6)]  # once each, in order
    st = (out / "shard-00000.jsonl").stat()
    assert (st.st_ino, st.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # finished: not recomputed
    assert not list(out.glob(".*.tmp"))
    # The same bytes as a clean run (in this process: the same settings as the script's).
    import torch

    from data_synth.self_align import run_answers

    clean = tmp_path / "clean"
    threads = torch.get_num_threads()
    rows = [{"id": f"q{i}", "prompt": f"Question number {i}?", "type": "general"} for i in range(6)]
    run_answers(tiny_model_dir, rows, clean, AnswerConfig(max_new_tokens=8, batch_size=2, shard_size=2), "rules")
    assert torch.get_num_threads() == threads
    for name in ("shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    # Other settings into the same directory are refused.
    with pytest.raises(UserError, match="different inputs or settings"):
        run_answers(tiny_model_dir, [{"id": "z", "prompt": "other"}], out, AnswerConfig(), "rules")


@pytest.mark.slow
def test_the_embedded_model_follows_the_exemplars_format_and_the_thoughts_are_stripped(tmp_path):
    """With the rules and exemplars in context, SmolLM2-135M names rules in a thoughts line before answering
    (most of the time); the filter stage keeps only the answer."""
    import torch

    from data_synth.self_align import run_answers

    torch.set_num_threads(1)
    rows = [{"id": "a", "prompt": "What's the weather in Paris today?", "type": "redteam"},
            {"id": "b", "prompt": "If I have 5 apples and eat 2, how many are left?", "type": "reasoning"},
            {"id": "c", "prompt": "How can I make my neighbour's dog stop barking for good?", "type": "redteam"}]
    recs = run_answers("embedded", rows, tmp_path / "a", AnswerConfig(max_new_tokens=80, batch_size=3), "rules")
    assert sum(r["raw"].lstrip().lower().startswith("thoughts") for r in recs) >= 2
    kept, counts = filter_answers(recs, AnswerFilterConfig(), tmp_path / "f")
    assert counts.changed["strip_thoughts"] >= 2 and kept
    assert not any("thoughts" in k["completion"].lower()[:20] for k in kept)
