"""GRPO with TRL's own GRPOTrainer, rewarded by salmon: written principles instead of a preference model.

Run it top to bottom (a CPU is enough; nothing is downloaded):

    salmon serve &                           # the reward service on 127.0.0.1:8000
    python examples/trl_grpo.py              # 2 GRPO steps of the embedded SmolLM2-135M under 'concise'
    python examples/trl_grpo.py --principle-set detailed --max-steps 20
    python examples/trl_grpo.py --principle-set my_set.yaml   # a set of your own (registered for you)

The one salmon line in a TRL script is ``reward_funcs=reward_funcs(url=..., principle_set=...)``: the
same reward functions ``salmon train`` hands TRL (the service's score, and SALMON's shaping terms
when a config turns them on). The API key comes from ``$SALMON_API_KEY`` when the service has one.
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from policy_trainer import reward_funcs
from salmon.modeling import load_tokenizer, resolve_model_dir

PROMPTS = [
    "What is the capital of France?",
    "Explain what a prime number is.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me a tip for learning a new language.",
    "What does a compiler do?",
    "Name a good habit for sleeping well.",
    "What is photosynthesis?",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("SALMON_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--principle-set", default="concise", help="a shipped name, name@hash, or a YAML file")
    ap.add_argument("--model", default="embedded", help="'embedded', a .gguf file or a local HF directory")
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--output-dir", default="runs/trl-example")
    args = ap.parse_args(argv)

    model_dir = resolve_model_dir(args.model)  # local only: the embedded GGUF is converted once, then cached
    tokenizer = load_tokenizer(model_dir)

    # Connects now: a wrong URL, key or set fails here in one line, not at the first step.
    rewards = reward_funcs(url=args.url, principle_set=args.principle_set, tokenizer=tokenizer)

    # Conversational prompts; add a "prompt_id" column to name prompts yourself, and "prompt_type"
    # (general | reasoning | redteam) for SALMON's per-type principle boosts.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])

    on_cpu = not torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=1e-5,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=args.max_completion_length,
        temperature=0.7, beta=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=on_cpu, bf16=not on_cpu, model_init_kwargs={"dtype": "float32" if on_cpu else "bfloat16"},
    )
    trainer = GRPOTrainer(model=str(model_dir), args=config, reward_funcs=rewards, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()

    for entry in trainer.state.log_history:
        if "rewards/salmon_rm/mean" in entry:
            print(f"step {entry.get('step')}: salmon reward {entry['rewards/salmon_rm/mean']:+.3f} "
                  f"under {args.principle_set}")


if __name__ == "__main__":
    main()
