"""Outcome advantages of the built-in estimators (grpo, dr_grpo, rloo, canon) in one Triton kernel.

``triton_group_advantages`` computes what ``fused_canon.estimators.ESTIMATORS[name]`` computes
(docs/algorithms.md §1.1-1.3, §2.3-2.4, §3; the torch reference defines the semantics) from tensors and
scalars; ``fused_canon.estimators.triton_advantages`` reads an AdvantageConfig into this launch.

Inputs: the rewards, CANON's per-response sort key, the rows grouped in batch order (``order``: the
rows of a group are contiguous there; groups need not be contiguous in the batch), each group's start
in ``order`` and its size. Kernel: one program per group holds the group's rewards (and CANON sort
keys) in a BLOCK_N vector, BLOCK_N = next power of two of the largest group (at most
MAX_GROUP_SIZE), and computes, in float64 (as the torch reference: O(B) work, and float32 loses a
reward scale of 1e30 to overflow and small spreads to cancellation),

  * mean and unbiased std (std 1 and baseline 0 for singletons: verl's rules), the std as
    scale * sqrt(sum((r - mean) / scale)^2 / (n - 1)) with scale = max |r - mean|, so that no square
    of a float64 reward overflows;
  * ranks instead of a sort: rank_i = #{j : x_j < x_i or (x_j == x_i and j < i)} is the position of
    row i in the stable ascending order (ties by batch order, as the reference's composite sort).
    The pairwise comparisons run in [BLOCK_N, BLOCK_J] tiles, so registers stay bounded for any
    group size; O(n^2) work per group is nothing next to the O(N V) of the logits;
  * CANON's split: high = (metric rank >= floor(n/2));
  * quantiles (torch.quantile's linear interpolation) as "the value whose reward rank is m",
    within the group, within each CANON half, or leaving row i out (RLOO: position m of the
    reduced run is position m or m + 1 of the full run, so two candidates per interpolation end);
  * the estimator's final formula, written back to the row's batch position.

The per-response CANON metric (masked mean entropy or length) stays in torch
(``fused_canon.estimators._canon_metric``, three elementwise/row-sum ops): a kernel would not beat it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_group_advantages", "GRPO", "DR_GRPO", "RLOO", "CANON", "MAX_GROUP_SIZE"]

# The estimators, as values of the kernel's ESTIMATOR constexpr.
GRPO = tl.constexpr(0)
DR_GRPO = tl.constexpr(1)
RLOO = tl.constexpr(2)
CANON = tl.constexpr(3)

# Largest group one program holds in registers (BLOCK_N vectors of fp64 / int32 at up to 32 warps).
MAX_GROUP_SIZE = 4096
# Elements of one pairwise-comparison tile [BLOCK_N, BLOCK_J].
PAIR_TILE = 4096


@triton.jit
def _value_at_rank(values, rank, m, where):
    """The value whose rank is m among the lanes in ``where`` (ranks are a permutation: one lane)."""
    return tl.sum(tl.where(where & (rank == m), values, 0.0), axis=0)


@triton.jit
def _quantile_of_ranked(values, rank, where, n, k):
    """torch.quantile(values[where], k) with linear interpolation, from the ranks; 0 for an empty set."""
    pos = k * (tl.maximum(n, 1) - 1).to(tl.float64)
    lo = tl.floor(pos)
    hi = tl.ceil(pos)
    x_lo = _value_at_rank(values, rank, lo.to(tl.int32), where)
    x_hi = _value_at_rank(values, rank, hi.to(tl.int32), where)
    return tl.where(n > 0, x_lo + (pos - lo) * (x_hi - x_lo), 0.0)


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, key_ptr,  # [B] float: rewards, CANON sort key (metric)
    order_ptr,  # [B] int64: row ids grouped by group, batch order inside a group
    group_start_ptr, group_size_ptr,  # [B] int64, size 0 after the last group
    out_ptr,  # [B] fp64 advantages
    quantile_k, epsilon, token_budget, alpha, beta, inter_weight,
    ESTIMATOR: tl.constexpr,
    QUANTILE: tl.constexpr,  # baseline="quantile"
    NORM_BY_STD: tl.constexpr,  # grpo
    FAVOR_HIGH: tl.constexpr,  # canon: alpha multiplies the high half's own reward
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    group = tl.program_id(0)
    start = tl.load(group_start_ptr + group)
    n = tl.load(group_size_ptr + group).to(tl.int32)
    if n == 0:  # one program per possible group (estimators.Groups): the groups after the last are empty
        return
    i = tl.arange(0, BLOCK_N)
    live = i < n
    rows = tl.load(order_ptr + start + i, mask=live, other=0)
    r = tl.load(rewards_ptr + rows, mask=live, other=0.0).to(tl.float64)
    nf = n.to(tl.float64)
    singleton = n == 1

    mean = tl.sum(r, axis=0) / nf
    centred = tl.where(live, r - mean, 0.0)
    scale = tl.max(tl.abs(centred), axis=0)
    scale = tl.where(scale > 0.0, scale, 1.0)
    scaled = centred / scale
    std = tl.where(singleton, 1.0,
                   scale * tl.sqrt(tl.sum(scaled * scaled, axis=0) / tl.maximum(n - 1, 1).to(tl.float64)))

    # Ranks by reward (quantiles) and by the CANON key, stable: ties go to the lower batch position.
    NEED_REWARD_RANK: tl.constexpr = QUANTILE and ESTIMATOR != CANON
    NEED_KEY_RANK: tl.constexpr = ESTIMATOR == CANON
    reward_rank = tl.zeros([BLOCK_N], tl.int32)
    key_rank = tl.zeros([BLOCK_N], tl.int32)
    key = tl.zeros([BLOCK_N], tl.float64)
    if NEED_KEY_RANK:
        key = tl.load(key_ptr + rows, mask=live, other=0.0).to(tl.float64)
    if NEED_REWARD_RANK or NEED_KEY_RANK:
        for j0 in range(0, n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_live = (j < n)[None, :]
            j_rows = tl.load(order_ptr + start + j, mask=j < n, other=0)
            before = j[None, :] < i[:, None]
            if NEED_REWARD_RANK:
                r_j = tl.load(rewards_ptr + j_rows, mask=j < n, other=0.0).to(tl.float64)[None, :]
                smaller = (r_j < r[:, None]) | ((r_j == r[:, None]) & before)
                reward_rank += tl.sum((j_live & smaller).to(tl.int32), axis=1)
            if NEED_KEY_RANK:
                k_j = tl.load(key_ptr + j_rows, mask=j < n, other=0.0).to(tl.float64)[None, :]
                smaller = (k_j < key[:, None]) | ((k_j == key[:, None]) & before)
                key_rank += tl.sum((j_live & smaller).to(tl.int32), axis=1)

    if ESTIMATOR == CANON:
        half = n // 2
        high = key_rank >= half
        n_high = n - half
        if QUANTILE:
            # Reward rank inside the own half. A row j is high iff (key_j, j) >= (key, position) of the
            # row of key rank floor(n/2): the split recomputed from two scalars, no scratch memory.
            pivot_key = tl.sum(tl.where(live & (key_rank == half), key, 0.0), axis=0)
            pivot_pos = tl.sum(tl.where(live & (key_rank == half), i, 0), axis=0)
            half_rank = tl.zeros([BLOCK_N], tl.int32)
            for j0 in range(0, n, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                j_rows = tl.load(order_ptr + start + j, mask=j < n, other=0)
                r_j = tl.load(rewards_ptr + j_rows, mask=j < n, other=0.0).to(tl.float64)
                k_j = tl.load(key_ptr + j_rows, mask=j < n, other=0.0).to(tl.float64)
                high_j = (k_j > pivot_key) | ((k_j == pivot_key) & (j >= pivot_pos))
                same_half = (high_j[None, :] == high[:, None]) & (j < n)[None, :]
                smaller = (r_j[None, :] < r[:, None]) | ((r_j[None, :] == r[:, None]) & (j[None, :] < i[:, None]))
                half_rank += tl.sum((same_half & smaller).to(tl.int32), axis=1)
            baseline_high = _quantile_of_ranked(r, half_rank, live & high, n_high, quantile_k)
            baseline_low = _quantile_of_ranked(r, half_rank, live & ~high, half, quantile_k)
        else:
            baseline_high = tl.sum(tl.where(live & high, r, 0.0), axis=0) / tl.maximum(n_high, 1).to(tl.float64)
            baseline_low = tl.sum(tl.where(live & ~high, r, 0.0), axis=0) / tl.maximum(half, 1).to(tl.float64)
        baseline_own = tl.where(singleton, 0.0, tl.where(high, baseline_high, baseline_low))
        baseline_other = tl.where(singleton, 0.0, tl.where(high, baseline_low, baseline_high))
        if FAVOR_HIGH:
            favored = high
        else:
            favored = ~high
        own_scale = tl.where(favored, alpha, 1.0)
        other_scale = tl.where(favored, 1.0, alpha)
        inter = own_scale * r - other_scale * baseline_other + tl.where(high, beta, -beta)
        intra = r - baseline_own
        advantage = (inter_weight * inter + (1.0 - inter_weight) * intra) / token_budget
    elif ESTIMATOR == RLOO:  # r - baseline of the other responses
        if QUANTILE:
            pos = quantile_k * tl.maximum(n - 2, 0).to(tl.float64)
            lo = tl.floor(pos)
            hi = tl.ceil(pos)
            lo_i = lo.to(tl.int32)
            hi_i = hi.to(tl.int32)
            # Without row i, reduced position m is full position m + (m >= rank_i), clamped to n - 1.
            x_lo = tl.where(lo_i >= reward_rank,
                            _value_at_rank(r, reward_rank, tl.minimum(lo_i + 1, n - 1), live),
                            _value_at_rank(r, reward_rank, tl.minimum(lo_i, n - 1), live))
            x_hi = tl.where(hi_i >= reward_rank,
                            _value_at_rank(r, reward_rank, tl.minimum(hi_i + 1, n - 1), live),
                            _value_at_rank(r, reward_rank, tl.minimum(hi_i, n - 1), live))
            baseline = x_lo + (pos - lo) * (x_hi - x_lo)
        else:
            baseline = (tl.sum(r, axis=0) - r) / tl.maximum(n - 1, 1).to(tl.float64)
        advantage = r - tl.where(singleton, 0.0, baseline)
    else:  # grpo, dr_grpo: r - group baseline (0 for a singleton)
        if QUANTILE:
            baseline = _quantile_of_ranked(r, reward_rank, live, n, quantile_k)
        else:
            baseline = mean
        advantage = r - tl.where(singleton, 0.0, baseline)
        if ESTIMATOR == DR_GRPO:
            advantage = advantage / token_budget
        elif NORM_BY_STD:
            advantage = advantage / (std + epsilon)
    tl.store(out_ptr + rows, advantage, mask=live)


def _num_warps(block_n: int) -> int:
    # 4096-response groups: 16 warps spill on Triton 3.8/3.9 (CANON quantile), 8 on 3.6 (RLOO
    # quantile, sm_90); 32 warps fit on every supported version (ptxas -v).
    return 4 if block_n <= 256 else (8 if block_n <= 1024 else (16 if block_n <= 2048 else 32))


def triton_group_advantages(rewards: torch.Tensor, key: torch.Tensor, order: torch.Tensor, group_start: torch.Tensor,
                            group_size: torch.Tensor, largest_group: int, *, estimator: int, quantile: bool,
                            quantile_k: float, epsilon: float, norm_by_std: bool, token_budget: float,
                            canon_alpha: float, canon_beta: float, inter_weight: float,
                            favor_high: bool) -> torch.Tensor:
    """Advantages [B] fp64 of ``estimator`` (GRPO, DR_GRPO, RLOO or CANON), one program per prompt group,
    computed in fp64.

    rewards [B] fp32 or fp64; key [B] fp32 or fp64: CANON's per-response sort key (read only for CANON);
    order [B] int64: the row ids grouped by group, batch order inside a group; group_start / group_size [G]
    int64: each group's first position in ``order`` and its size (G programs; a group of size 0 returns at
    once, so G may be any bound of the number of groups, such as B); largest_group >= max(group_size), an
    upper bound such as the batch size (sizes the block; at most MAX_GROUP_SIZE: the caller need not
    read the group sizes back to the host). The scalars are the estimators' (docs/algorithms.md §1-3):
    ``quantile`` the QAE baseline at ``quantile_k``; ``inter_weight`` CANON's inter-group weight at
    this step; ``favor_high`` whether alpha multiplies the high half's own reward.
    """
    if largest_group > MAX_GROUP_SIZE:
        raise ValueError(f"a prompt group has {largest_group} responses; the Triton estimator kernel holds at most "
                         f"MAX_GROUP_SIZE={MAX_GROUP_SIZE} per group")
    rewards = rewards.detach().contiguous()
    key = key.detach().contiguous()
    block_n = triton.next_power_of_2(largest_group)
    advantages = torch.empty(rewards.shape, dtype=torch.float64, device=rewards.device)
    _group_advantages_kernel[(len(group_size),)](
        rewards, key, order, group_start, group_size, advantages,
        quantile_k, epsilon, token_budget, canon_alpha, canon_beta, inter_weight,
        ESTIMATOR=int(estimator), QUANTILE=quantile, NORM_BY_STD=norm_by_std, FAVOR_HIGH=favor_high,
        BLOCK_N=block_n, BLOCK_J=max(1, min(block_n, PAIR_TILE // block_n)), num_warps=_num_warps(block_n))
    return advantages


# Ahead-of-time compile registry (tests/test_aot_compile.py): (kernel, signature, constexprs, options).
_SIGNATURE = {
    "rewards_ptr": "*fp32", "key_ptr": "*fp32", "order_ptr": "*i64", "group_start_ptr": "*i64",
    "group_size_ptr": "*i64", "out_ptr": "*fp64", "quantile_k": "fp32", "epsilon": "fp32", "token_budget": "fp32",
    "alpha": "fp32", "beta": "fp32", "inter_weight": "fp32",
    "ESTIMATOR": "constexpr", "QUANTILE": "constexpr", "NORM_BY_STD": "constexpr", "FAVOR_HIGH": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_J": "constexpr",
}


def _constexprs(estimator, quantile, block_n, favor_high=False):
    return {"ESTIMATOR": int(estimator), "QUANTILE": quantile, "NORM_BY_STD": True, "FAVOR_HIGH": favor_high,
            "BLOCK_N": block_n, "BLOCK_J": max(1, min(block_n, PAIR_TILE // block_n))}


AOT_SIGNATURES = [
    (_group_advantages_kernel, _SIGNATURE, _constexprs(GRPO, False, 16), {"num_warps": _num_warps(16)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(GRPO, True, 64), {"num_warps": _num_warps(64)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(RLOO, True, 8), {"num_warps": _num_warps(8)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(CANON, False, 16, True), {"num_warps": _num_warps(16)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(CANON, True, 64), {"num_warps": _num_warps(64)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(CANON, True, 512), {"num_warps": _num_warps(512)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(CANON, True, MAX_GROUP_SIZE),
     {"num_warps": _num_warps(MAX_GROUP_SIZE)}),
    (_group_advantages_kernel, _SIGNATURE, _constexprs(RLOO, True, MAX_GROUP_SIZE),
     {"num_warps": _num_warps(MAX_GROUP_SIZE)}),
]
# Kernels whose AOT build must not spill registers (the test fails if ptxas reports spills).
AOT_NO_SPILL = {"_group_advantages_kernel"}
