"""`salmon` — the one entry point. Each subcommand lives in its package's ``cli.main(argv)``.

Imports are lazy so that ``salmon --help`` and a bad flag answer instantly (no torch import).
Errors a user can fix end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from salmon.errors import SalmonError

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("rm_service.cli", "run the principle-following reward-model service"),
    "score": ("rm_service.cli", "score (prompt, response) pairs from the command line, no server"),
    "check": ("rm_service.cli", "report every scorer's principle-flip rate on the labelled check set"),
    "generate": ("rm_service.cli", "generate under principles: RAIN search (--rain) or plain sampling, no server"),
    "synth": ("data_synth.cli", "synthetic principle preferences: prompts, sample, judge, aggregate, watch"),
    "rm-train": ("data_synth.cli", "train a principle-following reward model and publish a registry version"),
    "rm-pretrain": ("data_synth.cli", "rebuild the shipped principle-following reward model (minimal pairs, many axes)"),
    "contrast-tune": ("data_synth.cli", "train a LoRA adapter that makes the contrastive scorer read principles"),
    "train": ("policy_trainer.cli", "RL (grpo | rloo | ppo) with rewards from the service over HTTP"),
    "isheep": ("salmon_cli.isheep", "I-SHEEP: the model writes, answers, rates and trains on its own data, per iteration"),
    "self-align": ("salmon_cli.self_align", "SELF-ALIGN: rules-in-context answers to TGRT prompts, engraved by SFT"),
    "demo": ("salmon_cli.demo", "the whole loop on the embedded default, on one CPU machine"),
    "bench": ("benchmarks.cli", "benchmark scoring against its limit and a baseline"),
}


def _usage() -> str:
    lines = ["usage: salmon <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`salmon <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from salmon import __version__

        print(f"salmon {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"salmon: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    try:
        return int(module.main([cmd, *rest]) or 0)
    except SalmonError as e:  # the one place errors become a line on stderr and an exit code
        print(f"salmon {cmd}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"salmon {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
