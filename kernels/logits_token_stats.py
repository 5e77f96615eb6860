"""Per-token log-prob and entropy of the target token, straight from the logits.

Forward: one program per row listed in ``row_index`` (1-D grid; with ``row_valid``, a listed row whose
entry is 0 returns at once and is never read, so a caller can list every position with its mask
instead of the valid rows, whose count would be a host read), one
streaming pass over the vocabulary in ``BLOCK_V`` tiles, all fp32, on the tempered logits
``z = logits / temperature``: each tile's softmax summary (max, sum-exp without the max
element, sum p*(z - max)) is merged into the row's, and the row's logp, entropy, lse and zbar
follow from it (softmax.py: the formulation both statistics paths share, with the log1p form
that keeps a peaked row's relative precision). A row whose only finite entry is the target
gives logp = 0 and H = 0 exactly.

Non-finite rows: ``-inf`` entries are a masked vocabulary (they contribute nothing). A NaN or ``+inf``
(tempered) logit makes the row's sum-exp ``rest`` NaN (the sums do not skip it, whatever the max does),
so the row gets ``logp = NaN``, and a ``-inf`` target logit gives ``logp = -inf``: a non-finite log-prob
is the row's error flag, which fused_canon reads with the loss's metrics (docs/design.md §4.1) instead
of reading the logits again.

Backward (docs/algorithms.md §8.3), one program per row of ``[B, T]``:

    dlogits_k = (1/T) * ( -p_k * [c_logp + c_ent * (z_k - zbar)] + c_logp * [k == y] )

with ``p_k = exp(z_k - lse)`` recomputed from the logits and the saved per-row scalars, and the
target column from the row's logp and entropy (softmax.target_grad). Rows that are not in
``row_index`` are written with zeros and never read.

Memory: the forward saves 4 fp32 scalars per valid row; the only ``[B, T, V]`` tensor ever
allocated is dlogits (none with ``inplace_backward=True``). Accesses are 16 bytes per thread when
V and the row strides are multiples of 16 (as padded vocabularies such as 151,936 are); otherwise
the JIT cannot prove alignment and falls back to narrower loads.
"""

import math

import torch
import triton
import triton.language as tl

from . import check_inplace_gradient_target, triton_interpreter_enabled
from .softmax import (merge_sums_of_squares, merge_summaries, row_statistics, store_row_grad, store_zero_row,
                      sum_of_squared_probs, tile_summary)


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr, stride_lb, stride_lt,  # [B, T, V], stride(-1) == 1
    targets_ptr, stride_yb, stride_yt,  # [B, T] int
    row_index_ptr,  # [N] int64: b * T + t of the rows to compute
    row_valid_ptr,  # [N] uint8: 0 skips the row (its outputs 0), read only if HAS_ROW_VALID
    logp_ptr, entropy_ptr, lse_ptr, zbar_ptr,  # [N] fp32 outputs
    certainty_ptr, target_logit_ptr, sum_pi_squared_ptr,  # [N] fp32 outputs, written only if EXTRA_STATS
    T, V, inv_temp,
    BLOCK_V: tl.constexpr,
    EXTRA_STATS: tl.constexpr,
    HAS_ROW_VALID: tl.constexpr,
):
    # int64 before any multiply: b * stride_lb exceeds 2**31 for N=16k, V=152k.
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROW_VALID:
        if tl.load(row_valid_ptr + pid) == 0:  # a padded row: zeros, its logits not read
            tl.store(logp_ptr + pid, 0.0)
            tl.store(entropy_ptr + pid, 0.0)
            tl.store(lse_ptr + pid, 0.0)
            tl.store(zbar_ptr + pid, 0.0)
            if EXTRA_STATS:
                tl.store(certainty_ptr + pid, 0.0)
                tl.store(target_logit_ptr + pid, 0.0)
                tl.store(sum_pi_squared_ptr + pid, 0.0)
            return
    row = tl.load(row_index_ptr + pid).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = logits_ptr + b * stride_lb + t * stride_lt
    y = tl.load(targets_ptr + b * stride_yb + t * stride_yt).to(tl.int64)

    m = float("-inf")  # the row's summary so far (softmax.py): the empty one
    rest = 0.0
    u = 0.0
    z_sum = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sum of z (self-certainty)
    squares = 0.0  # sum exp(2 (z - m)) (sum of p^2 = squares / s^2)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        # The masked tail reads as -inf: it contributes exactly like a -inf logit (nothing).
        z = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        tile_m, tile_rest, tile_u, tile_e = tile_summary(z, z > float("-inf"), 0, MAY_BE_EMPTY=True)
        m_before = m
        m, rest, u = merge_summaries(m, rest, u, tile_m, tile_rest, tile_u)
        if EXTRA_STATS:
            z_sum += tl.where(mask, z, 0.0)
            squares = merge_sums_of_squares(squares, m_before, tl.sum(tile_e * tile_e, axis=0), tile_m, m,
                                            MAY_BE_EMPTY=True)

    # Out-of-range targets are not read: they give NaN log-probs instead of an OOB access.
    y_ok = (y >= 0) & (y < V)
    x_y = tl.load(x_row + y, mask=y_ok, other=float("nan")).to(tl.float32)
    logp, entropy, lse, zbar = row_statistics(m, rest, u, x_y * inv_temp)
    tl.store(logp_ptr + pid, logp)
    tl.store(entropy_ptr + pid, entropy)
    tl.store(lse_ptr + pid, lse)
    tl.store(zbar_ptr + pid, zbar)
    if EXTRA_STATS:
        # UCAS self-certainty lse - mean_v(z) (+inf if the row has -inf entries, like torch),
        # the raw target logit, read before the temperature division, and sum_v p_v^2 (the
        # optimal token baseline's path variance), all from this one read of the row.
        tl.store(certainty_ptr + pid, lse - tl.sum(z_sum, axis=0) / V)
        tl.store(target_logit_ptr + pid, x_y)
        tl.store(sum_pi_squared_ptr + pid, sum_of_squared_probs(squares, rest))


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr, stride_lb, stride_lt,  # [B, T, V]
    dlogits_ptr, stride_db, stride_dt,  # [B, T, V], may alias logits (inplace_backward)
    targets_ptr, stride_yb, stride_yt,
    slot_ptr,  # [B * T] int64: position of the row in row_index, -1 for masked rows
    lse_ptr, zbar_ptr, logp_ptr, entropy_ptr, c_logp_ptr, c_ent_ptr,  # [N] fp32
    T, V, inv_temp,
    BLOCK_V: tl.constexpr,
    HAS_C_LOGP: tl.constexpr,
    HAS_C_ENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    d_row = dlogits_ptr + b * stride_db + t * stride_dt
    slot = tl.load(slot_ptr + row)
    if slot < 0:
        store_zero_row(d_row, V, BLOCK_V)  # a masked row: the logits are not read
    else:
        x_row = logits_ptr + b * stride_lb + t * stride_lt
        y = tl.load(targets_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
        lse = tl.load(lse_ptr + slot)
        zbar = tl.load(zbar_ptr + slot)
        logp = tl.load(logp_ptr + slot)
        entropy = tl.load(entropy_ptr + slot)
        if HAS_C_LOGP:
            c_logp = tl.load(c_logp_ptr + slot)
        else:
            c_logp = 0.0
        if HAS_C_ENT:
            c_ent = tl.load(c_ent_ptr + slot)
        else:
            c_ent = 0.0
        store_row_grad(x_row, d_row, y, V, inv_temp, lse, zbar, logp, entropy, c_logp, c_ent, BLOCK_V)


def default_block_v(V: int) -> int:
    """Power of two, whole row up to 4096 (8 fp32 per thread at 16 warps)."""
    return min(triton.next_power_of_2(V), 4096)


def _num_warps(block_v: int) -> int:
    # 8 elements per thread: at 16 (4096-wide tiles, 8 warps) the bf16 forward with extra stats
    # spills on Triton 3.8 (ptxas -v, sm_90); at 8 every supported version fits.
    return min(16, max(4, block_v // 256))


_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(logits, targets, row_index, temperature, block_v, check_rows=True, inplace_backward=False,
                  row_valid=None):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a 3-D tensor [B, T, V], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype must be one of {_SUPPORTED_DTYPES}, got {logits.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must have stride(-1) == 1 (got strides {tuple(logits.stride())}); "
                         "slices over B and T are fine, a transposed vocabulary is not")
    B, T, V = logits.shape
    if V == 0 and row_index.numel() > 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0) but row_index lists rows to compute")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (B, T):
        raise ValueError(f"targets must have shape {(B, T)}, got {getattr(targets, 'shape', type(targets))}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if not isinstance(row_index, torch.Tensor) or row_index.dim() != 1:
        raise ValueError(f"row_index must be a 1-D tensor [N], got {getattr(row_index, 'shape', type(row_index))}")
    if row_index.dtype != torch.int64:
        raise TypeError(f"row_index must be int64, got {row_index.dtype}")
    if row_valid is not None and (not isinstance(row_valid, torch.Tensor) or row_valid.shape != row_index.shape
                                  or row_valid.dtype != torch.bool):
        raise ValueError(f"row_valid must be a bool tensor shaped like row_index {tuple(row_index.shape)}, got "
                         f"{getattr(row_valid, 'shape', type(row_valid))} {getattr(row_valid, 'dtype', '')}")
    for name, x in (("targets", targets), ("row_index", row_index), ("row_valid", row_valid)):
        if x is not None and x.device != logits.device:
            raise ValueError(f"{name} is on {x.device} but logits is on {logits.device}")
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    if logits.device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {logits.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing triton, or use the torch backend")
    if inplace_backward:
        check_inplace_gradient_target(logits)
    # Out-of-range or repeated rows would read out of bounds / lose gradient: one host sync. Skipped when
    # the caller built row_index itself (check_rows=False: fused_canon's API).
    n_rows = B * T
    if check_rows and row_index.numel() > 0:
        in_range = (row_index >= 0) & (row_index < n_rows)
        counts = torch.zeros(max(n_rows, 1), dtype=torch.int32, device=row_index.device)
        counts.index_add_(0, torch.where(in_range, row_index, 0), torch.ones_like(row_index, dtype=torch.int32))
        if bool((~in_range).any() | (counts > 1).any()):
            raise ValueError(f"row_index must hold distinct flat indices b*T+t in [0, {n_rows})")


def token_stats_forward(logits, targets, row_index, temperature=1.0, *, block_v=None, extra_stats=False,
                        check_rows=True, inplace_backward=False, row_valid=None):
    """Launch the forward kernel (no autograd). Returns fp32 ``[N]`` tensors
    ``(logp, entropy, lse, zbar, certainty, target_logit, sum_pi_squared)``; the last three are empty
    unless ``extra_stats``. The first four are what :func:`token_stats_backward` needs.
    ``check_rows=False`` skips the check (one host sync) that ``row_index`` holds distinct in-range
    rows, for a caller that built it; ``inplace_backward`` checks that the logits can take dlogits;
    ``row_valid`` (bool ``[N]``) skips the rows where it is False (outputs 0, logits not read)."""
    _check_inputs(logits, targets, row_index, temperature, block_v, check_rows, inplace_backward, row_valid)
    B, T, V = logits.shape
    row_index = row_index.contiguous()
    N = row_index.numel()
    block_v = block_v or default_block_v(V)
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, entropy, lse, zbar = (torch.empty(N, **f32) for _ in range(4))
    certainty, target_logit, sum_pi_squared = (torch.empty(N if extra_stats else 0, **f32) for _ in range(3))
    if N > 0:
        _token_stats_fwd_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1),
            targets, targets.stride(0), targets.stride(1),
            row_index,
            (row_valid if row_valid is not None else row_index).contiguous().view(torch.uint8),  # if HAS_ROW_VALID
            logp, entropy, lse, zbar,
            *((certainty, target_logit, sum_pi_squared) if extra_stats else (logp, logp, logp)),  # unused then
            T, V, 1.0 / temperature,
            BLOCK_V=block_v, EXTRA_STATS=bool(extra_stats), HAS_ROW_VALID=row_valid is not None,
            num_warps=_num_warps(block_v),
        )
    return logp, entropy, lse, zbar, certainty, target_logit, sum_pi_squared


def token_stats_backward(logits, targets, row_index, logp, entropy, lse, zbar, c_logp, c_ent, temperature=1.0, *,
                         inplace=False, block_v=None, row_valid=None):
    """Launch the backward kernel (no autograd): dlogits ``[B, T, V]`` in the logits dtype for
    ``L = sum_i c_logp[i] * logp[i] + c_ent[i] * entropy[i]`` (docs/algorithms.md §8.3).

    ``c_logp`` / ``c_ent`` are ``[N]`` (any float dtype) or None for 0. Rows not in
    ``row_index``, or False in ``row_valid``, get exact zeros. ``inplace=True`` writes over ``logits`` and returns it.
    Inputs are assumed to have passed :func:`token_stats_forward`'s checks."""
    B, T, V = logits.shape
    N = row_index.numel()
    dev = logits.device
    block_v = block_v or default_block_v(V)
    slot = torch.full((B * T,), -1, dtype=torch.int64, device=dev)
    listed = torch.arange(N, dtype=torch.int64, device=dev)
    slot[row_index] = listed if row_valid is None else torch.where(row_valid, listed, -1)
    has_logp, has_ent = c_logp is not None, c_ent is not None
    c_logp = c_logp.to(torch.float32).contiguous() if has_logp else lse  # placeholder, not read
    c_ent = c_ent.to(torch.float32).contiguous() if has_ent else lse
    dlogits = logits if inplace else torch.empty((B, T, V), dtype=logits.dtype, device=dev)
    if B * T * V > 0:  # an empty vocabulary has no gradient entry to write
        _token_stats_bwd_kernel[(B * T,)](
            logits, logits.stride(0), logits.stride(1),
            dlogits, dlogits.stride(0), dlogits.stride(1),
            targets, targets.stride(0), targets.stride(1),
            slot, lse, zbar, logp, entropy, c_logp, c_ent,
            T, V, 1.0 / temperature,
            BLOCK_V=block_v, HAS_C_LOGP=has_logp, HAS_C_ENT=has_ent,
            num_warps=_num_warps(block_v),
        )
    return dlogits


class TritonTokenStats(torch.autograd.Function):
    """(logp, entropy, certainty, target_logit, sum_pi_squared) of the rows in ``row_index``; the first
    two are differentiable w.r.t. logits, the last three are empty unless ``extra_stats``."""

    @staticmethod
    def forward(ctx, logits, targets, row_index, temperature, inplace_backward, block_v, extra_stats, check_rows,
                row_valid):
        logp, entropy, lse, zbar, certainty, target_logit, sum_pi_squared = token_stats_forward(
            logits, targets, row_index, temperature, block_v=block_v, extra_stats=extra_stats,
            check_rows=check_rows, inplace_backward=inplace_backward, row_valid=row_valid)
        # Only per-row scalars are saved, plus references to the inputs (no copies).
        ctx.save_for_backward(logits, targets, row_index, logp, entropy, lse, zbar, row_valid)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.block_v = block_v or default_block_v(logits.shape[-1])
        ctx.set_materialize_grads(False)  # a None grad stays None: its term is compiled out
        ctx.mark_non_differentiable(certainty, target_logit, sum_pi_squared)
        return logp, entropy, certainty, target_logit, sum_pi_squared

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_grad_extra_stats):
        logits, targets, row_index, logp, entropy, lse, zbar, row_valid = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        # inplace_backward overwrites the caller's logits with the gradient (unsloth#5002):
        # only valid when these logits feed no other loss/op that still needs them.
        dlogits = token_stats_backward(logits, targets, row_index, logp, entropy, lse, zbar, grad_logp, grad_entropy,
                                       ctx.temperature, inplace=ctx.inplace_backward, block_v=ctx.block_v,
                                       row_valid=row_valid)
        if ctx.inplace_backward:
            # Later autograd use of the overwritten logits then fails loudly ("modified by an
            # inplace operation") instead of silently reading gradients.
            torch.autograd.graph.increment_version(logits)
            # A fresh alias of the buffer: AccumulateGrad takes it as a leaf's .grad instead of copying it.
            dlogits = dlogits.detach()
        return dlogits, None, None, None, None, None, None, None, None


def triton_token_stats(logits, targets, row_index, temperature=1.0, *, inplace_backward=False, block_v=None,
                       extra_stats=False, check_rows=True, row_valid=None):
    """Target log-prob and entropy of ``softmax(logits / temperature)`` for the valid rows.

    Args:
        logits: ``[B, T, V]`` bf16/fp16/fp32 with ``stride(-1) == 1`` (any other strides:
            e.g. ``full_logits[:, :-1, :]`` is read in place, never copied).
        targets: ``[B, T]`` int64 (or int32) token ids; a target outside ``[0, V)`` gives NaN.
        row_index: ``[N]`` int64 distinct flat indices ``b * T + t`` of the valid tokens
            (e.g. ``mask.flatten().nonzero().squeeze(1)``); other rows are neither read nor
            computed, and get zero gradient.
        temperature: Python number > 0.
        inplace_backward: write dlogits over the logits buffer instead of a new tensor.
            Saves one ``[B, T, V]`` allocation but destroys the logits: only safe when they
            feed no other loss (unsloth#5002). Later autograd use of them raises. Logits whose
            elements share memory (an ``expand()``) are refused. The saving is real for logits
            computed in the graph (an LM head's output, whose backward consumes the gradient);
            for a leaf tensor autograd's AccumulateGrad copies the gradient into ``.grad``
            anyway, so the option then only destroys the logits.
        check_rows: check that ``row_index`` holds distinct rows in range (one host sync);
            False for a caller that built it (fused_canon's API).
        row_valid: ``[N]`` bool or None: rows where it is False are not read; their outputs and
            gradient are 0. With ``row_index = arange(B * T)`` and the flattened mask, no list of
            the valid rows is needed (its length would be a host sync).
        block_v: vocabulary tile (power of two); default ``min(next_pow2(V), 4096)``.
        extra_stats: also return the self-certainty ``lse - mean_v(z)``, the raw (untempered)
            target logit and ``sum_v p_v^2``, fp32 ``[N]`` and non-differentiable, from the same read.

    Returns:
        ``(logp, entropy)`` fp32 ``[N]``, both differentiable w.r.t. logits, or
        ``(logp, entropy, certainty, target_logit, sum_pi_squared)`` with ``extra_stats=True``. A row
        with a NaN or +inf logit has ``logp = NaN`` (and a -inf target logit ``logp = -inf``): the
        flag fused_canon's API reads.
    """
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature = float(temperature)
    outputs = TritonTokenStats.apply(
        logits, targets, row_index, temperature, bool(inplace_backward), block_v, bool(extra_stats),
        bool(check_rows), row_valid)
    return outputs if extra_stats else outputs[:2]


# Ahead-of-time compile registry (tests/test_aot_compile.py): (kernel, signature, constexprs, options).
# Pointer arguments are compiled with 16-byte alignment, as the JIT specialises torch tensors.
def _fwd_sig(dtype, stride_ty="i32"):
    return {"logits_ptr": f"*{dtype}", "stride_lb": stride_ty, "stride_lt": "i32",
            "targets_ptr": "*i64", "stride_yb": "i32", "stride_yt": "i32", "row_index_ptr": "*i64",
            "row_valid_ptr": "*u8",
            "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "zbar_ptr": "*fp32",
            "certainty_ptr": "*fp32", "target_logit_ptr": "*fp32", "sum_pi_squared_ptr": "*fp32", "T": "i32", "V": "i32", "inv_temp": "fp32",
            "BLOCK_V": "constexpr", "EXTRA_STATS": "constexpr", "HAS_ROW_VALID": "constexpr"}


def _bwd_sig(dtype, stride_ty="i32"):
    return {"logits_ptr": f"*{dtype}", "stride_lb": stride_ty, "stride_lt": "i32",
            "dlogits_ptr": f"*{dtype}", "stride_db": stride_ty, "stride_dt": "i32",
            "targets_ptr": "*i64", "stride_yb": "i32", "stride_yt": "i32", "slot_ptr": "*i64",
            "lse_ptr": "*fp32", "zbar_ptr": "*fp32", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
            "c_logp_ptr": "*fp32", "c_ent_ptr": "*fp32",
            "T": "i32", "V": "i32", "inv_temp": "fp32",
            "BLOCK_V": "constexpr", "HAS_C_LOGP": "constexpr", "HAS_C_ENT": "constexpr"}


# Options as the JIT launches them at V = 151,936: the warps of _num_warps, and "div16", the integer
# arguments it specialises as divisible by 16 there (V and the row strides), which is what lets
# every thread move 16 bytes per access (tests/test_aot_compile.py checks the PTX for it).
_BV = default_block_v(151936)
_DIV16 = ("stride_lb", "stride_lt", "stride_db", "stride_dt", "V")


def _aot_entry(kernel, signature, **constexprs):
    options = {"num_warps": _num_warps(_BV), "div16": [arg for arg in _DIV16 if arg in signature]}
    return kernel, signature, {"BLOCK_V": _BV, **constexprs}, options


AOT_SIGNATURES = [
    # policy_loss's two-pass path and token_signals pass the mask (HAS_ROW_VALID); token_stats does not.
    _aot_entry(_token_stats_fwd_kernel, _fwd_sig("bf16"), EXTRA_STATS=False, HAS_ROW_VALID=True),
    _aot_entry(_token_stats_fwd_kernel, _fwd_sig("bf16", "i64"), EXTRA_STATS=True, HAS_ROW_VALID=True),
    _aot_entry(_token_stats_fwd_kernel, _fwd_sig("fp32"), EXTRA_STATS=False, HAS_ROW_VALID=True),
    _aot_entry(_token_stats_fwd_kernel, _fwd_sig("bf16"), EXTRA_STATS=False, HAS_ROW_VALID=False),
    _aot_entry(_token_stats_bwd_kernel, _bwd_sig("bf16"), HAS_C_LOGP=True, HAS_C_ENT=True),
    _aot_entry(_token_stats_bwd_kernel, _bwd_sig("fp16", "i64"), HAS_C_LOGP=True, HAS_C_ENT=False),
    _aot_entry(_token_stats_bwd_kernel, _bwd_sig("fp32"), HAS_C_LOGP=True, HAS_C_ENT=True),
]
# Kernels whose AOT build must not spill registers (the test fails if ptxas reports spills).
AOT_NO_SPILL = {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel"}
