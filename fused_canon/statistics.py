"""Per-token log-prob and entropy of softmax(logits / T): the torch reference of the statistics ops.

Formulas: docs/algorithms.md §8. For one row of tempered logits z = logits / T:
    lse = logsumexp(z),  p = exp(z - lse),  zbar = sum p z,  H = lse - zbar,  logp_y = z_y - lse
and for a loss L with c_logp = dL/dlogp_y, c_ent = dL/dH (§8.3):
    dL/dlogits_k = (1/T) (-p_k [c_logp + c_ent (z_k - zbar)] + c_logp [k == y])
Entries equal to -inf (a masked vocabulary) have p = 0 and contribute exactly 0 to every sum and
gradient: the reference never forms 0 * inf.

The two statistics ops of backends.py have the signatures of their Triton kernels, over a flat list
of rows, both outputs differentiable:
    torch_token_stats(logits [B, T, V], targets [B, T], row_index [N], temperature, row_valid=None [N])
        -> (logp [N], entropy [N])
    torch_linear_token_stats(hidden [R, H], weight [V, H], targets [R], row_index [N], bias, temperature)
The objective (losses.py) only sees those two vectors, so autograd hands a backend exactly c_logp and c_ent.
The torch statistics run chunk by chunk over the rows (docs/design.md §4.4): the forward saves only
references to the inputs and three [N] scalars per row (max z, sum exp(z - max), zbar); the backward
recomputes each chunk's softmax and writes its rows of dlogits (into the logits with ``inplace_backward``).
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


# Bytes of compute-dtype rows (fp32; fp64 for fp64 logits) in one chunk of the torch statistics: at most
# STATS_CHUNK_BYTES and at most 1/STATS_MIN_CHUNKS of the rows, so that the chunk's [chunk, V] temporaries
# stay under 0.1x the logits at any N while a large batch runs in few chunks (docs/design.md §4.4).
STATS_CHUNK_BYTES = 4 * 2 ** 20
STATS_MIN_CHUNKS = 64


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk of the torch statistics of ``n_rows`` rows of ``vocab`` logits of ``dtype``; at least 1."""
    row_bytes = max(vocab, 1) * torch.empty((), dtype=_compute_dtype(dtype)).element_size()
    return max(1, min(STATS_CHUNK_BYTES // row_bytes, -(-n_rows // STATS_MIN_CHUNKS)))


def _chunks(row_index: torch.Tensor, length: int, rows_per_chunk: int):
    """(rows, (b, t)) of each chunk: slice of the [N] rows, and the chunk's positions in [B, T]."""
    for start in range(0, row_index.numel(), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        flat = row_index[rows]
        yield rows, (flat // length, flat % length)


def _softmax_chunk(logits_rows: torch.Tensor, temperature: float, max_z=None, sum_exp=None):
    """z = logits / T in the compute dtype and p = softmax(z) of a chunk's rows ``[c, V]`` (a fresh tensor:
    z takes its buffer when it has the compute dtype), with the row max and sum of exp(z - max) they were
    formed with (given: the forward's, so the backward recomputes the forward's p exactly).
    lse = max + log(sum_exp)."""
    z = logits_rows.to(_compute_dtype(logits_rows.dtype)).div_(temperature)
    if max_z is None:
        # As torch.logsumexp: an infinite row max is shifted by 0 (an all -inf row stays -inf, not NaN).
        max_z = z.amax(-1, keepdim=True)
        max_z = max_z.masked_fill(max_z.abs() == float("inf"), 0.0)
    p = torch.sub(z, max_z).exp_()
    if sum_exp is None:
        sum_exp = p.sum(-1, keepdim=True)
    return z, p.div_(sum_exp), max_z, sum_exp


class TorchTokenStats(torch.autograd.Function):
    """Reference statistics of rows ``row_index`` (flat b*T + t) of ``logits [B, T, V]`` at ``targets [B*T]``,
    chunk by chunk over the rows (``chunk_rows``): ``(logp, entropy)``, then the detached ``EXTRA_SIGNALS``
    with ``extra_stats``. Only the logits (no copy) and four [N] vectors are saved; the backward recomputes
    each chunk's softmax and writes its dlogits rows, into the logits themselves with ``inplace_backward``.
    Extra memory: O(chunk * V), plus the [B, T, V] gradient without ``inplace_backward``."""

    @staticmethod
    def forward(ctx, logits, targets, row_index, temperature: float, inplace_backward: bool, extra_stats: bool):
        n, (_, length, vocab) = row_index.numel(), logits.shape
        if inplace_backward:
            # Imported here: importing the kernels package reads triton's settings, which the bench CLI
            # sets after importing fused_canon (the package itself imports no triton).
            from .kernels import check_inplace_gradient_target

            check_inplace_gradient_target(logits)
        dtype = _compute_dtype(logits.dtype)
        outputs = [logits.new_empty(n, dtype=dtype) for _ in range(2 + (len(EXTRA_SIGNALS) if extra_stats else 0))]
        max_z, sum_exp, zbar = (logits.new_empty(n, 1, dtype=dtype) for _ in range(3))
        row_targets = targets.index_select(0, row_index)[:, None]
        for rows, position in _chunks(row_index, length, chunk_rows(n, vocab, logits.dtype)):
            raw = logits[position]
            if extra_stats:  # the raw target logit, before z takes the buffer
                outputs[3][rows] = raw.gather(-1, row_targets[rows]).squeeze(-1).to(dtype)
            z, p, max_z[rows], sum_exp[rows] = _softmax_chunk(raw, temperature)
            lse = max_z[rows] + sum_exp[rows].log()
            outputs[0][rows] = (z.gather(-1, row_targets[rows]) - lse).squeeze(-1)
            if extra_stats:
                outputs[2][rows] = (lse - z.mean(-1, keepdim=True)).squeeze(-1)
                outputs[4][rows] = (p[:, None, :] @ p[:, :, None]).reshape(-1)
            # p * z taken as 0 where p == 0 (z may be -inf there), in z's own buffer.
            zbar[rows] = z.masked_fill_(p == 0, 0.0).mul_(p).sum(-1, keepdim=True)
            outputs[1][rows] = (lse - zbar[rows]).squeeze(-1)
        ctx.save_for_backward(logits, row_targets, row_index, max_z, sum_exp, zbar)
        ctx.temperature, ctx.inplace_backward = temperature, inplace_backward
        ctx.mark_non_differentiable(*outputs[2:])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_grad_extra_signals):
        logits, row_targets, row_index, max_z, sum_exp, zbar = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        n, (_, length, vocab) = row_index.numel(), logits.shape
        if ctx.inplace_backward:
            dlogits = logits
            unread = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            unread.view(-1)[row_index] = False
            dlogits.masked_fill_(unread[..., None], 0.0)  # rows not listed get an exact zero gradient
        else:
            dlogits = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        zero = max_z.new_zeros(n, 1)
        c_logp = zero if grad_logp is None else grad_logp[:, None].to(zero.dtype)
        c_ent = zero if grad_entropy is None else grad_entropy[:, None].to(zero.dtype)
        for rows, position in _chunks(row_index, length, chunk_rows(n, vocab, logits.dtype)):
            z, p, _, _ = _softmax_chunk(logits[position], ctx.temperature, max_z[rows], sum_exp[rows])
            # dz = -p [c_logp + c_ent (z - zbar)] + c_logp [k == y], in z's buffer; z is taken as 0 where
            # p == 0 so that the product is exactly 0 there, even when z == -inf.
            dz = z.masked_fill_(p == 0, 0.0).sub_(zbar[rows]).mul_(c_ent[rows]).add_(c_logp[rows]).mul_(p).neg_()
            dz.scatter_add_(-1, row_targets[rows], c_logp[rows])
            dlogits[position] = dz.div_(ctx.temperature).to(logits.dtype)
        if ctx.inplace_backward:
            # Later autograd use of the overwritten logits fails loudly ("modified by an inplace operation").
            torch.autograd.graph.increment_version(logits)
            # A fresh alias of the buffer: AccumulateGrad takes it as a leaf's .grad instead of copying it.
            dlogits = dlogits.detach()
        return dlogits, None, None, None, None, None


def torch_token_stats(logits: torch.Tensor, targets: torch.Tensor, row_index: torch.Tensor, temperature: float = 1.0,
                      *, inplace_backward: bool = False, extra_stats: bool = False,
                      row_valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Statistics of rows ``row_index`` (flat b*T + t) of ``logits [B, T, V]`` at ``targets [B, T]``:
    ``(logp, entropy)``, then the ``EXTRA_SIGNALS`` with ``extra_stats``. ``inplace_backward`` writes dlogits
    over the logits (docs/design.md §4.1). ``row_valid`` (bool, like ``row_index``): the rows where it is
    False are not read and get 0 (the Triton kernel's option; here the listed rows are gathered first, a
    host sync, since the chunks are sized on the host)."""
    if row_valid is not None:
        listed = row_valid.nonzero().squeeze(-1)
        stats = torch_token_stats(logits, targets, row_index[listed], temperature, inplace_backward=inplace_backward,
                                  extra_stats=extra_stats)
        return tuple(x.new_zeros(row_index.shape).index_put((listed,), x) for x in stats)
    stats = TorchTokenStats.apply(logits, targets.reshape(-1), row_index, temperature, inplace_backward,
                                  extra_stats)
    return stats if extra_stats else stats[:2]


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
        rows = torch.arange(len(t), device=t.device)
        return torch_token_stats(logits[None], t[None], rows, temperature, extra_stats=extra_stats)

    hidden_rows, targets_rows = hidden.index_select(0, row_index), targets.index_select(0, row_index)
    chunks = []
    # At least one (possibly empty) chunk, so the loss stays connected to weight and bias.
    for start in range(0, max(hidden_rows.shape[0], 1), LINEAR_REFERENCE_CHUNK_ROWS):
        rows = slice(start, start + LINEAR_REFERENCE_CHUNK_ROWS)
        chunks.append(checkpoint(chunk_stats, hidden_rows[rows], weight, bias, targets_rows[rows],
                                 use_reentrant=False))
    return tuple(torch.cat(outputs) for outputs in zip(*chunks))
