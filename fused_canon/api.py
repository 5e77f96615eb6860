"""The public loss: ``policy_loss`` (from logits), ``linear_policy_loss`` (from hidden states), ``FusedPolicyLoss``.

One call runs the three stages of DESIGN.md §4:
  1. per-token statistics of the valid rows only (log-prob of the target, entropy), by a backend:
     the torch reference, the Triton logits kernels, or the Triton fused LM-head kernels;
  2. O(N + B) work on [B, T] vectors: advantages (when rewards are given), the policy objective,
     aggregation and metrics (estimators.py, losses.py — shared by every backend);
  3. the backward: autograd through stage 2 yields dL/dlogp and dL/dH per token, and the backend's
     own backward turns them into dlogits (or dhidden, dweight, dbias) in the coefficient form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .config import LossConfig
from .estimators import compute_advantages
from .losses import Normalizers, is_builtin_policy_loss, policy_objective
from .token_stats import resolve_backend, row_token_stats, scatter_rows, valid_row_index
from .validation import (check_advantages, check_logits_and_targets, check_mask, check_per_token, check_tensor,
                         check_targets_in_range, FLOAT_DTYPES)

__all__ = ["LossOutput", "policy_loss", "linear_policy_loss", "FusedPolicyLoss"]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the inputs
    logprobs: torch.Tensor  # [B, T] fp32, detached, 0 at padded positions
    entropy: torch.Tensor  # [B, T] fp32, detached, 0 at padded positions
    advantages: torch.Tensor  # [B] (or [B, T] for token-level advantages), detached
    metrics: Dict[str, float] = field(default_factory=dict)  # verl metric names


def _check_normalizer(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0 (the global count over all micro-batches and ranks), got {value}")


def _objective(backend, logp, entropy, mask, advantages, old, ref, config, norm, step):
    """Stage 2's objective: the Triton kernel for built-in losses on fp32 statistics, else the reference."""
    objective = policy_objective
    if backend == "triton" and logp.dtype == torch.float32 and is_builtin_policy_loss(config.loss_mode):
        from .kernels.objective import triton_policy_objective as objective
    return objective(logp, entropy, mask, advantages, old, ref, config, norm, step=step)


def _loss_from_stats(logp_rows, entropy_rows, row_index, mask, *, backend, rewards, group_ids, advantages,
                     old_logprobs, ref_logprobs, metric, config, step, global_num_tokens,
                     global_num_seqs) -> LossOutput:
    """Stages 2-3 shared by the logits and the LM-head paths."""
    shape = mask.shape
    logp = scatter_rows(logp_rows, row_index, shape)
    entropy = scatter_rows(entropy_rows, row_index, shape)
    device = mask.device

    if advantages is not None:
        if rewards is not None:
            raise ValueError("pass either `advantages` or `rewards` + `group_ids`, not both")
        token_advantages = check_advantages(advantages, shape, device, mask)
        reported_advantages = advantages.detach()
    else:
        if rewards is None or group_ids is None:
            raise ValueError("policy_loss needs `advantages`, or `rewards` and `group_ids` to compute them")
        check_tensor("rewards", rewards, device=device)
        if rewards.shape != (shape[0],):
            raise ValueError(f"rewards must be [B={shape[0]}], got {tuple(rewards.shape)}")
        needs_entropy = config.advantage.estimator == "canon" and config.advantage.canon_metric == "entropy"
        reported_advantages = compute_advantages(
            rewards.to(logp.dtype) if rewards.is_floating_point() else rewards, group_ids, config.advantage,
            metric=metric, mask=mask, token_entropy=entropy.detach() if needs_entropy else None, step=step,
            backend=backend)
        token_advantages = reported_advantages[:, None].expand(shape)

    old = check_per_token("old_logprobs", old_logprobs, shape, device, mask)
    ref = check_per_token("ref_logprobs", ref_logprobs, shape, device, mask)
    norm = Normalizers(global_num_tokens, global_num_seqs, config.loss_scale_factor)
    loss, metrics = _objective(backend, logp, entropy, mask, token_advantages, old, ref, config, norm, step)

    valid_advantages = token_advantages.detach().reshape(-1).index_select(0, row_index)  # in mask order
    if valid_advantages.numel() > 0:
        metrics["critic/advantages/mean"] = valid_advantages.mean()
        metrics["critic/advantages/max"] = valid_advantages.max()
        metrics["critic/advantages/min"] = valid_advantages.min()
    if rewards is not None:
        metrics["critic/score/mean"] = rewards.detach().float().mean()
    names = list(metrics)
    values = torch.stack([metrics[k].detach().to(device=device, dtype=torch.float64) for k in names]).tolist()
    return LossOutput(loss=loss, logprobs=logp.detach(), entropy=entropy.detach(),
                      advantages=reported_advantages, metrics=dict(zip(names, values)))


def _check_common(mask, shape, device, config, global_num_tokens, global_num_seqs):
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fused_canon.LossConfig, got {type(config).__name__}")
    _check_normalizer("global_num_tokens", global_num_tokens)
    _check_normalizer("global_num_seqs", global_num_seqs)
    return check_mask(mask, shape, device)


def policy_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                rewards: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None,
                advantages: Optional[torch.Tensor] = None, old_logprobs: Optional[torch.Tensor] = None,
                ref_logprobs: Optional[torch.Tensor] = None, metric: Optional[torch.Tensor] = None,
                config: Optional[LossConfig] = None, step: int = 0,
                global_num_tokens: Optional[float] = None, global_num_seqs: Optional[float] = None,
                backend: str = "auto", inplace_backward: bool = False) -> LossOutput:
    """Clipped policy-gradient loss from ``logits [B, T, V]`` of the sampled ``targets [B, T]``.

    Give ``advantages`` ([B] or [B, T]) or ``rewards [B]`` + ``group_ids [B]`` (the estimator of
    ``config.advantage`` runs inside the call; CANON's entropy metric is then the masked mean of this
    pass's own token entropy, unless ``metric`` is passed). ``old_logprobs=None`` means on-policy.
    ``global_num_tokens`` / ``global_num_seqs`` are the normalizers over all micro-batches and ranks.
    ``inplace_backward=True`` (Triton only) writes dlogits over the logits buffer: only when nothing
    else uses these logits afterwards.
    """
    config = config or LossConfig()
    if not torch.is_tensor(logits) or logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {getattr(logits, 'shape', type(logits))}")
    mask = _check_common(mask, logits.shape[:2], logits.device, config, global_num_tokens, global_num_seqs)
    check_logits_and_targets(logits, targets, mask)
    backend = resolve_backend(backend, logits.device)
    row_index = valid_row_index(mask)
    logp_rows, entropy_rows = row_token_stats(logits, targets, row_index, config.temperature, backend,
                                              inplace_backward=inplace_backward)
    return _loss_from_stats(logp_rows, entropy_rows, row_index, mask, backend=backend, rewards=rewards,
                            group_ids=group_ids, advantages=advantages, old_logprobs=old_logprobs,
                            ref_logprobs=ref_logprobs,
                            metric=metric, config=config, step=step, global_num_tokens=global_num_tokens,
                            global_num_seqs=global_num_seqs)


# Rows of the reference LM-head path per chunk: bounds its [chunk, V] logits (recomputed in backward).
LINEAR_REFERENCE_CHUNK_ROWS = 1024


def _torch_linear_rows(hidden_rows, weight, bias, targets_rows, temperature):
    """Reference LM-head statistics, chunk by chunk with activation checkpointing: memory O(chunk * V)."""
    from torch.utils.checkpoint import checkpoint

    from .token_stats import TorchTokenStats

    def chunk_stats(h, w, b, t):
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
        return TorchTokenStats.apply(logits, t, temperature)

    logps, entropies = [], []
    # At least one (possibly empty) chunk, so the loss stays connected to weight and bias.
    for start in range(0, max(hidden_rows.shape[0], 1), LINEAR_REFERENCE_CHUNK_ROWS):
        rows = slice(start, start + LINEAR_REFERENCE_CHUNK_ROWS)
        logp, entropy = checkpoint(chunk_stats, hidden_rows[rows], weight, bias, targets_rows[rows],
                                   use_reentrant=False)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies)


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, rewards: Optional[torch.Tensor] = None,
                       group_ids: Optional[torch.Tensor] = None, advantages: Optional[torch.Tensor] = None,
                       old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                       metric: Optional[torch.Tensor] = None, config: Optional[LossConfig] = None, step: int = 0,
                       global_num_tokens: Optional[float] = None, global_num_seqs: Optional[float] = None,
                       backend: str = "auto") -> LossOutput:
    """``policy_loss`` from the last hidden states ``hidden [B, T, H]`` and the LM head ``weight [V, H]``
    (+ ``bias [V]``), without materialising the [B, T, V] logits (logits = hidden @ weight.T + bias).
    Same keywords and output as ``policy_loss``; the loss is differentiable w.r.t. hidden, weight, bias."""
    config = config or LossConfig()
    if not torch.is_tensor(hidden) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {getattr(hidden, 'shape', type(hidden))}")
    device = hidden.device
    mask = _check_common(mask, hidden.shape[:2], device, config, global_num_tokens, global_num_seqs)
    check_tensor("weight", weight, device=device)
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, device=device)
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be [V={weight.shape[0]}] in {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_tensor("targets", targets, device=device)
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be [B, T] = {tuple(hidden.shape[:2])}")
    check_targets_in_range(targets, weight.shape[0], mask)
    backend = resolve_backend(backend, device)
    row_index = valid_row_index(mask)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if backend == "torch":
        logp_rows, entropy_rows = _torch_linear_rows(flat_hidden.index_select(0, row_index), weight, bias,
                                                     flat_targets.index_select(0, row_index), config.temperature)
    else:
        from .kernels.linear_token_stats import triton_linear_token_stats

        logp_rows, entropy_rows = triton_linear_token_stats(flat_hidden, weight, flat_targets, row_index, bias=bias,
                                                            temperature=config.temperature)
    return _loss_from_stats(logp_rows, entropy_rows, row_index, mask, backend=backend, rewards=rewards,
                            group_ids=group_ids, advantages=advantages, old_logprobs=old_logprobs,
                            ref_logprobs=ref_logprobs,
                            metric=metric, config=config, step=step, global_num_tokens=global_num_tokens,
                            global_num_seqs=global_num_seqs)


class FusedPolicyLoss(torch.nn.Module):
    """``nn.Module`` wrapper of ``policy_loss`` holding its ``LossConfig`` and backend."""

    def __init__(self, config: Optional[LossConfig] = None, backend: str = "auto"):
        super().__init__()
        self.config = config or LossConfig()
        self.backend = backend

    def forward(self, logits, targets, mask, **kwargs) -> LossOutput:
        kwargs.setdefault("config", self.config)
        kwargs.setdefault("backend", self.backend)
        return policy_loss(logits, targets, mask, **kwargs)
