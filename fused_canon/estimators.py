"""Outcome advantage estimators: GRPO, Dr.GRPO, RLOO, CANON, each with a mean or quantile (QAE) baseline.

Formulas: ALGORITHMS.md §1.1-1.3 (verl 0.9.1), §2 (CANON), §3 (QAE); decisions: DESIGN.md §3.
Every estimator is one small function registered by name; ``register_estimator`` adds your own.
All work is O(B) and vectorised over groups (no Python loop over groups), so the same code is the
torch reference and the GPU path. Statistics run in float64 for float64 rewards, else float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .config import AdvantageConfig, CosineRestartSchedule

__all__ = ["compute_advantages", "register_estimator", "ESTIMATORS", "Groups", "cosine_restart_value"]


@dataclass
class Groups:
    """Prompt groups of a batch: ``index[i]`` is the dense group number (0..G-1) of response i."""

    index: torch.Tensor  # [B] int64
    count: torch.Tensor  # [G] int64

    @classmethod
    def from_ids(cls, group_ids: torch.Tensor) -> "Groups":
        _, index = torch.unique(group_ids, return_inverse=True)
        return cls(index=index, count=torch.bincount(index))

    @property
    def size(self) -> torch.Tensor:
        """Group size of each response, [B]."""
        return self.count[self.index]

    @property
    def starts(self) -> torch.Tensor:
        """Position of each group's first row in the grouped order of ``sorted_order``, [G]."""
        return torch.cumsum(self.count, 0) - self.count

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group sum of ``values``, [B] -> [G]."""
        return torch.zeros(len(self.count), dtype=values.dtype, device=values.device).index_add_(0, self.index, values)

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
    x_lo = sorted_values[start + lo.long()]
    x_hi = sorted_values[start + hi.long()]
    return x_lo + (pos - lo) * (x_hi - x_lo)


def _baseline_per_part(rewards: torch.Tensor, part: torch.Tensor, num_parts: int,
                       config: AdvantageConfig) -> torch.Tensor:
    """Mean or K-quantile of the rewards in each part (``part[i]`` in 0..num_parts-1), [num_parts].

    Empty parts give 0 (only CANON's low half of a singleton is empty).
    """
    parts = Groups(index=part, count=torch.bincount(part, minlength=num_parts))
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
    var = groups.sum((rewards - mean) ** 2)[groups.index] / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.ones_like(rewards))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

EstimatorFn = Callable[..., torch.Tensor]
ESTIMATORS: Dict[str, EstimatorFn] = {}


def register_estimator(name: str, *, overwrite: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(rewards, groups, config, *, metric, step) -> [B] advantages`` under ``name``.

    A name that is already registered is refused unless ``overwrite=True`` (replacing a built-in
    also replaces what its Triton kernel computed: the name then runs in torch)."""

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        if name in ESTIMATORS and not overwrite:
            raise ValueError(f"estimator {name!r} is already registered ({ESTIMATORS[name].__qualname__}); "
                             "pass overwrite=True to replace it")
        ESTIMATORS[name] = fn
        return fn

    return decorator


def _singleton_aware_baseline(rewards, groups, config):
    """verl's singleton rule: a group of one has baseline 0 (not its own reward)."""
    return torch.where(groups.size > 1, group_baseline(rewards, groups, config), torch.zeros_like(rewards))


@register_estimator("grpo")
def grpo(rewards, groups, config, *, metric=None, step=0):
    """a = (r - b) / (std + eps), or r - b without std; b = group mean or quantile (§1.1, §3.1)."""
    advantage = rewards - _singleton_aware_baseline(rewards, groups, config)
    if config.norm_by_std:
        advantage = advantage / (group_std(rewards, groups) + config.epsilon)
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


@register_estimator("canon")
def canon(rewards, groups, config, *, metric, step=0):
    """CANON (§2.3-2.4): split each group at floor(n/2) by ascending metric, compare across halves.

    For response i in half h (low or high) with other half o:
        inter = s_own r - s_other b_o + sign(h) beta       (alpha sits on the favoured half: s = alpha there)
        a     = [w inter + (1 - w)(r - b_h)] / L
    b is each half's mean (or K-quantile under baseline="quantile"); singletons have b_low = b_high = 0.
    """
    high = groups.rank(metric) >= groups.size // 2
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


BUILTIN_ESTIMATORS = dict(ESTIMATORS)  # what the Triton group kernel implements


def _is_builtin(name: str) -> bool:
    """True when ``name`` still means the built-in estimator (a user may re-register a name)."""
    return BUILTIN_ESTIMATORS.get(name) is ESTIMATORS.get(name) is not None


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def _canon_metric(config, rewards, metric, mask, token_entropy, step):
    """The per-response sort key of CANON's split (§2.2), in the statistics dtype."""
    dtype, device = rewards.dtype, rewards.device
    kind = config.canon_metric
    if kind == "random":
        # A seeded uniform permutation: inside each group the relative order of the keys is uniform.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        return torch.randperm(len(rewards), generator=generator).to(device=device, dtype=dtype)
    if metric is not None:
        return _checked_vector("metric", metric, len(rewards), device).to(dtype)
    if kind == "custom":
        raise ValueError("canon_metric='custom' needs the per-response metric in `metric`")
    if mask is None:
        raise ValueError(f"canon_metric={kind!r} needs `mask` (or a precomputed `metric`)")
    valid = mask.to(dtype)
    if kind == "length":
        return valid.sum(-1)
    if token_entropy is None:
        raise ValueError("canon_metric='entropy' needs `token_entropy` [B, T] (or a precomputed `metric`)")
    if token_entropy.shape != mask.shape:
        raise ValueError(f"token_entropy shape {tuple(token_entropy.shape)} != mask shape {tuple(mask.shape)}")
    return (token_entropy.detach().to(dtype) * valid).sum(-1) / (valid.sum(-1) + 1e-8)


def _checked_vector(name: str, x: torch.Tensor, length: int, device) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}] (one value per response), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but rewards are on {device}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


@torch.no_grad()
def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, config: Optional[AdvantageConfig] = None,
                       metric: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       token_entropy: Optional[torch.Tensor] = None, step: int = 0,
                       backend: str = "torch") -> torch.Tensor:
    """Per-response advantages [B] (float32; float64 for float64 rewards). Always detached.

    rewards [B] outcome scores; group_ids [B] int prompt ids (any order, groups need not be
    contiguous); metric [B] the CANON sort key (overrides the one derived from mask/token_entropy);
    mask [B, T] valid response tokens (CANON length and entropy); token_entropy [B, T] the rollout
    policy's token entropy (CANON entropy); step the trainer's global step (CANON schedules, random).
    backend "triton" runs the built-in estimators on float32 rewards in one Triton program per group
    (kernels/advantages.py); everything else (float64, user-registered estimators) runs here.
    """
    config = config or AdvantageConfig()
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend={backend!r} is not valid for compute_advantages; choose 'torch' or 'triton'")
    if config.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {config.estimator!r}; registered: {sorted(ESTIMATORS)}")
    if not torch.is_tensor(rewards) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if len(rewards) == 0:
        raise ValueError("rewards is empty: a batch needs at least one response")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    _checked_vector("rewards", rewards, len(rewards), rewards.device)
    _checked_vector("group_ids", group_ids, len(rewards), rewards.device)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if mask is not None and (mask.dim() != 2 or mask.shape[0] != len(rewards) or mask.device != rewards.device):
        raise ValueError(f"mask must be [B={len(rewards)}, T] on {rewards.device}, got {tuple(mask.shape)} on {mask.device}")

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.to(dtype)
    groups = Groups.from_ids(group_ids)
    key = None
    if config.estimator == "canon":
        key = _canon_metric(config, rewards, metric, mask, token_entropy, step)
    if backend == "triton" and dtype == torch.float32 and _is_builtin(config.estimator):
        from .kernels.advantages import triton_compute_advantages

        advantages = triton_compute_advantages(rewards, groups, config, metric=key, step=step)
    else:
        advantages = ESTIMATORS[config.estimator](rewards, groups, config, metric=key, step=step)
    if not torch.isfinite(advantages).all():
        raise FloatingPointError(f"estimator {config.estimator!r} produced non-finite advantages")
    return advantages
