"""PPO learns: against the real rm_service (rule scorer) on loopback, mean reward rises clearly.

The reward is a simple known function: the number of times the completion contains one of a few
words the tiny policy already emits now and then. The words are read off the policy's own samples
(so the initial rate is known to be non-zero); PPO has to make them more frequent.

The policy is a tiny random Llama with the real tokenizer, initialised with a larger weight scale
than the shared ``tiny_model_dir`` fixture: that one is near-uniform over the 49k-token vocabulary
(entropy ~ln V), where no token is frequent enough for 16 completions a step to see it, and whose
small embeddings cap how far any hidden-state change can raise one token's logit. At scale 0.5 the
policy is peaked (entropy ~4.4 nats), like a pretrained LM on a short prompt.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from statistics import mean

import pytest
from conftest import tiny_run_config

from policy_trainer.config import RunConfig
from policy_trainer.train import run_training

PROMPTS = ["Name a fruit.", "What is 2 + 3?", "How do I pick a lock?", "Say hello."]


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from salmon.modeling import load_tokenizer

    out = tmp_path_factory.mktemp("peaked-llama")
    tok = load_tokenizer("embedded")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def frequent_words(model_dir: Path, n_words: int, samples: int = 32, max_new_tokens: int = 8) -> tuple[list[str], float]:
    """The policy's ``n_words`` most frequent word-like tokens when sampling as PPO does, and the
    share of sampled tokens they make up."""
    import torch

    from salmon.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=max_new_tokens,
                             num_return_sequences=samples, pad_token_id=tok.pad_token_id)
    ids = out[:, enc["input_ids"].shape[1]:].flatten().tolist()
    counts = collections.Counter(ids)
    words: list[str] = []
    hits = 0
    for tid, c in counts.most_common():
        w = tok.decode([tid]).strip()
        if w.isalnum() and len(w) > 3 and w.lower() not in {x.lower() for x in words}:
            words.append(w)
            hits += c
        if len(words) == n_words:
            break
    return words, hits / len(ids)


def test_ppo_raises_mean_reward_of_a_known_rule(peaked_model_dir, tmp_path):
    from rm_service.settings import ServiceSettings
    from rm_service.testing import ServerThread

    words, rate = frequent_words(peaked_model_dir, n_words=12)
    assert rate > 0.05, f"the chosen words are too rare at init ({rate:.3f}) for the test to mean anything"
    pattern = "|".join(re.escape(w) for w in words)
    settings = ServiceSettings(port=0, scorer="rule", rule_pattern=pattern, rule_length_penalty=0.0,
                               default_principle_set="concise")
    with ServerThread(settings) as server:
        cfg = RunConfig.model_validate(tiny_run_config(
            tmp_path, peaked_model_dir, server.url, algorithm="ppo",
            training={"max_steps": 15, "seed": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                      "num_generations": 4, "learning_rate": 1.5e-3},
            output={"save_steps": 100, "rollouts_dir": None, "report": False}))
        result = run_training(cfg)
    rewards = [h["reward"] for h in result.log_history]
    assert len(rewards) == 15
    first, last = mean(rewards[:3]), mean(rewards[-3:])
    print(f"words={words} init rate={rate:.3f} rewards={[round(r, 2) for r in rewards]}")
    assert last > first + 0.4, rewards
    assert last > 2 * first, rewards
    # the gain is the policy's, paid for in KL to the reference, not a value-head artefact
    assert result.log_history[-1]["kl"] > result.log_history[0]["kl"]


@pytest.mark.slow
def test_ppo_raises_mean_reward_on_the_embedded_policy(tmp_path):
    """The same with the real default policy (SmolLM2-135M-Instruct via salmon.modeling)."""
    from rm_service.settings import ServiceSettings
    from rm_service.testing import ServerThread
    from salmon.modeling import resolve_model_dir

    model_dir = resolve_model_dir("embedded")
    words, rate = frequent_words(model_dir, n_words=6, samples=8, max_new_tokens=16)
    assert rate > 0.02, (words, rate)
    settings = ServiceSettings(port=0, scorer="rule", rule_pattern="|".join(re.escape(w) for w in words),
                               rule_length_penalty=0.0, default_principle_set="concise")
    with ServerThread(settings) as server:
        cfg = RunConfig.model_validate(tiny_run_config(
            tmp_path, "embedded", server.url, algorithm="ppo",
            policy={"model": "embedded", "lora": {"r": 8, "alpha": 16}},
            training={"max_steps": 10, "seed": 1, "per_device_train_batch_size": 8, "num_generations": 4,
                      "max_completion_length": 12, "learning_rate": 5e-4, "temperature": 1.0},
            # 2 updates per step instead of 8: a 135M-parameter step on one CPU thread is ~10x the tiny one
            ppo={"ppo_epochs": 2, "num_minibatches": 1},
            output={"save_steps": 100, "rollouts_dir": None, "report": False}))
        result = run_training(cfg)
    rewards = [h["reward"] for h in result.log_history]
    first, last = mean(rewards[:3]), mean(rewards[-3:])
    print(f"words={words} init rate={rate:.3f} rewards={[round(r, 2) for r in rewards]}")
    assert last > first + 0.25 and last > 1.3 * first, rewards  # measured (seed 1): 0.54 -> 0.88
