"""Stage 2 of the fused logits path: the per-token policy objective, aggregation and metrics in one kernel.

Drop-in for ``fused_canon.losses.policy_objective`` (same arguments, same ``(loss, metrics)``; the
reference defines the semantics) for the built-in loss modes vanilla, clip_cov, kl_cov, gspo, cispo.

Every aggregation mode of ALGORITHMS.md §1.8 is a weighted sum over the valid tokens with a weight
that depends only on the row: ``agg(v) = sum_{b,t} w_b v_bt`` with ``w_b`` = 1/N_tok (token-mean),
1/N_seq (seq-mean-token-sum), 1/(N_seq (len_b + 1e-8)) (seq-mean-token-mean) or 1/(N_seq L)
(seq-mean-token-sum-norm). So the loss is linear in per-token terms and the kernel can emit, per token,

    its contribution to the loss          w_pg l(logp) - entropy_coeff w H + kl_coef w KL(logp)
    c_logp = dL/dlogp                     w_pg l'(logp) + kl_coef w KL'(logp)
    c_ent  = dL/dH                        -entropy_coeff w

(ALGORITHMS.md §8.3) plus the counts of the verl metrics. The forward of ``PolicyObjectiveFunction``
runs the kernel once over [B, T] (one program per (row, BLOCK_T tile)); each program writes its
partial sums to its own slot of a small buffer that ``torch.sum`` reduces (deterministic, no
atomics); the backward only scales the saved ``c_logp`` / ``c_ent`` by ``grad_output``.

O(N) torch pre-passes, where a token needs something of its whole row or batch:
  * the per-row weights (O(B)) and per-row valid counts;
  * GSPO's sequence mean log-ratio;
  * Clip-Cov / KL-Cov token selection: the selection depends on batch statistics, a seeded random
    permutation (Clip-Cov) or a top-k (KL-Cov), so it runs in torch with the reference's own ops
    (``clip_cov_selection`` / ``kl_cov_selection`` of fused_canon.losses) and reaches the kernel as a
    0/1 mask.

Padded positions are never read (loads are masked by ``mask``), so they may hold garbage: they
contribute nothing and get zero gradient. An empty mask gives loss 0 with zero gradient.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_canon.config import LossConfig
from fused_canon.losses import (GSPO_AGG_MODE, GSPO_LOG_RATIO_MAX, LOG_RATIO_CLAMP, Normalizers, aggregation_weights,
                                check_ref_for_kl, clip_cov_selection, gspo_sequence_log_ratio, kl_cov_selection,
                                zero_padded)

__all__ = ["triton_policy_objective", "PolicyObjectiveFunction", "TRITON_LOSS_MODES"]

# The loss modes, as values of the kernel's LOSS_MODE constexpr.
VANILLA = tl.constexpr(0)
CLIP_COV = tl.constexpr(1)
KL_COV = tl.constexpr(2)
GSPO = tl.constexpr(3)
CISPO = tl.constexpr(4)
TRITON_LOSS_MODES = {"vanilla": VANILLA, "clip_cov": CLIP_COV, "kl_cov": KL_COV, "gspo": GSPO, "cispo": CISPO}
# The KL estimators, as values of the KL_TYPE constexpr.
KL_K1 = tl.constexpr(0)
KL_ABS = tl.constexpr(1)
KL_K2 = tl.constexpr(2)
KL_K3 = tl.constexpr(3)
_KL_TYPES = {"k1": KL_K1, "kl": KL_K1, "abs": KL_ABS, "k2": KL_K2, "mse": KL_K2, "k3": KL_K3, "low_var_kl": KL_K3}

# The reference's clamps, as kernel constants: vanilla/cispo log-ratio, GSPO's sequence log-ratio,
# and k3's value (its -d shares the log-ratio clamp).
_LOG_RATIO_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
_GSPO_LOG_RATIO_MAX = tl.constexpr(GSPO_LOG_RATIO_MAX)
_K3_VALUE_CLAMP = tl.constexpr(10.0)



class ObjectiveSums(NamedTuple):
    """The kernel's sums over the valid tokens, in the column order of its partial-sum buffer."""

    pg: torch.Tensor  # sum w_pg l: the aggregated policy loss
    entropy: torch.Tensor  # sum w H: the aggregated entropy
    kl: torch.Tensor  # sum w KL: the aggregated KL loss (0 without ref log-probs)
    clipped: torch.Tensor  # count of clipped (Clip-Cov: dropped) tokens
    ppo_kl: torch.Tensor  # sum of -log rho (KL-Cov: |log rho|)
    clipped_lower: torch.Tensor  # count of dual-clipped tokens


# Columns of the partial-sum buffer, as the kernel addresses them.
SUM_PG = tl.constexpr(ObjectiveSums._fields.index("pg"))
SUM_ENTROPY = tl.constexpr(ObjectiveSums._fields.index("entropy"))
SUM_KL = tl.constexpr(ObjectiveSums._fields.index("kl"))
SUM_CLIPPED = tl.constexpr(ObjectiveSums._fields.index("clipped"))
SUM_PPO_KL = tl.constexpr(ObjectiveSums._fields.index("ppo_kl"))
SUM_CLIPPED_LOWER = tl.constexpr(ObjectiveSums._fields.index("clipped_lower"))
NUM_SUMS = len(ObjectiveSums._fields)

# Largest token tile of one program (a row longer than this is split over several programs), and the
# warps of every launch: 4 tokens per thread at 4 warps compiles without spills on sm_80 / sm_90 for
# every mode (8 and 16 warps make ptxas aim for occupancy and spill a few bytes in some modes).
MAX_BLOCK_T = 512
NUM_WARPS = 4


@triton.jit
def _maximum_grad(a, b, grad_a, grad_b):
    """d torch.maximum(a, b): the larger input's gradient; half of each on a tie (torch's rule)."""
    return tl.where(a > b, grad_a, tl.where(a < b, grad_b, 0.5 * (grad_a + grad_b)))


@triton.jit
def _minimum_grad(a, b, grad_a, grad_b):
    """d torch.minimum(a, b): the smaller input's gradient; half of each on a tie (torch's rule)."""
    return tl.where(a < b, grad_a, tl.where(a > b, grad_b, 0.5 * (grad_a + grad_b)))


@triton.jit
def _policy_objective_fwd_kernel(
    logp_ptr, entropy_ptr, mask_ptr,  # [B, T] contiguous: fp32, fp32, uint8 (bool)
    old_ptr, ref_ptr, selected_ptr,  # [B, T] contiguous: old/ref log-probs, Clip-Cov / KL-Cov selection (uint8)
    adv_ptr, stride_ab, stride_at,  # [B, T] any strides: an expanded [B] vector has stride_at == 0
    seq_log_ratio_ptr,  # [B] fp32, GSPO's per-row mean log-ratio
    pg_weight_ptr, weight_ptr,  # [B] fp32 aggregation weight of a token of row b: policy term, entropy/KL terms
    c_logp_ptr, c_ent_ptr,  # [B, T] fp32 outputs: dL/dlogp, dL/dH (c_ent only if ENTROPY_GRAD)
    partial_ptr,  # [programs, NUM_SUMS] fp32 output: this program's partial sums
    T, clip_low, clip_high, clip_c, ppo_kl_coef, entropy_coeff, kl_coef,
    LOSS_MODE: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_TYPE: tl.constexpr,
    KL_STRAIGHT_THROUGH: tl.constexpr,  # kl_type with a '+' suffix: base value, k2 gradient
    ENTROPY_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_SUMS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = b * T + t
    valid = tl.load(mask_ptr + offs, mask=t < T, other=0) != 0
    # Only valid positions are read: padded ones may hold garbage (NaN included).
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + b * stride_ab + t * stride_at, mask=valid, other=0.0).to(tl.float32)
    pg_weight = tl.load(pg_weight_ptr + b)
    weight = tl.load(weight_ptr + b)

    # Per-token loss value, its derivative w.r.t. logp, and the metric indicators.
    raw_log_ratio = logp - old
    if (LOSS_MODE == VANILLA) or (LOSS_MODE == CISPO):  # verl clamps the log-ratio to +-20
        log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP)
        # torch.clamp passes the gradient at the bounds too (inclusive).
        d_log_ratio = ((raw_log_ratio >= -_LOG_RATIO_CLAMP) & (raw_log_ratio <= _LOG_RATIO_CLAMP)).to(tl.float32)
    else:
        log_ratio = raw_log_ratio
        d_log_ratio = tl.full([BLOCK_T], 1.0, tl.float32)
    if LOSS_MODE == GSPO:  # the ratio's value is the row's, its gradient path the token's own logp
        seq_log_ratio = tl.load(seq_log_ratio_ptr + b)
        ratio = tl.exp(tl.minimum(seq_log_ratio, _GSPO_LOG_RATIO_MAX)) + tl.zeros([BLOCK_T], tl.float32)
        d_ratio = tl.where(seq_log_ratio <= _GSPO_LOG_RATIO_MAX, ratio, 0.0)
    else:
        ratio = tl.exp(log_ratio)
        d_ratio = ratio * d_log_ratio
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    ratio_in_range = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    clipped_lower = tl.zeros([BLOCK_T], tl.int1)

    if LOSS_MODE == CISPO:  # -sg(clip(rho)) A logp
        value = -adv * clipped_ratio * logp
        d_value = -adv * clipped_ratio
        clipped = ratio != clipped_ratio
        ppo_kl = -log_ratio
    elif LOSS_MODE == KL_COV:  # -A rho + ppo_kl_coef |log rho| on the selected tokens
        penalized = tl.load(selected_ptr + offs, mask=valid, other=0) != 0
        abs_kl = tl.abs(log_ratio)
        sign = tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))  # torch: d|x|/dx = 0 at 0
        value = -adv * ratio + tl.where(penalized, ppo_kl_coef * abs_kl, 0.0)
        d_value = -adv * d_ratio + tl.where(penalized, ppo_kl_coef * sign, 0.0)
        clipped = tl.zeros([BLOCK_T], tl.int1)
        ppo_kl = abs_kl
    else:  # vanilla, gspo, clip_cov: max(-A rho, -A clip(rho))
        unclipped = -adv * ratio
        clipped_value = -adv * clipped_ratio
        d_unclipped = -adv * d_ratio
        d_clipped = tl.where(ratio_in_range, d_unclipped, 0.0)
        value = tl.maximum(unclipped, clipped_value)
        d_value = _maximum_grad(unclipped, clipped_value, d_unclipped, d_clipped)
        clipped = clipped_value > unclipped
        ppo_kl = -log_ratio
        if LOSS_MODE == VANILLA:
            if DUAL_CLIP:  # for A < 0 only: min(loss, -A c)
                dual = -adv * clip_c
                negative = adv < 0
                clipped_lower = (value > dual) & negative
                d_value = tl.where(negative, _minimum_grad(value, dual, d_value, 0.0), d_value)
                value = tl.where(negative, tl.minimum(value, dual), value)
        if LOSS_MODE == CLIP_COV:  # the selected tokens' loss is multiplied by 0
            dropped = tl.load(selected_ptr + offs, mask=valid, other=0) != 0
            value = tl.where(dropped, 0.0, value)
            d_value = tl.where(dropped, 0.0, d_value)
            clipped = dropped

    value = tl.where(valid, value, 0.0)
    c_logp = tl.where(valid, pg_weight * d_value, 0.0)
    entropy = tl.load(entropy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    slot = partial_ptr + (b * tl.num_programs(1) + tile) * NUM_SUMS
    tl.store(slot + SUM_PG, tl.sum(pg_weight * value, axis=0))
    tl.store(slot + SUM_ENTROPY, tl.sum(weight * entropy, axis=0))
    tl.store(slot + SUM_CLIPPED, tl.sum((clipped & valid).to(tl.float32), axis=0))
    tl.store(slot + SUM_PPO_KL, tl.sum(tl.where(valid, ppo_kl, 0.0), axis=0))
    tl.store(slot + SUM_CLIPPED_LOWER, tl.sum((clipped_lower & valid).to(tl.float32), axis=0))

    if HAS_REF:  # KL(pi || pi_ref) of d = logp - ref
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        d = logp - ref
        if KL_TYPE == KL_K1:
            kl = d
            d_kl = tl.full([BLOCK_T], 1.0, tl.float32)
        elif KL_TYPE == KL_ABS:
            kl = tl.abs(d)
            d_kl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        elif KL_TYPE == KL_K2:
            kl = 0.5 * d * d
            d_kl = d
        else:  # k3 = exp(-d) + d - 1 with -d clamped to +-20 and the value to +-10; no gradient where clamped
            neg = tl.minimum(tl.maximum(-d, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP)
            exp_neg = tl.exp(neg)
            k3 = exp_neg - neg - 1.0
            kl = tl.minimum(tl.maximum(k3, -_K3_VALUE_CLAMP), _K3_VALUE_CLAMP)
            live = ((-d >= -_LOG_RATIO_CLAMP) & (-d <= _LOG_RATIO_CLAMP)
                    & (k3 >= -_K3_VALUE_CLAMP) & (k3 <= _K3_VALUE_CLAMP))
            d_kl = tl.where(live, 1.0 - exp_neg, 0.0)
        if KL_STRAIGHT_THROUGH:
            d_kl = d
        kl = tl.where(valid, kl, 0.0)
        tl.store(slot + SUM_KL, tl.sum(weight * kl, axis=0))
        c_logp += tl.where(valid, kl_coef * weight * d_kl, 0.0)
    else:
        tl.store(slot + SUM_KL, 0.0)

    tl.store(c_logp_ptr + offs, c_logp, mask=t < T)
    if ENTROPY_GRAD:
        tl.store(c_ent_ptr + offs, tl.where(valid, -entropy_coeff * weight, 0.0), mask=t < T)


# ---------------------------------------------------------------------------------------------
# Host side: per-row weights, pre-passes, launch, autograd.Function
# ---------------------------------------------------------------------------------------------

def _kl_constexprs(kl_type: str) -> Tuple[int, bool]:
    base = kl_type[:-1] if kl_type.endswith("+") else kl_type
    if base not in _KL_TYPES:
        raise ValueError(f"unknown kl_type {kl_type!r}; choose one of k1|kl, abs, k2|mse, k3|low_var_kl "
                         "(optionally with '+')")
    return _KL_TYPES[base], kl_type.endswith("+")


class PolicyObjectiveFunction(torch.autograd.Function):
    """loss = sum of the kernel's per-token contributions; backward = grad_output * (c_logp, c_ent).

    forward(logp, entropy, launch) -> (loss, sums): ``launch`` holds every other kernel argument;
    ``sums`` [NUM_SUMS] are the reduced partial sums (metrics, not differentiable). Pass ``entropy``
    detached when entropy_coeff == 0 (as the reference does): c_ent is computed only when ``entropy``
    needs a gradient.
    """

    @staticmethod
    def forward(ctx, logp, entropy, launch):
        B, T = logp.shape
        entropy_grad = ctx.needs_input_grad[1]
        c_logp = torch.empty((B, T), dtype=torch.float32, device=logp.device)
        c_ent = torch.empty((B, T), dtype=torch.float32, device=logp.device) if entropy_grad else c_logp
        block_t = min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T)
        grid = (B, triton.cdiv(T, block_t))
        partial = torch.zeros((grid[0] * grid[1], NUM_SUMS), dtype=torch.float32, device=logp.device)
        if grid[0] * grid[1] > 0:
            adv = launch["advantages"]
            _policy_objective_fwd_kernel[grid](
                logp, entropy, launch["mask"], launch["old"], launch["ref"], launch["selected"],
                adv, adv.stride(0), adv.stride(1), launch["seq_log_ratio"], launch["pg_weight"], launch["weight"],
                c_logp, c_ent, partial, T, *launch["scalars"],
                ENTROPY_GRAD=entropy_grad, BLOCK_T=block_t, NUM_SUMS=NUM_SUMS, **launch["constexprs"],
                num_warps=NUM_WARPS)
        sums = partial.sum(0)
        named = ObjectiveSums(*sums.unbind())
        loss = named.pg.clone()
        if launch["entropy_coeff"] != 0:
            loss = loss - launch["entropy_coeff"] * named.entropy
        if launch["kl_coef"] != 0:
            loss = loss + launch["kl_coef"] * named.kl
        ctx.mark_non_differentiable(sums)
        ctx.save_for_backward(c_logp, c_ent if entropy_grad else None)
        ctx.logp_dtype, ctx.entropy_dtype = logp.dtype, entropy.dtype
        return loss.to(logp.dtype), sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        c_logp, c_ent = ctx.saved_tensors
        grad_logp = (grad_loss * c_logp).to(ctx.logp_dtype) if ctx.needs_input_grad[0] else None
        grad_entropy = (grad_loss * c_ent).to(ctx.entropy_dtype) if ctx.needs_input_grad[1] else None
        return grad_logp, grad_entropy, None


def triton_policy_objective(logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                            old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], config: LossConfig,
                            norm: Normalizers, step: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``fused_canon.losses.policy_objective`` on the Triton backend: same arguments, same ``(loss, metrics)``.

    logp, entropy [B, T] float (fp32 from stage 1); mask [B, T] bool; advantages [B, T] (an expanded
    [B] view is read in place); old_logp / ref_logp [B, T] or None. Loss modes: ``TRITON_LOSS_MODES``
    (a user-registered mode is the reference's business: ValueError here).
    """
    if config.loss_mode not in TRITON_LOSS_MODES:
        raise ValueError(f"loss_mode {config.loss_mode!r} has no Triton kernel; Triton modes: "
                         f"{sorted(TRITON_LOSS_MODES)} (use fused_canon.losses.policy_objective)")
    check_ref_for_kl(config, ref_logp)
    kl_type, kl_straight_through = _kl_constexprs(config.kl_type)
    B, T = logp.shape
    mode = TRITON_LOSS_MODES[config.loss_mode]
    mask = mask.to(torch.bool)
    valid = mask.to(logp.dtype)
    tokens_per_seq = valid.sum(-1)
    pg_agg_mode = GSPO_AGG_MODE if mode == GSPO else config.loss_agg_mode
    weight = aggregation_weights(tokens_per_seq, config.loss_agg_mode, norm, T).float()
    pg_weight = weight
    if pg_agg_mode != config.loss_agg_mode:
        pg_weight = aggregation_weights(tokens_per_seq, pg_agg_mode, norm, T).float()

    # On-policy (old_logp None): old = logp itself, log-ratio 0, gradient through the ratio only.
    old = logp.detach() if old_logp is None else old_logp.detach()
    seq_log_ratio, selected = pg_weight, mask  # placeholders the kernel does not read in other modes
    if mode in (GSPO, CLIP_COV, KL_COV):
        # The pre-passes see the reference's zero-padded inputs, so they reproduce its numbers exactly.
        # (logp too: the reference receives zeros there, the kernel tolerates anything.)
        padded_logp = zero_padded(logp, mask, logp)
        padded_old = padded_logp if old_logp is None else zero_padded(old_logp, mask, logp)
        padded_adv = zero_padded(advantages, mask, logp)
        if mode == GSPO:
            seq_log_ratio = gspo_sequence_log_ratio(padded_logp - padded_old, valid).float()
        elif mode == CLIP_COV:
            selected = clip_cov_selection(padded_logp, padded_old, padded_adv, valid, config, step)
        else:
            selected = kl_cov_selection(padded_logp, padded_adv, valid, config)

    launch = {
        "mask": mask.contiguous().view(torch.uint8), "old": old.contiguous(),
        "ref": logp.detach() if ref_logp is None else ref_logp.detach().contiguous(),
        "selected": selected.contiguous().view(torch.uint8), "advantages": advantages.detach(),
        "seq_log_ratio": seq_log_ratio, "pg_weight": pg_weight.contiguous(), "weight": weight.contiguous(),
        "scalars": (config.clip_ratio_low, config.clip_ratio_high,
                    config.clip_ratio_c if config.clip_ratio_c is not None else 0.0,
                    config.ppo_kl_coef, config.entropy_coeff, config.kl_coef),
        "constexprs": {"LOSS_MODE": int(mode), "DUAL_CLIP": bool(mode == VANILLA) and config.clip_ratio_c is not None,
                       "HAS_REF": ref_logp is not None, "KL_TYPE": int(kl_type),
                       "KL_STRAIGHT_THROUGH": kl_straight_through},
        "entropy_coeff": config.entropy_coeff,
        "kl_coef": config.kl_coef if ref_logp is not None else 0.0,
    }
    entropy_in = entropy.contiguous() if config.entropy_coeff != 0 else entropy.detach().contiguous()
    loss, sums = PolicyObjectiveFunction.apply(logp.contiguous(), entropy_in, launch)
    sums = ObjectiveSums(*sums.unbind())

    # verl's masked_mean denominators: the local valid count + 1e-8.
    count = tokens_per_seq.sum() + 1e-8
    metrics = {}
    if mode != KL_COV:
        metrics["actor/pg_clipfrac"] = sums.clipped / count
    metrics["actor/ppo_kl"] = sums.ppo_kl / count
    if mode in (VANILLA, GSPO, CISPO):
        metrics["actor/pg_clipfrac_lower"] = sums.clipped_lower / count
    metrics["actor/pg_loss"] = sums.pg
    metrics["actor/entropy"] = sums.entropy
    if ref_logp is not None:
        metrics["actor/kl_loss"] = sums.kl
        metrics["actor/kl_coef"] = torch.tensor(config.kl_coef)
    return loss, metrics


# Ahead-of-time compile registry (tests/test_aot_compile.py): (kernel, signature, constexprs, options).
_FWD_SIGNATURE = {
    "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "mask_ptr": "*u8", "old_ptr": "*fp32", "ref_ptr": "*fp32",
    "selected_ptr": "*u8", "adv_ptr": "*fp32", "stride_ab": "i32", "stride_at": "i32", "seq_log_ratio_ptr": "*fp32",
    "pg_weight_ptr": "*fp32", "weight_ptr": "*fp32", "c_logp_ptr": "*fp32", "c_ent_ptr": "*fp32",
    "partial_ptr": "*fp32", "T": "i32", "clip_low": "fp32", "clip_high": "fp32", "clip_c": "fp32",
    "ppo_kl_coef": "fp32", "entropy_coeff": "fp32", "kl_coef": "fp32",
    "LOSS_MODE": "constexpr", "DUAL_CLIP": "constexpr", "HAS_REF": "constexpr", "KL_TYPE": "constexpr",
    "KL_STRAIGHT_THROUGH": "constexpr", "ENTROPY_GRAD": "constexpr", "BLOCK_T": "constexpr", "NUM_SUMS": "constexpr",
}


def _fwd_constexprs(mode, dual_clip=False, has_ref=True, kl_type=KL_K3, entropy_grad=True, block_t=MAX_BLOCK_T):
    return {"LOSS_MODE": int(mode), "DUAL_CLIP": dual_clip, "HAS_REF": has_ref, "KL_TYPE": int(kl_type),
            "KL_STRAIGHT_THROUGH": False, "ENTROPY_GRAD": entropy_grad, "BLOCK_T": block_t, "NUM_SUMS": NUM_SUMS}


AOT_SIGNATURES = [
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, dual_clip=True), {"num_warps": NUM_WARPS}),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, has_ref=False, entropy_grad=False),
     {"num_warps": NUM_WARPS}),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(GSPO, kl_type=KL_ABS), {"num_warps": NUM_WARPS}),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(CISPO, kl_type=KL_K2), {"num_warps": NUM_WARPS}),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(CLIP_COV), {"num_warps": NUM_WARPS}),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(KL_COV, kl_type=KL_K1), {"num_warps": NUM_WARPS}),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, dual_clip=True, block_t=128),
     {"num_warps": NUM_WARPS}),
]
# Kernels whose AOT build must not spill registers (the test fails if ptxas reports spills).
AOT_NO_SPILL = {"_policy_objective_fwd_kernel"}
