"""salmon_client/openrlhf.py as OpenRLHF uses a ``--remote_rm_url file.py``, against a real `salmon serve`.

OpenRLHF loads the file with ``importlib.util.spec_from_file_location("reward_func", path)`` and calls
``reward_func(queries, prompts, labels)`` (from a worker thread) with the chat-templated texts it
generated, their prompts and the label column; it reads ``rewards``, ``scores`` and ``extra_logs``
from the dict it returns. Its plain-URL mode posts ``{"query": [...]}`` (newer versions add
``prompts`` and ``labels``) with no headers.
"""

from __future__ import annotations

import asyncio
import importlib.util

import httpx
import pytest
import torch

import salmon_client.openrlhf
from salmon_client import SalmonClient
from tests.reliability.helpers import assert_error_body
from tests.salmon_client.conftest import KEY, MAX_ITEMS

PAIRS = [("What time zone is Tokyo in?", "Japan Standard Time, UTC+9."),
         ("What time zone is Tokyo in?", "Look it up yourself."),
         ("Name a prime.", "7"),
         ("Name a prime.", "Seven, and also two, three and five."),
         ("Name a colour.", "Blue."),
         ("Name a colour.", "Blue, like the sky on a clear day.")]


def load_like_openrlhf():
    spec = importlib.util.spec_from_file_location("reward_func", salmon_client.openrlhf.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


def scores_of(pairs, principle_set="concise") -> list[float]:
    with SalmonClient() as client:
        return client.score([([{"role": "user", "content": p}], r) for p, r in pairs], principle_set=principle_set).scores


def test_reward_func_with_queries_prompts_and_labels(env, chat):
    reward_func = load_like_openrlhf()
    queries = [chat(p, r) for p, r in PAIRS]
    prompts = [chat(p) for p, _ in PAIRS]

    async def like_openrlhf():  # a thread per sample, as its single-turn executor does
        return await asyncio.gather(*(asyncio.to_thread(reward_func, [q], [p], ["label"])
                                      for q, p in zip(queries, prompts, strict=True)))

    one_by_one = asyncio.run(like_openrlhf())
    batch = reward_func(queries, prompts, [None] * len(queries))  # more than max_items: split by the client
    assert len(queries) > MAX_ITEMS
    assert isinstance(batch["rewards"], torch.Tensor) and batch["rewards"].dtype == torch.float32
    assert torch.equal(batch["rewards"], batch["scores"]) and batch["extra_logs"] == {}
    want = scores_of(PAIRS)  # the same conversations as (prompt, response) items on /v1/score
    assert batch["rewards"].tolist() == pytest.approx(want, abs=1e-4)
    assert [r["rewards"].item() for r in one_by_one] == pytest.approx(want, abs=1e-4)


def test_query_only_and_the_principle_set_from_the_environment(env, chat, monkeypatch):
    monkeypatch.setenv("SALMON_PRINCIPLE_SET", "detailed")
    out = load_like_openrlhf()([chat(p, r) for p, r in PAIRS[:3]], None, None)
    assert out["rewards"].tolist() == pytest.approx(scores_of(PAIRS[:3], "detailed"), abs=1e-4)


def test_text_outside_the_template_uses_its_prompt_and_bad_text_is_a_422(env):
    from salmon_client import RewardServiceError

    reward_func = load_like_openrlhf()
    out = reward_func(["Question: what is 2+2? Answer: 4"], ["Question: what is 2+2? Answer:"], [None])
    assert out["rewards"].shape == (1,)
    with pytest.raises(RewardServiceError) as bad:
        reward_func(["no template and no prompt"], None, None)
    assert bad.value.status == 422 and "query.0" in str(bad.value)


def test_the_bare_get_reward_url_mode_is_unchanged(env, chat):
    """OpenRLHF's own client sends no key: against a keyed service that is a 401 in the contract's shape
    (hence the file); with the key the same body is scored as before."""
    body = {"query": [chat(p, r) for p, r in PAIRS[:2]]}
    bare = httpx.post(env.url + "/get_reward", json=body, timeout=60)
    assert bare.status_code == 401
    assert_error_body(bare)
    keyed = httpx.post(env.url + "/get_reward", json={**body, "prompts": [chat(p) for p, _ in PAIRS[:2]],
                                                       "labels": [None, None]},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert keyed.status_code == 200, keyed.text
    out = keyed.json()
    assert out["rewards"] == out["scores"] == pytest.approx(scores_of(PAIRS[:2]), abs=1e-4)
    assert out["extra_logs"]["principle_set"].startswith("concise@")
