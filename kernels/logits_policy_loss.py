"""The policy loss and dlogits in one pass over the logits, for losses whose per-token coefficients are
known before the pass (docs/design.md §4.3).

When the advantages, the old and reference log-probs, the rollout weights and the aggregation weights
do not depend on this pass, a token's coefficients ``c_logp = dL/dlogp`` and ``c_ent = dL/dH``
(docs/algorithms.md §8.3) follow from its own row's statistics. One program then reads a row once to
summarise it (softmax.py), forms logp, H and the token's loss term (objective.py's ``token_policy_loss``
and ``token_kl``: the same formulas as the objective kernel), and reads the row a second time to write
dlogits (logits_token_stats.py's gradient form). The second read is of a row the same program has just
read: on a GPU it is served by L2 when the rows in flight fit there, which ``rows_in_flight`` arranges
(a persistent grid: each program walks the rows pid, pid + P, ...). The logits are thus fetched from
memory once and dlogits written once (1 R + 1 W), where the two-pass path reads them again in a later
launch (2 R + 1 W).

Autograd: the forward returns the loss and keeps dlogits (in the logits' own storage with
``inplace_backward``, which then destroys the logits in the forward, else one ``[B, T, V]`` buffer);
the backward scales it by ``grad_output`` in place, reading grad_output on the device: nothing moves
when it is 1 (``loss.backward()``), one read and one write of dlogits otherwise, and never a host sync.

Padded rows (``mask`` 0) are not read: their dlogits are zeros, their logp and entropy 0.
"""

import torch
import triton
import triton.language as tl

from .logits_token_stats import _check_inputs, _num_warps, default_block_v
from .objective import (NUM_SUMS, SUM_CLIPPED, SUM_CLIPPED_LOWER, SUM_ENTROPY, SUM_KL, SUM_PG, SUM_PPO_KL, CISPO,
                        KL_K3, SAPO, VANILLA, ObjectiveInputs, ObjectiveSums, objective_loss, token_kl,
                        token_policy_loss)
from .softmax import merge_summaries, row_statistics, store_row_grad, store_zero_row, tile_summary


def _fused_num_warps(block_v: int) -> int:
    # 16 elements per thread: at 8 (16 warps for a 4096-wide tile) the fp32 fused kernel spills 8 B on
    # Triton 3.6 (ptxas -v, sm_90); at 16 every supported version fits.
    return min(8, max(4, block_v // 512))

__all__ = ["triton_policy_loss", "FusedPolicyLossFunction", "rows_in_flight", "FUSED_LOSS_MODES",
           "L2_FRACTION_FOR_ROWS"]

# The loss modes whose token term needs only the token's own inputs (no sequence or batch statistic).
FUSED_LOSS_MODES = (VANILLA, CISPO, SAPO)
# Share of the L2 cache the rows in flight may fill between a row's two reads: the rest holds the
# dlogits lines being written back, the per-row vectors and whatever else is resident.
L2_FRACTION_FOR_ROWS = 0.75
# Programs per SM at most (8-warp programs, _fused_num_warps: 4 hold half of an SM's 2,048 threads).
MAX_PROGRAMS_PER_SM = 4
# Programs in the interpreter, which has no cache: a few, so that each walks several rows as on a GPU.
INTERPRETER_PROGRAMS = 4


@triton.jit
def _policy_loss_fused_kernel(
    logits_ptr, stride_lb, stride_lt,  # [B, T, V], stride(-1) == 1
    dlogits_ptr, stride_db, stride_dt,  # [B, T, V], may alias logits (inplace_backward)
    targets_ptr, stride_yb, stride_yt,  # [B, T] int
    mask_ptr,  # [B * T] uint8
    old_ptr, ref_ptr, token_weight_ptr,  # [B * T] fp32, read only with HAS_OLD / HAS_REF / HAS_TOKEN_WEIGHT
    adv_ptr, stride_ab, stride_at,  # [B, T] any strides (an expanded [B] vector: stride_at == 0)
    pg_weight_ptr, weight_ptr,  # [B] fp32 aggregation weights: policy term, entropy and KL terms
    logp_ptr, entropy_ptr,  # [B * T] fp32 outputs, 0 at padded positions
    partial_ptr,  # [programs, NUM_SUMS] fp32 output: this program's sums (objective.py's columns)
    n_rows, T, V, inv_temp,
    ratio_low, ratio_high, clip_c, entropy_coeff, kl_coef, log_ratio_clamp, k3_log_ratio_clamp, k3_value_clamp,
    sapo_tau_pos, sapo_tau_neg,  # sapo's gate temperatures (A > 0, A <= 0)
    LOSS_MODE: tl.constexpr,
    CISPO_ABSOLUTE: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    TWO_SIDED: tl.constexpr,
    HAS_OLD: tl.constexpr,  # False: on-policy, the old log-prob is this pass's own (ratio 1)
    HAS_REF: tl.constexpr,
    KL_TYPE: tl.constexpr,
    KL_STRAIGHT_THROUGH: tl.constexpr,
    KL_BIAS_CORRECTION: tl.constexpr,  # the KL term times the token's ratio (objective.py's token_kl)
    HAS_TOKEN_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_SUMS: tl.constexpr,
):
    sum_pg = 0.0
    sum_entropy = 0.0
    sum_kl = 0.0
    sum_clipped = 0.0
    sum_ppo_kl = 0.0
    sum_clipped_lower = 0.0
    # int64 before any multiply: b * stride_lb exceeds 2**31 for N=16k, V=152k.
    first_row = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    for i in range(0, tl.cdiv(n_rows - tl.program_id(0), programs)):  # rows pid, pid + P, ...
        row = first_row + i * programs
        b = row // T
        t = row - b * T
        d_row = dlogits_ptr + b * stride_db + t * stride_dt
        if tl.load(mask_ptr + row) == 0:
            store_zero_row(d_row, V, BLOCK_V)  # a padded row: the logits are not read
            tl.store(logp_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
        else:
            x_row = logits_ptr + b * stride_lb + t * stride_lt
            y = tl.load(targets_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
            m = float("-inf")  # the row's summary so far (softmax.py): the empty one
            rest = 0.0
            u = 0.0
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
                tile_m, tile_rest, tile_u, tile_e = tile_summary(z, z > float("-inf"), 0, MAY_BE_EMPTY=True)
                m, rest, u = merge_summaries(m, rest, u, tile_m, tile_rest, tile_u)
            y_ok = (y >= 0) & (y < V)  # an out-of-range target gives a NaN log-prob, not an OOB read
            x_y = tl.load(x_row + y, mask=y_ok, other=float("nan")).to(tl.float32)
            logp, entropy, lse, zbar = row_statistics(m, rest, u, x_y * inv_temp)

            # The token's loss term and coefficients, from its own inputs (objective.py's formulas).
            if HAS_OLD:
                old = tl.load(old_ptr + row)
            else:
                old = logp
            if HAS_TOKEN_WEIGHT:
                token_weight = tl.load(token_weight_ptr + row)
            else:
                token_weight = 1.0  # not read
            adv = tl.load(adv_ptr + b * stride_ab + t * stride_at).to(tl.float32)
            pg_weight = tl.load(pg_weight_ptr + b)
            weight = tl.load(weight_ptr + b)
            value, d_value, clipped, ppo_kl, clipped_lower = token_policy_loss(
                logp, old, adv, 0.0, False, token_weight, ratio_low, ratio_high, clip_c, 0.0, log_ratio_clamp,
                0.0, sapo_tau_pos, sapo_tau_neg, LOSS_MODE, CISPO_ABSOLUTE, DUAL_CLIP, TWO_SIDED, HAS_TOKEN_WEIGHT)
            c_logp = pg_weight * d_value
            if HAS_REF:
                kl, d_kl = token_kl(logp - tl.load(ref_ptr + row), logp - old, log_ratio_clamp, k3_log_ratio_clamp,
                                    k3_value_clamp, KL_TYPE, KL_STRAIGHT_THROUGH, KL_BIAS_CORRECTION)
                sum_kl += weight * kl
                c_logp += kl_coef * weight * d_kl
            c_ent = -entropy_coeff * weight
            sum_pg += pg_weight * value
            sum_entropy += weight * entropy
            sum_clipped += clipped.to(tl.float32)
            sum_ppo_kl += ppo_kl
            sum_clipped_lower += clipped_lower.to(tl.float32)

            # Second read of the row, by this program: dlogits (as logits_token_stats.py's backward).
            store_row_grad(x_row, d_row, y, V, inv_temp, lse, zbar, logp, entropy, c_logp, c_ent, BLOCK_V)
            tl.store(logp_ptr + row, logp)
            tl.store(entropy_ptr + row, entropy)

    slot = partial_ptr + tl.program_id(0) * NUM_SUMS
    tl.store(slot + SUM_PG, sum_pg)
    tl.store(slot + SUM_ENTROPY, sum_entropy)
    tl.store(slot + SUM_KL, sum_kl)
    tl.store(slot + SUM_CLIPPED, sum_clipped)
    tl.store(slot + SUM_PPO_KL, sum_ppo_kl)
    tl.store(slot + SUM_CLIPPED_LOWER, sum_clipped_lower)


@triton.jit
def _scale_gradient_kernel(d_ptr, stride_db, stride_dt, grad_ptr, T, V, BLOCK_V: tl.constexpr):
    """dlogits *= grad_output, one program per row; grad_output is read here, on the device, and a
    grad_output of 1 leaves the row untouched (no read, no write)."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(grad_ptr).to(tl.float32)
    if scale != 1.0:
        b = row // T
        d_row = d_ptr + b * stride_db + (row - b * T) * stride_dt
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            live = offs < V
            d = tl.load(d_row + offs, mask=live, other=0.0).to(tl.float32)
            tl.store(d_row + offs, (d * scale).to(d_ptr.dtype.element_ty), mask=live)


def rows_in_flight(device: torch.device, row_bytes: int, n_rows: int) -> int:
    """Programs of the persistent grid: as many as keep each row in L2 between its two reads.

    Between a program's two reads of a row, the other programs read theirs: the rows in flight
    (programs x row bytes) must fit in ``L2_FRACTION_FOR_ROWS`` of L2, and there are at most
    ``MAX_PROGRAMS_PER_SM`` per SM. On H100 / H200 (132 SMs, 50 MiB L2) at V = 151,936 bf16
    (296.75 KiB a row): 0.75 * 52,428,800 / 303,872 = 129 programs (docs/design.md §4.3)."""
    if device.type != "cuda":
        return max(1, min(n_rows, INTERPRETER_PROGRAMS))
    props = torch.cuda.get_device_properties(device)
    fitting = int(L2_FRACTION_FOR_ROWS * props.L2_cache_size) // max(row_bytes, 1)
    return max(1, min(n_rows, fitting, props.multi_processor_count * MAX_PROGRAMS_PER_SM))


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().contiguous()


def _fused_forward(logits, targets, inputs: ObjectiveInputs, temperature, inplace, block_v, programs):
    """Launch the fused kernel: ``(dlogits, logp [B, T], entropy [B, T], sums [NUM_SUMS])``."""
    B, T, V = logits.shape
    dev = logits.device
    n_rows = B * T
    f32 = dict(dtype=torch.float32, device=dev)
    launch = n_rows * V > 0  # an empty vocabulary has every row padded (the caller checks): zeros
    logp = torch.empty(n_rows, **f32) if launch else torch.zeros(n_rows, **f32)
    entropy = torch.empty(n_rows, **f32) if launch else torch.zeros(n_rows, **f32)
    dlogits = logits if inplace else torch.empty((B, T, V), dtype=logits.dtype, device=dev)
    programs = programs or rows_in_flight(dev, V * logits.element_size(), n_rows)
    partial = torch.zeros((max(programs, 1), NUM_SUMS), **f32)
    if launch:
        adv = inputs.advantages
        mask = inputs.mask.contiguous().view(torch.uint8)
        old, ref, token_weight = (_fp32(x) if x is not None else logp  # placeholders are not read
                                  for x in (inputs.old, inputs.ref, inputs.token_weight))
        _policy_loss_fused_kernel[(programs,)](
            logits, logits.stride(0), logits.stride(1),
            dlogits, dlogits.stride(0), dlogits.stride(1),
            targets, targets.stride(0), targets.stride(1),
            mask, old, ref, token_weight, adv, adv.stride(0), adv.stride(1),
            inputs.pg_weight.contiguous(), inputs.weight.contiguous(), logp, entropy, partial,
            n_rows, T, V, 1.0 / temperature,
            inputs.ratio_low, inputs.ratio_high, inputs.clip_c if inputs.clip_c is not None else 0.0,
            inputs.entropy_coeff, inputs.kl_coef, inputs.log_ratio_clamp, inputs.k3_log_ratio_clamp,
            inputs.k3_value_clamp, inputs.sapo_tau_pos, inputs.sapo_tau_neg,
            LOSS_MODE=int(inputs.loss_mode), CISPO_ABSOLUTE=inputs.cispo_absolute, DUAL_CLIP=inputs.clip_c is not None,
            TWO_SIDED=inputs.dual_clip_two_sided, HAS_OLD=inputs.old is not None, HAS_REF=inputs.ref is not None,
            KL_TYPE=int(inputs.kl_type), KL_STRAIGHT_THROUGH=inputs.kl_straight_through,
            KL_BIAS_CORRECTION=inputs.kl_bias_correction,
            HAS_TOKEN_WEIGHT=inputs.token_weight is not None, BLOCK_V=block_v, NUM_SUMS=NUM_SUMS,
            num_warps=_fused_num_warps(block_v))
    return dlogits, logp.reshape(B, T), entropy.reshape(B, T), partial.sum(0)


class FusedPolicyLossFunction(torch.autograd.Function):
    """forward(logits, targets, inputs, ...) -> (loss, sums, logp, entropy): only the loss is
    differentiable; its gradient w.r.t. the logits was written by the forward and is scaled here."""

    @staticmethod
    def forward(ctx, logits, targets, inputs: ObjectiveInputs, temperature, inplace_backward, block_v, programs):
        dlogits, logp, entropy, sums = _fused_forward(logits, targets, inputs, temperature, inplace_backward,
                                                      block_v or default_block_v(logits.shape[-1]), programs)
        if inplace_backward:
            # The logits now hold their gradient: a later autograd use of them fails loudly ("modified by
            # an inplace operation") instead of reading gradients.
            torch.autograd.graph.increment_version(logits)
        ctx.dlogits = dlogits  # not save_for_backward: with inplace_backward it is the modified input itself
        ctx.block_v = block_v or default_block_v(logits.shape[-1])
        ctx.mark_non_differentiable(sums, logp, entropy)
        return objective_loss(ObjectiveSums(*sums.unbind()), inputs).to(torch.float32), sums, logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_non_differentiable):
        dlogits = ctx.dlogits
        ctx.dlogits = None
        B, T, V = dlogits.shape
        if B * T * V > 0:
            _scale_gradient_kernel[(B * T,)](dlogits, dlogits.stride(0), dlogits.stride(1),
                                             grad_loss.detach().float().contiguous(), T, V, BLOCK_V=ctx.block_v,
                                             num_warps=_num_warps(ctx.block_v))
        # A fresh alias of the buffer: AccumulateGrad takes it as a leaf's .grad instead of copying it (with
        # inplace_backward the buffer is the leaf's own memory).
        return dlogits.detach(), None, None, None, None, None, None


def triton_policy_loss(logits, targets, inputs: ObjectiveInputs, temperature=1.0, *, inplace_backward=False,
                       block_v=None, programs=None):
    """Loss, objective sums and the per-token statistics of a loss whose coefficients need no pass statistic.

    ``logits [B, T, V]`` (fp32/fp16/bf16, stride(-1) == 1), ``targets [B, T]`` (checked in range by the
    caller: out of range gives NaN), ``inputs`` the objective's (``inputs.old`` None: on-policy;
    ``loss_mode`` in FUSED_LOSS_MODES, no Clip-Cov / KL-Cov selection, no GSPO ratio). Returns
    ``(loss, sums, logp [B, T], entropy [B, T])``: the loss differentiable w.r.t. the logits, the rest
    detached fp32 with zeros at padded positions. ``programs`` overrides ``rows_in_flight`` (tests)."""
    if int(inputs.loss_mode) not in [int(mode) for mode in FUSED_LOSS_MODES]:
        raise ValueError(f"loss_mode constant {int(inputs.loss_mode)} needs a sequence or batch statistic: "
                         f"the fused kernel takes {[int(mode) for mode in FUSED_LOSS_MODES]} (vanilla, cispo, sapo)")
    if inputs.selected is not None or inputs.seq_log_ratio is not None:
        raise ValueError("the fused kernel takes no Clip-Cov / KL-Cov selection and no GSPO sequence ratio")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature = float(temperature)
    _check_inputs(logits, targets, torch.empty(0, dtype=torch.int64, device=logits.device), temperature, block_v,
                  check_rows=False, inplace_backward=inplace_backward)
    if programs is not None and (not isinstance(programs, int) or programs < 1):
        raise ValueError(f"programs must be an int >= 1, got {programs!r}")
    loss, sums, logp, entropy = FusedPolicyLossFunction.apply(logits, targets, inputs, temperature,
                                                              bool(inplace_backward), block_v, programs)
    return loss, ObjectiveSums(*sums.unbind()), logp, entropy


# Ahead-of-time compile registry (tests/test_aot_compile.py): (kernel, signature, constexprs, options),
# as the JIT launches them at V = 151,936 (V and the row strides divisible by 16: 16-byte accesses).
def _fused_sig(dtype, stride_ty="i32"):
    return {"logits_ptr": f"*{dtype}", "stride_lb": stride_ty, "stride_lt": "i32",
            "dlogits_ptr": f"*{dtype}", "stride_db": stride_ty, "stride_dt": "i32",
            "targets_ptr": "*i64", "stride_yb": "i32", "stride_yt": "i32", "mask_ptr": "*u8",
            "old_ptr": "*fp32", "ref_ptr": "*fp32", "token_weight_ptr": "*fp32",
            "adv_ptr": "*fp32", "stride_ab": "i32", "stride_at": "i32", "pg_weight_ptr": "*fp32", "weight_ptr": "*fp32",
            "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "partial_ptr": "*fp32",
            "n_rows": "i32", "T": "i32", "V": "i32", "inv_temp": "fp32",
            "ratio_low": "fp32", "ratio_high": "fp32", "clip_c": "fp32", "entropy_coeff": "fp32", "kl_coef": "fp32",
            "log_ratio_clamp": "fp32", "k3_log_ratio_clamp": "fp32", "k3_value_clamp": "fp32",
            "sapo_tau_pos": "fp32", "sapo_tau_neg": "fp32",
            "LOSS_MODE": "constexpr", "CISPO_ABSOLUTE": "constexpr", "DUAL_CLIP": "constexpr", "TWO_SIDED": "constexpr",
            "HAS_OLD": "constexpr", "HAS_REF": "constexpr", "KL_TYPE": "constexpr", "KL_STRAIGHT_THROUGH": "constexpr",
            "KL_BIAS_CORRECTION": "constexpr", "HAS_TOKEN_WEIGHT": "constexpr", "BLOCK_V": "constexpr", "NUM_SUMS": "constexpr"}


def _scale_sig(dtype, stride_ty="i32"):
    return {"d_ptr": f"*{dtype}", "stride_db": stride_ty, "stride_dt": "i32", "grad_ptr": "*fp32", "T": "i32",
            "V": "i32", "BLOCK_V": "constexpr"}


_BV = default_block_v(151936)
_DIV16 = ("stride_lb", "stride_lt", "stride_db", "stride_dt", "V")


def _aot_entry(kernel, signature, **constexprs):
    warps = _fused_num_warps(_BV) if kernel is _policy_loss_fused_kernel else _num_warps(_BV)
    options = {"num_warps": warps, "div16": [arg for arg in _DIV16 if arg in signature]}
    return kernel, signature, {"BLOCK_V": _BV, **constexprs}, options


def _fused_constexprs(mode, dual_clip=False, two_sided=False, has_old=True, has_ref=True, kl_type=KL_K3,
                      token_weight=False, kl_bias_correction=False):
    return {"LOSS_MODE": int(mode), "CISPO_ABSOLUTE": False, "DUAL_CLIP": dual_clip, "TWO_SIDED": two_sided,
            "HAS_OLD": has_old, "HAS_REF": has_ref, "KL_TYPE": int(kl_type), "KL_STRAIGHT_THROUGH": False,
            "KL_BIAS_CORRECTION": kl_bias_correction, "HAS_TOKEN_WEIGHT": token_weight, "NUM_SUMS": NUM_SUMS}


AOT_SIGNATURES = [
    _aot_entry(_policy_loss_fused_kernel, _fused_sig("bf16"), **_fused_constexprs(VANILLA, dual_clip=True)),
    _aot_entry(_policy_loss_fused_kernel, _fused_sig("bf16", "i64"),
               **_fused_constexprs(VANILLA, dual_clip=True, two_sided=True, token_weight=True)),
    _aot_entry(_policy_loss_fused_kernel, _fused_sig("fp16"), **_fused_constexprs(CISPO, has_old=False, has_ref=False)),
    _aot_entry(_policy_loss_fused_kernel, _fused_sig("fp32"), **_fused_constexprs(VANILLA, has_ref=False)),
    _aot_entry(_policy_loss_fused_kernel, _fused_sig("bf16"), **_fused_constexprs(SAPO, kl_bias_correction=True)),
    _aot_entry(_scale_gradient_kernel, _scale_sig("bf16")),
    _aot_entry(_scale_gradient_kernel, _scale_sig("fp32", "i64")),
]
# Kernels whose AOT build must not spill registers (the test fails if ptxas reports spills).
AOT_NO_SPILL = {"_policy_loss_fused_kernel", "_scale_gradient_kernel"}
