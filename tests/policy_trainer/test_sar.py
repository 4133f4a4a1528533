"""SAR and the exact-answer reward: hand computations, the live-policy path, and a GRPO run without the service."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from conftest import free_port, tiny_run_config

from policy_trainer.arith import TOYDATA, arith_questions
from policy_trainer.config import RunConfig
from policy_trainer.self_reward import (
    CorrectnessReward,
    SARReward,
    answer_nll,
    final_number,
    is_correct,
    sar_from_nll,
    sar_from_ppl,
)
from salmon.atomic import read_jsonl
from salmon.errors import UserError


@pytest.mark.parametrize(("ppl_cond", "ppl_uncond", "want"), [
    (2.0, 4.0, 0.5),     # (4 - 2) / 4
    (3.0, 4.0, 0.25),    # (4 - 3) / 4
    (4.0, 4.0, 0.0),     # the question changes nothing
    (6.0, 4.0, -0.5),    # (4 - 6) / 4
    (10.0, 2.0, -1.0),   # (2 - 10) / 2 = -4, clipped
])
def test_sar_formula_by_hand(ppl_cond, ppl_uncond, want):
    assert sar_from_ppl(ppl_cond, ppl_uncond) == pytest.approx(want)
    assert sar_from_nll(math.log(ppl_cond), math.log(ppl_uncond)) == pytest.approx(want)


def test_sar_does_not_overflow_on_far_apart_likelihoods():
    assert sar_from_nll(900.0, 1.0) == -1.0
    assert sar_from_nll(1.0, 900.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("text", "answer", "ok"), [
    ("The answer is 42.", "42", True),
    ("7 + 5 = 12", "12", True),
    ("It is 1,320 in total", "1320", True),
    ("12 apples, so 13", "12", False),   # the last number counts
    ("14 - 13 = 1\n\nThis is a classic example of 2 numbers", "1", True),  # the number after the last '='
    ("3 × 4 = 12. So 12 it is, not 13", "12", True),
    ("2 + 2 = 5", "4", False),
    ("-3", "-3", True),
    ("no number here", "3", False),
    ("3.5", "3", False),
])
def test_exact_answer_checker(text, answer, ok):
    assert is_correct(text, answer) is ok


def test_final_number_and_reward_function():
    assert final_number("x 2.50 y") == 2.5 and final_number("none") is None
    r = CorrectnessReward()
    assert r(prompts=["q", "q"], completions=["= 4", [{"role": "assistant", "content": "5"}]], answer=["4", "4"]) \
        == [1.0, 0.0]
    with pytest.raises(UserError, match="answer"):
        r(prompts=["q"], completions=["4"])


def _loop_nll(model, prefix: list[int], answer: list[int]) -> float:
    """By hand: one forward per answer token, no batching or padding."""
    import torch

    total = 0.0
    with torch.no_grad():
        for t in range(len(answer)):
            ids = torch.tensor([prefix + answer[:t]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
            total -= float(logp[answer[t]])
    return total / len(answer)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from salmon.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_answer_nll_batched_equals_the_loop(tiny):
    model, tok = tiny
    model.eval()
    prefixes = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    answers = [[20, 21, 22], [30, 31, 32, 33, 34, 35], []]
    got = answer_nll(model, prefixes, answers, pad_id=tok.pad_token_id, max_batch_tokens=16)
    for p, a, g in zip(prefixes[:2], answers[:2], got[:2], strict=True):
        assert g == pytest.approx(_loop_nll(model, p, a), abs=1e-4)
    assert got[2] == 0.0


def test_sar_reward_is_the_hand_computation_on_the_live_policy(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    policy = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.5,
                                              target_modules="all-linear", init_lora_weights=False))
    policy.train()  # as TRL leaves it; SAR must not read dropout noise
    sar = SARReward(max_batch_tokens=64)
    sar.bind(SimpleNamespace(model=policy, processing_class=tok))
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}],
               [{"role": "user", "content": "Name a fruit."}]]
    completions = [tok("5, because 2 + 3 = 5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                   tok("Apple", add_special_tokens=False)["input_ids"]]
    got = sar(prompts=prompts, completions=["", ""], completion_ids=completions)
    assert policy.training  # restored
    assert sar(prompts=prompts, completions=["", ""], completion_ids=completions) == pytest.approx(got, abs=1e-6)

    policy.eval()
    for msgs, ans, g in zip(prompts, completions, got, strict=True):
        cond = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
        empty = [m for m in msgs if m["role"] == "system"] + [{"role": "user", "content": ""}]
        uncond = tok(tok.apply_chat_template(empty, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        ppl_q, ppl_0 = math.exp(_loop_nll(policy, cond, ans)), math.exp(_loop_nll(policy, uncond, ans))
        assert g == pytest.approx(max((ppl_0 - ppl_q) / ppl_0, -1.0), abs=1e-4)
    # the adapter is part of what SAR reads: with it disabled the values change
    with policy.disable_adapter():
        base = sar.score(prompts, completions)
    assert base != pytest.approx(got, abs=1e-3)


def test_toy_arith_files_are_the_generator_output_and_held_out_is_disjoint():
    train, held = arith_questions()
    assert read_jsonl(TOYDATA / "arith_train.jsonl") == train
    assert read_jsonl(TOYDATA / "arith_heldout.jsonl") == held
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for r in train + held:
        a, op, b = r["prompt"].removeprefix("What is ").removesuffix("?").split()
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert r["answer"] == str(want)


def test_config_refuses_no_reward_and_shaping_without_service(tmp_path, tiny_model_dir):
    base = tiny_run_config(tmp_path, tiny_model_dir, "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="every weight is 0"):
        RunConfig.model_validate({**base, "rewards": {"service": 0}})
    with pytest.raises(ValueError, match="rewards.service"):
        RunConfig.model_validate({**base, "rewards": {"service": 0, "sar": 1},
                                  "shaping": {"unfinished_penalty": 1.0}})


def test_correctness_needs_answers_and_ppo_refuses_sar(tmp_path, tiny_model_dir):
    from policy_trainer.train import run_training

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a run that contacted it would fail
    cfg = RunConfig.model_validate(tiny_run_config(tmp_path, tiny_model_dir, url,
                                                   rewards={"service": 0, "correctness": 1}))
    with pytest.raises(UserError, match="'answer' is required"):
        run_training(cfg)
    cfg = RunConfig.model_validate(tiny_run_config(tmp_path, tiny_model_dir, url, algorithm="ppo",
                                                   rewards={"service": 0, "sar": 1}))
    with pytest.raises(UserError, match="ppo takes the service's score only"):
        run_training(cfg)


def test_grpo_correctness_plus_sar_without_the_service(tmp_path, tiny_model_dir):
    from policy_trainer.train import run_training

    url = f"http://127.0.0.1:{free_port()}"
    cfg = RunConfig.model_validate(tiny_run_config(
        tmp_path, tiny_model_dir, url, data={"prompts": str(TOYDATA / "arith_train.jsonl"), "max_prompts": 4},
        rewards={"service": 0, "correctness": 1.0, "sar": 0.2}, output={"rollouts_dir": None}))
    result = run_training(cfg)
    assert result.global_step == 2
    rows = [h for h in result.log_history if "rewards/sar/mean" in h]
    assert len(rows) == 2
    for h in rows:
        assert -1.0 <= h["rewards/sar/mean"] <= 1.0 and h["rewards/sar/mean"] != 0.0
        assert 0.0 <= h["rewards/correctness/mean"] <= 1.0
        # TRL's total is the weighted sum: correctness + 0.2 * SAR
        assert h["reward"] == pytest.approx(h["rewards/correctness/mean"] + 0.2 * h["rewards/sar/mean"], abs=1e-5)
    assert not any(k.startswith("rewards/salmon_rm") for h in result.log_history for k in h)


def test_sar_compare_writes_both_runs_and_the_heldout_report(tmp_path, tiny_model_dir):
    import json

    import yaml

    from policy_trainer.sar_compare import main

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in arith_questions()[1][:3]))
    cfg = tiny_run_config(tmp_path, tiny_model_dir, "http://127.0.0.1:9",
                          data={"prompts": str(TOYDATA / "arith_train.jsonl"), "max_prompts": 4},
                          rewards={"service": 0, "correctness": 1.0})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "cmp"), "--steps", "1",
                 "--heldout", str(held), "--max-new-tokens", "6"]) == 0
    rep = json.loads((tmp_path / "cmp" / "sar_compare.json").read_text())
    assert set(rep["heldout"]) == {"initial", "correctness", "correctness+sar"}
    assert (tmp_path / "cmp" / "sar_compare.png").stat().st_size > 1000
    for name, answers in rep["answers"].items():
        assert len(answers) == 3
        s = rep["heldout"][name]
        assert s["accuracy"] == sum(a["correct"] for a in answers) / 3
        assert 1 <= s["mean_tokens"] <= 6
    sar_steps = rep["train_reward"]["correctness+sar"]
    assert sar_steps and sar_steps[0]["sar"] is not None and rep["train_reward"]["correctness"][0]["sar"] is None


def test_grpo_service_listwise_plus_sar_weights(tmp_path, tiny_model_dir):
    from conftest import make_service

    from policy_trainer.train import run_training

    svc = make_service("real")
    try:
        cfg = RunConfig.model_validate(tiny_run_config(
            tmp_path, tiny_model_dir, svc.url, reward={"url": svc.url, "mode": "listwise"},
            rewards={"service": 0.5, "sar": 0.2}, training={"max_steps": 1}))
        result = run_training(cfg)
        calls = [c for c in svc.recorder.calls if c["path"] == "/v1/score"]
        assert calls and all(c["headers"].get("x-score-mode") == "listwise" for c in calls)
        assert all(c["response"]["mode"] == "listwise" and c["response"]["ranks"] for c in calls)
    finally:
        svc.stop()
    h = next(h for h in result.log_history if "rewards/sar/mean" in h)
    assert h["reward"] == pytest.approx(0.5 * h["rewards/salmon_rm/mean"] + 0.2 * h["rewards/sar/mean"], abs=1e-5)


def test_reward_mode_needs_the_salmon_protocol(tmp_path, tiny_model_dir):
    base = tiny_run_config(tmp_path, tiny_model_dir, "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="needs protocol salmon"):
        RunConfig.model_validate({**base, "reward": {**base["reward"], "mode": "rubric", "protocol": "openrlhf"}})


def test_sar_in_a_users_own_grpo_trainer(tmp_path, tiny_model_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from policy_trainer import CorrectnessReward, SARReward

    sar = SARReward()
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in arith_questions()[0][:4]])
    args = GRPOConfig(output_dir=str(tmp_path / "own"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=6, reward_weights=[1.0, 0.2], use_cpu=True,
                      report_to="none", save_strategy="no", disable_tqdm=True, beta=0.0)
    trainer = GRPOTrainer(model=str(tiny_model_dir), args=args, reward_funcs=[CorrectnessReward(), sar],
                          train_dataset=ds)
    sar.bind(trainer)
    trainer.train()
    h = next(h for h in trainer.state.log_history if "rewards/sar/mean" in h)
    assert sar.model is trainer.model and -1.0 <= h["rewards/sar/mean"] <= 1.0
    assert h["reward"] == pytest.approx(h["rewards/correctness/mean"] + 0.2 * h["rewards/sar/mean"], abs=1e-5)


def test_methods_that_cannot_take_in_trainer_rewards_say_so(tmp_path, tiny_model_dir):
    from policy_trainer import methods
    from policy_trainer.train import run_training

    url = f"http://127.0.0.1:{free_port()}"
    cfg = RunConfig.model_validate(tiny_run_config(tmp_path, tiny_model_dir, url, algorithm="sami",
                                                   rewards={"service": 0, "sar": 1}))
    with pytest.raises(UserError, match="needs the reward service's score"):
        run_training(cfg)

    built = []
    methods.register(methods.Method(name="own_rewards", summary="a method with its own reward plumbing",
                                    build=lambda ctx: built.append(ctx) or SimpleNamespace(),
                                    uses_reward_service=False))
    try:
        cfg = RunConfig.model_validate(tiny_run_config(tmp_path, tiny_model_dir, url, algorithm="own_rewards",
                                                       rewards={"service": 1, "correctness": 1}))
        with pytest.raises(UserError, match="does not take rewards.correctness or rewards.sar"):
            run_training(cfg)
        assert built and not built[0].local_taken
    finally:
        methods.unregister("own_rewards")
