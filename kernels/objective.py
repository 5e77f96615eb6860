"""Stage 2 of a loss call: the per-token policy objective, aggregation and metric sums in one kernel.

``triton_objective`` computes, from tensors and scalars, what the torch reference
``fused_canon.losses.policy_objective`` computes (it defines the semantics) for the built-in loss
modes vanilla, clip_cov, kl_cov, gspo, cispo, sapo; ``fused_canon.losses.triton_policy_objective`` reads a
LossConfig into this launch and turns the sums into verl's metrics.

Every aggregation mode of docs/algorithms.md §1.8 is a weighted sum over the valid tokens with a weight
that depends only on the row: ``agg(v) = sum_{b,t} w_b v_bt`` with ``w_b`` = 1/N_tok (token-mean),
1/N_seq (seq-mean-token-sum), 1/(N_seq (len_b + 1e-8)) (seq-mean-token-mean) or 1/(N_seq L)
(seq-mean-token-sum-norm). So the loss is linear in per-token terms and the kernel can emit, per token,

    its contribution to the loss          w_pg l(logp) - entropy_coeff w H + kl_coef w KL(logp)
    c_logp = dL/dlogp                     w_pg l'(logp) + kl_coef w KL'(logp)
    c_ent  = dL/dH                        -entropy_coeff w

(docs/algorithms.md §8.3) plus the counts of the verl metrics. The forward of ``PolicyObjectiveFunction``
runs the kernel once over [B, T] (one program per (row, BLOCK_T tile)); each program writes its
partial sums to its own slot of a small buffer that ``torch.sum`` reduces (deterministic, no
atomics); the backward only scales the saved ``c_logp`` / ``c_ent`` by ``grad_output``.

What a token needs of its whole row or batch arrives precomputed (O(N) torch pre-passes, run by
the caller with the reference's own functions): the per-row weights, GSPO's sequence mean log-ratio,
and the Clip-Cov / KL-Cov token selection (batch statistics, a seeded random permutation or a
top-k) as a 0/1 mask. A per-token factor of the policy term (the rollout importance-sampling weights,
docs/algorithms.md §1.12) multiplies l and l' after the clip when given (HAS_TOKEN_WEIGHT).

Padded positions are never read (loads are masked by ``mask``), so they may hold garbage: they
contribute nothing and get zero gradient. An empty mask gives loss 0 with zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["triton_objective", "ObjectiveInputs", "ObjectiveSums", "PolicyObjectiveFunction", "objective_loss",
           "token_policy_loss", "token_kl", "VANILLA", "CLIP_COV",
           "KL_COV", "GSPO", "CISPO", "SAPO", "KL_K1", "KL_ABS", "KL_K2", "KL_K3"]

# The loss modes, as values of the kernel's LOSS_MODE constexpr.
VANILLA = tl.constexpr(0)
CLIP_COV = tl.constexpr(1)
KL_COV = tl.constexpr(2)
GSPO = tl.constexpr(3)
CISPO = tl.constexpr(4)
SAPO = tl.constexpr(5)
# The KL estimators, as values of the KL_TYPE constexpr.
KL_K1 = tl.constexpr(0)
KL_ABS = tl.constexpr(1)
KL_K2 = tl.constexpr(2)
KL_K3 = tl.constexpr(3)


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
# tokens per thread that set a launch's warps: 4 tokens per thread compiles without spills on sm_80 /
# sm_90 for every mode (at 512 tokens, 8 and 16 warps make ptxas aim for occupancy and spill a few bytes
# in some modes; a 128-token tile at 4 warps, 1 token per thread, spills 8 B on Triton 3.6).
MAX_BLOCK_T = 512
TOKENS_PER_THREAD = 4


def _num_warps(block_t: int) -> int:
    """Warps for a tile of block_t tokens: TOKENS_PER_THREAD tokens per thread, 1 to 4 warps."""
    return max(1, min(4, block_t // (32 * TOKENS_PER_THREAD)))


@triton.jit
def _maximum_grad(a, b, grad_a, grad_b):
    """d torch.maximum(a, b): the larger input's gradient; half of each on a tie (torch's rule)."""
    return tl.where(a > b, grad_a, tl.where(a < b, grad_b, 0.5 * (grad_a + grad_b)))


@triton.jit
def _minimum_grad(a, b, grad_a, grad_b):
    """d torch.minimum(a, b): the smaller input's gradient; half of each on a tie (torch's rule)."""
    return tl.where(a < b, grad_a, tl.where(a > b, grad_b, 0.5 * (grad_a + grad_b)))


@triton.jit
def token_policy_loss(logp, old, adv, seq_log_ratio, selected, token_weight, ratio_low, ratio_high, clip_c,
                      ppo_kl_coef, log_ratio_clamp, gspo_log_ratio_max, sapo_tau_pos, sapo_tau_neg,
                      LOSS_MODE: tl.constexpr,
                      CISPO_ABSOLUTE: tl.constexpr, DUAL_CLIP: tl.constexpr, TWO_SIDED: tl.constexpr,
                      HAS_TOKEN_WEIGHT: tl.constexpr):
    """The policy term of tokens (scalars or vectors alike): (value l, dl/dlogp, clipped, ppo_kl,
    clipped_lower), the last three the metric indicators. ``seq_log_ratio`` is read by GSPO only (the
    row's mean log-ratio), ``selected`` by Clip-Cov / KL-Cov only (their token selection),
    ``token_weight`` only with HAS_TOKEN_WEIGHT (the rollout IS weights, after the clip), the gate
    temperatures by SAPO only (A > 0, A <= 0). Shared by the
    objective kernel and the fused loss kernel (logits_policy_loss.py): one implementation of the losses."""
    zero = tl.zeros_like(logp)  # the shape of the tokens, whatever their values
    raw_log_ratio = logp - old
    if (LOSS_MODE == VANILLA) or (LOSS_MODE == CISPO) or (LOSS_MODE == SAPO):  # verl clamps the log-ratio to +-20
        log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -log_ratio_clamp), log_ratio_clamp)
        # torch.clamp passes the gradient at the bounds too (inclusive).
        d_log_ratio = ((raw_log_ratio >= -log_ratio_clamp) & (raw_log_ratio <= log_ratio_clamp)).to(tl.float32)
    else:
        log_ratio = raw_log_ratio
        d_log_ratio = zero + 1.0
    if LOSS_MODE == GSPO:  # the ratio's value is the row's, its gradient path the token's own logp
        ratio = tl.exp(tl.minimum(seq_log_ratio, gspo_log_ratio_max)) + zero
        d_ratio = tl.where(seq_log_ratio <= gspo_log_ratio_max, ratio, 0.0)
    else:
        ratio = tl.exp(log_ratio)
        d_ratio = ratio * d_log_ratio
    clipped_ratio = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    ratio_in_range = (ratio >= ratio_low) & (ratio <= ratio_high)
    clipped_lower = zero != 0.0

    if LOSS_MODE == CISPO:  # -sg(clip(rho)) A logp
        value = -adv * clipped_ratio * logp
        d_value = -adv * clipped_ratio
        if CISPO_ABSOLUTE:
            clipped = (ratio > ratio_high) & (adv > 0)
        else:
            clipped = ratio != clipped_ratio
        ppo_kl = -log_ratio
    elif LOSS_MODE == SAPO:  # -sigmoid(tau (rho - 1)) (4 / tau) A; d/dlogp = -A 4 s (1 - s) rho
        tau = tl.where(adv > 0, sapo_tau_pos, sapo_tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        value = -adv * gate * (4.0 / tau)
        d_value = -adv * 4.0 * gate * (1.0 - gate) * d_ratio
        clipped = zero != 0.0
        ppo_kl = -log_ratio
    elif LOSS_MODE == KL_COV:  # -A rho + ppo_kl_coef |log rho| on the selected tokens
        abs_kl = tl.abs(log_ratio)
        sign = tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))  # torch: d|x|/dx = 0 at 0
        value = -adv * ratio + tl.where(selected, ppo_kl_coef * abs_kl, 0.0)
        d_value = -adv * d_ratio + tl.where(selected, ppo_kl_coef * sign, 0.0)
        clipped = zero != 0.0
        ppo_kl = abs_kl
    else:  # vanilla, gspo, clip_cov: max(-A rho, -A clip(rho))
        unclipped = -adv * ratio
        clipped_value = -adv * clipped_ratio
        d_unclipped = -adv * d_ratio
        d_clipped = tl.where(ratio_in_range, d_unclipped, 0.0)
        clipped = clipped_value > unclipped
        ppo_kl = -log_ratio
        if DUAL_CLIP and TWO_SIDED:  # max(-A min(rho, c), -A clip(rho)); torch.clamp passes the gradient at c
            capped = -adv * tl.minimum(ratio, clip_c)
            d_capped = tl.where(ratio <= clip_c, d_unclipped, 0.0)
            value = tl.maximum(capped, clipped_value)
            d_value = _maximum_grad(capped, clipped_value, d_capped, d_clipped)
            clipped_lower = ratio > clip_c
        else:
            value = tl.maximum(unclipped, clipped_value)
            d_value = _maximum_grad(unclipped, clipped_value, d_unclipped, d_clipped)
        if LOSS_MODE == VANILLA:
            if DUAL_CLIP and not TWO_SIDED:  # for A < 0 only: min(loss, -A c)
                dual = -adv * clip_c
                negative = adv < 0
                clipped_lower = (value > dual) & negative
                d_value = tl.where(negative, _minimum_grad(value, dual, d_value, 0.0), d_value)
                value = tl.where(negative, tl.minimum(value, dual), value)
        if LOSS_MODE == CLIP_COV:  # the selected tokens' loss is multiplied by 0
            value = tl.where(selected, 0.0, value)
            d_value = tl.where(selected, 0.0, d_value)
            clipped = selected

    if HAS_TOKEN_WEIGHT:  # after the clip; the metric counts above are of the unweighted loss
        value = value * token_weight
        d_value = d_value * token_weight
    # A NaN log-prob gives a NaN loss, as in the reference: the clamps above (tl.minimum and tl.maximum
    # return the non-NaN operand) would turn it into a finite number.
    value = tl.where(logp != logp, logp, value)
    return value, d_value, clipped, ppo_kl, clipped_lower


@triton.jit
def token_kl(d, raw_log_ratio, log_ratio_clamp, k3_log_ratio_clamp, k3_value_clamp, KL_TYPE: tl.constexpr,
             KL_STRAIGHT_THROUGH: tl.constexpr, KL_BIAS_CORRECTION: tl.constexpr):
    """KL(pi || pi_ref) of tokens from d = logp - ref: (value, d value / d logp). With KL_BIAS_CORRECTION
    (TRL's use_bias_correction_kl) the term times the token's ratio exp(clamp(logp - old, +-log_ratio_clamp)),
    ``raw_log_ratio`` = logp - old (read only then)."""
    if KL_TYPE == KL_K1:
        kl = d
        d_kl = tl.zeros_like(d) + 1.0
    elif KL_TYPE == KL_ABS:
        kl = tl.abs(d)
        d_kl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif KL_TYPE == KL_K2:
        kl = 0.5 * d * d
        d_kl = d
    else:  # k3 = exp(-d) + d - 1 with -d clamped to +-20 and the value to +-10; no gradient where clamped
        neg = tl.minimum(tl.maximum(-d, -k3_log_ratio_clamp), k3_log_ratio_clamp)
        exp_neg = tl.exp(neg)
        k3 = exp_neg - neg - 1.0
        kl = tl.minimum(tl.maximum(k3, -k3_value_clamp), k3_value_clamp)
        live = ((-d >= -k3_log_ratio_clamp) & (-d <= k3_log_ratio_clamp)
                & (k3 >= -k3_value_clamp) & (k3 <= k3_value_clamp))
        d_kl = tl.where(live, 1.0 - exp_neg, 0.0)
    if KL_STRAIGHT_THROUGH:
        d_kl = d
    if KL_BIAS_CORRECTION:  # d(KL rho) = d_KL rho + KL rho (inside the clamp; torch.clamp's bounds inclusive)
        kl_ratio = tl.exp(tl.minimum(tl.maximum(raw_log_ratio, -log_ratio_clamp), log_ratio_clamp))
        in_clamp = (raw_log_ratio >= -log_ratio_clamp) & (raw_log_ratio <= log_ratio_clamp)
        d_kl = d_kl * kl_ratio + tl.where(in_clamp, kl * kl_ratio, 0.0)
        kl = kl * kl_ratio
    return kl, d_kl


@triton.jit
def _policy_objective_fwd_kernel(
    logp_ptr, entropy_ptr, mask_ptr,  # [B, T] contiguous: fp32, fp32, uint8 (bool)
    old_ptr, ref_ptr, selected_ptr,  # [B, T] contiguous: old/ref log-probs, Clip-Cov / KL-Cov selection (uint8)
    adv_ptr, stride_ab, stride_at,  # [B, T] any strides: an expanded [B] vector has stride_at == 0
    seq_log_ratio_ptr,  # [B] fp32, GSPO's per-row mean log-ratio
    token_weight_ptr,  # [B, T] contiguous fp32: the policy term's per-token factor (rollout IS weights)
    pg_weight_ptr, weight_ptr,  # [B] fp32 aggregation weight of a token of row b: policy term, entropy/KL terms
    c_logp_ptr, c_ent_ptr,  # [B, T] fp32 outputs: dL/dlogp, dL/dH (c_ent only if ENTROPY_GRAD)
    partial_ptr,  # [programs, NUM_SUMS] fp32 output: this program's partial sums
    T, ratio_low, ratio_high, clip_c, ppo_kl_coef, entropy_coeff, kl_coef,  # ratio_low/high: the clip bounds
    log_ratio_clamp, gspo_log_ratio_max,  # the reference's clamps (fused_canon/losses.py)
    k3_log_ratio_clamp, k3_value_clamp,  # k3's clamps (inf: off)
    sapo_tau_pos, sapo_tau_neg,  # sapo's gate temperatures (A > 0, A <= 0)
    LOSS_MODE: tl.constexpr,
    CISPO_ABSOLUTE: tl.constexpr,  # cispo's absolute cap (TRL): count clipped tokens only where A > 0
    DUAL_CLIP: tl.constexpr,
    TWO_SIDED: tl.constexpr,  # the dual clip caps rho in the unclipped branch for every token (TRL's delta)
    HAS_REF: tl.constexpr,
    KL_TYPE: tl.constexpr,
    KL_STRAIGHT_THROUGH: tl.constexpr,  # kl_type with a '+' suffix: base value, k2 gradient
    KL_BIAS_CORRECTION: tl.constexpr,  # the KL term times the token's ratio exp(clamp(logp - old, +-20)) (TRL)
    ENTROPY_GRAD: tl.constexpr,
    HAS_TOKEN_WEIGHT: tl.constexpr,
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

    if (LOSS_MODE == CLIP_COV) or (LOSS_MODE == KL_COV):
        selected = tl.load(selected_ptr + offs, mask=valid, other=0) != 0
    else:
        selected = valid  # not read
    if LOSS_MODE == GSPO:
        seq_log_ratio = tl.load(seq_log_ratio_ptr + b)
    else:
        seq_log_ratio = 0.0  # not read
    if HAS_TOKEN_WEIGHT:
        token_weight = tl.load(token_weight_ptr + offs, mask=valid, other=0.0)
    else:
        token_weight = 1.0  # not read
    value, d_value, clipped, ppo_kl, clipped_lower = token_policy_loss(
        logp, old, adv, seq_log_ratio, selected, token_weight, ratio_low, ratio_high, clip_c, ppo_kl_coef,
        log_ratio_clamp, gspo_log_ratio_max, sapo_tau_pos, sapo_tau_neg, LOSS_MODE, CISPO_ABSOLUTE, DUAL_CLIP,
        TWO_SIDED, HAS_TOKEN_WEIGHT)
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
        kl, d_kl = token_kl(logp - ref, logp - old, log_ratio_clamp, k3_log_ratio_clamp, k3_value_clamp, KL_TYPE,
                            KL_STRAIGHT_THROUGH, KL_BIAS_CORRECTION)
        kl = tl.where(valid, kl, 0.0)
        tl.store(slot + SUM_KL, tl.sum(weight * kl, axis=0))
        c_logp += tl.where(valid, kl_coef * weight * d_kl, 0.0)
    else:
        tl.store(slot + SUM_KL, 0.0)

    tl.store(c_logp_ptr + offs, c_logp, mask=t < T)
    if ENTROPY_GRAD:
        tl.store(c_ent_ptr + offs, tl.where(valid, -entropy_coeff * weight, 0.0), mask=t < T)


# ---------------------------------------------------------------------------------------------
# Host side: launch and autograd.Function
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectiveInputs:
    """Every input of the objective kernel but the two differentiable vectors logp and entropy."""

    mask: torch.Tensor  # [B, T] bool
    advantages: torch.Tensor  # [B, T] float, any strides (an expanded [B] vector is read in place)
    old: Optional[torch.Tensor]  # [B, T] old log-probs; None: on-policy (logp itself, detached)
    ref: Optional[torch.Tensor]  # [B, T] reference log-probs, or None: no KL term
    selected: Optional[torch.Tensor]  # [B, T] bool: the tokens Clip-Cov drops / KL-Cov penalises
    seq_log_ratio: Optional[torch.Tensor]  # [B] fp32: GSPO's per-row mean log-ratio
    token_weight: Optional[torch.Tensor]  # [B, T]: the policy term's per-token factor, or None (1)
    pg_weight: torch.Tensor  # [B] fp32: aggregation weight of a token of row b in the policy term
    weight: torch.Tensor  # [B] fp32: the same in the entropy and KL terms
    loss_mode: int  # VANILLA | CLIP_COV | KL_COV | GSPO | CISPO | SAPO
    kl_type: int  # KL_K1 | KL_ABS | KL_K2 | KL_K3 (read only with ref)
    kl_straight_through: bool  # the value of kl_type with the k2 gradient
    ratio_low: float  # the clip bounds of the ratio: 1 - clip_ratio_low, 1 + clip_ratio_high (cispo: its own)
    ratio_high: float
    cispo_absolute: bool  # cispo's absolute cap: clipped tokens counted where A > 0 only (TRL)
    clip_c: Optional[float]  # dual clip c (vanilla; gspo when two-sided); None: off
    dual_clip_two_sided: bool  # c caps rho for every token (TRL's delta), not the loss of A < 0 tokens
    ppo_kl_coef: float
    entropy_coeff: float
    kl_coef: float
    log_ratio_clamp: float  # |log rho| bound of vanilla and cispo
    gspo_log_ratio_max: float  # upper bound of GSPO's sequence log-ratio
    k3_log_ratio_clamp: float  # |ref - logp| bound of k3 (inf: none)
    k3_value_clamp: float  # |k3| bound (inf: none)
    kl_bias_correction: bool = False  # the KL term times the token's clamped ratio (not gspo: its ratio is the row's)
    sapo_tau_pos: float = 1.0  # sapo's gate temperatures
    sapo_tau_neg: float = 1.05


def objective_loss(sums: ObjectiveSums, inputs: ObjectiveInputs) -> torch.Tensor:
    """The loss from the kernels' sums: pg - entropy_coeff entropy + kl_coef kl (a term with coefficient 0
    is left out, so that its NaN or inf cannot reach the loss)."""
    loss = sums.pg.clone()
    if inputs.entropy_coeff != 0:
        loss = loss - inputs.entropy_coeff * sums.entropy
    if inputs.kl_coef != 0:
        loss = loss + inputs.kl_coef * sums.kl
    return loss


class PolicyObjectiveFunction(torch.autograd.Function):
    """loss = sum of the kernel's per-token contributions; backward = grad_output * (c_logp, c_ent).

    forward(logp, entropy, inputs) -> (loss, sums): ``sums`` [NUM_SUMS] are the reduced partial sums
    (metrics, not differentiable). c_ent is computed only when ``entropy`` needs a gradient: pass it
    detached when entropy_coeff == 0, as the reference does.
    """

    @staticmethod
    def forward(ctx, logp, entropy, inputs: ObjectiveInputs):
        B, T = logp.shape
        entropy_grad = ctx.needs_input_grad[1]
        c_logp = torch.empty((B, T), dtype=torch.float32, device=logp.device)
        c_ent = torch.empty((B, T), dtype=torch.float32, device=logp.device) if entropy_grad else c_logp
        block_t = min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T)
        grid = (B, triton.cdiv(T, block_t))
        partial = torch.zeros((grid[0] * grid[1], NUM_SUMS), dtype=torch.float32, device=logp.device)
        if grid[0] * grid[1] > 0:
            adv = inputs.advantages
            has_ref = inputs.ref is not None
            old = inputs.old.contiguous() if inputs.old is not None else logp.detach()  # on-policy: ratio 1
            mask = inputs.mask.contiguous().view(torch.uint8)
            # Placeholders for the pointers a mode does not read.
            ref = inputs.ref.detach().contiguous() if has_ref else logp
            selected = inputs.selected.contiguous().view(torch.uint8) if inputs.selected is not None else mask
            seq_log_ratio = inputs.seq_log_ratio if inputs.seq_log_ratio is not None else inputs.pg_weight
            has_token_weight = inputs.token_weight is not None
            token_weight = inputs.token_weight.detach().float().contiguous() if has_token_weight else logp
            _policy_objective_fwd_kernel[grid](
                logp, entropy, mask, old, ref, selected,
                adv, adv.stride(0), adv.stride(1), seq_log_ratio, token_weight, inputs.pg_weight.contiguous(),
                inputs.weight.contiguous(), c_logp, c_ent, partial, T,
                inputs.ratio_low, inputs.ratio_high, inputs.clip_c if inputs.clip_c is not None else 0.0,
                inputs.ppo_kl_coef, inputs.entropy_coeff, inputs.kl_coef,
                inputs.log_ratio_clamp, inputs.gspo_log_ratio_max, inputs.k3_log_ratio_clamp, inputs.k3_value_clamp,
                inputs.sapo_tau_pos, inputs.sapo_tau_neg,
                LOSS_MODE=int(inputs.loss_mode), CISPO_ABSOLUTE=inputs.cispo_absolute, DUAL_CLIP=inputs.clip_c is not None,
                TWO_SIDED=inputs.dual_clip_two_sided, HAS_REF=has_ref,
                KL_TYPE=int(inputs.kl_type), KL_STRAIGHT_THROUGH=inputs.kl_straight_through,
                KL_BIAS_CORRECTION=inputs.kl_bias_correction,
                ENTROPY_GRAD=entropy_grad, HAS_TOKEN_WEIGHT=has_token_weight, BLOCK_T=block_t, NUM_SUMS=NUM_SUMS,
                num_warps=_num_warps(block_t))
        sums = partial.sum(0)
        loss = objective_loss(ObjectiveSums(*sums.unbind()), inputs)
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


def triton_objective(logp: torch.Tensor, entropy: torch.Tensor,
                     inputs: ObjectiveInputs) -> Tuple[torch.Tensor, ObjectiveSums]:
    """The loss (differentiable w.r.t. logp, and w.r.t. entropy when it requires grad) and the kernel's sums.

    logp, entropy [B, T] fp32 (padded positions are never read); ``inputs`` everything else. The loss is
    sums.pg - entropy_coeff sums.entropy + kl_coef sums.kl."""
    loss, sums = PolicyObjectiveFunction.apply(logp.contiguous(), entropy.contiguous(), inputs)
    return loss, ObjectiveSums(*sums.unbind())


# Ahead-of-time compile registry (tests/test_aot_compile.py): (kernel, signature, constexprs, options).
_FWD_SIGNATURE = {
    "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "mask_ptr": "*u8", "old_ptr": "*fp32", "ref_ptr": "*fp32",
    "selected_ptr": "*u8", "adv_ptr": "*fp32", "stride_ab": "i32", "stride_at": "i32", "seq_log_ratio_ptr": "*fp32",
    "token_weight_ptr": "*fp32",
    "pg_weight_ptr": "*fp32", "weight_ptr": "*fp32", "c_logp_ptr": "*fp32", "c_ent_ptr": "*fp32",
    "partial_ptr": "*fp32", "T": "i32", "ratio_low": "fp32", "ratio_high": "fp32", "clip_c": "fp32",
    "ppo_kl_coef": "fp32", "entropy_coeff": "fp32", "kl_coef": "fp32",
    "log_ratio_clamp": "fp32", "gspo_log_ratio_max": "fp32", "k3_log_ratio_clamp": "fp32", "k3_value_clamp": "fp32",
    "sapo_tau_pos": "fp32", "sapo_tau_neg": "fp32",
    "LOSS_MODE": "constexpr", "CISPO_ABSOLUTE": "constexpr", "DUAL_CLIP": "constexpr", "TWO_SIDED": "constexpr", "HAS_REF": "constexpr", "KL_TYPE": "constexpr",
    "KL_STRAIGHT_THROUGH": "constexpr", "KL_BIAS_CORRECTION": "constexpr", "ENTROPY_GRAD": "constexpr", "HAS_TOKEN_WEIGHT": "constexpr", "BLOCK_T": "constexpr", "NUM_SUMS": "constexpr",
}


def _fwd_constexprs(mode, dual_clip=False, has_ref=True, kl_type=KL_K3, entropy_grad=True, block_t=MAX_BLOCK_T,
                    token_weight=False, two_sided=False, kl_bias_correction=False):
    return {"LOSS_MODE": int(mode), "CISPO_ABSOLUTE": False, "DUAL_CLIP": dual_clip, "TWO_SIDED": two_sided, "HAS_REF": has_ref, "KL_TYPE": int(kl_type),
            "KL_STRAIGHT_THROUGH": False, "KL_BIAS_CORRECTION": kl_bias_correction, "ENTROPY_GRAD": entropy_grad, "HAS_TOKEN_WEIGHT": token_weight, "BLOCK_T": block_t, "NUM_SUMS": NUM_SUMS}


_FULL_TILE_OPTIONS = {"num_warps": _num_warps(MAX_BLOCK_T)}
AOT_SIGNATURES = [
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, dual_clip=True), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, dual_clip=True, token_weight=True),
     _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, has_ref=False, entropy_grad=False),
     _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(GSPO, kl_type=KL_ABS), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(GSPO, dual_clip=True, two_sided=True),
     _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(CISPO, kl_type=KL_K2), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(CLIP_COV), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(SAPO, kl_bias_correction=True), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, dual_clip=True, two_sided=True,
                                                                   kl_bias_correction=True), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(KL_COV, kl_type=KL_K1), _FULL_TILE_OPTIONS),
    (_policy_objective_fwd_kernel, _FWD_SIGNATURE, _fwd_constexprs(VANILLA, dual_clip=True, block_t=128),
     {"num_warps": _num_warps(128)}),
]
# Kernels whose AOT build must not spill registers (the test fails if ptxas reports spills).
AOT_NO_SPILL = {"_policy_objective_fwd_kernel"}
