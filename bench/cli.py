"""``fused-canon bench``: time every path against the reference and the peers, beside its floor.

    fused-canon bench                          # the full grid on the CUDA device
    fused-canon bench --paths token_stats/fwd --n 16384 --vocab 151936
    fused-canon bench --smoke --out /tmp/bench # CPU harness check through Triton's interpreter
    fused-canon bench --count                  # bytes, FLOPs, launches, syncs, memory, sm_90 builds (CPU)

Prints a table, writes ``<out>/<device>-<date>.json`` (rewritten after every row, so a run that is
killed keeps what it measured, with ``"complete": false``) and a PNG beside it. Exit status 1 when
a row ended in an unexpected error. bench/README.md explains how to read the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _int_list(text: str) -> List[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    from fused_canon.bench.workloads import PATHS

    parser = argparse.ArgumentParser(prog="fused-canon bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU harness check: tiny shapes, fp32, Triton's interpreter, 3 timed calls per row")
    parser.add_argument("--count", action="store_true",
                        help="count instead of timing, on the CPU through Triton's interpreter (bench/count.py): "
                             "bytes per tensor in units of the logits, FLOPs, launches, host syncs, peak memory, "
                             "sm_90 registers / spills / tensor cores; --n, --vocab, --hidden take one value each")
    parser.add_argument("--no-builds", action="store_true", help="with --count: leave out the sm_90 builds")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and the PNG (default: bench/results)")
    parser.add_argument("--tag", help="appended to the file name, e.g. one per split of the grid")
    parser.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS),
                        help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--n", type=_int_list, help="valid-token counts to keep (comma-separated)")
    parser.add_argument("--vocab", type=_int_list, help="vocabulary sizes to keep")
    parser.add_argument("--hidden", type=_int_list, help="hidden sizes to keep (LM-head paths)")
    parser.add_argument("--no-padded", action="store_true", help="leave out the half-masked batch")
    parser.add_argument("--impl", type=lambda s: s.split(","),
                        help="run only implementations whose name contains one of these (e.g. fused_canon,liger)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default bf16; fp32 with --smoke)")
    parser.add_argument("--compile-backend",
                        help="torch.compile backend of the reference (default inductor; aot_eager with --smoke, "
                             "since inductor's C++ build takes ~20 s per graph on 2 cores)")
    parser.add_argument("--compile-shapes", choices=("all", "target"),
                        help="where the torch.compile reference runs: every shape, or only the target shape "
                             "N=16384 V=151936 H=4096 (default: target; inductor compiles take tens of seconds each)")
    parser.add_argument("--min-runs", type=int, default=20, help="fewest timed calls per row on CUDA (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _needs_fresh_interpreter_process() -> bool:
    """Triton reads TRITON_INTERPRET when a kernel is decorated: if a kernel module is already imported
    without it, only a new process can run it on the CPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if any(name.startswith("fused_canon.kernels.") for name in sys.modules):
        return True
    os.environ["TRITON_INTERPRET"] = "1"
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import torch

    if args.count:
        if _needs_fresh_interpreter_process():
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.call([sys.executable, "-m", "fused_canon.bench.cli", *argv], env=env)
        return _run_count(args)
    if not args.smoke and not torch.cuda.is_available():
        print("fused-canon bench: no CUDA device. Run `fused-canon bench --smoke` to check the harness on the CPU.",
              file=sys.stderr)
        return 2
    if args.smoke and _needs_fresh_interpreter_process():
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "fused_canon.bench.cli", *argv], env=env)
    return _run(args)


def _run_count(args) -> int:
    import torch

    from fused_canon.bench.count import default_shape, format_count_table, run_count
    from fused_canon.bench.report import results_stem, unused_path, write_json

    torch.set_num_threads(1)
    given = {"rows": args.n, "vocab": args.vocab, "hidden": args.hidden}
    shape = default_shape(**{name: values[0] for name, values in given.items() if values})
    dtype = getattr(torch, DTYPES[args.dtype or "fp32"])
    paths = args.paths if args.paths != build_parser().get_default("paths") else None
    doc = run_count(shape, dtype, args.seed, impl_filter=args.impl, paths=paths, builds=not args.no_builds)
    os.makedirs(args.out, exist_ok=True)
    path = unused_path(args.out, "counts-" + results_stem(doc, args.tag), ".json")
    write_json(doc, path)
    print()
    print(format_count_table(doc))
    print(f"\nresults: {path}")
    return 1 if any(row["status"] == "error" for row in doc["rows"]) else 0


def _run(args) -> int:
    import torch

    from fused_canon.bench.report import format_table, results_stem, unused_path, write_json, write_plot
    from fused_canon.bench.suite import RunConfig, default_timer, run_suite
    from fused_canon.bench.workloads import FULL_GRID, PATHS, SMOKE_GRID, filter_grid

    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        print(f"fused-canon bench: unknown path(s) {unknown}; choose from {list(PATHS)}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, DTYPES[args.dtype or ("fp32" if args.smoke else "bf16")])
    grid = filter_grid(SMOKE_GRID if args.smoke else FULL_GRID, args.n, args.vocab, args.hidden,
                       padded=not args.no_padded)
    timer = default_timer(device, args.smoke, args.min_runs)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        copy_bytes, matmul_size = min(2 * 2 ** 30, free // 8), 8192
    else:
        copy_bytes, matmul_size = 64 * 2 ** 20, 512
    cfg = RunConfig(mode="smoke" if args.smoke else "full", grid=grid, paths=args.paths, dtype=dtype, device=device,
                    seed=args.seed, compile_backend=args.compile_backend or ("aot_eager" if args.smoke else "inductor"),
                    timer=timer, copy_bytes=copy_bytes, matmul_size=matmul_size, impl_filter=args.impl,
                    compile_shapes="smoke" if args.smoke else (args.compile_shapes or "target"))
    os.makedirs(args.out, exist_ok=True)
    json_path: List[str] = []

    def save(doc):
        if not json_path:
            json_path.append(unused_path(args.out, results_stem(doc, args.tag), ".json"))
        write_json(doc, json_path[0])

    started = time.time()
    doc = run_suite(cfg, on_update=save)
    save(doc)  # also when no row ran
    doc["plot"] = write_plot(doc, json_path[0][:-len(".json")] + ".png")
    save(doc)
    print()
    print(format_table(doc))
    print(f"\nresults: {json_path[0]}")
    print(f"plot: {doc['plot']['status']}" + (f" ({os.path.join(args.out, doc['plot']['path'])})"
                                              if doc["plot"]["path"] else ""))
    print(f"{len(doc['rows'])} rows in {time.time() - started:.1f} s")
    return 1 if any(row["status"] == "error" for row in doc["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
