"""Fused LM-head token statistics: log p(target) and entropy from hidden states and the LM-head
weight, without ever materialising the ``[N, V]`` logits.

Public entry point::

    logp, entropy = triton_linear_token_stats(hidden, weight, targets, row_index,
                                              bias=None, temperature=1.0, *, block_sizes=None)

* ``hidden``    ``[R, H]`` bf16 / fp16 / fp32, any row stride (last stride 1; otherwise copied).
                A ``[B, T, H]`` caller flattens to ``[B*T, H]``.
* ``weight``    ``[V, H]``, same dtype (last stride 1; otherwise copied).
* ``bias``      ``[V]`` or None, same dtype.
* ``targets``   int64 (or int32) ``[R]``: the sampled token of every row.
* ``row_index`` int64 ``[N]``: the rows to compute (the valid tokens), unique, in ``[0, R)``.
                Rows not listed are never read and get a zero ``grad_hidden`` row.
* ``temperature`` a Python number > 0 (a runtime argument, not a compile-time constant).

Returns ``(logp, entropy)``, both fp32 ``[N]`` in ``row_index`` order and both differentiable
w.r.t. ``hidden``, ``weight`` and ``bias``. The tempered logits are
``z = (hidden @ weight.T + bias) / temperature`` (docs/algorithms.md §8.1).

Design
------
Forward (``_linear_token_stats_fwd_kernel``), grid ``cdiv(N, BLOCK_N)``: a program gathers
BLOCK_N valid rows through ``row_index`` and sweeps the vocabulary in BLOCK_V tiles. Each
``[BLOCK_N, BLOCK_V]`` logits tile is built on chip by ``tl.dot`` over H in BLOCK_H steps with an
fp32 accumulator, and folded into per-row fp32 online statistics (softmax.py, shared with the logits path):
the running max ``m``, ``rest = sum_k exp(z_k - m) - 1`` (the sum-exp without the max element,
so that log-sum-exp and entropy of a very peaked row keep full relative precision via log1p),
``u = sum_k exp(z_k - m) (z_k - m)`` and the target logit. Per valid row it writes
``logp, entropy`` (returned) and ``lse, zbar = sum_k p_k z_k`` (saved for the backward).

Forward grid ``(cdiv(N, BLOCK_N), S)``: with ``S > 1`` vocabulary splits (``vocab_splits``; by
default enough to fill the GPU's SMs, docs/algorithms.md §8.5) each program summarises its rows over
one contiguous range of whole BLOCK_V tiles and ``_linear_token_stats_merge_kernel`` merges the S
summaries of each row, in range order.

Backward, given ``c_logp = dL/dlogp`` and ``c_ent = dL/dentropy`` per valid row (a None
gradient counts as 0), processes the vocabulary in chunks of ``CHUNK_V`` columns
(``LinearTokenStatsBlocks.backward_chunk_vocab``), every valid row in each:

1. ``_linear_token_stats_dlogits_kernel``, grid ``(cdiv(N, rows), cdiv(CHUNK_V, BLOCK_V))`` (rows:
   ``dlogits_block_n``, 128, for bf16 / fp16 operands, ``block_n`` for fp32):
   recomputes each logits tile and writes ``dlogits = dL/d(hidden @ W.T + b)`` (docs/algorithms.md §8.3)
   ``= (1/T) (-p_k [c_logp + c_ent (z_k - zbar)] + c_logp delta_{k,y})`` with ``p = exp(z - lse)``
   into an ``[N, CHUNK_V]`` workspace. The target column is formed from the saved per-row
   ``logp`` and ``entropy`` (``1 - p_y = -expm1(logp)``, ``z_y - zbar = logp + entropy``), so
   that the gradient of a very peaked row keeps its relative precision.
2. ``_linear_token_stats_dhidden_kernel``, grid ``(cdiv(N, G), cdiv(H, G))`` with
   ``G = gemm_block_out`` (128) output tiles and the chunk's columns in ``gemm_block_k`` steps (64 for
   bf16 / fp16 tensor-core operands, 32 for fp32 operands):
   ``grad_hidden[rows] (+)= dlogits @ W[chunk]``, fp32 accumulation; between chunks the sum lives in
   an fp32 ``[N, H]`` buffer, and the last chunk writes the ``row_index`` rows of ``grad_hidden``.
3. ``_linear_token_stats_dweight_kernel``, grid ``(cdiv(H, W), cdiv(CHUNK_V, G))`` with ``G x W``
   output tiles (``W = dweight_block_h``: 256 for bf16 / fp16 operands on sm_90, else ``G``), every valid row
   in ``gemm_block_k`` steps: ``grad_weight[chunk] = dlogits.T @ hidden[rows]`` and
   ``grad_bias[chunk] = dlogits.sum(0)``, complete in one program's fp32 registers and written once,
   in the weight dtype (no grad_weight accumulator).

No atomics anywhere: every output element is written by exactly one program per chunk, in a
fixed order, so forward and backward are **deterministic** (bitwise reproducible for a given
block configuration, split count and chunk size).

Cost: forward ``2 N H V`` FLOPs; backward ``6 N H V`` (``2NHV`` logits recompute + ``2NHV``
for grad_hidden + ``2NHV`` for grad_weight), so ``8 N H V`` for forward + backward.
Memory traffic of the accumulators (docs/design.md §4.2): grad_weight is written once (2 V H bytes
in bf16); grad_hidden's fp32 partial sum is written by the first chunk, read and written by the
middle ones and read by the last: ``8 N H`` bytes per chunk boundary, 0.54 GB at N = 16,384,
H = 4,096 (a row chunking instead read and wrote an fp32 grad_weight, ``8 V H`` = 5 GB per chunk
boundary at V = 151,936). Operand re-reads are L2-dependent and were not measured (no GPU).

Memory (besides the inputs, the three gradients and O(N) fp32 vectors: logp, entropy, lse,
zbar, the two coefficients, the fp16 operand scales; with S > 1 splits ``4 S N`` or ``6 S N`` fp32):

* workspace ``dlogits [N, CHUNK_V]``: bf16 for bf16 inputs (tensor-core GEMMs; 2 bytes/elem),
  fp32 for fp16 and fp32 inputs (fp16 would flush small gradients ``p_k / (T N)`` to zero).
  ``CHUNK_V`` defaults to the most whole tiles of columns (at least one) that fit in
  ``DEFAULT_WORKSPACE_BYTES`` = 512 MiB, e.g. 16,384 columns at N = 16,384 in bf16 (10 chunks at
  V = 151,936), 65,536 at N = 4,096 (3 chunks).
* with more than one chunk, the fp32 grad_hidden partial sum: ``4 N H`` bytes (268 MB at
  N = 16,384, H = 4,096).

Numerics: all statistics and GEMM accumulators are fp32. ``tl.dot`` takes bf16 / fp16 operands
on tensor cores and fp32 operands with ``input_precision="ieee"`` (full fp32, no TF32:
fp32 inputs ask for fp32 accuracy, at CUDA-core speed). For fp16 inputs the backward GEMMs read the
fp32 workspace as fp16 tiles scaled by a power of two (per row for grad_hidden, per chunk for
grad_weight; ``_fp16_operand_scales``, docs/design.md §4.2). Under the Triton CPU interpreter
(CPU tensors, ``TRITON_INTERPRET=1``) bf16 tiles are cast to fp32 before ``tl.dot`` because the
interpreter's bf16 arithmetic is wrong (docs/design.md §5.1). Padded vocabulary columns are
``-inf`` before any max or exp; all loads and stores are masked; row, vocabulary and workspace
offsets are int64.

``AOT_SIGNATURES`` lists every kernel as ``(kernel, signature, constexprs, options)`` with a
realistic bf16 GPU configuration (plus fp32 / fp16 variants) for ahead-of-time compilation
(tests/test_aot_compile.py); ``AOT_NO_SPILL`` names the kernels that must not spill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_interpreter_enabled
from .softmax import (merge_sums_of_squares, merge_summaries, row_statistics, softmax_grad, sum_of_squared_probs,
                      target_grad, tile_summary)

__all__ = [
    "AOT_NO_SPILL",
    "AOT_SIGNATURES",
    "DEFAULT_WORKSPACE_BYTES",
    "LinearTokenStatsBlocks",
    "TritonLinearTokenStats",
    "triton_linear_token_stats",
]

DEFAULT_WORKSPACE_BYTES = 512 * 1024 * 1024
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _logits_tile(
    hidden_row_ptrs,  # [BLOCK_N] pointers to the first element of each gathered hidden row
    row_ok,  # [BLOCK_N] bool: the row slot holds a real valid row
    weight_ptr,
    bias_ptr,
    cols,  # [BLOCK_V] vocabulary ids of this tile
    col_ok,  # [BLOCK_V] bool: cols < V
    hidden_size,
    stride_weight_row,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT_INPUTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Tempered logits ``(hidden[rows] @ W[cols].T + b[cols]) / T`` as an fp32 [BLOCK_N, BLOCK_V]
    tile. Padded rows and columns are computed from zero-filled operands (finite; the callers
    mask them)."""
    weight_row_ptrs = weight_ptr + cols.to(tl.int64) * stride_weight_row
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h_start in range(0, hidden_size, BLOCK_H):
        hs = h_start + tl.arange(0, BLOCK_H)
        h_ok = hs < hidden_size
        x = tl.load(hidden_row_ptrs[:, None] + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(weight_row_ptrs[:, None] + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST_DOT_INPUTS:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_temperature


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _linear_token_stats_fwd_kernel(
    hidden_ptr,  # [R, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] (unused when HAS_BIAS is False)
    targets_ptr,  # int64 or int32 [R]
    row_index_ptr,  # int64 [N]
    logp_ptr,  # fp32 [N] out
    entropy_ptr,  # fp32 [N] out
    lse_ptr,  # fp32 [N] out, saved for the backward
    zbar_ptr,  # fp32 [N] out, saved for the backward
    certainty_ptr,  # fp32 [N] out, written only if EXTRA_STATS: lse - mean_v(z)
    target_logit_ptr,  # fp32 [N] out, written only if EXTRA_STATS: the raw (untempered) target logit
    sum_pi_squared_ptr,  # fp32 [N] out, written only if EXTRA_STATS: sum_v p_v^2
    partials_ptr,  # fp32 [6, SPLITS, N] out, written only if SPLIT: each split's summary of its rows
    field_stride,  # SPLITS * N: the distance of two fields in partials
    n_valid,
    vocab_size,
    split_width,  # vocabulary columns per split (a multiple of BLOCK_V); >= V without a split
    hidden_size,
    stride_hidden_row,
    stride_weight_row,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT_INPUTS: tl.constexpr,
    EXTRA_STATS: tl.constexpr,
    SPLIT: tl.constexpr,  # the vocabulary is split across grid axis 1: store partials for the merge kernel
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # positions in row_index
    slot_ok = slots < n_valid
    rows = tl.load(row_index_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    target = tl.load(targets_ptr + rows, mask=slot_ok, other=-1)
    hidden_row_ptrs = hidden_ptr + rows * stride_hidden_row

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    rest = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_v z (self-certainty)
    squares = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_v exp(2 (z - m)) (sum p^2 = squares / s^2)
    split_start = tl.program_id(1) * split_width
    split_end = tl.minimum(split_start + split_width, vocab_size)
    for v_start in range(split_start, split_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size
        z = _logits_tile(hidden_row_ptrs, slot_ok, weight_ptr, bias_ptr, cols, col_ok, hidden_size,
                         stride_weight_row, inv_temperature, HAS_BIAS, UPCAST_DOT_INPUTS,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        # Padded columns must not count as exp(0) = 1 (the verl#2899 bug): -inf before max/exp.
        z = tl.where(col_ok[None, :], z, float("-inf"))
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)

        # A -inf bias entry is a masked vocabulary entry: like a padded column it counts for nothing, and
        # a tile may hold nothing else (without a bias every logit is finite: no guards, fewer registers).
        if HAS_BIAS:
            live = z > float("-inf")
        else:
            live = col_ok[None, :]
        tile_m, tile_rest, tile_u, tile_e = tile_summary(z, live, 1, MAY_BE_EMPTY=HAS_BIAS)
        m_before = m
        m, rest, u = merge_summaries(m, rest, u, tile_m, tile_rest, tile_u)
        if EXTRA_STATS:
            z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
            squares = merge_sums_of_squares(squares, m_before, tl.sum(tile_e * tile_e, axis=1), tile_m, m,
                                            MAY_BE_EMPTY=HAS_BIAS)

    if SPLIT:
        # Layout [field, split, row]: one field of every split and row is field_stride = SPLITS * N apart.
        field_ptrs = partials_ptr + tl.program_id(1) * n_valid + slots
        tl.store(field_ptrs, m, mask=slot_ok)
        field_ptrs += field_stride
        tl.store(field_ptrs, rest, mask=slot_ok)
        field_ptrs += field_stride
        tl.store(field_ptrs, u, mask=slot_ok)
        field_ptrs += field_stride
        tl.store(field_ptrs, z_target, mask=slot_ok)
        if EXTRA_STATS:
            field_ptrs += field_stride
            tl.store(field_ptrs, z_sum, mask=slot_ok)
            field_ptrs += field_stride
            tl.store(field_ptrs, squares, mask=slot_ok)
    else:
        _store_row_results(slots, slot_ok, m, rest, u, z_target, z_sum, squares, logp_ptr, entropy_ptr, lse_ptr,
                           zbar_ptr, certainty_ptr, target_logit_ptr, sum_pi_squared_ptr, vocab_size,
                           inv_temperature, EXTRA_STATS)


@triton.jit
def _store_row_results(slots, slot_ok, m, rest, u, z_target, z_sum, squares, logp_ptr, entropy_ptr, lse_ptr,
                       zbar_ptr, certainty_ptr, target_logit_ptr, sum_pi_squared_ptr, vocab_size, inv_temperature,
                       EXTRA_STATS: tl.constexpr):
    """The forward's outputs of whole rows from their summary, target logit and (EXTRA_STATS) sums."""
    logp, entropy, lse, zbar = row_statistics(m, rest, u, z_target)
    tl.store(logp_ptr + slots, logp, mask=slot_ok)
    tl.store(entropy_ptr + slots, entropy, mask=slot_ok)
    tl.store(lse_ptr + slots, lse, mask=slot_ok)
    tl.store(zbar_ptr + slots, zbar, mask=slot_ok)
    if EXTRA_STATS:
        tl.store(certainty_ptr + slots, lse - z_sum / vocab_size, mask=slot_ok)
        tl.store(target_logit_ptr + slots, z_target / inv_temperature, mask=slot_ok)
        tl.store(sum_pi_squared_ptr + slots, sum_of_squared_probs(squares, rest), mask=slot_ok)


@triton.jit
def _linear_token_stats_merge_kernel(
    partials_ptr,  # fp32 [6, SPLITS, N] from the forward kernel
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    zbar_ptr,
    certainty_ptr,
    target_logit_ptr,
    sum_pi_squared_ptr,  # as in the forward kernel
    field_stride,  # SPLITS * N
    n_valid,
    num_splits,
    vocab_size,
    inv_temperature,
    EXTRA_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Whole rows from the splits' summaries (docs/algorithms.md §8.5), in split order."""
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < n_valid
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    rest = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_N], dtype=tl.float32)
    for split in range(0, num_splits):
        field_ptrs = partials_ptr + split * n_valid + slots
        split_m = tl.load(field_ptrs, mask=slot_ok, other=float("-inf"))
        field_ptrs += field_stride
        split_rest = tl.load(field_ptrs, mask=slot_ok, other=0.0)
        field_ptrs += field_stride
        split_u = tl.load(field_ptrs, mask=slot_ok, other=0.0)
        field_ptrs += field_stride
        z_target += tl.load(field_ptrs, mask=slot_ok, other=0.0)  # 0 but in the target's split
        m_before = m
        m, rest, u = merge_summaries(m, rest, u, split_m, split_rest, split_u)
        if EXTRA_STATS:
            field_ptrs += field_stride
            z_sum += tl.load(field_ptrs, mask=slot_ok, other=0.0)
            field_ptrs += field_stride
            squares = merge_sums_of_squares(squares, m_before, tl.load(field_ptrs, mask=slot_ok, other=0.0),
                                            split_m, m, MAY_BE_EMPTY=True)
    _store_row_results(slots, slot_ok, m, rest, u, z_target, z_sum, squares, logp_ptr, entropy_ptr, lse_ptr,
                       zbar_ptr, certainty_ptr, target_logit_ptr, sum_pi_squared_ptr, vocab_size, inv_temperature,
                       EXTRA_STATS)


# ----------------------------------------------------------------------------------------------
# Backward kernels (one chunk of CHUNK_V vocabulary columns, every valid row, at a time)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _linear_token_stats_dlogits_kernel(
    hidden_ptr,  # [R, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] (unused when HAS_BIAS is False)
    targets_ptr,  # int64 or int32 [R]
    row_index_ptr,  # int64 [N]
    lse_ptr,  # fp32 [N] from the forward
    zbar_ptr,  # fp32 [N] from the forward
    logp_ptr,  # fp32 [N] from the forward
    entropy_ptr,  # fp32 [N] from the forward
    coef_logp_ptr,  # fp32 [N]: dL/dlogp
    coef_entropy_ptr,  # fp32 [N]: dL/dentropy
    dlogits_ptr,  # [N, CHUNK_V] workspace out (bf16 or fp32): the chunk's columns
    n_valid,
    chunk_vocab_start,
    chunk_vocab_end,
    hidden_size,
    stride_hidden_row,
    stride_weight_row,
    stride_dlogits_row,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT_INPUTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # positions in row_index, rows of the workspace
    row_ok = slots < n_valid
    rows = tl.load(row_index_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + slots, mask=row_ok, other=0.0)
    zbar = tl.load(zbar_ptr + slots, mask=row_ok, other=0.0)
    logp = tl.load(logp_ptr + slots, mask=row_ok, other=0.0)
    entropy = tl.load(entropy_ptr + slots, mask=row_ok, other=0.0)
    c_logp = tl.load(coef_logp_ptr + slots, mask=row_ok, other=0.0)
    c_ent = tl.load(coef_entropy_ptr + slots, mask=row_ok, other=0.0)

    local_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # columns of the workspace
    cols = chunk_vocab_start + local_cols
    col_ok = cols < chunk_vocab_end
    z = _logits_tile(hidden_ptr + rows * stride_hidden_row, row_ok, weight_ptr, bias_ptr, cols, col_ok,
                     hidden_size, stride_weight_row, inv_temperature, HAS_BIAS, UPCAST_DOT_INPUTS,
                     BLOCK_N, BLOCK_V, BLOCK_H)

    # dL/dz (docs/algorithms.md §8.3), the target column from the forward's logp and entropy (softmax.py).
    # The tile is finite (padded rows and columns are computed from zero-filled operands) but for the
    # entries of a -inf bias (a masked vocabulary).
    grad_target = target_grad(logp, entropy, c_logp, c_ent, MAY_HOLD_NEG_INF=HAS_BIAS)
    dz = softmax_grad(z, cols[None, :] == target[:, None], lse[:, None], zbar[:, None], c_logp[:, None],
                      c_ent[:, None], grad_target[:, None], MAY_HOLD_NEG_INF=HAS_BIAS)
    dlogits = dz * inv_temperature  # chain rule through z = logits / T

    offsets = slots.to(tl.int64)[:, None] * stride_dlogits_row + local_cols[None, :]
    tl.store(dlogits_ptr + offsets, dlogits.to(dlogits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _linear_token_stats_dhidden_kernel(
    dlogits_ptr,  # [N, CHUNK_V] workspace: the chunk's columns
    weight_ptr,  # [V, H]
    row_index_ptr,  # int64 [N]
    row_scale_ptr,  # fp32 [N]: powers of two, read only if SCALED_FP16
    partial_ptr,  # fp32 [N, H]: the sum over the previous chunks (read if ACCUMULATE, written unless FINAL)
    grad_hidden_ptr,  # [R, H] out (hidden dtype): the valid rows, written if FINAL
    n_valid,
    chunk_vocab_start,
    chunk_width,
    hidden_size,
    stride_dlogits_row,
    stride_weight_row,
    stride_grad_hidden_row,
    ACCUMULATE: tl.constexpr,  # add the previous chunks' partial sum
    FINAL: tl.constexpr,  # the last chunk: write grad_hidden itself
    UPCAST_DOT_INPUTS: tl.constexpr,
    SCALED_FP16: tl.constexpr,  # fp32 workspace, fp16 weight: scaled fp16 tiles on tensor cores
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = slots < n_valid
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < hidden_size
    dlogits_row_ptrs = dlogits_ptr + slots.to(tl.int64) * stride_dlogits_row
    if SCALED_FP16:
        row_scale = tl.load(row_scale_ptr + slots, mask=row_ok, other=1.0)

    out_mask = row_ok[:, None] & h_ok[None, :]
    partial_ptrs = partial_ptr + slots.to(tl.int64)[:, None] * hidden_size + hs[None, :]
    # The previous chunks' sum starts the accumulator, in the scaled units of this chunk's tiles: one
    # [BLOCK_N, BLOCK_H] fp32 tile in registers rather than two (142 registers on sm_90 instead of 178).
    if ACCUMULATE:
        acc = tl.load(partial_ptrs, mask=out_mask, other=0.0)
        if SCALED_FP16:
            acc = acc * row_scale[:, None]  # exact: a power of two
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for k_start in range(0, chunk_width, BLOCK_V):
        local_cols = k_start + tl.arange(0, BLOCK_V)
        col_ok = local_cols < chunk_width
        g = tl.load(dlogits_row_ptrs[:, None] + local_cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        cols = chunk_vocab_start + local_cols
        w = tl.load(weight_ptr + cols.to(tl.int64)[:, None] * stride_weight_row + hs[None, :],
                    mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST_DOT_INPUTS:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        if SCALED_FP16:
            g = (g * row_scale[:, None]).to(tl.float16)  # the one rounding of dlogits (docs/design.md §4.2)
        acc = tl.dot(g, w, acc, input_precision="ieee")
    if SCALED_FP16:
        acc = acc / row_scale[:, None]  # exact: a power of two

    if FINAL:
        rows = tl.load(row_index_ptr + slots, mask=row_ok, other=0).to(tl.int64)
        out_ptrs = grad_hidden_ptr + rows[:, None] * stride_grad_hidden_row + hs[None, :]
        tl.store(out_ptrs, acc.to(grad_hidden_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(partial_ptrs, acc, mask=out_mask)


@triton.jit
def _linear_token_stats_dweight_kernel(
    dlogits_ptr,  # [N, CHUNK_V] workspace: the chunk's columns
    hidden_ptr,  # [R, H]
    row_index_ptr,  # int64 [N]
    grad_weight_ptr,  # [V, H] out (weight dtype): the chunk's rows, written once
    grad_bias_ptr,  # [V] out (bias dtype; unused when COMPUTE_BIAS is False)
    operand_scale_ptr,  # fp32 [1]: a power of two, read only if SCALED_FP16
    n_valid,
    chunk_vocab_start,
    chunk_width,
    hidden_size,
    stride_dlogits_row,
    stride_hidden_row,
    stride_grad_weight_row,
    COMPUTE_BIAS: tl.constexpr,
    UPCAST_DOT_INPUTS: tl.constexpr,
    SCALED_FP16: tl.constexpr,  # fp32 workspace, fp16 hidden: scaled fp16 tiles on tensor cores
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_h = tl.program_id(0)  # H blocks first: they share this program's dlogits columns in L2
    local_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local_cols < chunk_width
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < hidden_size

    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    if SCALED_FP16:
        operand_scale = tl.load(operand_scale_ptr)
    # Every valid row in one program: the output tile is complete here, written once (no accumulator).
    for n_start in range(0, n_valid, BLOCK_N):
        slots = n_start + tl.arange(0, BLOCK_N)
        row_ok = slots < n_valid
        rows = tl.load(row_index_ptr + slots, mask=row_ok, other=0).to(tl.int64)
        g = tl.load(dlogits_ptr + slots.to(tl.int64)[:, None] * stride_dlogits_row + local_cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_V]
        x = tl.load(hidden_ptr + rows[:, None] * stride_hidden_row + hs[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
        if UPCAST_DOT_INPUTS:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        if COMPUTE_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
        if SCALED_FP16:
            g = (g * operand_scale).to(tl.float16)  # the one rounding of dlogits (docs/design.md §4.2)
        acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
    if SCALED_FP16:
        acc = acc / operand_scale  # exact: a power of two

    cols = chunk_vocab_start + local_cols
    out_offsets = cols.to(tl.int64)[:, None] * stride_grad_weight_row + hs[None, :]
    tl.store(grad_weight_ptr + out_offsets, acc.to(grad_weight_ptr.dtype.element_ty),
             mask=col_ok[:, None] & h_ok[None, :])
    if COMPUTE_BIAS:
        # Every H-block program of this vocabulary tile has the same column sums; the first writes.
        # A uniform branch, not a `col_ok & (pid_h == 0)` mask: Triton 3.9's interpreter turns a
        # bool block & a bool scalar into int32 and rejects it as a mask.
        if pid_h == 0:
            tl.store(grad_bias_ptr + cols, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearTokenStatsBlocks:
    """Tile sizes of the kernels, and the backward's workspace chunk.

    * ``block_n, block_v, block_h``: the logits-tile kernels (forward, dlogits) build
      ``[block_n, block_v]`` logits tiles, H in ``block_h`` steps; with bf16 / fp16 operands the
      dlogits kernel takes ``dlogits_block_n`` rows instead (``_dlogits_rows``). It writes its tile
      rather than folding it into running statistics, so 128 rows fit its registers (sm_90, Triton
      3.9: 225 registers, 0 spills at 128 x 128 x 32) where the forward spills (255 registers and
      100 B of spill stores); with fp32 operands it spills too (132 B) and keeps ``block_n``.
    * ``gemm_block_out, gemm_block_k``: the two backward GEMMs write ``gemm_block_out``-sized output
      tiles (grad_hidden: rows x H, square; grad_weight: V x H, ``gemm_block_out x dweight_block_h``)
      and step through their reduction (V, resp. the chunk's rows) ``gemm_block_k`` at a time. Large
      output tiles keep their operands' re-reads (and so memory traffic) low. ``gemm_block_k`` None
      picks it per ``tl.dot`` operand dtype (``_gemm_tiles``).
    * ``dweight_block_h``: the H width of grad_weight's tiles; None picks ``WIDE_DWEIGHT_BLOCK_H`` (256) for
      bf16 / fp16 operands on sm_90 (Hopper, wgmma), else ``gemm_block_out`` (``_gemm_tiles``). At 128 x 256
      the one fp32 accumulator fits 8 warps there (ptxas -v, Triton 3.6 and 3.9: 227-249 registers, 0
      spills); on sm_80 (mma.sync) it spills (Triton 3.6, bf16: 6 KB; 3.9, fp16: 16 B); later
      architectures were not measured and keep the square tile. grad_hidden keeps 128 x 128: at
      128 x 256 it spills 64-188 B on sm_90.
    * ``backward_chunk_vocab``: the number of vocabulary columns whose ``dlogits`` (of every valid
      row) live in the workspace at once, rounded down to whole tiles (at least one); None sizes it
      to ``DEFAULT_WORKSPACE_BYTES``.
    * ``vocab_splits``: the forward splits the vocabulary across this many programs per row block
      (whole ``block_v`` tiles each; fewer if V has fewer tiles), merged by a second kernel; None
      picks enough to fill the GPU's SMs (``_splits_filling``; 1 under the interpreter).

    On a GPU every block must be >= 16 (``tl.dot``); all are powers of two.
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 32
    dlogits_block_n: int = 128
    gemm_block_out: int = 128
    gemm_block_k: int | None = None
    dweight_block_h: int | None = None
    num_warps: int = 8
    num_stages: int = 3
    backward_chunk_vocab: int | None = None
    vocab_splits: int | None = None

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h", "dlogits_block_n", "gemm_block_out", "gemm_block_k",
                     "dweight_block_h"):
            value = getattr(self, name)
            if value is None and name in ("gemm_block_k", "dweight_block_h"):
                continue
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        for name in ("backward_chunk_vocab", "vocab_splits"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


def _launch_options(blocks: LinearTokenStatsBlocks, dot_operand_dtype: torch.dtype) -> dict:
    """num_warps / num_stages for a kernel whose tl.dot operands have this dtype. fp32 operands
    take the CUDA-core FMA path, which spills registers at the default tiles when
    software-pipelined (ptxas -v, triton 3.6 and 3.7, sm_80 and sm_90): those kernels run
    unpipelined (num_stages=1)."""
    stages = 1 if dot_operand_dtype == torch.float32 else blocks.num_stages
    return {"num_warps": blocks.num_warps, "num_stages": stages}


def _dlogits_rows(blocks: LinearTokenStatsBlocks, dot_operand_dtype: torch.dtype) -> int:
    """Rows of the dlogits kernel's tile for this tl.dot operand dtype (see LinearTokenStatsBlocks)."""
    return blocks.block_n if dot_operand_dtype == torch.float32 else blocks.dlogits_block_n


WIDE_DWEIGHT_BLOCK_H = 256


def _compute_capability(device: torch.device) -> int | None:
    """10 * major + minor of a CUDA device; None for the interpreter."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _gemm_tiles(blocks: LinearTokenStatsBlocks, dot_operand_dtype: torch.dtype,
                compute_capability: int | None) -> tuple[int, int, int, dict]:
    """``(block_out, dweight_block_h, block_k, launch options)`` of the two backward GEMMs for this tl.dot
    operand dtype on a GPU of this compute capability (None: the interpreter). The default reduction step
    is 64 on tensor cores (bf16 / fp16 operands) and 32 for fp32 operands: at 64 their FMA path spills up
    to 16.5 KB per thread on Triton 3.8 and 3.9 (ptxas -v, sm_80; sm_90 too on 3.9; 3.6 and 3.7 fit); at 32
    every supported version fits. The wide grad_weight tile is for 16-bit operands on sm_90
    (``LinearTokenStatsBlocks.dweight_block_h``)."""
    block_k = blocks.gemm_block_k
    if block_k is None:
        block_k = 32 if dot_operand_dtype == torch.float32 else 64
    block_h = blocks.dweight_block_h
    if block_h is None:
        hopper = compute_capability is not None and 90 <= compute_capability < 100  # wgmma; others unmeasured
        block_h = WIDE_DWEIGHT_BLOCK_H if hopper and dot_operand_dtype != torch.float32 else blocks.gemm_block_out
    return blocks.gemm_block_out, block_h, block_k, _launch_options(blocks, dot_operand_dtype)


# The forward's programs at the default tiles use ~150 registers x 256 threads: one per SM. The vocabulary
# is split until the grid's waves keep this share of the SMs busy (docs/algorithms.md §8.5).
_SPLIT_TARGET_OCCUPANCY = 0.95
_MERGE_BLOCK_N = 128


def _device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (no split unless asked for)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _splits_filling(row_blocks: int, sm_count: int, max_splits: int) -> int:
    """The fewest vocabulary splits s (<= max_splits, <= sm_count) whose grid of row_blocks * s programs keeps
    _SPLIT_TARGET_OCCUPANCY of the SM slots of its waves busy (one program per SM), else the best s."""
    def busy(s):
        programs = row_blocks * s
        return programs / (triton.cdiv(programs, sm_count) * sm_count)

    candidates = range(1, max(1, min(max_splits, sm_count)) + 1)
    good = [s for s in candidates if busy(s) >= _SPLIT_TARGET_OCCUPANCY]
    return good[0] if good else max(candidates, key=lambda s: (busy(s), -s))


def _vocab_split(row_blocks: int, vocab_size: int, blocks: "LinearTokenStatsBlocks", device) -> tuple[int, int]:
    """(number of splits, columns per split) of the forward's vocabulary: whole BLOCK_V tiles per split, the
    last split ragged, none empty."""
    tiles = max(1, triton.cdiv(vocab_size, blocks.block_v))
    requested = blocks.vocab_splits
    if requested is None:
        requested = _splits_filling(row_blocks, _device_sm_count(device), tiles)
    tiles_per_split = triton.cdiv(tiles, min(requested, tiles))
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * blocks.block_v


def _resolve_blocks(block_sizes) -> LinearTokenStatsBlocks:
    if block_sizes is None:
        return LinearTokenStatsBlocks()
    if isinstance(block_sizes, LinearTokenStatsBlocks):
        return block_sizes
    if isinstance(block_sizes, dict):
        return LinearTokenStatsBlocks(**block_sizes)
    raise TypeError(f"block_sizes must be None, a dict or LinearTokenStatsBlocks, got {type(block_sizes).__name__}")


def _runs_in_interpreter(tensor: torch.Tensor) -> bool:
    # CPU tensors can only be launched through Triton's interpreter (TRITON_INTERPRET=1).
    return tensor.device.type != "cuda"


def _workspace_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # bf16 keeps fp32's exponent range, so tensor-core GEMMs on bf16 dlogits lose only mantissa;
    # fp16 would flush the many tiny entries p_k * c / T to zero, so fp16 (and fp32) use fp32.
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


# dlogits scaled into fp16 peak at 2**14 (2 binades below fp16's largest, 65,504, for the fp32 rounding of
# the bound) and keep 38 binades above fp16's smallest subnormal 2**-24 (docs/design.md §4.2).
_FP16_OPERAND_PEAK_EXPONENT = 14.0


def _fp16_operand_scales(coef_logp, coef_entropy, entropy, inv_temperature):
    """Per valid row a power of two s with s * |dlogits_k| <= 2**14 for every k (fp32 [N]): from the bound
    |dL/dlogits_k| <= (|c_logp| + |c_ent| (1/e + H)) / T (p_k <= 1, p_k |log p_k| <= 1/e, z_k - zbar =
    log p_k + H). A row whose bound is 0 gets the largest scale (it then never sets a chunk's minimum);
    a non-finite one 1."""
    bound = (coef_logp.abs() + coef_entropy.abs() * (math.exp(-1.0) + entropy)) * inv_temperature
    exponent = torch.floor(_FP16_OPERAND_PEAK_EXPONENT - torch.log2(bound))
    return torch.exp2(exponent.nan_to_num(nan=0.0, posinf=126.0, neginf=-126.0).clamp(-126.0, 126.0))


def _chunk_vocab(n_valid: int, vocab_size: int, workspace_dtype: torch.dtype, blocks: LinearTokenStatsBlocks,
                 tile: int) -> int:
    """Vocabulary columns per backward chunk: ``backward_chunk_vocab``, or the most whole tiles whose
    ``[N, columns]`` dlogits fit in DEFAULT_WORKSPACE_BYTES (at least one tile); at most V (one chunk)."""
    if blocks.backward_chunk_vocab is not None:
        columns = blocks.backward_chunk_vocab
    else:
        element_size = torch.empty((), dtype=workspace_dtype).element_size()
        columns = DEFAULT_WORKSPACE_BYTES // (max(n_valid, 1) * element_size)
    return min(max(1, columns // tile) * tile, vocab_size)


def _check_inputs(hidden, weight, targets, row_index, bias, temperature, check_rows=True):
    """Shape / dtype / device / value checks with messages that say what to fix. One host sync
    (for the value checks of row_index and targets), skipped with ``check_rows=False`` (a caller that
    built row_index and checked the targets: fused_canon's API)."""
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, targets, row_index)):
        raise TypeError("hidden, weight, targets and row_index must be torch.Tensors")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [R, H] (flatten [B, T, H] first), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"weight is [V, H] = {tuple(weight.shape)} but hidden has H = {hidden_size}")
    if hidden_size == 0 or (vocab_size == 0 and row_index.numel() > 0):
        raise ValueError(f"empty vocabulary or hidden size: weight shape {tuple(weight.shape)}, "
                         f"{row_index.numel()} rows to compute")
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if targets.dtype not in (torch.int64, torch.int32) or row_index.dtype != torch.int64:
        raise TypeError(f"targets must be int64 or int32 and row_index int64, got {targets.dtype} and "
                        f"{row_index.dtype}")
    if targets.shape != (num_rows,):
        raise ValueError(f"targets must be [R] = [{num_rows}], got shape {tuple(targets.shape)}")
    if row_index.dim() != 1:
        raise ValueError(f"row_index must be 1-D [N], got shape {tuple(row_index.shape)}")
    tensors = {"hidden": hidden, "weight": weight, "targets": targets, "row_index": row_index}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError("bias must be a torch.Tensor or None")
        if bias.shape != (vocab_size,):
            raise ValueError(f"bias must be [V] = [{vocab_size}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if hidden.device.type == "cpu" and not triton_interpreter_enabled():
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "fused_canon.kernels is imported")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError("temperature must be a scalar")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")

    if check_rows and row_index.numel() > 0:
        row_out_of_range = ((row_index < 0) | (row_index >= num_rows)).any()
        sorted_rows = row_index.sort().values
        duplicate_row = (sorted_rows[1:] == sorted_rows[:-1]).any()
        valid_targets = targets[row_index.clamp(0, max(num_rows - 1, 0))]
        target_out_of_range = ((valid_targets < 0) | (valid_targets >= vocab_size)).any()
        bad_rows, duplicates, bad_targets = torch.stack([row_out_of_range, duplicate_row, target_out_of_range]).tolist()
        if bad_rows:
            raise ValueError(f"row_index has entries outside [0, R) = [0, {num_rows})")
        if duplicates:
            raise ValueError("row_index has duplicate rows")
        if bad_targets:
            raise ValueError(f"targets of valid rows must lie in [0, V) = [0, {vocab_size})")
    return temperature


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(hidden, weight, bias, targets, row_index, inv_temperature, blocks, extra_stats=False):
    """(logp, entropy, lse, zbar, extras): extras is (certainty, target_logit, sum_pi_squared), empty
    tensors unless ``extra_stats``."""
    n_valid = row_index.numel()
    vocab_size, hidden_size = weight.shape
    logp, entropy, lse, zbar = (torch.empty(n_valid, dtype=torch.float32, device=hidden.device) for _ in range(4))
    extras = tuple(torch.empty(n_valid if extra_stats else 0, dtype=torch.float32, device=hidden.device)
                   for _ in range(3))
    if n_valid == 0:
        return logp, entropy, lse, zbar, extras
    upcast = _runs_in_interpreter(hidden) and hidden.dtype == torch.bfloat16
    row_blocks = triton.cdiv(n_valid, blocks.block_n)
    num_splits, split_width = _vocab_split(row_blocks, vocab_size, blocks, hidden.device)
    outputs = (logp, entropy, lse, zbar, *(extras if extra_stats else (logp, logp, logp)))  # unused then
    split = num_splits > 1
    partials = torch.empty((6 if extra_stats else 4, num_splits, n_valid) if split else 0, dtype=torch.float32,
                           device=hidden.device)
    field_stride = num_splits * n_valid
    _linear_token_stats_fwd_kernel[(row_blocks, num_splits)](
        hidden, weight, bias if bias is not None else weight, targets, row_index, *outputs, partials, field_stride,
        n_valid, vocab_size, split_width, hidden_size, hidden.stride(0), weight.stride(0), inv_temperature,
        HAS_BIAS=bias is not None, UPCAST_DOT_INPUTS=upcast, EXTRA_STATS=bool(extra_stats), SPLIT=split,
        BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
        **_launch_options(blocks, torch.float32 if upcast else hidden.dtype),
    )
    if split:
        _linear_token_stats_merge_kernel[(triton.cdiv(n_valid, _MERGE_BLOCK_N),)](
            partials, *outputs, field_stride, n_valid, num_splits, vocab_size, inv_temperature,
            EXTRA_STATS=bool(extra_stats), BLOCK_N=_MERGE_BLOCK_N, num_warps=4,
        )
    return logp, entropy, lse, zbar, extras


def _backward(hidden, weight, bias, targets, row_index, logp, entropy, lse, zbar, coef_logp, coef_entropy,
              inv_temperature, blocks, need_hidden, need_weight, need_bias):
    """Gradients w.r.t. hidden, weight and bias (None where not needed); see the module docstring."""
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    n_valid = row_index.numel()
    device = hidden.device
    grad_hidden = torch.zeros((num_rows, hidden_size), dtype=hidden.dtype, device=device) if need_hidden else None
    grad_weight = grad_bias = None
    if not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias
    if n_valid == 0:
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        return grad_hidden, grad_weight, grad_bias

    upcast = _runs_in_interpreter(hidden) and hidden.dtype == torch.bfloat16
    workspace_dtype = _workspace_dtype(weight.dtype)
    out_block, dweight_h, k_block, gemm_options = _gemm_tiles(blocks, torch.float32 if upcast else hidden.dtype,
                                                              _compute_capability(device))
    chunk_vocab = _chunk_vocab(n_valid, vocab_size, workspace_dtype, blocks, max(blocks.block_v, out_block, k_block))
    num_chunks = triton.cdiv(vocab_size, chunk_vocab)
    dlogits = torch.empty((n_valid, chunk_vocab), dtype=workspace_dtype, device=device)
    # tl.dot needs equal operand dtypes: the fp32 workspace of fp16 inputs enters the GEMMs as scaled
    # fp16 tiles (tensor cores), the scales from the rows' own statistics.
    scaled_fp16 = workspace_dtype != weight.dtype
    row_scale = _fp16_operand_scales(coef_logp, coef_entropy, entropy, inv_temperature) if scaled_fp16 else logp
    # grad_weight reduces over every row: one scale for all of them, the largest row bound sets it.
    weight_operand_scale = row_scale.amin().reshape(1) if scaled_fp16 else logp
    # grad_hidden sums over the chunks: fp32 [N, H] in between (4 N H bytes).
    partial = torch.empty((n_valid, hidden_size) if need_hidden and num_chunks > 1 else 0, dtype=torch.float32,
                          device=device)

    need_weight_kernel = need_weight or need_bias
    if need_weight_kernel:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        grad_bias = torch.empty_like(bias) if need_bias else grad_weight  # unused without a bias gradient

    tile_dot_dtype = torch.float32 if upcast else hidden.dtype
    dlogits_rows = _dlogits_rows(blocks, tile_dot_dtype)
    dlogits_args = dict(BLOCK_N=dlogits_rows, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
                        **_launch_options(blocks, tile_dot_dtype))
    dhidden_args = dict(BLOCK_N=out_block, BLOCK_V=k_block, BLOCK_H=out_block, **gemm_options)
    dweight_args = dict(BLOCK_N=k_block, BLOCK_V=out_block, BLOCK_H=dweight_h, **gemm_options)
    for chunk in range(num_chunks):
        vocab_start = chunk * chunk_vocab
        width = min(chunk_vocab, vocab_size - vocab_start)
        grid = (triton.cdiv(n_valid, dlogits_rows), triton.cdiv(width, blocks.block_v))
        _linear_token_stats_dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, row_index,
            lse, zbar, logp, entropy, coef_logp, coef_entropy, dlogits,
            n_valid, vocab_start, vocab_start + width, hidden_size, hidden.stride(0), weight.stride(0),
            dlogits.stride(0), inv_temperature, HAS_BIAS=bias is not None, UPCAST_DOT_INPUTS=upcast, **dlogits_args,
        )
        # Grid axis 0 varies fastest in launch order, so programs that run at the same time share
        # an operand stream in L2: the row blocks of one H block (the same W rows) for
        # grad_hidden, the H blocks of one vocabulary block (the same dlogits columns) for grad_weight.
        if need_hidden:
            grid = (triton.cdiv(n_valid, out_block), triton.cdiv(hidden_size, out_block))
            _linear_token_stats_dhidden_kernel[grid](
                dlogits, weight, row_index, row_scale, partial, grad_hidden,
                n_valid, vocab_start, width, hidden_size, dlogits.stride(0), weight.stride(0), grad_hidden.stride(0),
                ACCUMULATE=chunk > 0, FINAL=chunk == num_chunks - 1, UPCAST_DOT_INPUTS=upcast,
                SCALED_FP16=scaled_fp16, **dhidden_args,
            )
        if need_weight_kernel:
            grid = (triton.cdiv(hidden_size, dweight_h), triton.cdiv(width, out_block))
            _linear_token_stats_dweight_kernel[grid](
                dlogits, hidden, row_index, grad_weight, grad_bias, weight_operand_scale,
                n_valid, vocab_start, width, hidden_size, dlogits.stride(0), hidden.stride(0), grad_weight.stride(0),
                COMPUTE_BIAS=need_bias, UPCAST_DOT_INPUTS=upcast, SCALED_FP16=scaled_fp16, **dweight_args,
            )
    return grad_hidden, grad_weight if need_weight else None, grad_bias if need_bias else None


# ----------------------------------------------------------------------------------------------
# Autograd wiring and public entry point
# ----------------------------------------------------------------------------------------------


class TritonLinearTokenStats(torch.autograd.Function):
    """``(logp, entropy, certainty, target_logit, sum_pi_squared) = f(hidden, weight, bias)`` for the valid
    rows; see the module docstring. The last three are detached and empty unless ``extra_stats``.

    ``apply(hidden, weight, targets, row_index, bias, temperature, block_sizes, extra_stats, check_rows)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_index, bias, temperature, block_sizes, extra_stats, check_rows):
        temperature = _check_inputs(hidden, weight, targets, row_index, bias, temperature, check_rows)
        blocks = _resolve_blocks(block_sizes)
        hidden = _last_dim_contiguous(hidden)
        weight = _last_dim_contiguous(weight)
        bias = bias.contiguous() if bias is not None else None
        targets, row_index = targets.contiguous(), row_index.contiguous()  # the kernels index them with stride 1
        inv_temperature = 1.0 / temperature
        logp, entropy, lse, zbar, extras = _forward(hidden, weight, bias, targets, row_index, inv_temperature,
                                                    blocks, extra_stats)
        ctx.save_for_backward(hidden, weight, bias, targets, row_index, logp, entropy, lse, zbar)
        ctx.inv_temperature = inv_temperature
        ctx.blocks = blocks
        ctx.mark_non_differentiable(*extras)
        return logp, entropy, *extras

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_grad_extra_stats):
        hidden, weight, bias, targets, row_index, logp, entropy, lse, zbar = ctx.saved_tensors
        need_hidden, need_weight, _, _, need_bias = ctx.needs_input_grad[:5]
        need_bias = need_bias and bias is not None

        def coefficient(grad):
            if grad is None:
                return torch.zeros_like(logp)
            return grad.to(torch.float32).contiguous()

        grad_hidden, grad_weight, grad_bias = _backward(
            hidden, weight, bias, targets, row_index, logp, entropy, lse, zbar,
            coefficient(grad_logp), coefficient(grad_entropy), ctx.inv_temperature, ctx.blocks,
            need_hidden, need_weight, need_bias,
        )
        return grad_hidden, grad_weight, None, None, grad_bias, None, None, None, None


def triton_linear_token_stats(hidden, weight, targets, row_index, bias=None, temperature=1.0, *, block_sizes=None,
                              extra_stats=False, check_rows=True):
    """Per-token ``(logp, entropy)``, fp32 ``[N]``, of the valid rows ``row_index`` of
    ``z = (hidden @ weight.T + bias) / temperature``, without materialising ``[N, V]``.

    ``block_sizes``: None (defaults), a ``LinearTokenStatsBlocks`` or a dict of its fields.
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; see the module docstring. A row with a NaN
    or +inf logit has ``logp = NaN``. ``extra_stats=True`` also returns, from the same pass, the
    self-certainty ``lse - mean_v(z)``, the raw target logit and ``sum_v p_v^2`` (fp32 ``[N]``,
    detached): five outputs. ``check_rows=False`` skips the check (one host sync) of row_index and of
    its rows' targets, for a caller that built and checked them.
    """
    outputs = TritonLinearTokenStats.apply(hidden, weight, targets, row_index, bias, temperature, block_sizes,
                                           bool(extra_stats), bool(check_rows))
    return outputs if extra_stats else outputs[:2]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation registry (tests/test_aot_compile.py compiles every entry for sm_80 and
# sm_90 and runs ptxas -v on it)
# ----------------------------------------------------------------------------------------------
# Entries are (kernel, signature, constexprs, options): the signature names every argument in
# order with its Triton type ("constexpr" for compile-time ones); options are triton.compile
# options plus "div16", the integer arguments to compile with a divisible-by-16 hint (what the
# JIT infers at H = 4096, V = 151,936), and "archs" where a build is for some architectures only. One
# entry per kernel and input dtype (grad_weight: per architecture too), with the tiles and launch
# options _launch_options() / _gemm_tiles() pick for it.

_AOT_BLOCKS = LinearTokenStatsBlocks()
_AOT_SIZES = {"n_valid": "i32", "vocab_size": "i32", "hidden_size": "i32", "chunk_vocab_start": "i32",
              "field_stride": "i32", "split_width": "i32", "num_splits": "i32", "chunk_vocab_end": "i32",
              "chunk_width": "i32", "stride_dlogits_row": "i32", "stride_hidden_row": "i32", "stride_weight_row": "i32",
              "stride_grad_hidden_row": "i32", "stride_grad_weight_row": "i32", "inv_temperature": "fp32"}
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _aot_entry(kernel, pointer_types, launch_options, blocks, **constexprs):
    constexprs = {"BLOCK_N": blocks[0], "BLOCK_V": blocks[1], "BLOCK_H": blocks[2], **constexprs}
    types = {**_AOT_SIZES, **pointer_types}
    signature = {arg: ("constexpr" if arg in constexprs else types[arg]) for arg in kernel.arg_names}
    div16 = [arg for arg in signature if arg in ("vocab_size", "hidden_size") or arg.startswith("stride_")]
    return kernel, signature, constexprs, {**launch_options, "div16": div16}


def _aot_entries(dtype: torch.dtype):
    """The four kernels as a GPU launches them for `dtype` inputs (bias present; the forward unsplit and split,
    grad_hidden's last chunk of several)."""
    ty = _TRITON_TYPE[dtype]
    workspace = _workspace_dtype(dtype)
    gemm_dot = torch.float32 if dtype == torch.float32 else dtype  # fp16: scaled fp16 tiles (_backward)
    stats = {"hidden_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i64",
             "row_index_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32",
             "zbar_ptr": "*fp32", "certainty_ptr": "*fp32", "target_logit_ptr": "*fp32",
             "sum_pi_squared_ptr": "*fp32", "coef_logp_ptr": "*fp32", "coef_entropy_ptr": "*fp32",
             "dlogits_ptr": f"*{_TRITON_TYPE[workspace]}",
             "partials_ptr": "*fp32"}
    gemm_pointers = {"dlogits_ptr": stats["dlogits_ptr"], "weight_ptr": f"*{ty}", "hidden_ptr": f"*{ty}",
                     "row_index_ptr": "*i64", "grad_hidden_ptr": f"*{ty}", "grad_weight_ptr": f"*{ty}",
                     "grad_bias_ptr": f"*{ty}", "row_scale_ptr": "*fp32", "operand_scale_ptr": "*fp32",
                     "partial_ptr": "*fp32"}
    b = _AOT_BLOCKS
    tile_blocks = (b.block_n, b.block_v, b.block_h)  # (BLOCK_N, BLOCK_V, BLOCK_H) as _backward passes them
    tile_options = _launch_options(b, dtype)
    out_block, _, k_block, gemm_options = _gemm_tiles(b, gemm_dot, None)
    dhidden_blocks = (out_block, k_block, out_block)

    def dweight_entries():  # its tile depends on the architecture (_gemm_tiles): one build for each
        for cc in (80, 90):
            dweight_h = _gemm_tiles(b, gemm_dot, cc)[1]
            kernel, signature, constexprs, options = _aot_entry(
                _linear_token_stats_dweight_kernel, gemm_pointers, gemm_options, (k_block, out_block, dweight_h),
                COMPUTE_BIAS=True, UPCAST_DOT_INPUTS=False, SCALED_FP16=workspace != dtype)
            yield kernel, signature, constexprs, {**options, "archs": [cc]}

    return [
        _aot_entry(_linear_token_stats_fwd_kernel, stats, tile_options, tile_blocks, HAS_BIAS=True,
                   UPCAST_DOT_INPUTS=False, EXTRA_STATS=False, SPLIT=False),
        _aot_entry(_linear_token_stats_fwd_kernel, stats, tile_options, tile_blocks, HAS_BIAS=True,
                   UPCAST_DOT_INPUTS=False, EXTRA_STATS=True, SPLIT=True),
        _aot_entry(_linear_token_stats_dlogits_kernel, stats, tile_options,
                   (_dlogits_rows(b, dtype), b.block_v, b.block_h), HAS_BIAS=True, UPCAST_DOT_INPUTS=False),
        _aot_entry(_linear_token_stats_dhidden_kernel, gemm_pointers, gemm_options, dhidden_blocks, ACCUMULATE=True,
                   FINAL=True, UPCAST_DOT_INPUTS=False, SCALED_FP16=workspace != dtype),
        *dweight_entries(),
    ]


AOT_SIGNATURES = [entry for dtype in (torch.bfloat16, torch.float16, torch.float32) for entry in _aot_entries(dtype)]
_MERGE_SIGNATURE = {"partials_ptr": "*fp32", "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32",
                    "zbar_ptr": "*fp32", "certainty_ptr": "*fp32", "target_logit_ptr": "*fp32",
                    "sum_pi_squared_ptr": "*fp32", **_AOT_SIZES}
AOT_SIGNATURES.append((_linear_token_stats_merge_kernel,
                       {arg: "constexpr" if arg in ("EXTRA_STATS", "BLOCK_N") else _MERGE_SIGNATURE[arg]
                        for arg in _linear_token_stats_merge_kernel.arg_names},
                       {"EXTRA_STATS": True, "BLOCK_N": _MERGE_BLOCK_N}, {"num_warps": 4}))
# Kernels whose AOT builds must report 0 spill bytes from ptxas -v.
AOT_NO_SPILL = {"_linear_token_stats_fwd_kernel", "_linear_token_stats_merge_kernel",
                "_linear_token_stats_dlogits_kernel",
                "_linear_token_stats_dhidden_kernel", "_linear_token_stats_dweight_kernel"}
