"""Timers and the peak-memory probe, one interface on CUDA and on the CPU.

``timer.measure(fn, grad_to_none)`` returns the median of repeated calls of ``fn`` in
milliseconds, warm-up excluded, ``.grad`` of ``grad_to_none`` reset before every call. On CUDA it
times with CUDA events as ``triton.testing.do_bench`` does; on the CPU it is a wall-clock loop with
the same interface, for the smoke run that only checks the harness.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    runs: int  # timed calls the median is taken over


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


class CudaTimer:
    """What ``triton.testing.do_bench`` does, with an exact count of timed calls.

    Each call is bracketed by CUDA events and preceded by a 256 MB write that evicts the L2 cache
    (50-60 MB on Hopper), so bandwidth-bound rows are not timed out of cache. The budget is
    ``rep_ms`` of timed calls but never fewer than ``min_runs``; warm-up is ``warmup_ms`` but at
    least ``min_warmup`` calls (the first call compiles kernels and is never timed).
    """

    name = "CUDA events per call, L2 flushed before each call, median (as triton.testing.do_bench)"

    def __init__(self, min_runs: int = 20, max_runs: int = 500, rep_ms: float = 100.0, warmup_ms: float = 25.0,
                 min_warmup: int = 2):
        self.min_runs, self.max_runs, self.rep_ms = min_runs, max_runs, rep_ms
        self.warmup_ms, self.min_warmup = warmup_ms, min_warmup
        self._flush = None

    def measure(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
        if self._flush is None:
            self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
        estimate_ms = self._estimate_ms(fn, grad_to_none)
        warmup = max(self.min_warmup, math.ceil(self.warmup_ms / estimate_ms))
        runs = min(self.max_runs, max(self.min_runs, math.ceil(self.rep_ms / estimate_ms)))
        for _ in range(warmup):
            _reset_grads(grad_to_none)
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for start, end in zip(starts, ends):
            _reset_grads(grad_to_none)
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        _reset_grads(grad_to_none)
        return Timing(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), runs)

    @staticmethod
    def _estimate_ms(fn, grad_to_none) -> float:
        _reset_grads(grad_to_none)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        _reset_grads(grad_to_none)
        return max((time.perf_counter() - start) * 1e3, 1e-3)


class WallClockTimer:
    """CPU stand-in for ``do_bench``: ``warmup`` untimed calls, then the median of ``runs`` timed calls."""

    name = "wall clock (time.perf_counter, median)"

    def __init__(self, runs: int = 3, warmup: int = 1):
        self.runs, self.warmup = runs, warmup

    def measure(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
        for _ in range(self.warmup):
            _reset_grads(grad_to_none)
            fn()
        samples = []
        for _ in range(self.runs):
            _reset_grads(grad_to_none)
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        _reset_grads(grad_to_none)
        return Timing(statistics.median(samples), self.runs)


CPU_MEMORY_NOTE = ("not measured on the CPU: torch keeps no peak-allocation statistics for CPU tensors, "
                   "and process RSS would count the allocator's cached pages, not the op's extra memory")


def peak_extra_memory(fn: Callable[[], object], device: torch.device,
                      grad_to_none: Sequence[torch.Tensor] = ()) -> Dict[str, Optional[object]]:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it (inputs).

    What the call leaves behind (gradients) stays inside the peak, as in Liger's memory tables.
    """
    if device.type != "cuda":
        return {"peak_extra_bytes": None, "memory_note": CPU_MEMORY_NOTE}
    _reset_grads(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    _reset_grads(grad_to_none)
    return {"peak_extra_bytes": int(peak),
            "memory_note": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the inputs"}
