"""`salmon train --config run.yaml`: train a policy with one of the registered methods (below).

Exit codes: 0 done; 2 bad input (one line naming the field); 3 the reward service stayed
unreachable past the retry budget (a checkpoint was saved: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from policy_trainer.methods import methods  # torch-free: builders import their trainers when called

    table = "\n".join(f"  {m.name:<8} {m.summary}" for m in methods())
    p = argparse.ArgumentParser(prog="salmon train", description=__doc__, epilog=f"methods:\n{table}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run YAML (see policy_trainer/config.py; policy_trainer/configs/ has examples)")
    p.add_argument("--algorithm", choices=[m.name for m in methods()], help="overrides algorithm")
    p.add_argument("--rm-url", help="overrides reward.url")
    p.add_argument("--policy", help="overrides policy.model")
    p.add_argument("--principle-set", help="overrides principles.set")
    p.add_argument("--max-steps", type=int, help="overrides training.max_steps")
    p.add_argument("--output-dir", help="overrides output.output_dir")
    p.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / the error
        return int(e.code or 0)
    from policy_trainer.config import load_run_config

    cfg = load_run_config(args.config, {
        "algorithm": args.algorithm, "reward.url": args.rm_url, "policy.model": args.policy,
        "principles.set": args.principle_set, "training.max_steps": args.max_steps,
        "output.output_dir": args.output_dir,
    })
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    from policy_trainer.train import run_training

    result = run_training(cfg)  # TrainingAborted (exit 3) and UserError (exit 2) are mapped by salmon_cli
    s = result.summary
    share = s.get("reward_wait_share")
    print(f"salmon train: {result.algorithm} run {result.run_id} finished at step {result.global_step}; "
          f"{s.get('time_per_step_s') or 0:.2f} s/step, reward wait {share or 0:.0%} of step time; "
          f"report {result.report_json}")
    return 0

