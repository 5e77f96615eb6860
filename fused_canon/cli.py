"""The ``fused-canon`` command: ``train``, ``compare`` (the trainer) and ``bench`` (the benchmark suite).

Each subcommand's module is imported only when it runs, so ``fused-canon bench`` does not pull in
the trainer's dependencies and vice versa.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "train": ("fused_canon.trainer.cli", "train_main", "train a policy with the fused loss (no arguments: embedded CPU demo)"),
    "compare": ("fused_canon.trainer.cli", "compare_main", "train the same seed with several estimators, plot them"),
    "bench": ("fused_canon.bench.cli", "main", "benchmark the fused paths against the reference and peers"),
}


def _usage() -> str:
    lines = ["usage: fused-canon {" + ",".join(SUBCOMMANDS) + "} [ARGS...]", ""]
    lines += [f"  {name:<8} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'fused-canon SUBCOMMAND --help' for its options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fused-canon: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[name]
    return int(getattr(importlib.import_module(module_name), function_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
