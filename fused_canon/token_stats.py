"""Per-token log-prob and entropy: the torch reference and the backend dispatch.

Formulas: ALGORITHMS.md §8. For one row of tempered logits z = logits / T:
    lse = logsumexp(z),  p = exp(z - lse),  zbar = sum p z,  H = lse - zbar,  logp_y = z_y - lse
and for a loss L with c_logp = dL/dlogp_y, c_ent = dL/dH (§8.3):
    dL/dlogits_k = (1/T) (-p_k [c_logp + c_ent (z_k - zbar)] + c_logp [k == y])
Entries equal to -inf (a masked vocabulary) have p = 0 and contribute exactly 0 to every sum and
gradient: the reference never forms 0 * inf.

Every statistics backend has the same shape: ``fn(rows_logits, targets, temperature) -> (logp, entropy)``
over a flat list of valid rows, both outputs differentiable. The objective (losses.py) only sees
those two vectors, so autograd hands the backend exactly c_logp and c_ent.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .validation import check_logits_and_targets

__all__ = ["token_stats", "TorchTokenStats", "resolve_backend", "valid_row_index"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in fp32 (fp64 stays fp64, so the reference can be checked exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_statistics(logits: torch.Tensor, temperature: float):
    """z, lse, p and zbar of each row; p * z is taken as 0 where p == 0 (z may be -inf there)."""
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    zbar = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1, keepdim=True)
    return z, lse, p, zbar


class TorchTokenStats(torch.autograd.Function):
    """Reference statistics of rows ``logits [N, V]`` at ``targets [N]``; backward in the coefficient form."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float):
        z, lse, _, zbar = _row_statistics(logits, temperature)
        logp = z.gather(-1, targets[:, None]) - lse
        entropy = lse - zbar
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        return logp.squeeze(-1), entropy.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, targets = ctx.saved_tensors
        z, _, p, zbar = _row_statistics(logits, ctx.temperature)
        c_logp = torch.zeros_like(zbar) if grad_logp is None else grad_logp[:, None].to(z.dtype)
        c_ent = torch.zeros_like(zbar) if grad_entropy is None else grad_entropy[:, None].to(z.dtype)
        # -p (z - zbar) in the stable form: exactly 0 where p == 0, even when z == -inf.
        centered = torch.where(p > 0, z - zbar, torch.zeros_like(z))
        dz = -p * (c_logp + c_ent * centered)
        dz.scatter_add_(-1, targets[:, None], c_logp)
        return (dz / ctx.temperature).to(logits.dtype), None, None


def torch_row_token_stats(logits: torch.Tensor, targets: torch.Tensor, row_index: torch.Tensor,
                          temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference backend: statistics of rows ``row_index`` of ``logits [B, T, V]`` (flat b*T + t)."""
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, row_index)
    return TorchTokenStats.apply(rows, targets.reshape(-1).index_select(0, row_index), temperature)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET`` as Triton itself reads
    it (its knobs accept 1/true/yes/on), or any value but "" and "0" on a Triton without knobs."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA (when Triton imports), else "torch". Checks explicit choices."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not valid; choose one of ['auto', 'triton', 'torch']")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'fused-canon[triton]'")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' on a {device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing fused_canon (or use backend='torch')"
            )
    return backend


def row_token_stats(logits, targets, row_index, temperature, backend, inplace_backward=False):
    """Dispatch the statistics of the valid rows to the torch reference or the Triton kernels."""
    if backend == "torch":
        if inplace_backward:
            raise ValueError("inplace_backward=True is only available with backend='triton'")
        return torch_row_token_stats(logits, targets, row_index, temperature)
    from .kernels.token_stats import triton_token_stats

    return triton_token_stats(logits, targets, row_index, temperature, inplace_backward=inplace_backward)


def valid_row_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices b*T + t of the valid tokens, int64 [N]."""
    return mask.reshape(-1).nonzero().squeeze(-1)


def scatter_rows(values: torch.Tensor, row_index: torch.Tensor, shape) -> torch.Tensor:
    """Place per-valid-row values into a zero [B, T] tensor (differentiable)."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return out.index_put((row_index,), values).reshape(shape)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy of each position: ``logits [..., V]``, ``targets [...]``.

    Returns ``(logprobs, entropy)`` in fp32 (fp64 for fp64 logits), shaped like ``targets``, both
    differentiable w.r.t. ``logits``. ``temperature`` divides the logits first.
    """
    check_logits_and_targets(logits, targets)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(backend, logits.device)
    shape = targets.shape
    logits3d = logits.reshape(1, -1, logits.shape[-1]) if logits.dim() != 3 else logits
    targets2d = targets.reshape(logits3d.shape[:2])
    row_index = torch.arange(targets2d.numel(), device=logits.device)
    logp, entropy = row_token_stats(logits3d, targets2d, row_index, temperature, backend)
    return logp.reshape(shape), entropy.reshape(shape)
