"""salmon_client/verl.py called exactly as verl calls a custom reward function, against a real `salmon serve`.

verl loads ``custom_reward_function.path`` with ``importlib.util.spec_from_file_location`` as a lone
module and wraps the named function so that ``reward_kwargs`` are merged into every call's keywords.
NaiveRewardManager then calls it per response with keywords ``data_source``, ``solution_str``,
``ground_truth`` and ``extra_info`` (to which it adds ``num_turns``); BatchRewardManager calls it once
with ``data_sources`` (a numpy object array), ``solution_strs``, ``ground_truths`` and
``extra_infos``; the async reward loop awaits a coroutine function, adding
``reward_router_address`` and ``reward_model_tokenizer`` when it has a reward router.
"""

from __future__ import annotations

import asyncio
import importlib.util
from functools import partial

import numpy as np
import pytest

import salmon_client.verl
from principles.schema import load_principle_set
from salmon_client import SalmonClient

ROWS = [("What time zone is Tokyo in?", "Japan Standard Time, UTC+9."),
        ("What time zone is Tokyo in?", "Look it up yourself, I am busy."),
        ("Name a prime.", "7"),
        ("Name a prime.", "Seven is prime, and so are two, three and five."),
        ("Name a colour.", "Blue.")]


def load_like_verl(name: str, reward_kwargs: dict):
    """verl's get_custom_reward_fn: the file by path, the function by name, reward_kwargs merged in."""
    spec = importlib.util.spec_from_file_location("custom_module", salmon_client.verl.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw_fn = getattr(module, name)

    def _call_with_kwargs(raw, extra, *args, **kwargs):
        return raw(*args, **{**kwargs, **extra})

    if asyncio.iscoroutinefunction(raw_fn):
        async def _acall(raw, extra, *args, **kwargs):
            return await raw(*args, **{**kwargs, **extra})
        return partial(_acall, raw_fn, reward_kwargs)
    return partial(_call_with_kwargs, raw_fn, reward_kwargs)


def expected(rows, principle_set="concise") -> list[float]:
    with SalmonClient() as client:
        return client.score(rows, principle_set=principle_set).scores


def test_naive_manager_call(env):
    fn = load_like_verl("compute_score", {"url": env.url, "principle_set": "concise"})
    got = [fn(data_source="salmon/demo", solution_str=response, ground_truth=None,
              extra_info={"prompt": prompt, "index": i, "num_turns": None})
           for i, (prompt, response) in enumerate(ROWS)]
    assert all(isinstance(x, float) for x in got)
    assert got == pytest.approx(expected(ROWS), abs=1e-5)


def test_batch_manager_call_with_numpy_arrays_and_chat_prompts(env):
    fn = load_like_verl("compute_score_batch", {"principle_set": "concise"})  # URL from $SALMON_URL
    infos = np.array([{"prompt": np.array([{"role": "user", "content": p, "extra": 1}], dtype=object)}
                      for p, _ in ROWS], dtype=object)
    got = fn(data_sources=np.array(["salmon/demo"] * len(ROWS), dtype=object),
             solution_strs=[r for _, r in ROWS], ground_truths=[None] * len(ROWS), extra_infos=infos)
    chat_rows = [([{"role": "user", "content": p}], r) for p, r in ROWS]
    assert got == pytest.approx(expected(chat_rows), abs=1e-5)


def test_async_reward_loop_call(env):
    fn = load_like_verl("compute_score_async", {"principle_set": "concise"})

    async def go():
        return await asyncio.gather(*(fn(data_source="salmon/demo", solution_str=r, ground_truth="",
                                         extra_info={"question": p}, reward_router_address=None,
                                         reward_model_tokenizer=None) for p, r in ROWS))

    assert asyncio.run(go()) == pytest.approx(expected(ROWS), abs=1e-5)


def test_principle_set_from_extra_info_then_config_then_environment(env, monkeypatch):
    monkeypatch.setenv("SALMON_PRINCIPLE_SET", "harmless")
    fn = load_like_verl("compute_score_batch", {})
    infos = [{"prompt": p, "principle_set": "detailed"} if i % 2 else {"prompt": p} for i, (p, _) in enumerate(ROWS)]
    got = fn(data_sources=["d"] * len(ROWS), solution_strs=[r for _, r in ROWS], ground_truths=[None] * len(ROWS),
             extra_infos=infos)
    odd, even = ROWS[1::2], ROWS[0::2]
    assert got[1::2] == pytest.approx(expected(odd, "detailed"), abs=1e-5)
    assert got[0::2] == pytest.approx(expected(even, "harmless"), abs=1e-5)
    configured = load_like_verl("compute_score", {"principle_set": load_principle_set("concise").ref})
    assert configured(data_source="d", solution_str=ROWS[0][1], ground_truth=None,
                      extra_info={"prompt": ROWS[0][0]}) == pytest.approx(expected(ROWS[:1], "concise")[0], abs=1e-5)


def test_a_row_without_its_prompt_or_with_an_unknown_set_says_what_to_fix(env):
    from salmon_client import RewardServiceError

    fn = load_like_verl("compute_score", {})
    with pytest.raises(ValueError, match=r"extra_info\['prompt'\]"):
        fn(data_source="d", solution_str="x", ground_truth=None, extra_info={"index": 0})
    with pytest.raises(RewardServiceError) as unknown:
        fn(data_source="d", solution_str="x", ground_truth=None, extra_info={"prompt": "q", "principle_set": "nope"})
    assert unknown.value.status == 404 and "nope" in str(unknown.value)
