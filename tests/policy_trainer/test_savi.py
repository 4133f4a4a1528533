"""VideoSAVi (text) end to end on the tiny policy against a real rm_service app (rule scorer) on loopback:
the stage files, the pair rule as the service decided it, the counts, DPO on the kept pairs, held-out
before/after, resume from the stage files and from a finished round; and the pure pieces."""

from __future__ import annotations

import json

import pytest
from conftest import make_service

from policy_trainer.config import RunConfig
from policy_trainer.savi import STAGES
from policy_trainer.savi_text import grounding, judge_pair, parse_question
from policy_trainer.train import run_training
from salmon.errors import UserError

PASSAGES = [
    ("p0", "The red boat sails at noon from the north pier and returns at dusk."),
    ("p1", "Owls hunt at night because their eyes gather faint light well."),
    ("p2", "Bread rises when yeast turns sugar into gas inside the dough."),
    ("p3", "The old mill on the river ground oats until it closed in 1950."),
    ("h0", "Rain fills the lake each autumn, and the lake feeds the town's taps."),
]


def savi_config(tmp_path, model_dir, url: str, **section) -> RunConfig:
    path = tmp_path / "passages.jsonl"
    with path.open("w") as f:
        for pid, text in PASSAGES:
            rec = {"id": pid, "prompt": text, "type": "general"}
            if pid.startswith("h"):
                rec["questions"] = ["What fills the lake?", "Why does the town need the lake?"]
            f.write(json.dumps(rec) + "\n")
    return RunConfig.model_validate({
        "algorithm": "savi",
        "policy": {"model": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"prompts": str(path)},
        "reward": {"url": url, "retry": {"max_attempts": 3, "initial_backoff_s": 0.05, "budget_s": 5}},
        "principles": {"set": "faithful"},
        "training": {"per_device_train_batch_size": 4, "max_completion_length": 8, "learning_rate": 5e-3,
                     "temperature": 1.0},
        "output": {"output_dir": str(tmp_path / "run"), "rollouts_dir": str(tmp_path / "rollouts"),
                   "tensorboard": False, "run_id": "savi"},
        "savi": {"iterations": 2, "prompts_per_iteration": 2, "heldout_prompts": 1, "questions_per_passage": 3,
                 **section},
    })


@pytest.fixture(scope="module")
def real_service():
    svc = make_service("real")
    yield svc
    svc.stop()


def test_savi_rounds_pairs_counts_and_resume(real_service, tiny_model_dir, tmp_path, monkeypatch):
    cfg = savi_config(tmp_path, tiny_model_dir, real_service.url)
    assert run_training(cfg).global_step == 2
    out = tmp_path / "run"
    rep = json.loads((out / "iterations.json").read_text())
    assert rep["principle_set"].startswith("faithful@") and rep["heldout_prompt_ids"] == ["h0"]
    assert (out / "iterations.png").stat().st_size > 0 and (out / "savi_funnel.png").stat().st_size > 0
    rounds = rep["iterations"]
    assert [r["iteration"] for r in rounds] == [0, 1, 2]
    for r in rounds:  # the held-out passage's own two questions, scored by the service
        assert [a["question"] for a in r["heldout_answers"]] == ["What fills the lake?",
                                                                  "Why does the town need the lake?"]
        assert len(r["heldout_scores"]) == 2
    for r in rounds[1:]:
        recs = [json.loads(line) for line in (out / "savi" / f"round-{r['iteration']}" / "pairs.jsonl").open()]
        assert len(recs) == 6 and {x["kind"] for x in recs} == {"what", "why", "how"}
        assert {x["passage_id"] for x in recs} <= {"p0", "p1", "p2", "p3"}  # never the held-out passage
        for x in recs:
            # the kept flag is exactly "the service scored the refined answer higher (and they differ)"
            assert x["kept"] == (x["refined_score"] > x["initial_score"] and x["refined"] != x["initial"])
        assert r["pairs_kept"] == sum(x["kept"] for x in recs)
        assert r["pairs_kept"] + sum(r["dropped"].values()) == r["stage_counts"]["questions"] == 6
        assert r["initial_score_mean"] == pytest.approx(sum(x["initial_score"] for x in recs) / 6)
        assert (r["dpo_steps"] > 0) == (r["pairs_kept"] > 0)
    assert rep["summary"]["pairs_kept_total"] == sum(r["pairs_kept"] for r in rounds[1:])

    # A stopped run: drop round 2's last stage and the final state; the rerun must read round 1 and round
    # 2's first stages back (no generation for them) and redo only the scoring of round 2.
    state = json.loads((out / "savi" / "state.json").read_text())
    state["round"], state["rounds"] = 1, state["rounds"][:2]
    (out / "savi" / "state.json").write_text(json.dumps(state))
    (out / "savi" / "round-2" / "pairs.jsonl").unlink()
    refined_before = (out / "savi" / "round-2" / "refined.jsonl").read_text()
    from policy_trainer.savi import SAVITrainer

    for name in STAGES[:-1]:
        monkeypatch.setattr(SAVITrainer, f"stage_{name}", lambda *a, _n=name: pytest.fail(f"{_n} ran again"))
    assert run_training(cfg).global_step == 2
    assert (out / "savi" / "round-2" / "pairs.jsonl").is_file()
    assert (out / "savi" / "round-2" / "refined.jsonl").read_text() == refined_before
    rep2 = json.loads((out / "iterations.json").read_text())
    assert [r["iteration"] for r in rep2["iterations"]] == [0, 1, 2]
    assert rep2["iterations"][1] == rounds[1]  # round 1 came from the saved table, not a rerun


def test_savi_grounding_filter_drops_and_counts(real_service, tiny_model_dir, tmp_path):
    # A random-init policy writes gibberish: at a grounding floor of 1.0 nearly every pair is dropped.
    cfg = savi_config(tmp_path, tiny_model_dir, real_service.url, iterations=1, grounding_min=1.0)
    run_training(cfg)
    r = json.loads((tmp_path / "run" / "iterations.json").read_text())["iterations"][1]
    recs = [json.loads(line) for line in (tmp_path / "run" / "savi" / "round-1" / "pairs.jsonl").open()]
    for x in recs:
        if x["refined"] != x["initial"] and x["refined_grounding"] < 1.0:
            assert x["reason"] == "ungrounded" and not x["kept"]
    assert r["dropped"]["ungrounded"] == sum(x["reason"] == "ungrounded" for x in recs)
    assert r["stage_counts"]["grounded"] == sum(x["refined_grounding"] >= 1.0 for x in recs)


def test_savi_heldout_questions_must_be_strings(real_service, tiny_model_dir, tmp_path):
    cfg = savi_config(tmp_path, tiny_model_dir, real_service.url)
    path = tmp_path / "passages.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[-1])
    bad["questions"] = ["ok?", 3]
    path.write_text("\n".join([*lines[:-1], json.dumps(bad)]) + "\n")
    with pytest.raises(UserError, match="'questions' must be a non-empty list"):
        run_training(cfg)


def test_parse_question_takes_the_first_question_else_the_kinds_fallback():
    assert parse_question('Sure.\n"Why do owls hunt at night?" I hope', "why") == ("Why do owls hunt at night?", True)
    q, generated = parse_question("Owls hunt at night.", "how")
    assert not generated and q.startswith("How") and q.endswith("?")


def test_grounding_is_the_share_of_content_words_in_the_passage():
    passage = "Owls hunt at night because their eyes gather faint light."
    assert grounding("Owls hunt at night.", passage) == 1.0
    assert grounding("Owls hunt fish.", passage) == pytest.approx(2 / 3)
    assert grounding("the and of", passage) == 0.0  # no content words at all


def test_judge_pair_reasons():
    assert judge_pair("a", "b", 0.0, 1.0, 0.0, None, None).kept
    assert judge_pair("a", "b", 1.0, 1.0, 0.0, None, None).reason == "not_preferred"  # a tie is not a preference
    assert judge_pair("a", "b", 0.0, 0.4, 0.5, None, None).reason == "not_preferred"
    assert judge_pair("a", " a ", 0.0, 1.0, 0.0, None, None).reason == "identical"
    assert judge_pair("a", "b", 0.0, 1.0, 0.0, 0.2, 0.5).reason == "ungrounded"
    assert judge_pair("a", "b", 0.0, 1.0, 0.0, 0.6, 0.5).kept
