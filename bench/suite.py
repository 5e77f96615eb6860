"""Run every (path, shape, candidate) of a grid and collect one result row each.

Every row gets a status: ``ok`` (timed), ``unavailable`` (our backend or API has not landed; the
error text is kept), ``not installed`` / ``import failed`` (a peer), ``skipped`` (estimated not to
fit in memory, or not applicable), ``oom`` (ran out of memory after all) or ``error`` (anything
else, with its text). Nothing is filled in for a row that did not run.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch._dynamo.utils import counters as dynamo_counters

from fused_canon.bench.candidates import COMPILED, EAGER, OURS, Candidate, Settings, candidates_for
from fused_canon.bench.floors import (
    TARGETS,
    Ceilings,
    Target,
    Work,
    evaluate_target,
    measure_ceilings,
    target_for,
    work_for,
)
from fused_canon.bench.peers import Peer, dist_version, probe_peers
from fused_canon.bench.timing import CudaTimer, WallClockTimer, peak_extra_memory
from fused_canon.bench.workloads import (
    LINEAR_POLICY_LOSS_FWD_BWD,
    POLICY_LOSS_FWD_BWD,
    TOKEN_STATS_FWD,
    Grid,
    Shape,
    input_bytes,
    make_inputs,
)

SCHEMA_VERSION = 1
SMOKE_COMPILED_PATHS = (TOKEN_STATS_FWD, POLICY_LOSS_FWD_BWD, LINEAR_POLICY_LOSS_FWD_BWD)
# Fraction of free memory a case may be estimated to use before it is skipped unrun.
MEMORY_HEADROOM = 0.9


@dataclass
class RunConfig:
    mode: str  # "full" | "smoke"
    grid: Grid
    paths: Sequence[str]
    dtype: torch.dtype
    device: torch.device
    seed: int
    compile_backend: str
    timer: object  # CudaTimer | WallClockTimer
    copy_bytes: int  # size of the bandwidth probe
    matmul_size: int  # size of the matmul-rate probe
    impl_filter: Optional[Sequence[str]] = None  # substrings; None runs every candidate
    compile_shapes: str = "all"  # where the torch.compile reference runs: see compile_skip_reason


def default_timer(device: torch.device, smoke: bool, min_runs: int = 20):
    if device.type == "cuda":
        return CudaTimer(min_runs=min_runs)
    # The first call of every row is already an untimed warm-up (see run_case).
    return WallClockTimer(runs=3 if smoke else 10, warmup=0)


def device_info(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    return {"type": "cpu", "name": f"cpu-{platform.machine()}", "memory_bytes": _physical_memory(),
            "cpu_count": os.cpu_count(), "model": _cpu_model()}


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:
        return None


def versions(peers: Dict[str, Peer]) -> Dict[str, Optional[str]]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": dist_version("triton"), "fused-canon": dist_version("fused-canon")}
    out.update({name: peer.version for name, peer in peers.items()})
    return out


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    # Linux's MemAvailable counts the page cache that the kernel gives back on demand; unused pages
    # alone (SC_AVPHYS_PAGES, MemFree) fall below 1 GiB on a 24 GiB machine after a few pip installs.
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_skip_reason(policy: str, path: str, shape_index: int, shape: Shape) -> Optional[str]:
    """Why the torch.compile reference does not run at this shape, or None when it does.

    Compiling costs far more than timing: tens of seconds per shape with inductor on a GPU, seconds
    of dynamo tracing on the CPU. "target" compiles at the target shape only (N = 16,384,
    V = 151,936, H = 4,096, where the targets are set); "smoke" once per entry point, at its first
    shape, in training mode where there is one.
    """
    if policy == "all":
        return None
    if policy == "target":
        if not shape.padded and any(t.n_valid == shape.n_valid and t.vocab == shape.vocab
                                    and (shape.hidden is None or t.hidden == shape.hidden) for t in TARGETS):
            return None
        return ("torch.compile runs at the target shape only (N=16384 V=151936 H=4096); "
                "--compile-shapes all for every shape")
    if shape_index == 0 and path in SMOKE_COMPILED_PATHS:
        return None
    return f"smoke: torch.compile runs once per entry point ({', '.join(SMOKE_COMPILED_PATHS)}; first shape)"


def memory_skip_reason(path: str, shape: Shape, candidate: Candidate, device: torch.device, elt: int) -> Optional[str]:
    """Why the case is estimated not to fit in free memory (it is then skipped unrun), or None when it fits."""
    needed = input_bytes(path, shape, elt) + candidate.workspace_bytes(shape, elt)
    free = _free_memory(device)
    if needed > MEMORY_HEADROOM * free:
        return (f"estimated {needed / 2**30:.1f} GiB (inputs + workspace) > {MEMORY_HEADROOM:.0%} of "
                f"{free / 2**30:.1f} GiB free")
    return None


def _value_of(path: str) -> str:
    return "mean log-prob of the valid tokens" if path == TOKEN_STATS_FWD else "loss"


def cross_check(case_rows: List[Dict[str, object]]) -> None:
    """Relative difference of each row's value from the eager reference's on the same inputs (from
    ours where the reference did not run): every candidate computes the same number, so a large
    difference is a wrong adapter or a wrong kernel, not a speed-up.

    Called again as the case's rows come in: each call recomputes every row from the rows so far,
    so the last call gives what one call on the whole case would.
    """
    by_impl = {r["impl"]: r for r in case_rows if r["value"] is not None}
    reference = by_impl.get(EAGER) or by_impl.get(OURS)
    if reference is None:
        return
    for row in by_impl.values():
        if row is reference:
            row["rel_diff"] = row["rel_diff_vs"] = None  # in case an earlier call compared it to another reference
        else:
            row["rel_diff"] = abs(row["value"] - reference["value"]) / max(abs(reference["value"]), 1e-12)
            row["rel_diff_vs"] = reference["impl"]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _classify(exc: BaseException) -> str:
    """``unavailable`` for a backend or API that is not there yet, ``oom``, else ``error``."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    if isinstance(exc, (ImportError, NotImplementedError)):
        return "unavailable"
    if isinstance(exc, AttributeError) and "fused_canon" in str(exc):
        return "unavailable"  # e.g. "module 'fused_canon' has no attribute 'policy_loss'"
    return "error"


def base_row(path: str, shape: Shape, candidate: Candidate, work: Work, floor: Dict[str, object],
             target: Optional[Target]) -> Dict[str, object]:
    return {
        "path": path, "impl": candidate.impl, "kind": candidate.kind, "peer": candidate.peer,
        "computes": candidate.computes, "shape": shape.as_dict(), "label": shape.label(), "status": None,
        "detail": None, "time_ms": None, "runs": None, "first_call_s": None, "peak_extra_bytes": None,
        "memory_note": None, "weight_grad_bytes": None, "value": None, "value_of": _value_of(path),
        "rel_diff": None, "rel_diff_vs": None, "compiled_frames": None, "work": work.as_dict(), "floor": floor,
        "fraction_of_floor": None, "achieved_GBps": None, "achieved_TFLOPs": None,
        "target": target.as_dict() if target else None,
    }


def run_case(cfg: RunConfig, path: str, shape: Shape, candidate: Candidate, peers: Dict[str, Peer],
             ceilings: Ceilings, device_name: str, shape_index: int = 0) -> Dict[str, object]:
    """One row; ``shape_index`` is the index of ``shape`` in ``cfg.grid.shapes(path)`` (see compile_skip_reason)."""
    elt = _element_size(cfg.dtype)
    work = work_for(path, shape, elt)
    floor = ceilings.floor_ms(work)
    target = target_for(candidate.impl, path, shape)
    row = base_row(path, shape, candidate, work, floor, target)
    reason = compile_skip_reason(cfg.compile_shapes, path, shape_index, shape) if candidate.impl == COMPILED else None
    if reason:
        row["status"], row["detail"] = "skipped", reason
        return row
    if candidate.peer is not None and not peers[candidate.peer].available:
        row["status"] = peers[candidate.peer].status.split(":")[0]
        row["detail"] = f"{candidate.peer}: {peers[candidate.peer].status}"
        return row
    if candidate.cuda_only and cfg.device.type != "cuda":
        row["status"], row["detail"] = "skipped", f"needs a CUDA device: {candidate.cuda_only}"
        return row
    reason = memory_skip_reason(path, shape, candidate, cfg.device, elt)
    if reason:
        row["status"], row["detail"] = "skipped", reason
        return row
    inputs = prepared = None
    try:
        inputs = make_inputs(path, shape, cfg.dtype, cfg.device, cfg.seed)
        prepared = candidate.prepare(inputs)
        inputs = None  # from here only what the candidate kept is alive (e.g. Liger's own layout)
        _synchronize(cfg.device)
        frames_before = dynamo_counters["frames"]["ok"]
        start = time.perf_counter()
        output = prepared.fn()  # compiles kernels / traces torch.compile; never timed
        _synchronize(cfg.device)
        row["first_call_s"] = time.perf_counter() - start
        row["compiled_frames"] = dynamo_counters["frames"]["ok"] - frames_before
        row["value"] = prepared.summarize(output)
        del output
        if not math.isfinite(row["value"]):
            raise FloatingPointError(f"non-finite {row['value_of']}: {row['value']}")
        timing = cfg.timer.measure(prepared.fn, prepared.grad_to_none)
        row.update(peak_extra_memory(prepared.fn, cfg.device, prepared.grad_to_none))
        if prepared.weight is not None:
            row["weight_grad_bytes"] = prepared.weight.numel() * prepared.weight.element_size()
    except Exception as exc:  # every failure becomes this row's status; the run goes on
        row["status"] = _classify(exc)
        row["detail"] = f"{type(exc).__name__}: {exc}"
        return row
    finally:
        del inputs, prepared
        _release(cfg.device)
    row["status"] = "ok"
    row["time_ms"], row["runs"] = timing.median_ms, timing.runs
    row["fraction_of_floor"] = floor["floor_ms"] / timing.median_ms
    row["achieved_GBps"] = work.bytes / (timing.median_ms * 1e-3) / 1e9
    row["achieved_TFLOPs"] = work.flops / (timing.median_ms * 1e-3) / 1e12 if work.flops else None
    if target is not None:
        extra = row["peak_extra_bytes"]
        beyond_dw = extra - (row["weight_grad_bytes"] or 0) if extra is not None else None
        row["target"] = evaluate_target(target, device_name, timing.median_ms, beyond_dw)
    return row


def run_suite(cfg: RunConfig, on_update: Callable[[Dict[str, object]], None] = lambda doc: None,
              log: Callable[[str], None] = print) -> Dict[str, object]:
    """Measure the ceilings, then every row; ``on_update(doc)`` after each row (partial results survive)."""
    started = time.time()
    peers = probe_peers()
    info = device_info(cfg.device)
    settings = Settings(compile_backend=cfg.compile_backend)
    log(f"device: {info['name']}; peers: " + ", ".join(f"{n} {p.status}" for n, p in peers.items()))
    ceilings = measure_ceilings(cfg.device, cfg.dtype, cfg.timer, cfg.copy_bytes, cfg.matmul_size)
    log(f"ceilings: copy {ceilings.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
        f"{ceilings.matmul_dtype} matmul {ceilings.matmul_flops_per_s / 1e12:.2f} TFLOP/s")
    doc: Dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "mode": cfg.mode,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "complete": False,
        "elapsed_s": None,
        "device": info,
        "versions": versions(peers),
        "settings": {"dtype": str(cfg.dtype).replace("torch.", ""), "timer": cfg.timer.name,
                     "seed": cfg.seed, "compile_backend": cfg.compile_backend, "compile_shapes": cfg.compile_shapes,
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
                     "loss_config": "fused_canon.LossConfig(clip_ratio_c=None): GRPO advantages, vanilla clip "
                                    "0.2, no dual clip, token-mean, no entropy bonus, no KL",
                     "grid": {"token_counts": list(cfg.grid.token_counts), "padded_rows": cfg.grid.padded_rows,
                              "vocabs": list(cfg.grid.vocabs), "hiddens": list(cfg.grid.hiddens),
                              "seq_len": cfg.grid.seq_len},
                     "paths": list(cfg.paths), "impl_filter": list(cfg.impl_filter) if cfg.impl_filter else None},
        "ceilings": ceilings.as_dict(),
        "peers": {name: peer.as_dict() for name, peer in peers.items()},
        "targets": [t.as_dict() for t in TARGETS],
        "rows": [],
        "plot": None,
    }
    rows: List[Dict[str, object]] = doc["rows"]
    for path in cfg.paths:
        for i, shape in enumerate(cfg.grid.shapes(path)):
            case_rows = []
            for candidate in candidates_for(path, peers, settings):
                if cfg.impl_filter and not any(f in candidate.impl for f in cfg.impl_filter):
                    continue
                row = run_case(cfg, path, shape, candidate, peers, ceilings, str(info["name"]), shape_index=i)
                rows.append(row)
                case_rows.append(row)
                shown = f"{row['time_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}"
                log(f"  {path:27s} {shape.label():34s} {candidate.impl:36s} {shown}")
                cross_check(case_rows)
                on_update(doc)
    doc["complete"] = True
    doc["elapsed_s"] = time.time() - started
    return doc
