"""Per-token log-prob and entropy of softmax(logits / T): the torch reference of the statistics ops.

Formulas: docs/algorithms.md §8. For one row of tempered logits z = logits / T:
    lse = logsumexp(z),  p = exp(z - lse),  zbar = sum p z,  H = lse - zbar,  logp_y = z_y - lse
and for a loss L with c_logp = dL/dlogp_y, c_ent = dL/dH (§8.3):
    dL/dlogits_k = (1/T) (-p_k [c_logp + c_ent (z_k - zbar)] + c_logp [k == y])
Entries equal to -inf (a masked vocabulary) have p = 0 and contribute exactly 0 to every sum and
gradient: the reference never forms 0 * inf.

The two statistics ops of backends.py have the signatures of their Triton kernels, over a flat list
of valid rows, both outputs differentiable:
    torch_token_stats(logits [B, T, V], targets [B, T], row_index [N], temperature) -> (logp [N], entropy [N])
    torch_linear_token_stats(hidden [R, H], weight [V, H], targets [R], row_index [N], bias, temperature)
The objective (losses.py) only sees those two vectors, so autograd hands a backend exactly c_logp and c_ent.
With ``extra_stats=True`` both also return, from the same rows, the detached signals some estimators read
(``EXTRA_SIGNALS``, docs/algorithms.md §5.1 and §1.3): the self-certainty lse(z) - mean_v(z), the raw
(untempered) logit of the target, and sum_v p_v^2.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["TorchTokenStats", "torch_token_stats", "torch_linear_token_stats", "LINEAR_REFERENCE_CHUNK_ROWS",
           "EXTRA_SIGNALS"]

# The detached per-token signals a statistics pass emits with extra_stats=True, in this order.
EXTRA_SIGNALS = ("self_certainty", "target_logits", "sum_pi_squared")


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


@torch.no_grad()
def _extra_signals(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, ...]:
    """``EXTRA_SIGNALS`` of rows ``logits [N, V]`` at ``targets [N]``, detached. A row with a -inf entry
    has mean_v(z) = -inf, so its certainty is +inf (as torch, and UCAS, compute it)."""
    z, lse, p, _ = _row_statistics(logits, temperature)
    certainty = (lse - z.mean(-1, keepdim=True)).squeeze(-1)
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1).to(z.dtype)
    return certainty, target_logits, (p * p).sum(-1)


def torch_token_stats(logits: torch.Tensor, targets: torch.Tensor, row_index: torch.Tensor, temperature: float = 1.0,
                      *, inplace_backward: bool = False, extra_stats: bool = False) -> Tuple[torch.Tensor, ...]:
    """Statistics of rows ``row_index`` (flat b*T + t) of ``logits [B, T, V]`` at ``targets [B, T]``:
    ``(logp, entropy)``, then the ``EXTRA_SIGNALS`` with ``extra_stats``."""
    if inplace_backward:
        raise ValueError("inplace_backward=True is only available with backend='triton'")
    batch, length, vocab = logits.shape
    rows = logits.reshape(batch * length, vocab).index_select(0, row_index)  # explicit: V may be 0
    row_targets = targets.reshape(-1).index_select(0, row_index)
    stats = TorchTokenStats.apply(rows, row_targets, temperature)
    return stats + _extra_signals(rows, row_targets, temperature) if extra_stats else stats


# Rows of the reference LM-head path per chunk: bounds its [chunk, V] logits (recomputed in backward).
LINEAR_REFERENCE_CHUNK_ROWS = 1024


def torch_linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             row_index: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             temperature: float = 1.0, *, extra_stats: bool = False) -> Tuple[torch.Tensor, ...]:
    """Statistics of rows ``row_index`` of the logits ``hidden [R, H] @ weight.T (+ bias)`` at ``targets [R]``,
    chunk by chunk with activation checkpointing: memory O(chunk * V). ``(logp, entropy)``, then the
    ``EXTRA_SIGNALS`` with ``extra_stats``."""
    from torch.utils.checkpoint import checkpoint

    def chunk_stats(h, w, b, t):
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
        stats = TorchTokenStats.apply(logits, t, temperature)
        return stats + _extra_signals(logits, t, temperature) if extra_stats else stats

    hidden_rows, targets_rows = hidden.index_select(0, row_index), targets.index_select(0, row_index)
    chunks = []
    # At least one (possibly empty) chunk, so the loss stays connected to weight and bias.
    for start in range(0, max(hidden_rows.shape[0], 1), LINEAR_REFERENCE_CHUNK_ROWS):
        rows = slice(start, start + LINEAR_REFERENCE_CHUNK_ROWS)
        chunks.append(checkpoint(chunk_stats, hidden_rows[rows], weight, bias, targets_rows[rows],
                                 use_reentrant=False))
    return tuple(torch.cat(outputs) for outputs in zip(*chunks))
