"""What the seed papers measure, computed from each step's batch (docs/experiments.md reads them).

- ``actor/cov_logprob_advantage``: Cov(log pi, A) over the valid tokens (docs/algorithms.md §4.1), the
  quantity the Entropy Mechanism paper finds driving the entropy down (positive: entropy falls).
- ``critic/advantages/nonzero_frac``: the fraction of responses (or valid tokens, for a token-level
  estimator) whose advantage is non-zero: the responses that move the policy at all.
- ``gate/nonzero_frac/<c>of<n>`` and ``gate/groups/<c>of<n>``, for 0/1 rewards: over the step's groups
  of n responses with c correct, the mean fraction of non-zero advantages, and how many such groups
  there were. QAE's claim is a two-regime gate in c/n (§3.1); GRPO is 1 for every 0 < c < n.
- ``canon/low_minus_high_score``, ``canon/low_half_better_frac``, ``canon/high_half_better_frac``: each
  group split into CANON's halves by ``algorithm.advantage.canon_metric`` (§2.3; the entropy by
  default), the mean reward of the low half minus the high half's, and the fraction of groups in
  which each half scored higher. CANON's inter-group term rewards the better half; these say which
  half that was over training. They are reported under every estimator (the split is a property of
  the samples), so Dr.GRPO's run shows the same statistic for comparison.
"""

from __future__ import annotations

from typing import Dict

import torch

import fused_canon as fc
from fused_canon.estimators import canon_split
from fused_canon.losses import token_covariance

Batch = Dict[str, torch.Tensor]


def batch_diagnostics(batch: Batch, advantage: fc.AdvantageConfig, step: int) -> Dict[str, float]:
    """The metrics above for a batch holding rewards, group_ids, response_mask, advantages,
    old_logprobs and (for an entropy split) token_entropy."""
    mask, advantages = batch["response_mask"], batch["advantages"]
    token_advantages = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask)
    metrics: Dict[str, float] = {}
    _, cov = token_covariance(batch["old_logprobs"], token_advantages.to(batch["old_logprobs"].dtype), mask)
    if len(cov):
        metrics["actor/cov_logprob_advantage"] = float(cov.mean())
    nonzero = advantages[mask] != 0 if advantages.dim() == 2 else advantages != 0
    metrics["critic/advantages/nonzero_frac"] = float(nonzero.float().mean())
    rewards, group_ids = batch["rewards"].float(), batch["group_ids"]
    if advantages.dim() == 1 and bool(((rewards == 0) | (rewards == 1)).all()):
        metrics.update(_gate(rewards, group_ids, advantages != 0))
    if advantage.canon_metric != "entropy" or "token_entropy" in batch:
        high = canon_split(rewards, group_ids, advantage, mask=mask, token_entropy=batch.get("token_entropy"),
                           step=step)
        metrics.update(_halves(rewards, group_ids, high))
    return metrics


def _per_group(values: torch.Tensor, group_ids: torch.Tensor):
    """(the sum of ``values`` in each group, the group sizes), over the groups present."""
    _, index = torch.unique(group_ids, return_inverse=True)
    count = torch.bincount(index)
    return torch.zeros(len(count), dtype=values.dtype, device=values.device).index_add_(0, index, values), count


def _gate(rewards: torch.Tensor, group_ids: torch.Tensor, nonzero: torch.Tensor) -> Dict[str, float]:
    correct, size = _per_group(rewards, group_ids)
    moved, _ = _per_group(nonzero.float(), group_ids)
    metrics: Dict[str, float] = {}
    for c, n in sorted(set(zip(correct.long().tolist(), size.tolist()))):
        these = (correct.long() == c) & (size == n)
        metrics[f"gate/nonzero_frac/{c}of{n}"] = float((moved[these] / n).mean())
        metrics[f"gate/groups/{c}of{n}"] = float(these.sum())
    return metrics


def _halves(rewards: torch.Tensor, group_ids: torch.Tensor, high: torch.Tensor) -> Dict[str, float]:
    high_sum, _ = _per_group(rewards * high, group_ids)
    high_count, size = _per_group(high.to(rewards.dtype), group_ids)
    total, _ = _per_group(rewards, group_ids)
    low_count = size - high_count
    both = (low_count > 0) & (high_count > 0)  # a singleton has no low half
    if not bool(both.any()):
        return {}
    gap = ((total - high_sum) / low_count.clamp(min=1) - high_sum / high_count.clamp(min=1))[both]
    return {"canon/low_minus_high_score": float(gap.mean()),
            "canon/low_half_better_frac": float((gap > 0).float().mean()),
            "canon/high_half_better_frac": float((gap < 0).float().mean())}
