"""Rollout importance-sampling weights: the correction for the gap between the engine that sampled
the responses (vLLM, bf16) and the trainer's own log-probs of them (docs/algorithms.md §1.12).

``rollout_is_weights(old_logprobs, rollout_logprobs, mask, config)`` returns the detached [B, T]
weights that multiply the policy term of the loss token by token, and their metrics, as verl 0.9.1's
rollout correction and TRL's vLLM importance-sampling correction compute them (metric names are
verl's ``rollout_corr/...``). O(B T) torch work on [B, T] vectors before the objective; the weights
are an input of every objective backend.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .config import LossConfig

__all__ = ["rollout_is_weights", "check_rollout_is_weights", "rollout_offpolicy_metrics"]

PREFIX = "rollout_corr/"


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, dim=None) -> torch.Tensor:
    """verl's masked mean: sum(v m) / (sum(m) + 1e-8)."""
    if dim is None:
        return (values * valid).sum() / (valid.sum() + 1e-8)
    return (values * valid).sum(dim) / (valid.sum(dim) + 1e-8)


@torch.no_grad()
def rollout_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                       config: LossConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The weights [B, T] (0 at padding, detached) and their metrics (scalar tensors), for
    ``config.rollout_is`` = "token" | "sequence".

    log r = old - rollout per token, or its sum over the row's valid tokens (sequence); raw = exp(log r
    clamped to +-rollout_is_log_ratio_clamp). "truncate" clamps raw to [threshold_lower, threshold],
    "mask" zeroes it outside; rollout_is_batch_normalize then divides by the mean weight (of the
    tokens, or of the non-empty rows). Inputs may hold anything at padded positions."""
    valid = mask.to(old_logprobs.dtype)
    is_valid = mask.to(torch.bool)
    log_ratio = torch.where(is_valid, old_logprobs - rollout_logprobs, torch.zeros_like(old_logprobs))
    if config.rollout_is == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True)  # [B, 1]
    bound = config.rollout_is_log_ratio_clamp
    raw = torch.exp(log_ratio if bound is None else log_ratio.clamp(-bound, bound)).expand_as(valid) * valid
    upper, lower = config.rollout_is_threshold, config.rollout_is_threshold_lower
    if config.rollout_is_mode == "truncate":
        weights = raw.clamp(min=lower, max=upper) * valid
    else:
        keep = (raw <= upper) if lower is None else (raw >= lower) & (raw <= upper)
        weights = torch.where(keep, raw, torch.zeros_like(raw))
    if not is_valid.any():
        return weights, {}

    metrics = _weight_metrics(weights, raw, log_ratio, valid, config)
    if config.rollout_is_batch_normalize:
        if config.rollout_is == "token":
            mean = _masked_mean(weights, valid)
        else:
            seq_valid = (valid.sum(-1) > 0).to(weights.dtype)
            mean = (_masked_mean(weights, valid, -1) * seq_valid).sum() / seq_valid.sum().clamp(min=1e-8)
        normalize = bool(mean > 1e-8)
        if normalize:
            weights = weights / mean
        metrics[PREFIX + "rollout_is_batch_norm_factor"] = mean if normalize else torch.ones_like(mean)
    return weights, metrics


def _weight_metrics(weights, raw, log_ratio, valid, config: LossConfig) -> Dict[str, torch.Tensor]:
    """verl's IS metrics: statistics of the applied weights, fractions of the raw ones beyond the bounds
    (the lower bound defaults to 1 / threshold there), ESS, per-row means."""
    upper = config.rollout_is_threshold
    lower = config.rollout_is_threshold_lower if config.rollout_is_threshold_lower is not None else 1.0 / upper
    is_valid = valid > 0
    m: Dict[str, torch.Tensor] = {}
    if config.rollout_is == "sequence":  # log-space statistics of the per-row log-ratio, unclamped
        m["rollout_is_max"] = torch.exp(log_ratio.max().clamp(max=20.0))
        m["rollout_is_min"] = torch.exp(log_ratio.min())
        m["rollout_is_mean"] = _masked_mean(weights, valid)
        m["rollout_is_ratio_fraction_high"] = (log_ratio > math.log(upper)).to(valid.dtype).mean()
        m["rollout_is_ratio_fraction_low"] = (log_ratio < math.log(lower)).to(valid.dtype).mean() if lower > 0 \
            else torch.zeros((), dtype=valid.dtype, device=valid.device)
    else:
        m["rollout_is_mean"] = _masked_mean(weights, valid)
        m["rollout_is_ratio_fraction_high"] = _masked_mean((raw > upper).to(valid.dtype), valid)
        m["rollout_is_ratio_fraction_low"] = _masked_mean((raw < lower).to(valid.dtype), valid)
        m["rollout_is_max"] = weights.masked_fill(~is_valid, float("-inf")).max()
        m["rollout_is_min"] = weights.masked_fill(~is_valid, float("inf")).min()
    bounded = weights.clamp(min=0.0, max=upper)
    mean_bounded = _masked_mean(bounded, valid)
    if valid.sum() > 1:
        m["rollout_is_std"] = (_masked_mean(bounded.square(), valid) - mean_bounded.square()).clamp(min=0).sqrt()
    else:
        m["rollout_is_std"] = torch.zeros_like(mean_bounded)
    m["rollout_is_eff_sample_size"] = 1.0 / _masked_mean((bounded / (mean_bounded + 1e-8)).square(), valid)
    seq_mean = _masked_mean(weights, valid, -1)
    m["rollout_is_seq_mean"] = seq_mean.mean()
    m["rollout_is_seq_std"] = seq_mean.std() if seq_mean.numel() > 1 else torch.zeros_like(seq_mean.mean())
    m["rollout_is_seq_max"] = seq_mean.max()
    m["rollout_is_seq_min"] = seq_mean.min()
    m["rollout_is_seq_max_deviation"] = (seq_mean - 1.0).abs().max()
    raw_seq_mean = _masked_mean(raw, valid, -1)
    m["rollout_is_seq_fraction_high"] = (raw_seq_mean > upper).to(valid.dtype).mean()
    m["rollout_is_seq_fraction_low"] = (raw_seq_mean < lower).to(valid.dtype).mean()
    if config.rollout_is_mode == "mask":
        outside = (raw > upper) | (raw < (config.rollout_is_threshold_lower or 0.0))
        m["rollout_is_oob_ratio"] = _masked_mean(outside.to(valid.dtype), valid)
    return {PREFIX + name: value for name, value in m.items()}


@torch.no_grad()
def rollout_offpolicy_metrics(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                              mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """verl's off-policy diagnostics of the rollout gap (``rollout_corr/kl``, ``k3_kl``, the two
    perplexities, their log difference, chi^2 per token and per sequence). Empty without a valid token."""
    is_valid = mask.to(torch.bool)
    if not is_valid.any():
        return {}
    valid = mask.to(old_logprobs.dtype)
    old = torch.where(is_valid, old_logprobs, torch.zeros_like(old_logprobs))
    rollout = torch.where(is_valid, rollout_logprobs, torch.zeros_like(old_logprobs))
    log_ratio = old - rollout
    mean_old, mean_rollout = _masked_mean(old, valid, -1), _masked_mean(rollout, valid, -1)
    log_ppl_diff = mean_rollout - mean_old
    seq_log_ratio = (log_ratio * valid).sum(-1).clamp(-20.0, 20.0)
    m = {"training_ppl": torch.exp(-mean_old).mean(), "training_log_ppl": (-mean_old).mean(),
         "kl": _masked_mean(rollout - old, valid),
         "k3_kl": _masked_mean(torch.exp(log_ratio) - log_ratio - 1, valid),
         "rollout_ppl": torch.exp(-mean_rollout).mean(), "rollout_log_ppl": (-mean_rollout).mean(),
         "log_ppl_diff": log_ppl_diff.mean(), "log_ppl_abs_diff": log_ppl_diff.abs().mean(),
         "log_ppl_diff_max": log_ppl_diff.max(), "log_ppl_diff_min": log_ppl_diff.min(),
         "ppl_ratio": torch.exp(log_ppl_diff).mean(),
         "chi2_token": _masked_mean(torch.exp(log_ratio.clamp(-20.0, 20.0)).square(), valid) - 1.0,
         "chi2_seq": torch.exp(2.0 * seq_log_ratio).mean() - 1.0}
    return {PREFIX + name: value for name, value in m.items()}


def check_rollout_is_weights(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Caller-given weights [B, T]: finite and >= 0 at valid positions; returned detached, 0 at padding."""
    is_valid = mask.to(torch.bool)
    bad = is_valid & ~(torch.isfinite(weights) & (weights >= 0))
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"rollout_is_weights must be finite and >= 0 at valid (mask=1) positions; "
                         f"rollout_is_weights{list(index)} = {weights[index].item()}")
    return torch.where(is_valid, weights.detach(), torch.zeros_like(weights))
