"""Physical floors: the bytes and FLOPs each path must spend, and the machine's two ceilings.

A row's floor is ``max(bytes / bandwidth, flops / matmul rate)`` with both rates measured in the
same run (a large device-to-device copy, a large matrix product), never datasheet figures. The
work counted here is what the *task* needs, whoever does it: every candidate of a row (ours, the
torch reference, a peer) is held to the same floor. docs/design.md §7.1 derives these counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fused_canon.bench.candidates import OURS
from fused_canon.bench.workloads import (
    LINEAR_POLICY_LOSS_FWD,
    LINEAR_POLICY_LOSS_FWD_BWD,
    POLICY_LOSS_FWD,
    POLICY_LOSS_FWD_BWD,
    TOKEN_STATS_FWD,
    Shape,
)

# Per-token side traffic: the target id (int64), the mask byte, the old log-prob (fp32) read;
# log-prob and entropy (fp32) written. Negligible next to a 300 KB logits row, counted anyway.
SIDE_BYTES_PER_ROW = 8 + 1 + 4 + 4 + 4


@dataclass(frozen=True)
class Work:
    bytes: int  # bytes that must cross device memory
    flops: int  # matrix FLOPs that must be done (elementwise work is never the bound here)
    counted: str  # how, in words, for the JSON and the README

    def as_dict(self) -> Dict[str, object]:
        return {"bytes": self.bytes, "flops": self.flops, "counted": self.counted}


def work_for(path: str, shape: Shape, elt: int) -> Work:
    """The work of ``path`` at ``shape`` with ``elt``-byte logits / activations (2 for bf16)."""
    rows, valid, v = shape.n_rows, shape.n_valid, shape.vocab
    side = rows * SIDE_BYTES_PER_ROW
    if path == TOKEN_STATS_FWD:
        # token_stats has no mask: every row is read once (online max / sum-exp / sum p*z).
        return Work(rows * v * elt + side, 0, "1 read of every logits row: rows*V*elt")
    if path == POLICY_LOSS_FWD:
        return Work(valid * v * elt + side, 0, "1 read of each valid logits row: N*V*elt (masked rows skipped)")
    if path == POLICY_LOSS_FWD_BWD:
        # Streaming design (docs/design.md §7.1 (b')): a statistics read and a gradient read of each valid row,
        # and dlogits written for every row (padded rows get zeros). Keeping a 300 KB row on chip to
        # save the second read needs thread-block clusters, which Triton does not expose.
        return Work((2 * valid + rows) * v * elt + side, 0,
                    "2 reads of each valid row + 1 write of every dlogits row: (2N+rows)*V*elt")
    h = shape.hidden
    if path == LINEAR_POLICY_LOSS_FWD:
        return Work((valid * h + v * h) * elt + side, 2 * valid * h * v,
                    "2*N*H*V FLOPs (logits GEMM of the valid rows); reads hidden and weight once")
    if path == LINEAR_POLICY_LOSS_FWD_BWD:
        # Statistics in the forward, logits recomputed in the backward (verl/CCE design): 2NHV forward,
        # 2NHV recompute, 4NHV for dhidden and dweight. Gradient-in-forward designs could do 6NHV.
        return Work((2 * (valid * h + v * h) + rows * h + v * h) * elt + side, 8 * valid * h * v,
                    "8*N*H*V FLOPs (fwd 2 + recompute 2 + dX, dW 4); hidden/weight read twice, dX, dW written")
    raise ValueError(f"unknown path {path!r}")


@dataclass(frozen=True)
class Ceilings:
    """The two rates of this machine, measured in this run."""

    bandwidth_bytes_per_s: float  # device-to-device copy, bytes read + bytes written
    copy_bytes: int
    copy_ms: float
    matmul_flops_per_s: float
    matmul_size: int
    matmul_dtype: str
    matmul_ms: float

    def floor_ms(self, work: Work) -> Dict[str, object]:
        memory_ms = work.bytes / self.bandwidth_bytes_per_s * 1e3
        compute_ms = work.flops / self.matmul_flops_per_s * 1e3
        bound = "compute" if compute_ms > memory_ms else "memory"
        return {"floor_ms": max(memory_ms, compute_ms), "memory_ms": memory_ms, "compute_ms": compute_ms,
                "bound": bound}

    def as_dict(self) -> Dict[str, object]:
        return {"bandwidth_GBps": self.bandwidth_bytes_per_s / 1e9, "copy_bytes": self.copy_bytes,
                "copy_ms": self.copy_ms, "matmul_TFLOPs": self.matmul_flops_per_s / 1e12,
                "matmul_size": self.matmul_size, "matmul_dtype": self.matmul_dtype, "matmul_ms": self.matmul_ms,
                "how": "median time of a device-to-device copy (bytes read + written) and of a square matmul, "
                       "measured with the run's timer"}


def measure_ceilings(device: torch.device, dtype: torch.dtype, timer, copy_bytes: int,
                     matmul_size: int) -> Ceilings:
    """Time a ``copy_bytes`` copy and a ``matmul_size``-cubed matmul in ``dtype`` with ``timer``."""
    n = copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = timer.measure(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    mm = timer.measure(lambda: a @ b)
    return Ceilings(
        bandwidth_bytes_per_s=2 * n * 4 / (copy.median_ms * 1e-3),
        copy_bytes=2 * n * 4,
        copy_ms=copy.median_ms,
        matmul_flops_per_s=2 * matmul_size ** 3 / (mm.median_ms * 1e-3),
        matmul_size=matmul_size,
        matmul_dtype=str(dtype).replace("torch.", ""),
        matmul_ms=mm.median_ms,
    )


@dataclass(frozen=True)
class Target:
    """A goal for one row (issue 5 / docs/design.md §7.3), defined on one device kind."""

    path: str
    n_valid: int
    vocab: int
    hidden: Optional[int]
    time_ms: float
    extra_gib: Optional[float]  # peak extra memory beyond the weight gradient (docs/design.md §7.3: "beyond dW")
    device: str
    impl: str
    note: str

    def matches(self, impl: str, path: str, shape: Shape) -> bool:
        return (impl == self.impl and path == self.path and not shape.padded and shape.n_valid == self.n_valid
                and shape.vocab == self.vocab and shape.hidden == self.hidden)

    def as_dict(self) -> Dict[str, object]:
        return {"impl": self.impl, "path": self.path, "n_valid": self.n_valid, "vocab": self.vocab,
                "hidden": self.hidden, "time_ms_max": self.time_ms, "extra_gib_max": self.extra_gib,
                "device": self.device, "note": self.note}


TARGETS = (
    Target(TOKEN_STATS_FWD, 16384, 151936, None, 1.8, None, "H100", OURS,
           "floor 1.66 ms (one read at 3.0 TB/s)"),
    Target(POLICY_LOSS_FWD_BWD, 16384, 151936, None, 4.5, None, "H100", OURS,
           "between 1R+1W (3.32 ms) and streaming 2R+1W (4.98 ms) at 3.0 TB/s"),
    Target(LINEAR_POLICY_LOSS_FWD_BWD, 16384, 151936, 4096, 130.0, 1.5, "H100", OURS,
           "8NHV = 102 ms at 800 TFLOP/s; extra memory counted beyond dW (bf16 dW alone is 1.16 GiB)"),
)


def evaluate_target(target: Target, device_name: str, time_ms: Optional[float],
                    extra_beyond_dw_bytes: Optional[int]) -> Dict[str, object]:
    """Pass/fail of a measured row against its target; ``applies`` is False on another device kind."""
    applies = target.device.lower() in device_name.lower()
    time_ok = time_ms is not None and time_ms <= target.time_ms
    mem_ok: Optional[bool] = None
    if target.extra_gib is not None:
        mem_ok = extra_beyond_dw_bytes is not None and extra_beyond_dw_bytes <= target.extra_gib * 2 ** 30
    met = time_ok and (mem_ok is not False)
    return dict(target.as_dict(), applies=applies, time_met=time_ok, memory_met=mem_ok,
                met=met if applies else None)


def target_for(impl: str, path: str, shape: Shape) -> Optional[Target]:
    return next((t for t in TARGETS if t.matches(impl, path, shape)), None)

