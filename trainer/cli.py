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


def compare_main(argv: Optional[List[str]] = None) -> int:
    parser = _parser("fused-canon compare", "Train the same config and seed with several advantage estimators "
                     "and plot their curves on one figure.")
    parser.add_argument("--estimators", default="grpo,qae,canon",
                        help=f"comma-separated, from {runnable_estimators()} (qae = grpo with a quantile baseline)")
    parser.add_argument("--out-dir", default="runs/compare", help="one sub-directory per estimator + compare.png")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .tracking import learning_summary, plot_runs
    from .trainer import check_out_dir, train

    names = [name.strip() for name in args.estimators.split(",") if name.strip()]
    try:
        if not names:
            raise ConfigError(f"--estimators names none; choose from {runnable_estimators()}")
        # Each name is checked by load_config, like algorithm.advantage.estimator on the train command.
        configs = {name: load_config(args.config, args.overrides + _flags(args) + [
            f"algorithm.advantage.estimator={name}", f"trainer.out_dir={os.path.join(args.out_dir, name)}"])
            for name in names}
        if args.print_config:
            for name, cfg in configs.items():
                print(f"# {name}\n{to_yaml(cfg)}")
            return 0
        for cfg in configs.values():  # refuse a used directory before the first run, not after it
            check_out_dir(cfg.trainer)
        runs = {}
        for name, cfg in configs.items():
            print(f"=== {name} ===", flush=True)
            cfg.trainer.logger = sorted(set(cfg.trainer.logger) | {"jsonl"})  # the comparison reads the JSONL
            train(cfg)
            runs[name] = os.path.join(cfg.trainer.out_dir, "metrics.jsonl")
    except (ConfigError, CheckpointError, OSError) as error:
        code = _report("fused-canon compare", error)
        if code is None:
            raise
        return code
    png = os.path.join(args.out_dir, "compare.png")
    plot_runs(runs, png, title="estimators compared (same seed)")
    for name, jsonl_path in runs.items():
        s = learning_summary(jsonl_path)
        print(f"{name}: mean reward first tenth {s['first_tenth']:.3f} -> last tenth {s['last_tenth']:.3f}")
    print(f"figure: {png}")
    return 0
