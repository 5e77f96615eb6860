"""Token-level advantage estimators: REINFORCE++, GAE, the optimal token baselines (verl 0.9.1) and UCAS.

Formulas: docs/algorithms.md §1.3-1.4 (verl 0.9.1), §5 (UCAS). Each returns advantages [B, T] that are 0 at
padded positions, and, where they differ from the advantages, the returns [B, T]. The outcome reward
of a response counts as received at its last valid token (as verl's reward manager writes it).
Torch only: the work is O(B T) on [B, T] vectors. KTAE, also token-level, lives in ktae.py.
"""

from __future__ import annotations

import torch

from .estimators import batch_whitening, group_zscore, grpo, register_estimator

__all__ = ["discounted_returns", "last_valid_token"]


def last_valid_token(valid: torch.Tensor) -> torch.Tensor:
    """1 at the last valid position of each row, else 0, [B, T] (in ``valid``'s dtype)."""
    return valid * (valid.cumsum(-1) == valid.sum(-1, keepdim=True))


def discounted_returns(rewards: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go of an outcome reward at the last valid token, [B, T]: G_t = gamma^k r at a valid t,
    with k the number of valid tokens after t, and 0 at padding. The discount counts valid tokens only:
    verl 0.9.1 carries the running return unchanged across mask-0 positions."""
    after = valid.sum(-1, keepdim=True) - valid.cumsum(-1)
    return rewards[:, None] * torch.pow(gamma, after) * valid


@register_estimator("reinforce_plus_plus", inputs=("mask",), reads_baseline=False)
def reinforce_plus_plus(rewards, groups, config, *, mask, metric=None, step=0):
    """REINFORCE++ (§1.3): the discounted return G (gamma), whitened over every valid token of the batch.
    Ignores the groups. Returns (advantages, G)."""
    returns = discounted_returns(rewards, mask, config.gamma)
    mean, inv_std = batch_whitening(returns, mask, "reinforce_plus_plus")
    return (returns - mean) * inv_std * mask, returns


@register_estimator("gae", inputs=("mask", "values"), reads_baseline=False)
def gae(rewards, groups, config, *, mask, values, metric=None, step=0):
    """GAE (§1.4): delta_t = r_t + gamma V_next - V_t and A_t = delta_t + gamma lam A_next, backwards,
    with V_next and A_next carried across valid tokens only. returns = A + V before whitening; the
    advantages are whitened over every valid token of the batch. Ignores the groups. Open-Reasoner-Zero:
    gamma = lam = 1, so A_t = R - V_t and returns_t = R."""
    token_rewards = rewards[:, None] * last_valid_token(mask)
    next_value = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards)
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t] > 0
        delta = token_rewards[:, t] + config.gamma * next_value - values[:, t]
        next_advantage = torch.where(valid, delta + config.gamma * config.lam * next_advantage, next_advantage)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    mean, inv_std = batch_whitening(advantages, mask, "gae")
    return (advantages - mean) * inv_std * mask, returns


def _path_variance(old_logprobs, sum_pi_squared, rollout_is_weights):
    """OTB's per-token w = 1 - 2 pi_t + sum_v pi_v^2 (times the rollout IS weight squared when given)."""
    variance = 1.0 - 2.0 * torch.exp(old_logprobs) + sum_pi_squared
    return variance if rollout_is_weights is None else variance * rollout_is_weights.square()


def _token_baseline_advantages(returns, path_variance, mask, groups, members, config):
    """A = (G - B) m with the optimal token baseline B of each group and position (§1.3); ``members`` [B] is
    the size of each row's group as the singleton rule counts it (a group of one member has no baseline)."""
    cumulative = (path_variance * mask).cumsum(-1)
    baseline = (groups.sum(returns * cumulative * mask) / (groups.sum(cumulative * mask) + config.effective_epsilon))
    baseline = torch.where(members[:, None] > 1, baseline[groups.index], torch.zeros_like(baseline[groups.index]))
    if config.otb_handle_zero_tail:
        lengths = mask.sum(-1)
        order = groups.sorted_order(lengths)
        first = groups.starts[groups.index]  # of each response's group, in ``order``
        last = first + groups.size - 1
        longest = lengths[order[last]]
        second = lengths[order[torch.maximum(last - 1, first)]]
        row_is_longest = (groups.size > 1) & (longest > second) & (lengths == longest)
        positions = torch.arange(mask.shape[1], device=mask.device, dtype=lengths.dtype)
        tail = row_is_longest[:, None] & (positions[None, :] >= second[:, None])
        baseline = torch.where(tail, torch.zeros_like(baseline), baseline)
    return (returns - baseline) * mask


@register_estimator("optimal_token_baseline", inputs=("mask", "old_logprobs", "sum_pi_squared"),
                    optional_inputs=("rollout_is_weights",), reads_baseline=False)
def optimal_token_baseline(rewards, groups, config, *, mask, old_logprobs, sum_pi_squared, rollout_is_weights=None,
                           metric=None, step=0):
    """verl's optimal token baseline (§1.3): per group and position, B_t = sum_j G W m / (sum_j W m + eps)
    with G the reward-to-go and W_t = cumsum of w = 1 - 2 pi_t + sum_v pi_v^2 (times the rollout IS
    weight squared when given) over the valid tokens; A = (G - B) m. A singleton has no baseline. With
    otb_handle_zero_tail, the strictly longest response of a group gets baseline 0 from the
    second-longest length on. eps is ``epsilon``, by default 1e-8 here (verl 0.9.1's)."""
    returns = discounted_returns(rewards, mask, 1.0)
    variance = _path_variance(old_logprobs, sum_pi_squared, rollout_is_weights)
    return _token_baseline_advantages(returns, variance, mask, groups, groups.size, config), returns


@register_estimator("tir_optimal_token_baseline", inputs=("mask", "old_logprobs", "sum_pi_squared"),
                    optional_inputs=("rollout_is_weights",), reads_baseline=False)
def tir_optimal_token_baseline(rewards, groups, config, *, mask, old_logprobs, sum_pi_squared,
                               rollout_is_weights=None, metric=None, step=0):
    """verl's multi-turn (tool-integrated) optimal token baseline (§1.3): the optimal token baseline over
    each row's valid tokens packed to the left, so the k-th valid token of every response shares a baseline
    whatever mask-0 spans (tool output) come before it; empty rows do not count as group members."""
    packed = torch.sort((mask == 0).to(torch.int8), dim=-1, stable=True).indices  # valid positions first, in order
    packed_mask = mask.gather(1, packed)
    returns = discounted_returns(rewards, packed_mask, 1.0)
    variance = _path_variance(old_logprobs, sum_pi_squared, rollout_is_weights).gather(1, packed)
    members = groups.sum((mask.sum(-1) > 0).to(mask.dtype))[groups.index]
    advantages = _token_baseline_advantages(returns, variance, packed_mask, groups, members, config)
    return torch.zeros_like(advantages).scatter_(1, packed, advantages), discounted_returns(rewards, mask, 1.0)


# UCAS's min-max normaliser of the raw logits: its own constant, not config.epsilon (upstream).
UCAS_MINMAX_EPS = 1e-6


def batch_minmax(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(x - min)/(max - min + 1e-6) over every valid token of the batch, 0 at padding; 0.5 on every
    valid token when max and min are torch.isclose (UCAS's _normalize_kl_certainty)."""
    is_valid = valid > 0
    if not bool(is_valid.any()):
        return torch.zeros_like(values)
    low = torch.where(is_valid, values, torch.full_like(values, float("inf"))).min()
    high = torch.where(is_valid, values, torch.full_like(values, float("-inf"))).max()
    if bool(torch.isclose(high, low)):
        return 0.5 * valid
    return (values - low) / (high - low + UCAS_MINMAX_EPS) * valid


@register_estimator("ucas", inputs=("mask", "self_certainty", "target_logits"))
def ucas(rewards, groups, config, *, mask, self_certainty, target_logits, metric=None, step=0):
    """UCAS (§5): GRPO's A times a certainty modifier, minus a token penalty on the raw logit.

    C = sum of the token self-certainty over the valid tokens, z-scored per group like A (Cz);
    base = A exp(-beta_pos Cz) if A > 0 else A exp(beta_neg Cz); raw = base - token_coef zn with zn the
    batch min-max of the raw target logits; a positive base is floored at 0 (never flips sign). A group
    with all-equal rewards (A = 0) gets -token_coef zn <= 0, as upstream. A singleton's Cz is its raw
    sum (mean 0, std 1), so its modifier can be huge (upstream's rule, kept)."""
    advantage = grpo(rewards, groups, config)
    certainty = group_zscore((self_certainty * mask).sum(-1), groups, config)
    modifier = torch.where(advantage > 0, torch.exp(-config.ucas_beta_pos * certainty),
                           torch.exp(config.ucas_beta_neg * certainty))
    base = (advantage * modifier)[:, None]
    raw = base - config.ucas_token_coef * batch_minmax(target_logits, mask)
    return torch.where(base > 0, raw.clamp(min=0.0), raw) * mask
