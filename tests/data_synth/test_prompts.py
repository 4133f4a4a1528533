"""Prompt files: validation with file:line errors; TGRT filters (length, dedup, ROUGE-L) and generation."""

from __future__ import annotations

import json

import pytest

from data_synth.config import GeneratePromptsConfig
from data_synth.prompts import (
    PromptFilter,
    generate_prompts,
    load_prompts,
    parse_list,
    rouge_l,
    shipped_prompts,
)
from salmon.errors import UserError


def write(tmp_path, lines):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_shipped_prompt_set_loads():
    prompts = load_prompts(shipped_prompts())
    assert len(prompts) >= 32 and len({p["id"] for p in prompts}) == len(prompts)


def test_bad_prompt_files_name_the_file_and_line(tmp_path):
    ok = json.dumps({"id": "a", "prompt": "hi there"})
    with pytest.raises(UserError, match=r"prompts.jsonl:3: not valid JSON"):
        load_prompts(write(tmp_path, [ok, "", "{broken"]))
    with pytest.raises(UserError, match=r"prompts.jsonl:2: 'prompt' is empty"):
        load_prompts(write(tmp_path, [ok, json.dumps({"prompt": "  "})]))
    with pytest.raises(UserError, match=r"prompts.jsonl:2: 'type' is 'poem'"):
        load_prompts(write(tmp_path, [ok, json.dumps({"prompt": "x", "type": "poem"})]))
    with pytest.raises(UserError, match=r"prompts.jsonl:2: id 'a' already used on line 1"):
        load_prompts(write(tmp_path, [ok, ok]))
    with pytest.raises(UserError, match=r"prompts.jsonl: no prompts"):
        load_prompts(write(tmp_path, []))
    msgs = load_prompts(write(tmp_path, [json.dumps({"prompt": [{"role": "user", "content": "q"}]})]))
    assert msgs[0]["id"].startswith("p") and msgs[0]["type"] == "general"


def test_rouge_l_against_a_hand_computation():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = 4/6, R = 4/6.
    assert rouge_l("The cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert rouge_l("abc", "abc") == 1.0 and rouge_l("x y", "z w") == 0.0 and rouge_l("", "a") == 0.0


def test_filter_drops_by_length_case_insensitive_duplicates_and_near_duplicates():
    f = PromptFilter(min_chars=5, max_chars=60, max_rouge_l=0.7, existing=["How do I bake bread at home?"])
    assert not f.offer("Hi?")
    assert not f.offer("x" * 61)
    assert not f.offer("HOW DO I BAKE BREAD AT HOME?")
    assert not f.offer("How do I bake bread at home quickly?")  # ROUGE-L 0.93
    assert f.offer("What is the tallest mountain in Africa?")
    assert f.dropped == {"too_short": 1, "too_long": 1, "duplicate": 1, "near_duplicate": 1}


def test_parse_list_reads_numbered_and_bulleted_items():
    assert parse_list("Topics:\n1. Space travel\n2) Cooking\n- Gardening\n\n") == [
        "Topics:", "Space travel", "Cooking", "Gardening"]


def test_tgrt_generation_with_a_local_model_is_filtered_and_deterministic(tiny_model_dir):
    from data_synth.prompts import shipped_seeds

    cfg = GeneratePromptsConfig(model=str(tiny_model_dir), target=3, types=["factual question"], topics_per_type=2,
                                questions_per_topic=2, max_new_tokens=12, max_rounds=2, min_chars=5, max_chars=400)
    seeds = load_prompts(shipped_seeds())
    new, counters = generate_prompts(cfg, seeds)
    assert counters["generated"] > 0 and counters["rounds"] >= 1
    assert len(new) <= 3 and len({p["prompt"].lower() for p in new}) == len(new)
    for p in new:
        assert 5 <= len(p["prompt"]) <= 400 and p["type"] == "general"
        assert all(rouge_l(p["prompt"], s["prompt"]) < 0.7 for s in seeds)
    assert generate_prompts(cfg, seeds)[0] == new
