"""Outcome advantage estimators: GRPO, Dr.GRPO, RLOO, CANON, each with a mean or quantile (QAE) baseline, and
verl's other outcome estimators (GDPO's per-reward normalisation included).

Formulas: docs/algorithms.md §1.1-1.3 (verl 0.9.1), §2 (CANON), §3 (QAE); decisions: docs/design.md §3.
Every estimator is one small function registered by name; ``register_estimator`` adds your own.
All work is O(B) and vectorised over groups (no Python loop over groups), so the same code is the
torch reference and the GPU path. Statistics run in float64 whatever the rewards' dtype (O(B) work:
float32 would lose a reward scale of 1e30 to overflow and small spreads to cancellation), and the
advantages come back in float32 (float64 for float64 rewards): docs/design.md §4.1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import AdvantageConfig, CosineRestartSchedule, seeded_generator
from .validation import PendingChecks, check_bool, check_mask, check_step

__all__ = ["compute_advantages", "advantages_and_choice", "register_estimator", "ESTIMATORS", "ESTIMATOR_INPUTS",
           "ADVANTAGE_INPUTS", "Groups", "cosine_restart_value", "triton_advantages", "canon_split",
           "declared_inputs", "missing_inputs", "weighted_reward"]


@dataclass
class Groups:
    """Prompt groups of a batch: ``index[i]`` is the dense group number of response i, numbered 0, 1, ... in
    ascending order of the ids; ``count[g]`` the size of group g.

    ``count`` has B entries, one per possible group: the groups after the last one have size 0. The number of
    groups depends on the ids, and reading it back would be a host sync (it would size a tensor); B bounds it.
    Per-group tensors are thus [B, ...] and are read through ``index`` (``x[groups.index]``); an empty group
    never reaches a response."""

    index: torch.Tensor  # [B] int64
    count: torch.Tensor  # [B] int64, 0 after the last group

    @classmethod
    def from_ids(cls, group_ids: torch.Tensor) -> "Groups":
        # torch.unique's numbering without its host sync: sort the ids, start a group where the id changes.
        sorted_ids, order = torch.sort(group_ids, stable=True)
        starts_group = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
        index = torch.empty_like(order).index_copy_(0, order, torch.cumsum(starts_group, 0) - 1)
        count = torch.zeros_like(order).index_add_(0, index, torch.ones_like(order))
        return cls(index=index, count=count)

    @property
    def num_groups(self) -> torch.Tensor:
        """The number of groups, a 0-d device tensor (``len(count)`` is B, not it; ``int()`` it to read it back)."""
        return (self.count > 0).sum()

    @property
    def size(self) -> torch.Tensor:
        """Group size of each response, [B]."""
        return self.count[self.index]

    @functools.cached_property
    def largest(self) -> int:
        """Size of the largest group (one host sync, once per Groups)."""
        return int(self.count.max())

    def largest_bound(self, limit: int) -> int:
        """An upper bound of the largest group: the batch size when it is at most ``limit`` (no group can
        then exceed it, and no host read is needed), else ``largest`` (one host sync)."""
        batch = len(self.index)
        return batch if batch <= limit else self.largest

    @property
    def starts(self) -> torch.Tensor:
        """Position of each group's first row in the grouped order of ``sorted_order``, [B] (B for an empty group)."""
        return torch.cumsum(self.count, 0) - self.count

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group sum of ``values``, [B, ...] -> [B, ...] (0 for an empty group)."""
        out = torch.zeros((len(self.count),) + values.shape[1:], dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.index, values)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group maximum of ``values`` [B] -> [B] (0 for an empty group)."""
        out = torch.zeros(len(self.count), dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.index, values, "amax", include_self=False)

    def sorted_order(self, key: torch.Tensor) -> torch.Tensor:
        """Permutation grouping rows by group, ascending ``key`` inside a group, ties in batch order."""
        by_key = torch.sort(key, stable=True).indices
        return by_key[torch.sort(self.index[by_key], stable=True).indices]

    def rank(self, key: torch.Tensor) -> torch.Tensor:
        """0-based rank of each row inside its group by ascending ``key`` (stable), [B]."""
        return self.rank_in(self.sorted_order(key))

    def rank_in(self, order: torch.Tensor) -> torch.Tensor:
        """0-based position of each row inside its group in ``order`` (a result of ``sorted_order``), [B]."""
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device) - self.starts[self.index[order]]
        return rank


# ---------------------------------------------------------------------------------------------
# Baselines: group mean or group K-quantile (torch.quantile's linear interpolation)
# ---------------------------------------------------------------------------------------------

def _quantile_of_sorted(sorted_values: torch.Tensor, start: torch.Tensor, n: torch.Tensor, k: float) -> torch.Tensor:
    """K-quantile of the runs ``sorted_values[start : start+n]`` (each ascending), linear interpolation.

    Same rule as torch.quantile: pos = k (n-1), q = x[floor(pos)] + frac(pos) (x[ceil(pos)] - x[floor(pos)]).
    """
    pos = k * (n - 1).to(sorted_values.dtype)
    lo = torch.floor(pos)
    hi = torch.ceil(pos)
    last = len(sorted_values) - 1  # an empty run (start = B) reads a valid position, masked out by the caller
    x_lo = sorted_values[(start + lo.long()).clamp(max=last)]
    x_hi = sorted_values[(start + hi.long()).clamp(max=last)]
    return x_lo + (pos - lo) * (x_hi - x_lo)


def _baseline_per_part(rewards: torch.Tensor, part: torch.Tensor, num_parts: int,
                       config: AdvantageConfig) -> torch.Tensor:
    """Mean or K-quantile of the rewards in each part (``part[i]`` in 0..num_parts-1), [num_parts].

    Empty parts give 0 (only CANON's low half of a singleton is empty).
    """
    # A scatter of ones, not bincount: bincount reads the largest part back to size its output (a host sync).
    count = torch.zeros(num_parts, dtype=torch.int64, device=part.device).index_add_(0, part, torch.ones_like(part))
    parts = Groups(index=part, count=count)
    if config.baseline == "mean":
        return parts.sum(rewards) / parts.count.clamp(min=1)
    order = parts.sorted_order(rewards)
    value = _quantile_of_sorted(rewards[order], parts.starts, parts.count.clamp(min=1), config.quantile_k)
    return torch.where(parts.count > 0, value, torch.zeros_like(value))


def group_baseline(rewards: torch.Tensor, groups: Groups, config: AdvantageConfig) -> torch.Tensor:
    """Per-response baseline: mean or K-quantile of the rewards of the response's group, [B]."""
    return _baseline_per_part(rewards, groups.index, len(groups.count), config)[groups.index]


def half_baselines(rewards: torch.Tensor, groups: Groups, high: torch.Tensor, config: AdvantageConfig):
    """CANON: baselines of the response's own half and of the other half of its group, ([B], [B])."""
    own_part = groups.index * 2 + high.long()
    other_part = groups.index * 2 + (~high).long()
    per_half = _baseline_per_part(rewards, own_part, 2 * len(groups.count), config)
    return per_half[own_part], per_half[other_part]


def leave_one_out_baseline(rewards: torch.Tensor, groups: Groups, config: AdvantageConfig) -> torch.Tensor:
    """RLOO baseline: mean (or K-quantile) of the *other* responses of the group; 0 for singletons."""
    n = groups.size
    if config.baseline == "mean":
        others = groups.sum(rewards)[groups.index] - rewards
        return torch.where(n > 1, others / (n - 1).clamp(min=1), torch.zeros_like(rewards))
    # Quantile of the group with row i removed: in the group's ascending order, position m of the
    # reduced run is position m (m < rank_i) or m + 1 (m >= rank_i) of the full run.
    order = groups.sorted_order(rewards)
    rank = groups.rank_in(order)
    starts = groups.starts[groups.index]
    sorted_rewards = rewards[order]
    pos = config.quantile_k * (n - 2).clamp(min=0).to(rewards.dtype)
    lo, hi = torch.floor(pos).long(), torch.ceil(pos).long()
    last = n - 1  # clamp keeps singletons (masked out below) in bounds
    x_lo = sorted_rewards[starts + torch.minimum(lo + (lo >= rank).long(), last)]
    x_hi = sorted_rewards[starts + torch.minimum(hi + (hi >= rank).long(), last)]
    value = x_lo + (pos - lo.to(rewards.dtype)) * (x_hi - x_lo)
    return torch.where(n > 1, value, torch.zeros_like(rewards))


def group_std(rewards: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Unbiased group std around the group *mean* (also under QAE, §3.1); 1 for singletons (verl)."""
    n = groups.size
    mean = groups.sum(rewards)[groups.index] / n
    centred = rewards - mean
    scale = groups.max(centred.abs())
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))[groups.index]
    # sqrt(sum c^2 / (n-1)) as scale * sqrt(sum (c/scale)^2 / (n-1)): squares of float64 rewards beyond
    # 1e154 would overflow; scale = the group's max |c| (1 for a constant group, whose std is 0).
    var = groups.sum((centred / safe_scale) ** 2)[groups.index] / (n - 1).clamp(min=1)
    return torch.where(n > 1, safe_scale * var.sqrt(), torch.ones_like(rewards))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

STATISTICS_DTYPE = torch.float64  # every estimator computes in it (module docstring)

EstimatorFn = Callable[..., torch.Tensor]
ESTIMATORS: Dict[str, EstimatorFn] = {}

# What each estimator may ask for beyond rewards and group ids: the keyword of ``compute_advantages``
# and where it comes from (said in the error when it is missing; "{them}" is filled in).
_FROM_LOGITS = ("pass {them}, compute {them} with fc.token_signals, or call policy_loss with rewards= "
                "so the fused pass computes {them}")
ADVANTAGE_INPUTS = {
    "mask": "the valid-token mask [B, T] of the responses",
    "values": "the critic's value of every response token [B, T] (a value model's forward pass; "
              "policy_loss takes {them} in advantage_inputs)",
    "baseline_rewards": "the reward of a greedy rollout of each response's prompt [B] (policy_loss takes "
                        "{them} in advantage_inputs)",
    "token_ids": "the sampled token ids [B, T] (policy_loss with rewards= uses its targets)",
    "self_certainty": _FROM_LOGITS,
    "target_logits": _FROM_LOGITS,
    "sum_pi_squared": _FROM_LOGITS,
    "old_logprobs": _FROM_LOGITS,
    "rollout_is_weights": "the rollout importance-sampling weights [B, T] (policy_loss takes {them} in "
                          "advantage_inputs)",
}
_ROW_INPUTS = ("baseline_rewards",)  # [B]; every other input is [B, T]
_INTEGER_INPUTS = ("token_ids",)


@dataclass(frozen=True)
class EstimatorInputs:
    required: Tuple[str, ...] = ()
    optional: Tuple[str, ...] = ()
    reads_baseline: bool = True  # False: the estimator has its own baseline; config.baseline must be "mean"
    multi_reward: bool = False  # True: it gets rewards [B, K] (one column per reward function), not their sum


ESTIMATOR_INPUTS: Dict[str, EstimatorInputs] = {}


def declared_inputs(estimator: str) -> EstimatorInputs:
    """What ``estimator`` declared when it was registered (nothing, for a name without a declaration)."""
    return ESTIMATOR_INPUTS.get(estimator, EstimatorInputs())


def missing_inputs(estimator: str, given: Mapping[str, Optional[torch.Tensor]]) -> List[str]:
    """The required inputs of ``estimator`` that ``given`` lacks or holds as None, in declaration order."""
    return [name for name in declared_inputs(estimator).required if given.get(name) is None]


def register_estimator(name: str, *, inputs: Sequence[str] = (), optional_inputs: Sequence[str] = (),
                       reads_baseline: bool = True, multi_reward: bool = False,
                       overwrite: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(rewards, groups, config, *, metric, step, **inputs)`` under ``name``.

    It returns advantages [B] (one per response) or [B, T] (per token, 0 at padding), or a pair
    ``(advantages, returns)`` when its returns differ from its advantages (GAE, REINFORCE++).
    ``inputs`` names the ``compute_advantages`` keywords it needs (keys of ``ADVANTAGE_INPUTS``; a
    missing one is an error naming it), ``optional_inputs`` those it reads when given. Only the
    declared inputs are passed, checked finite at valid positions; the rewards and every float input
    (``mask`` as 0/1) arrive in float64 (``STATISTICS_DTYPE``), and the caller gets the result in the
    rewards' dtype (float32 unless they are float64). ``reads_baseline=False``
    says it has a baseline of its own, so ``baseline="quantile"`` is refused rather than ignored.
    ``multi_reward=True`` says it reads the rewards of each reward function: it gets rewards [B, K]
    (``[B]`` rewards as K = 1); every other estimator gets the weighted sum over the K columns, [B].
    A name that is already registered is refused unless ``overwrite=True`` (replacing a built-in
    also replaces what its Triton kernel computed: the name then runs in torch).
    """
    unknown = sorted((set(inputs) | set(optional_inputs)) - set(ADVANTAGE_INPUTS))
    if unknown:
        raise ValueError(f"estimator {name!r} declares unknown inputs {unknown}; known: {sorted(ADVANTAGE_INPUTS)}")

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        if name in ESTIMATORS and not overwrite:
            raise ValueError(f"estimator {name!r} is already registered ({ESTIMATORS[name].__qualname__}); "
                             "pass overwrite=True to replace it")
        ESTIMATORS[name] = fn
        ESTIMATOR_INPUTS[name] = EstimatorInputs(tuple(inputs), tuple(optional_inputs), reads_baseline, multi_reward)
        return fn

    return decorator


def _singleton_aware_baseline(rewards, groups, config):
    """The group baseline; a group of one has baseline 0 (verl's rule), or its own reward under
    singleton_baseline="own" (TRL's, whose group mean of one response is that response's reward)."""
    baseline = group_baseline(rewards, groups, config)
    if config.singleton_baseline == "own":
        return baseline
    return torch.where(groups.size > 1, baseline, torch.zeros_like(rewards))


def batch_std(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std of every value of the batch (group_std of the batch as one group; 1 for one value)."""
    one_group = Groups(index=torch.zeros_like(values, dtype=torch.long),  # one entry suffices: index is all 0
                       count=torch.tensor([len(values)], device=values.device))
    return group_std(values, one_group)


@register_estimator("grpo")
def grpo(rewards, groups, config, *, metric=None, step=0):
    """a = (r - b) / (std + eps), or r - b without std; b = group mean or quantile (§1.1, §3.1); the std is
    the group's, or the batch's under std_scope="batch" (TRL's scale_rewards="batch")."""
    advantage = rewards - _singleton_aware_baseline(rewards, groups, config)
    if config.norm_by_std:
        std = group_std(rewards, groups) if config.std_scope == "group" else batch_std(rewards)
        advantage = advantage / (std + config.effective_epsilon)
    return advantage


@register_estimator("dr_grpo")
def dr_grpo(rewards, groups, config, *, metric=None, step=0):
    """GRPO without the std, divided by the constant token budget L (CANON's form, §1.2)."""
    return (rewards - _singleton_aware_baseline(rewards, groups, config)) / config.token_budget


@register_estimator("rloo")
def rloo(rewards, groups, config, *, metric=None, step=0):
    """a = r - baseline of the other responses; singletons keep r (verl's looped version, §1.3)."""
    return rewards - leave_one_out_baseline(rewards, groups, config)


def cosine_restart_value(step: int, schedule: CosineRestartSchedule) -> float:
    """CANON's c(step): linear warm-up, then cosine from max to min restarting every period (§2.4)."""
    if step < schedule.warmup_steps:
        return schedule.max_value * (step + 1) / schedule.warmup_steps
    period = (schedule.total_steps - schedule.warmup_steps) // schedule.num_cycles
    phase = ((step - schedule.warmup_steps) % period) / period
    return schedule.min_value + 0.5 * (schedule.max_value - schedule.min_value) * (1.0 + math.cos(math.pi * phase))


def canon_inter_weight(rewards: torch.Tensor, config: AdvantageConfig, step: int) -> float:
    """The inter-group weight: canon_lambda, or the value of the configured schedule."""
    if config.canon_schedule == "constant":
        return config.canon_lambda
    if config.canon_schedule == "anneal":
        return rewards.mean().item()  # batch accuracy for 0/1 rewards, over every group passed in
    if config.canon_schedule == "cosine_restart":
        return 1.0 - cosine_restart_value(step, config.cosine_restart)
    return cosine_restart_value(step, config.cosine_restart_r)


def _high_half(groups: Groups, metric: torch.Tensor) -> torch.Tensor:
    """CANON's split (§2.3): True for the ranks >= floor(n/2) by ascending metric (stable), [B] bool."""
    return groups.rank(metric) >= groups.size // 2


@register_estimator("canon")
def canon(rewards, groups, config, *, metric, step=0):
    """CANON (§2.3-2.4): split each group at floor(n/2) by ascending metric, compare across halves.

    For response i in half h (low or high) with other half o:
        inter = s_own r - s_other b_o + sign(h) beta       (alpha sits on the favoured half: s = alpha there)
        a     = [w inter + (1 - w)(r - b_h)] / L
    b is each half's mean (or K-quantile under baseline="quantile"); singletons have b_low = b_high = 0.
    """
    high = _high_half(groups, metric)
    baseline_own, baseline_other = half_baselines(rewards, groups, high, config)
    singleton = groups.size == 1
    baseline_own = torch.where(singleton, torch.zeros_like(rewards), baseline_own)
    baseline_other = torch.where(singleton, torch.zeros_like(rewards), baseline_other)

    favored = high if config.favored_half == "high" else ~high
    alpha = config.canon_alpha
    own_scale = torch.where(favored, torch.full_like(rewards, alpha), torch.ones_like(rewards))
    other_scale = torch.where(favored, torch.ones_like(rewards), torch.full_like(rewards, alpha))
    beta = torch.where(high, torch.full_like(rewards, config.canon_beta), torch.full_like(rewards, -config.canon_beta))

    inter = own_scale * rewards - other_scale * baseline_other + beta
    intra = rewards - baseline_own
    weight = canon_inter_weight(rewards, config, step)
    return (weight * inter + (1.0 - weight) * intra) / config.token_budget


# ---------------------------------------------------------------------------------------------
# More outcome estimators: verl 0.9.1's (docs/algorithms.md §1.3), QAE by name (§3), ADORA (§7).
# Torch only; each returns one advantage per response, [B].
# ---------------------------------------------------------------------------------------------

def group_mean(values: torch.Tensor, groups: Groups, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of each response's group (weighted by ``weights``), 0 for a singleton (verl's rule), [B]."""
    weights = torch.ones_like(values) if weights is None else weights
    mean = groups.sum(weights * values)[groups.index] / groups.sum(weights)[groups.index]
    return torch.where(groups.size > 1, mean, torch.zeros_like(values))


def group_zscore(values: torch.Tensor, groups: Groups, config: AdvantageConfig) -> torch.Tensor:
    """GRPO's statistics on any per-response value: (x - mean)/(std + eps), or x - mean without
    norm_by_std; a singleton has mean 0 and std 1 (verl)."""
    centred = values - group_mean(values, groups)
    return centred / (group_std(values, groups) + config.effective_epsilon) if config.norm_by_std else centred


def batch_whitening(values: torch.Tensor, valid: torch.Tensor, estimator: str):
    """verl's masked_whiten statistics over every valid token of the batch, (mean, 1/sqrt(var + 1e-8)):
    mean = sum(v m)/(N + 1e-8), var unbiased (x N/(N-1)). Like verl, fewer than 2 valid tokens is an error."""
    num_valid = valid.sum()
    if num_valid < 2:
        raise ValueError(f"{estimator} whitens over every valid token of the batch and needs at least 2 of them, "
                         f"got {int(num_valid)}")
    mean = (values * valid).sum() / (num_valid + 1e-8)
    centred = (values - mean) * valid
    # var = scale^2 var' with scale = max |centred|: the squares of float64 values beyond 1e154 would
    # overflow (as in group_std). 1/sqrt(var + 1e-8) is formed so that neither scale^2 overflows (scale > 1)
    # nor 1e-8 / scale^2 does (scale <= 1).
    scale = centred.abs().max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled_var = (centred / scale).square().sum() / (num_valid + 1e-8) * num_valid / (num_valid - 1)
    inv_std = torch.where(scale > 1, 1.0 / (scale * torch.sqrt(scaled_var + 1e-8 / scale.clamp(min=1) ** 2)),
                          torch.rsqrt(scale.clamp(max=1) ** 2 * scaled_var + 1e-8))
    return mean, inv_std


@register_estimator("qae")
def qae(rewards, groups, config, *, metric=None, step=0):
    """QAE (§3): GRPO with the group's quantile_k-quantile as baseline, whatever config.baseline says."""
    return grpo(rewards, groups, replace(config, baseline="quantile"))


@register_estimator("reinforce_plus_plus_baseline", inputs=("mask",), reads_baseline=False)
def reinforce_plus_plus_baseline(rewards, groups, config, *, mask, metric=None, step=0):
    """s = r - group mean (singleton: r), whitened over every valid token of the batch: token-weighted,
    so long responses weigh more; no group std (§1.3)."""
    shifted = rewards - group_mean(rewards, groups)
    mean, inv_std = batch_whitening(shifted[:, None] * mask, mask, "reinforce_plus_plus_baseline")
    return (shifted - mean) * inv_std


@register_estimator("remax", inputs=("baseline_rewards",), reads_baseline=False)
def remax(rewards, groups, config, *, baseline_rewards, metric=None, step=0):
    """A = r - b with b the reward of the prompt's greedy rollout; no groups, no normalisation (§1.3).
    The returns are the reward-to-go, r."""
    return rewards - baseline_rewards, rewards


@register_estimator("opo", inputs=("mask",), reads_baseline=False)
def opo(rewards, groups, config, *, mask, metric=None, step=0):
    """A = r - sum_j L_j r_j / sum_j L_j over the group (L: response length); singleton baseline 0 (§1.3)."""
    return rewards - group_mean(rewards, groups, weights=mask.sum(-1))


@register_estimator("gpg", reads_baseline=False)
def gpg(rewards, groups, config, *, metric=None, step=0):
    """A = alpha (r - group mean), alpha = B / max(1, number of non-zero rewards in the whole batch) (§1.3).
    verl computes a group std and never uses it; its f_norm is 1."""
    alpha = len(rewards) / (rewards != 0).sum().clamp(min=1).to(rewards.dtype)
    return alpha * (rewards - group_mean(rewards, groups))


@register_estimator("grpo_passk", reads_baseline=False)
def grpo_passk(rewards, groups, config, *, metric=None, step=0):
    """Pass@k (§1.3): only the best response of a group is non-zero, r_max - r_second, divided by
    (std + eps) under norm_by_std. Tied maxima give every response 0. Groups of one are an error (verl)."""
    if bool((groups.size < 2).any()):
        raise ValueError(f"grpo_passk compares each group's best response with its second best: every group needs "
                         f"at least 2 responses, got a group of {int(groups.size.min())}")
    order = groups.sorted_order(rewards)
    best_position = (groups.starts + groups.count - 1)[groups.index]  # of each response's group
    best_row = order[best_position]
    gap = rewards[best_row] - rewards[order[best_position - 1]]
    if config.norm_by_std:
        gap = gap / (group_std(rewards, groups) + config.effective_epsilon)
    return torch.where(best_row == torch.arange(len(rewards), device=rewards.device), gap, torch.zeros_like(gap))


def _scored_grpo(column: torch.Tensor, groups: Groups, config: AdvantageConfig) -> torch.Tensor:
    """grpo of one reward column; a response it did not score (NaN) is left out of the column's group
    statistics and gets 0 from it (TRL's nan-aware group statistics; §1.14)."""
    scored = ~torch.isnan(column)
    if bool(scored.all()):
        return grpo(column, groups, config)
    advantages = torch.zeros_like(column)
    advantages[scored] = grpo(column[scored], Groups.from_ids(groups.index[scored]), config)
    return advantages


@register_estimator("gdpo", optional_inputs=("mask",), multi_reward=True)
def gdpo(rewards, groups, config, *, mask=None, metric=None, step=0):
    """GDPO (§1.14): each reward column through grpo on its own, the columns' weighted sum, then a batch
    normalisation: whitened over the valid tokens (gdpo_whiten="tokens", verl) or z-scored over the
    responses with (std + epsilon) (gdpo_whiten="responses", TRL's normalize_then_sum)."""
    weights = reward_weight_vector(config, rewards.shape[1], rewards)
    combined = sum(weights[k] * _scored_grpo(rewards[:, k], groups, config) for k in range(rewards.shape[1]))
    if config.gdpo_whiten == "responses":
        return (combined - combined.mean()) / (batch_std(combined) + config.effective_epsilon)
    if mask is None:
        raise ValueError("gdpo with gdpo_whiten='tokens' whitens over the valid tokens of the batch: pass `mask` "
                         "(or gdpo_whiten='responses')")
    mean, inv_std = batch_whitening(combined[:, None] * mask, mask, "gdpo")
    return (combined - mean) * inv_std


@register_estimator("adora", inputs=("mask",))
def adora(rewards, groups, config, *, mask, metric=None, step=0):
    """ADORA (§7): GRPO (a singleton keeps its raw reward), and the whole group times adora_lambda unless
    it has a length advantage: longest correct response (r > adora_correct_score) strictly longer than
    the mean length of the wrong ones shorter than adora_max_length. No correct response: scaled; correct
    responses and no qualifying wrong one: not scaled."""
    advantage = torch.where(groups.size > 1, grpo(rewards, groups, config), rewards)
    lengths = mask.sum(-1)
    correct = rewards > config.adora_correct_score
    short_wrong = ~correct & (lengths < config.adora_max_length)
    no_group = torch.full((len(groups.count),), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    longest_correct = no_group.scatter_reduce(0, groups.index[correct], lengths[correct], "amax", include_self=True)
    wrong_count = groups.sum(short_wrong.to(rewards.dtype))
    mean_wrong = torch.where(wrong_count > 0, groups.sum(lengths * short_wrong) / wrong_count.clamp(min=1), no_group)
    length_advantage = (longest_correct > mean_wrong)[groups.index]
    return torch.where(length_advantage, advantage, advantage * config.adora_lambda)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def _canon_metric(config, rewards, metric, mask, token_entropy, step, checks):
    """The per-response sort key of CANON's split (§2.2), in the statistics dtype. Padded positions of
    ``token_entropy`` are never read (selected away, not multiplied by 0); its valid ones must be finite."""
    dtype, device = rewards.dtype, rewards.device
    kind = config.canon_metric
    if kind == "random":
        # A seeded uniform permutation: inside each group the relative order of the keys is uniform.
        generator = seeded_generator(config.seed, step)
        return torch.randperm(len(rewards), generator=generator).to(device=device, dtype=dtype)
    if metric is not None:
        return _checked_vector("metric", metric, len(rewards), device, checks).to(dtype)
    if kind == "custom":
        raise ValueError("canon_metric='custom' needs the per-response metric in `metric`")
    if mask is None:
        raise ValueError(f"canon_metric={kind!r} needs `mask` (or a precomputed `metric`)")
    valid = mask != 0
    if kind == "length":
        return valid.sum(-1).to(dtype)
    if token_entropy is None:
        raise ValueError("canon_metric='entropy' needs `token_entropy` [B, T] (or a precomputed `metric`)")
    if not torch.is_tensor(token_entropy) or token_entropy.shape != mask.shape or token_entropy.device != device:
        raise ValueError(f"token_entropy must be [B, T] = {tuple(mask.shape)} on {device}, got "
                         f"{tuple(getattr(token_entropy, 'shape', ()))} on "
                         f"{getattr(token_entropy, 'device', type(token_entropy).__name__)}")
    if not token_entropy.is_floating_point():
        raise TypeError(f"token_entropy must be a floating tensor, got {token_entropy.dtype}")
    entropy = token_entropy.detach()
    checks.first_nonfinite("token_entropy", entropy, valid, mask.shape,
                           what="contains NaN or inf at valid (mask=1) positions; first at")
    selected = torch.where(valid, entropy.to(dtype), torch.zeros((), dtype=dtype, device=device))
    return selected.sum(-1) / (valid.sum(-1).to(dtype) + 1e-8)


@torch.no_grad()
def canon_split(rewards: torch.Tensor, group_ids: torch.Tensor, config: AdvantageConfig, *,
                metric: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                token_entropy: Optional[torch.Tensor] = None, step: int = 0) -> torch.Tensor:
    """The halves CANON compares, as its estimator splits them (``config.canon_metric``, §2.2-2.3):
    True for the high-metric half of each group, [B] bool. Works for any ``config.estimator``, so
    that a trainer can report which half did better under another estimator too."""
    checks = PendingChecks()
    key = _canon_metric(config, rewards.to(STATISTICS_DTYPE), metric, mask, token_entropy, check_step(step), checks)
    checks.flush()
    return _high_half(Groups.from_ids(group_ids), key)


def _checked_vector(name: str, x: torch.Tensor, length: int, device, checks: PendingChecks) -> torch.Tensor:
    """A per-response vector [B] on the rewards' device; a float one must be finite (in ``checks``)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}] (one value per response), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but rewards are on {device}")
    if x.is_floating_point():
        checks.first_nonfinite(name, x.detach(), None, (length,), what="contains NaN or inf: first at response")
    return x


def reward_weight_vector(config: AdvantageConfig, num_columns: int, like: torch.Tensor) -> torch.Tensor:
    """``config.reward_weights`` as a [K] tensor like ``like`` (1 each when None); K must match the rewards."""
    if config.reward_weights is None:
        return torch.ones(num_columns, dtype=like.dtype, device=like.device)
    if len(config.reward_weights) != num_columns:
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries but the rewards have "
                         f"K={num_columns} column(s) (one weight per reward function)")
    return torch.tensor(config.reward_weights, dtype=like.dtype, device=like.device)


def reward_columns(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards as [B, K]: [B] rewards are the case K = 1."""
    return rewards if rewards.dim() == 2 else rewards[:, None]


def weighted_reward(rewards: torch.Tensor, config: AdvantageConfig) -> torch.Tensor:
    """The reward of each response, [B]: sum_k w_k r_k over the reward columns that scored it (a NaN counts
    0, TRL's nansum); [B] rewards are one column."""
    columns = reward_columns(rewards)
    return torch.nan_to_num(columns, nan=0.0) @ reward_weight_vector(config, columns.shape[1], columns)


def _rewards_for(config: AdvantageConfig, rewards: torch.Tensor) -> torch.Tensor:
    """What the estimator reads: the columns [B, K] if it declared multi_reward, else the weighted sum [B]."""
    if not declared_inputs(config.estimator).multi_reward:
        return weighted_reward(rewards, config)
    columns = reward_columns(rewards)
    reward_weight_vector(config, columns.shape[1], columns)  # a wrong number of weights fails before the run
    return columns


def _missing_inputs_error(estimator: str, missing) -> ValueError:
    """"ucas needs self_certainty and target_logits: pass them, ...": names and sources of the missing inputs."""
    by_source: Dict[str, list] = {}
    for name in missing:
        by_source.setdefault(ADVANTAGE_INPUTS[name], []).append(name)
    parts = [f"{' and '.join(names)}: {source.format(them='them' if len(names) > 1 else 'it')}"
             for source, names in by_source.items()]
    return ValueError(f"{estimator} needs " + "; ".join(parts))


def _estimator_inputs(config, given: Dict[str, Optional[torch.Tensor]], num_responses, device, mask, dtype, checks):
    """The declared inputs of ``config.estimator``, checked and in the statistics dtype."""
    declared = declared_inputs(config.estimator)
    if not declared.reads_baseline and config.baseline != "mean":
        raise ValueError(f"estimator {config.estimator!r} has a baseline of its own: baseline={config.baseline!r} "
                         "does not apply to it (use baseline='mean')")
    missing = missing_inputs(config.estimator, given)
    if missing:
        raise _missing_inputs_error(config.estimator, missing)
    valid = None if mask is None else mask != 0
    inputs = {}
    for name in declared.required + declared.optional:
        x = given[name]
        if x is None:
            inputs[name] = None
            continue
        if name == "mask":
            inputs[name] = x.to(dtype)
            continue
        if name in _ROW_INPUTS:
            inputs[name] = _checked_vector(name, x, num_responses, device, checks).to(dtype)
            continue
        if valid is None:
            raise ValueError(f"{name} [B, T] needs `mask` (the valid tokens) as well")
        if not torch.is_tensor(x) or x.shape != valid.shape or x.device != device:
            raise ValueError(f"{name} must be [B, T] = {tuple(valid.shape)} on {device}, "
                             f"got {tuple(getattr(x, 'shape', ()))} on {getattr(x, 'device', type(x).__name__)}")
        if name in _INTEGER_INPUTS:
            if x.is_floating_point() or x.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
            inputs[name] = x
            continue
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        checks.first_nonfinite(name, x.detach(), valid, valid.shape,
                               what="contains NaN or inf at valid (mask=1) positions; first at")
        # Padding may hold anything (e.g. +inf certainty of a masked vocabulary): it is never read.
        inputs[name] = torch.where(valid, x.detach().to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return inputs


@torch.no_grad()
def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, config: Optional[AdvantageConfig] = None,
                       metric: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       token_entropy: Optional[torch.Tensor] = None, step: int = 0,
                       backend: str = "torch", *, values: Optional[torch.Tensor] = None,
                       baseline_rewards: Optional[torch.Tensor] = None, token_ids: Optional[torch.Tensor] = None,
                       self_certainty: Optional[torch.Tensor] = None, target_logits: Optional[torch.Tensor] = None,
                       old_logprobs: Optional[torch.Tensor] = None, sum_pi_squared: Optional[torch.Tensor] = None,
                       rollout_is_weights: Optional[torch.Tensor] = None, with_returns: bool = False):
    """Advantages (float32; float64 for float64 rewards; the statistics run in float64 either way), always
    detached: [B] for the per-response estimators, [B, T] (0 at padding) for the token-level ones
    (reinforce_plus_plus, gae, optimal_token_baseline, tir_optimal_token_baseline, ucas, ktae).
    ``with_returns=True`` returns
    ``(advantages, returns)``.

    rewards [B] outcome scores (the score of the whole response, as at its last valid token), or [B, K]
    the scores of K reward functions: estimators get their sum weighted by ``config.reward_weights``
    (TRL's sum_then_normalize), except those registered with ``multi_reward=True`` (gdpo), which
    normalise each column first (docs/algorithms.md §1.14);
    group_ids [B] int prompt ids (any order, groups need not be contiguous); metric [B] the CANON sort
    key (overrides the one derived from mask/token_entropy); mask [B, T] valid response tokens (bool or
    0/1); token_entropy [B, T] the rollout policy's token entropy (CANON entropy); step the trainer's
    global step, an int >= 0 (CANON schedules, random). Each estimator declares the other inputs it needs
    (``ESTIMATOR_INPUTS``; what each one is: ``ADVANTAGE_INPUTS``); a missing one is a ValueError saying
    where it comes from. Padded positions of [B, T] inputs are never read; valid ones must be finite.
    backend "torch" (the default) runs the registered function; "triton" runs a built-in estimator that
    has a kernel (grpo, dr_grpo, rloo, canon) in one Triton program per group (kernels/advantages.py)
    or raises, saying why it cannot; "auto" is Triton on CUDA where it can run, else torch (backends.py
    decides).
    """
    return advantages_and_choice(
        rewards, group_ids, config, metric=metric, mask=mask, token_entropy=token_entropy, step=step, backend=backend,
        values=values, baseline_rewards=baseline_rewards, token_ids=token_ids, self_certainty=self_certainty,
        target_logits=target_logits, old_logprobs=old_logprobs, sum_pi_squared=sum_pi_squared,
        rollout_is_weights=rollout_is_weights, with_returns=with_returns)[0]


@torch.no_grad()
def advantages_and_choice(rewards, group_ids, config=None, *, metric=None, mask=None, token_entropy=None, step=0,
                          backend="torch", values=None, baseline_rewards=None, token_ids=None, self_certainty=None,
                          target_logits=None, old_logprobs=None, sum_pi_squared=None, rollout_is_weights=None,
                          with_returns=False, checks: Optional[PendingChecks] = None):
    """``compute_advantages`` and the backend choice it ran (``backends.Choice``): policy_loss reports it.

    ``checks``: the calling loss's pending value checks. They are read (with this call's own input
    checks, in one sync) before the estimator runs; the check of the estimator's output is left in them
    for the loss's batched read. Without ``checks`` (compute_advantages) both are read here."""
    from .backends import ADVANTAGES, check_backend, select  # backends imports this module (its table)

    if config is None:
        config = AdvantageConfig()
    if not isinstance(config, AdvantageConfig):
        hint = " (its `advantage` field holds the AdvantageConfig)" if type(config).__name__ == "LossConfig" else ""
        raise TypeError(f"config must be a fused_canon.AdvantageConfig{hint}, got {type(config).__name__}")
    check_backend(backend)
    step = check_step(step)
    check_bool("with_returns", with_returns)
    own_checks = checks is None
    checks = PendingChecks() if own_checks else checks
    if not torch.is_tensor(rewards) or rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be a tensor [B], or [B, K] for K reward functions, got "
                         f"{tuple(getattr(rewards, 'shape', ())) if torch.is_tensor(rewards) else type(rewards)}")
    if rewards.numel() == 0:
        raise ValueError(f"rewards is empty (shape {tuple(rewards.shape)}): a batch needs at least one response "
                         "and one reward")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    # [B, K]: NaN is a reward function that did not score the response (TRL's None), but every response
    # needs one score at least.
    scores = rewards.detach()
    bad = ~torch.isfinite(scores) if scores.dim() == 1 else torch.isinf(scores).any(1) | torch.isnan(scores).all(1)
    checks.first_nonfinite("rewards", torch.where(bad, float("nan"), 0.0), None, (len(rewards),),
                           what="contains NaN or inf: first at response" if scores.dim() == 1 else
                           "[B, K] has a response with an infinite score or with no score (NaN in every column): "
                           "first at response")
    _checked_vector("group_ids", group_ids, len(rewards), rewards.device, checks)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if mask is not None:
        if not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[0] != len(rewards):
            raise ValueError(f"mask must be [B={len(rewards)}, T], got {tuple(getattr(mask, 'shape', ()))}")
        mask = check_mask(mask, tuple(mask.shape), rewards.device, checks)

    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = _rewards_for(config, rewards.to(STATISTICS_DTYPE))
    rewards_out = rewards.to(out_dtype)  # the dtype backends.select decides on (the Triton kernel's input)
    groups = Groups.from_ids(group_ids)
    choice = select(ADVANTAGES, backend, rewards_out, name=config.estimator, groups=groups, config=config)
    num_responses = len(rewards)
    inputs = _estimator_inputs(config, dict(
        mask=mask, values=values, baseline_rewards=baseline_rewards, token_ids=token_ids,
        self_certainty=self_certainty, target_logits=target_logits, old_logprobs=old_logprobs,
        sum_pi_squared=sum_pi_squared, rollout_is_weights=rollout_is_weights), num_responses, rewards.device, mask,
        STATISTICS_DTYPE, checks)
    key = None
    if config.estimator == "canon":
        key = _canon_metric(config, rewards, metric, mask, token_entropy, step, checks)
    if not _runs_on_any_value(choice):
        checks.flush()  # a user-registered estimator never sees a non-finite input
    result = choice.fn(rewards, groups, config, metric=key, step=step, **inputs)
    advantages, returns = result if isinstance(result, tuple) else (result, result)
    outputs = []
    for name, x in (("advantages", advantages), ("returns", returns)):
        if not torch.is_tensor(x) or (x.shape != (num_responses,) and (mask is None or x.shape != mask.shape)):
            raise ValueError(f"estimator {config.estimator!r} returned {name} of shape "
                             f"{tuple(getattr(x, 'shape', ()))}; expected [B] = ({num_responses},) or [B, T]")
        checks.first_nonfinite(f"estimator {config.estimator!r} produced non-finite {name}:", x, None, x.shape,
                               what="first at", error=FloatingPointError)
        outputs.append(x.to(out_dtype))
    if own_checks:
        checks.flush()
    return (tuple(outputs) if with_returns else outputs[0]), choice


def _runs_on_any_value(choice) -> bool:
    """Whether the chosen estimator is fused-canon's own (its Triton kernel, or a torch function of this
    package): those turn a non-finite input into non-finite advantages and never fail on one, so the input
    checks wait for the call's one batched read, which raises them before the check of the output."""
    return choice.backend == "triton" or getattr(choice.fn, "__module__", "").startswith(__package__ + ".")


# ---------------------------------------------------------------------------------------------
# The Triton launch of the built-in estimators (kernels/advantages.py; backends.py decides when)
# ---------------------------------------------------------------------------------------------

def triton_advantages(rewards: torch.Tensor, groups: Groups, config: AdvantageConfig, *,
                      metric: Optional[torch.Tensor] = None, step: int = 0, estimator) -> torch.Tensor:
    """``ESTIMATORS[config.estimator](rewards, groups, config, metric=, step=)`` for a built-in estimator, in
    one Triton program per group, fp64 like the reference. ``estimator`` is the kernel's constant for ``config.estimator``
    (the dispatch table binds it); ``metric`` is CANON's per-response sort key (``_canon_metric``).

    The O(B) host side: the rows grouped in batch order (one stable sort; groups need not be
    contiguous), the group starts, and CANON's inter-group weight of this step.
    """
    from .kernels import advantages as kernel

    is_canon = estimator == kernel.CANON
    if is_canon and (metric is None or metric.shape != rewards.shape):
        raise ValueError(f"canon needs the per-response sort key `metric` [B={len(rewards)}]")
    order = torch.sort(groups.index, stable=True).indices
    return kernel.triton_group_advantages(
        rewards, metric if is_canon else rewards, order, groups.starts, groups.count,
        groups.largest_bound(kernel.MAX_GROUP_SIZE),
        estimator=estimator, quantile=config.baseline == "quantile", quantile_k=config.quantile_k,
        epsilon=config.effective_epsilon, norm_by_std=config.norm_by_std, token_budget=config.token_budget,
        canon_alpha=config.canon_alpha, canon_beta=config.canon_beta,
        inter_weight=canon_inter_weight(rewards, config, step) if is_canon else 0.0,
        favor_high=config.favored_half == "high")
