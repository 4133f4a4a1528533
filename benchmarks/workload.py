"""The GRPO-shaped workload of `salmon bench`: the principle set, the prompts and the seeded responses.

See the package docstring (benchmarks/__init__.py) for what the workload is and why.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SET_NAME = "bench"
POOL_ORDER = ("rm", "self_align", "harmless", "honest", "rl", "hhh", "concise", "intervention")
SENTENCES = (
    "The first step is to look at what the question actually asks for.",
    "In short, the answer depends on how much time and money you can spend.",
    "A simple way to check the result is to work it out a second time by hand.",
    "Water expands when it freezes, which is why pipes can burst in winter.",
    "Most people find it easier to start with a small goal and build from there.",
    "If you are unsure, a pharmacist or a doctor can give advice for your case.",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
    "Interest is charged on the balance, so paying early lowers the total cost.",
    "Here is a short example that shows the idea in practice.",
    "Keep the soil moist but not wet, and give the plant plenty of light.",
    "This works because each step only depends on the one before it.",
    "To be honest, I do not know the exact figure, but it is roughly a third.",
    "Let us break the problem into three parts and solve each one in turn.",
    "The main risk is overheating, so leave space around the device for air.",
    "Many cities now offer free maps and timetables online.",
    "Finally, remember to save your work and to take a short break now and then.",
    "The poem uses rain as a picture of a slow and quiet start to the week.",
    "Multiplying both sides by four gives the same answer as before.",
    "A good interview answer names a real situation, what you did and what happened.",
    "Climate is the average over many years, while weather is what happens today.",
)



def build_principles(renderer, target_tokens: int) -> tuple[list, int]:
    """Shipped principles in POOL_ORDER until the system segment reaches ``target_tokens``."""
    from principles.schema import Principle, load_builtin_sets
    from rm_core.render import principle_block

    sets = load_builtin_sets()
    pool, seen = [], set()
    for name in POOL_ORDER:
        for pr in sets[name].principles if name in sets else ():
            if pr.name not in seen and pr.negative_definition:
                seen.add(pr.name)
                pool.append(pr)
    i = 0
    while True:  # synthetic filler only once the shipped principles run out
        i += 1
        pool.append(Principle(
            name=f"bench_filler_{i}",
            definition=f"The response keeps rule {i} of the house style: it is clear, polite and well organised.",
            negative_definition=f"The response breaks rule {i} of the house style: it is muddled, rude and disorganised."))
        if len(pool) >= 64:
            break
    chosen: list = []
    length = 0
    for pr in pool:
        chosen.append(pr)
        length = len(renderer.render(principle_block(chosen), "x", "y").system_ids)
        if length >= target_tokens:
            break
    return chosen, length


def _prompt_pool(rng: random.Random, n: int) -> list[str]:
    path = Path(__file__).resolve().parents[1] / "data_synth" / "data" / "prompts.jsonl"
    prompts = []
    if path.is_file():
        prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng.shuffle(prompts)
    while len(prompts) < n:
        prompts.append(f"Question {len(prompts) + 1}: explain step by step how to plan a small garden.")
    return prompts[:n]


def _response(tokenizer, rng: random.Random, n_tokens: int) -> str:
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text = (text + " " + rng.choice(SENTENCES)).strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids).strip()


def build_workload(tokenizer, args) -> dict:
    """Groups of (prompt, responses): ``{"warmup": [group], "rounds": [[group × B] × R]}``."""
    rng = random.Random(args.seed)
    prompts = _prompt_pool(rng, 1 + args.prompts * args.rounds)

    def group(prompt: str) -> list:
        lens = [rng.randint(args.min_response_tokens, args.max_response_tokens) for _ in range(args.generations)]
        return [prompt, [_response(tokenizer, rng, n) for n in lens]]

    # One short item: it loads the kernels and (in (1) and (2)) the principle block, as the first step
    # of a run does. A whole group here would cost the full-sequence configurations ~1 min each and
    # measure nothing.
    warmup = [[prompts[0], [_response(tokenizer, rng, args.min_response_tokens)]]]
    rounds = [[group(prompts[1 + r * args.prompts + b]) for b in range(args.prompts)] for r in range(args.rounds)]
    return {"warmup": warmup, "rounds": rounds}



def items(groups: list) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of ``groups`` ([prompt, responses] each), in order."""
    return [(prompt, r) for prompt, responses in groups for r in responses]
