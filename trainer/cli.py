"""``fused-canon train`` and ``fused-canon compare`` (dispatched here by fused_canon.cli).

A config error (unknown key, bad value, missing file, a used output directory) is printed as one
message, exit code 2, before anything is built; a checkpoint that cannot be read or written and a
full disk are printed as one message, exit code 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import List, Optional

import fused_canon as fc

from .checkpoint import CheckpointError
from .config import ConfigError, load_config, runnable_estimators, to_yaml


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. actor.lr=3e-3 trainer.total_steps=50")
    parser.add_argument("--config", help="a YAML file merged over the defaults (see --print-config)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in the output directory (else refused)")
    return parser


def _flags(args) -> List[str]:
    return ["trainer.overwrite=true"] if args.overwrite else []


def _report(prog: str, error: Exception) -> Optional[int]:
    """Print an error the user can act on as one message and return its exit code; None for any other."""
    if isinstance(error, ConfigError):
        print(f"{prog}: config error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, CheckpointError):
        print(f"{prog}: checkpoint error: {error}", file=sys.stderr)
        return 1
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        print(f"{prog}: no space left on the device writing {error.filename or 'the outputs'}: free some space, "
              "then rerun with --resume (the last checkpoint is intact and the log is repaired)", file=sys.stderr)
        return 1
    return None


def train_main(argv: Optional[List[str]] = None) -> int:
    parser = _parser("fused-canon train", "RL-train a policy with the fused loss. With no arguments: the "
                     "embedded default (a tiny char-level model on a synthetic arithmetic task, CANON).")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in <out_dir>/checkpoints")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .tracking import learning_summary
    from .trainer import train

    try:
        cfg = load_config(args.config, args.overrides + _flags(args) + (["trainer.resume=true"] if args.resume else []))
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        train(cfg)
    except (ConfigError, CheckpointError, OSError) as error:
        code = _report("fused-canon train", error)
        if code is None:
            raise
        return code
    if "jsonl" in cfg.trainer.logger:
        s = learning_summary(os.path.join(cfg.trainer.out_dir, "metrics.jsonl"))
        print(f"mean reward: first tenth {s['first_tenth']:.3f} -> last tenth {s['last_tenth']:.3f} "
              f"({s['steps']} steps)")
    print(f"outputs in {cfg.trainer.out_dir}")
    return 0


def _integers(text: str, flag: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag}={text!r} is not valid: comma-separated integers, e.g. 0,1,2") from None
    if not values:
        raise ConfigError(f"{flag}={text!r} names none")
    return values


def compare_main(argv: Optional[List[str]] = None) -> int:
    parser = _parser("fused-canon compare", "Train several methods with the same config, seeds and budget; write "
                     "a table (summary.md, summary.json) and figures of their effects (curves, gate, halves).")
    parser.add_argument("--methods", "--estimators", dest="methods", default="grpo,qae,canon",
                        help=f"comma-separated ESTIMATOR or ESTIMATOR+LOSS (e.g. grpo+clip_cov); estimators: "
                             f"{runnable_estimators()}; losses: {sorted(fc.POLICY_LOSSES)}")
    parser.add_argument("--seeds", default="0", help="comma-separated trainer seeds; every method runs each")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (1: in this one)")
    parser.add_argument("--out-dir", default="runs/compare", help="<method>/seed<s>/ per run, the table and figures")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .compare import compare, parse_methods, table

    try:
        if args.jobs < 1:
            raise ConfigError(f"--jobs={args.jobs} is not valid: must be >= 1")
        methods, seeds = parse_methods(args.methods), _integers(args.seeds, "--seeds")
        if args.print_config:
            from .compare import run_configs

            for (name, seed), cfg in run_configs(methods, seeds, args.out_dir, args.config, args.overrides).items():
                print(f"# {name} seed {seed}\n{to_yaml(cfg)}")
            return 0
        summary = compare(methods, seeds, args.out_dir, args.config, args.overrides + _flags(args), args.jobs)
    except (ConfigError, CheckpointError, OSError) as error:
        code = _report("fused-canon compare", error)
        if code is None:
            raise
        return code
    print(table(summary))
    print(f"table, summary.json and figures (curves.png, gate.png, halves.png) in {args.out_dir}")
    return 0
