"""The public entry points: ``token_stats`` and ``token_signals``, ``policy_loss`` (from logits),
``linear_policy_loss`` (from hidden states), ``policy_loss_from_logprobs`` (from the caller's log-probs) and
``FusedPolicyLoss``.

One loss call runs the stages of docs/design.md §4, each an op of the dispatch table (backends.py):
  1. per-token statistics of the valid rows only (log-prob of the target, entropy): ``token_stats``
     from logits, ``linear_token_stats`` from hidden states and the LM head. ``policy_loss_from_logprobs``
     starts after this stage, with the caller's own log-probs. When the estimator reads a signal of the
     logits (UCAS: self-certainty and raw target logit; the optimal token baseline: sum p^2), the same
     pass emits it (``extra_stats``): no second read of the logits;
  2. O(N + B) work on [B, T] vectors, one path for all three entry points (``_loss_from_logprobs``):
     ``advantages`` (when rewards are given) and the ``objective`` (policy loss, aggregation, metrics);
  3. the backward: autograd through stage 2 yields dL/dlogp and dL/dH per token, and the statistics
     backend's own backward turns them into dlogits (or dhidden, dweight, dbias) in the coefficient form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .backends import (LINEAR_TOKEN_STATS, LOGITS_PASS, OBJECTIVE, TOKEN_STATS, check_backend, describe_logits_pass,
                       fused_pass_blocker, fused_policy_loss_launch, select)
from .config import LossConfig
from .estimators import ADVANTAGE_INPUTS, advantages_and_choice, declared_inputs, weighted_reward
from .losses import Normalizers, check_unreduced
from .rollout_correction import check_rollout_is_weights, rollout_offpolicy_metrics
from .rollout_correction import rollout_is_weights as rollout_is_weights_of
from .statistics import EXTRA_SIGNALS
from .validation import (PendingChecks, check_advantages, check_bool, check_logits_and_targets, check_mask,
                         check_nonfinite_logits, check_number, check_per_token, check_step, check_tensor,
                         check_targets_in_range, FLOAT_DTYPES)

__all__ = ["LossOutput", "token_stats", "token_signals", "SIGNALS", "policy_loss", "linear_policy_loss",
           "policy_loss_from_logprobs", "FusedPolicyLoss"]

# What token_signals can return: a statistics pass's two differentiable outputs, then its extra ones.
SIGNALS = ("logprobs", "entropy") + EXTRA_SIGNALS


@dataclass
class LossOutput:
    # scalar, differentiable w.r.t. the inputs; with reduce=False the per-token loss [B, T] (0 at padding) whose
    # aggregation with loss_agg_mode is that scalar (docs/algorithms.md §1.8)
    loss: torch.Tensor
    logprobs: torch.Tensor  # [B, T], detached, 0 at padded positions (fp32; the caller's dtype from logprobs)
    entropy: Optional[torch.Tensor]  # [B, T] like logprobs; None when policy_loss_from_logprobs got no entropy
    advantages: torch.Tensor  # [B] (or [B, T] for token-level ones), detached; from rewards: fp32 (fp64 rewards: fp64)
    metrics: Dict[str, float] = field(default_factory=dict)  # verl metric names (0-d tensors: tensor_metrics)
    # What ran for each stage and why, e.g. {"token_stats": "triton (auto: cuda tensors)",
    # "advantages": "torch (auto: estimator 'mine' has no Triton kernel ...)", "objective": "triton (requested)"}.
    # Keys are the ops of backends.py that ran; "advantages" only when rewards were given.
    backends: Dict[str, str] = field(default_factory=dict)
    # tensor_metrics=True: the value checks not read yet (``check`` / ``read_metrics`` read them).
    pending_checks: Optional[PendingChecks] = field(default=None, repr=False)

    def read_metrics(self) -> "LossOutput":
        """The call's one batched host read: the metrics (0-d tensors -> floats) and every pending value
        check, raising the first that failed. The default of every loss call; with ``tensor_metrics=True``
        the caller calls it (or ``check``) when it reads (docs/design.md §4.1). Returns self."""
        names = [name for name, value in self.metrics.items() if torch.is_tensor(value)]
        checks = self.pending_checks.values() if self.pending_checks is not None else []
        if names or checks:
            device = self.loss.device
            values = torch.cat([self.metrics[name].reshape(1).to(device) for name in names]
                               + [value.to(device) for value in checks]).tolist()
            if self.pending_checks is not None:
                self.pending_checks.raise_failed(values[len(names):])
            self.metrics.update(zip(names, values[:len(names)]))
        self.pending_checks = None
        return self

    def check(self) -> None:
        """Read the pending value checks only (one host sync) and raise the first that failed; the
        metrics stay tensors."""
        if self.pending_checks is not None:
            self.pending_checks.flush()
            self.pending_checks = None


def valid_row_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices b*T + t of the valid tokens, int64 [N]."""
    return mask.reshape(-1).nonzero().squeeze(-1)


def scatter_rows(values: torch.Tensor, row_index: torch.Tensor, shape) -> torch.Tensor:
    """Place per-valid-row values into a zero [B, T] tensor (differentiable)."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return out.index_put((row_index,), values).reshape(shape)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy of each position: ``logits [..., V]``, ``targets [...]``.

    Returns ``(logprobs, entropy)`` in fp32 (fp64 for fp64 logits), shaped like ``targets``, both
    differentiable w.r.t. ``logits``. ``temperature`` divides the logits first. Every position counts
    as valid: a NaN or +inf logit, or a -inf logit at the target, is an error naming the position.
    """
    checks = PendingChecks()
    safe_targets = check_logits_and_targets(logits, targets, None, checks)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    stats = select(TOKEN_STATS, backend, logits)
    shape = targets.shape
    vocab = logits.shape[-1]
    logits3d = logits.reshape(1, targets.numel(), vocab) if logits.dim() != 3 else logits
    targets2d = safe_targets.reshape(logits3d.shape[:2])
    row_index = torch.arange(targets2d.numel(), device=logits.device)
    logp, entropy = stats.fn(logits3d, targets2d, row_index, temperature)
    check_nonfinite_logits(checks, logp.detach(), row_index, shape)
    checks.flush()
    return logp.reshape(shape), entropy.reshape(shape)


@torch.no_grad()
def token_signals(logits: torch.Tensor, targets: torch.Tensor, names, temperature: float = 1.0,
                  backend: str = "auto", *, mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Detached per-token signals of ``softmax(logits / temperature)`` at ``targets``, one statistics pass.

    ``logits [..., V]``, ``targets [...]``; ``names`` from ``SIGNALS``: "logprobs", "entropy",
    "self_certainty" (lse(z) - mean_v(z) of the tempered logits z; +inf on a row with -inf entries),
    "target_logits" (the raw, untempered logit of the target), "sum_pi_squared" (sum_v p_v^2). Returns
    ``{name: tensor shaped like targets}`` in fp32 (fp64 for fp64 logits). On the Triton backend every
    signal comes from one read of each row. Positions where ``mask`` is 0 are not read and hold 0.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in SIGNALS]
    if unknown or not names:
        raise ValueError(f"token_signals names {unknown or names} are not valid; choose from {list(SIGNALS)}")
    checks = PendingChecks()
    if mask is not None:
        check_tensor("mask", mask, device=logits.device)
        mask = check_mask(mask, tuple(targets.shape), logits.device, checks)
    safe_targets = check_logits_and_targets(logits, targets, mask, checks)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    stats = select(TOKEN_STATS, backend, logits)
    logits3d = logits.reshape(1, targets.numel(), logits.shape[-1]) if logits.dim() != 3 else logits
    targets2d = safe_targets.reshape(logits3d.shape[:2])
    valid = None if mask is None else mask.reshape(-1)
    outputs = stats.fn(logits3d, targets2d, torch.arange(targets2d.numel(), device=logits.device), temperature,
                       extra_stats=any(name in EXTRA_SIGNALS for name in names), row_valid=valid)
    check_nonfinite_logits(checks, outputs[0], None, targets.shape, valid=valid)
    checks.flush()
    by_name = dict(zip(SIGNALS, outputs))
    return {name: by_name[name].detach().reshape(targets.shape) for name in names}


def _needs_extra_signals(config: LossConfig, rewards, advantage_inputs) -> bool:
    """Whether the statistics pass must emit EXTRA_SIGNALS: the estimator runs in this call and reads one
    that the caller did not pass."""
    if rewards is None:
        return False
    declared = declared_inputs(config.advantage.estimator)
    return any(name in declared.required + declared.optional and name not in (advantage_inputs or {})
               for name in EXTRA_SIGNALS)


def _pass_signals(grid_outputs) -> Dict[str, torch.Tensor]:
    """The EXTRA_SIGNALS a statistics pass emitted (its outputs after logp and entropy, as [B, T])."""
    return dict(zip(EXTRA_SIGNALS, grid_outputs[2:]))


def _check_normalizer(name: str, value, unit: str) -> Optional[float]:
    """A global normalizer: None (this micro-batch's own count), or a Python number > 0."""
    if value is None:
        return None
    return check_number(name, value, low=0.0, low_open=True,
                        why=f" (a Python number: the {unit} of all micro-batches on all ranks)")


def _check_common(mask, shape, device, config, step, global_num_tokens, global_num_seqs, reduce, checks):
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fused_canon.LossConfig, got {type(config).__name__}")
    check_step(step)
    check_bool("reduce", reduce)
    if not reduce:
        check_unreduced(config)
    _check_normalizer("global_num_tokens", global_num_tokens, "valid tokens")
    _check_normalizer("global_num_seqs", global_num_seqs, "sequences with a valid token")
    return check_mask(mask, shape, device, checks)


def _data_parallel_ranks() -> int:
    """The world size of torch.distributed (1 without it): a global count may be shared out over the ranks."""
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _check_normalizers_cover(checks: PendingChecks, mask: torch.Tensor, global_num_tokens, global_num_seqs) -> None:
    """A global count covers this micro-batch's own count (with data parallelism, its 1/world_size share may be
    passed instead: docs/integrations.md), read with the metrics."""
    ranks = _data_parallel_ranks()
    for name, given, local, unit in (("global_num_tokens", global_num_tokens, mask.sum(), "valid tokens"),
                                     ("global_num_seqs", global_num_seqs, mask.any(-1).sum(), "sequences with a "
                                                                                             "valid token")):
        if given is None:
            continue
        checks.add(torch.where(local > given * ranks, local, -1),
                   lambda count, name=name, given=given, unit=unit: (
                       f"{name}={given!r} is below this micro-batch's own {count} {unit}"
                       + (f" (over the {ranks} data-parallel ranks)" if ranks > 1 else "")
                       + f": it must count the {unit} of all micro-batches on all ranks"
                       + (" (or that count divided by the world size)" if ranks > 1 else "")))


def _rollout_correction(logp, mask, old_logprobs, rollout_logprobs, rollout_is_weights, config: LossConfig,
                        checks: PendingChecks):
    """The rollout IS weights of the policy term ([B, T] or None) and their ``rollout_corr/`` metrics
    (docs/algorithms.md §1.12): the caller's ``rollout_is_weights``, or computed from ``rollout_logprobs``
    and the old log-probs (this pass's own ``logp`` when on-policy) when ``config.rollout_is`` is set.
    ``logp`` None: before the pass, with the old log-probs given (backends.fused_pass_blocker)."""
    shape, device = mask.shape, mask.device
    dtype = torch.float32 if logp is None else logp.dtype  # None: before the pass (fp32 statistics)
    check_per_token("rollout_logprobs", rollout_logprobs, shape, device, mask, checks)
    check_per_token("rollout_is_weights", rollout_is_weights, shape, device, mask, checks)
    if rollout_is_weights is not None:
        if rollout_logprobs is not None:
            raise ValueError("pass either `rollout_is_weights` or `rollout_logprobs` (to compute them), not both")
        return check_rollout_is_weights(rollout_is_weights.to(dtype), mask), {}
    if config.rollout_is is None:
        if rollout_logprobs is not None:
            raise ValueError("rollout_logprobs given but config.rollout_is is None: set rollout_is='token' or "
                             "'sequence' to weight the loss by them")
        return None, {}
    if rollout_logprobs is None:
        raise ValueError(f"rollout_is={config.rollout_is!r} needs `rollout_logprobs` (the sampling engine's "
                         "log-probs of the response tokens), or pass `rollout_is_weights`")
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().to(dtype)
    rollout = rollout_logprobs.detach().to(dtype)
    weights, metrics = rollout_is_weights_of(old, rollout, mask, config)
    metrics.update(rollout_offpolicy_metrics(old, rollout, mask))
    return weights, metrics


REF_LINEAR_TOKEN_STATS = "ref_" + LINEAR_TOKEN_STATS  # LossOutput.backends' key of the reference LM-head pass


def _check_lm_head(prefix: str, hidden, weight, bias, shape, vocab: Optional[int] = None) -> None:
    """``{prefix}hidden [B, T, H]``, ``{prefix}weight [V, H]`` and ``{prefix}bias [V]`` (or None) in one float
    dtype on hidden's device; ``vocab``: the V the weight must have (the policy's)."""
    if not torch.is_tensor(hidden) or tuple(hidden.shape[:2]) != tuple(shape) or hidden.dim() != 3:
        raise ValueError(f"{prefix}hidden must be [B, T, H] with [B, T] = {tuple(shape)}, got "
                         f"{tuple(getattr(hidden, 'shape', ())) or type(hidden).__name__}")
    device = hidden.device
    check_tensor(f"{prefix}weight", weight, device=device)
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}hidden and {prefix}weight must share one float dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or (vocab is not None and weight.shape[0] != vocab):
        rows = "V" if vocab is None else f"V={vocab}"
        raise ValueError(f"{prefix}weight must be [{rows}, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, device=device)
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype:
            raise ValueError(f"{prefix}bias must be [V={weight.shape[0]}] in {hidden.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")


def _reference_logprobs(ref_hidden, ref_weight, ref_bias, targets, row_index, shape, config, backend, checks):
    """The reference model's log-probs of ``targets`` [B, T] (0 at padding) from its LM head, forward only,
    and what ran it (``Choice.describe()``)."""
    stats = select(LINEAR_TOKEN_STATS, backend, ref_hidden)
    with torch.no_grad():
        ref_rows = stats.fn(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, targets.reshape(-1), row_index,
                            bias=ref_bias, temperature=config.temperature)[0]
    check_nonfinite_logits(checks, ref_rows, row_index, shape, lm_head=True, reference=True)
    return scatter_rows(ref_rows, row_index, shape), stats.describe()


@dataclass
class _Prepared:
    """What stage 2 knows before the objective: every input of the per-token coefficients but logp and H."""

    token_advantages: torch.Tensor  # [B, T] (an expanded [B] view for per-response advantages)
    reported_advantages: torch.Tensor  # LossOutput.advantages
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    norm: Normalizers
    rollout_weights: Optional[torch.Tensor]
    rollout_metrics: Dict[str, torch.Tensor]


def _before_objective(logp, entropy, mask, *, backend, rewards, group_ids, advantages, old_logprobs, ref_logprobs,
                      rollout_logprobs, rollout_is_weights, metric, config, step, global_num_tokens, global_num_seqs,
                      backends, checks, advantage_inputs=None, pass_inputs=None) -> _Prepared:
    """The advantages, rollout weights, checked old / ref log-probs and normalisers. ``logp`` / ``entropy``
    are this pass's (the on-policy old log-probs, CANON's entropy), or None before the pass: the fused
    path, which backends.fused_pass_blocker admits only when nothing here reads them."""
    shape = mask.shape
    device = mask.device
    rollout_weights, rollout_metrics = _rollout_correction(logp, mask, old_logprobs, rollout_logprobs,
                                                           rollout_is_weights, config, checks)
    if rollout_weights is not None and "rollout_is_weights" in declared_inputs(config.advantage.estimator).optional:
        pass_inputs = {**(pass_inputs or {}), "rollout_is_weights": rollout_weights}  # verl feeds its estimator too
    if advantage_inputs is not None and rewards is None:
        raise ValueError("advantage_inputs are inputs of the estimator: pass them with `rewards` and `group_ids`")
    _check_normalizers_cover(checks, mask, global_num_tokens, global_num_seqs)
    if advantages is not None:
        if rewards is not None:
            raise ValueError("pass either `advantages` or `rewards` + `group_ids`, not both")
        token_advantages = check_advantages(advantages, shape, device, mask, checks)
        reported_advantages = advantages.detach()
    else:
        if rewards is None or group_ids is None:
            raise ValueError("policy_loss needs `advantages`, or `rewards` and `group_ids` to compute them")
        check_tensor("rewards", rewards, device=device)
        if rewards.dim() not in (1, 2) or rewards.shape[0] != shape[0]:
            raise ValueError(f"rewards must be [B={shape[0]}], or [B, K] for K reward functions, got "
                             f"{tuple(rewards.shape)}")
        needs_entropy = config.advantage.estimator == "canon" and config.advantage.canon_metric == "entropy"
        declared = declared_inputs(config.advantage.estimator)
        for name in advantage_inputs or {}:
            if name == "mask" or name not in ADVANTAGE_INPUTS:
                raise ValueError(f"advantage_inputs[{name!r}] is not an estimator input; valid keys: "
                                 f"{sorted(set(ADVANTAGE_INPUTS) - {'mask'})}")
            if name not in declared.required + declared.optional:
                raise ValueError(f"advantage_inputs[{name!r}] is not read by estimator {config.advantage.estimator!r} "
                                 f"(it reads {list(declared.required + declared.optional)})")
        # On-policy, the rollout policy's log-probs are this pass's own.
        inputs = {"old_logprobs": logp.detach() if old_logprobs is None and logp is not None else old_logprobs,
                  **(pass_inputs or {}), **(advantage_inputs or {})}
        # The caller's rewards as given (never downcast): the estimators compute in float64.
        reported_advantages, choice = advantages_and_choice(
            rewards, group_ids, config.advantage, metric=metric, mask=mask,
            token_entropy=entropy.detach() if needs_entropy and entropy is not None else None,
            step=step, backend=backend, checks=checks, **inputs)
        backends["advantages"] = choice.describe()
        token_advantages = (reported_advantages if reported_advantages.dim() == 2
                            else reported_advantages[:, None].expand(shape))

    old = check_per_token("old_logprobs", old_logprobs, shape, device, mask, checks)
    ref = check_per_token("ref_logprobs", ref_logprobs, shape, device, mask, checks)
    norm = Normalizers(global_num_tokens, global_num_seqs, config.loss_scale_factor)
    return _Prepared(token_advantages, reported_advantages, old, ref, norm, rollout_weights, rollout_metrics)


def _loss_output(loss, metrics, prepared: _Prepared, logp, entropy, mask, rewards, backends,
                 checks: PendingChecks, config: LossConfig, tensor_metrics: bool) -> LossOutput:
    """The LossOutput, with the call's one batched host read of the metrics and every pending check (the
    caller's to make with ``tensor_metrics``: LossOutput.read_metrics)."""
    device = mask.device
    token_advantages = prepared.token_advantages
    metrics.update(prepared.rollout_metrics)

    # Over the valid tokens, as masked reductions (a list of them would be a host sync); 0 for an empty mask.
    advantages = token_advantages.detach()
    count = mask.sum()
    any_valid = count > 0
    # summed in float64: an fp16 sum overflows past 65,504 where the mean does not
    metrics["critic/advantages/mean"] = torch.where(mask, advantages, 0).sum(dtype=torch.float64) / count.clamp(min=1)
    for name, reduce_fn, fill in (("max", torch.amax, -math.inf), ("min", torch.amin, math.inf)):
        filled = torch.where(mask, advantages, fill).reshape(-1)
        extreme = reduce_fn(torch.cat([filled, filled.new_full((1,), fill)]))  # one entry at least (B T = 0)
        metrics[f"critic/advantages/{name}"] = torch.where(any_valid, extreme, 0)
    if rewards is not None:
        metrics["critic/score/mean"] = weighted_reward(rewards.detach().double(), config.advantage).mean()
    metrics = {name: value.detach().to(device=device, dtype=torch.float64).reshape(())
               for name, value in metrics.items()}
    out = LossOutput(loss=loss, logprobs=logp.detach(), entropy=None if entropy is None else entropy.detach(),
                     advantages=prepared.reported_advantages, metrics=metrics, backends=backends,
                     pending_checks=checks)
    return out if tensor_metrics else out.read_metrics()


def _loss_from_logprobs(logp, entropy, mask, *, backend, rewards, group_ids, advantages, old_logprobs,
                        ref_logprobs, rollout_logprobs, rollout_is_weights, metric, config, step, global_num_tokens,
                        global_num_seqs, backends, checks, advantage_inputs=None, pass_inputs=None,
                        reduce=True, tensor_metrics=False) -> LossOutput:
    """Stage 2, shared by every entry point: ``logp`` / ``entropy`` [B, T] with zeros at padded positions
    (``entropy`` may be None); ``backends`` what ran so far;
    ``checks`` the value checks so far, read with the metrics (docs/design.md §4.1); ``pass_inputs`` the
    estimator inputs the entry point provides (token ids, the pass's signals), which the caller's
    ``advantage_inputs`` override."""
    prepared = _before_objective(logp, entropy, mask, backend=backend, rewards=rewards, group_ids=group_ids,
                                 advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                 rollout_logprobs=rollout_logprobs, rollout_is_weights=rollout_is_weights,
                                 metric=metric, config=config, step=step, global_num_tokens=global_num_tokens,
                                 global_num_seqs=global_num_seqs, backends=backends, checks=checks,
                                 advantage_inputs=advantage_inputs, pass_inputs=pass_inputs)
    objective = select(OBJECTIVE, backend, logp, name=config.loss_mode, config=config, reduce=reduce)
    backends[OBJECTIVE] = objective.describe()
    loss, metrics = objective.fn(logp, entropy, mask, prepared.token_advantages, prepared.old, prepared.ref, config,
                                 prepared.norm, step=step, rollout_is_weights=prepared.rollout_weights, reduce=reduce)
    return _loss_output(loss, metrics, prepared, logp, entropy, mask, rewards, backends, checks, config,
                        tensor_metrics)


def policy_loss_from_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, *, entropy: Optional[torch.Tensor] = None,
                              rewards: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None,
                              advantages: Optional[torch.Tensor] = None, old_logprobs: Optional[torch.Tensor] = None,
                              ref_logprobs: Optional[torch.Tensor] = None, metric: Optional[torch.Tensor] = None,
                              rollout_logprobs: Optional[torch.Tensor] = None,
                              rollout_is_weights: Optional[torch.Tensor] = None,
                              config: Optional[LossConfig] = None, step: int = 0,
                              global_num_tokens: Optional[float] = None, global_num_seqs: Optional[float] = None,
                              backend: str = "auto",
                              advantage_inputs: Optional[Dict[str, torch.Tensor]] = None,
                              reduce: bool = True, tensor_metrics: bool = False) -> LossOutput:
    """``policy_loss`` from per-token log-probs the caller computed itself (TRL's or verl's own pass).

    ``logprobs [B, T]`` (float, differentiable: the gradient flows back into them) are the log-probs of
    the sampled tokens under the tempered policy (``config.temperature`` is not applied again);
    ``entropy [B, T]`` the per-token entropy, differentiable when ``config.entropy_coeff != 0``. Both may
    hold anything at padded positions. Every other keyword, the config, the metrics and the errors are
    those of ``policy_loss``. Without ``entropy``, ``entropy_coeff`` must be 0, CANON's entropy metric
    needs ``metric=``, and the metric ``actor/entropy`` is not reported (``LossOutput.entropy`` is None).
    There are no logits here: an estimator that reads token ids or a signal of the logits (ktae, ucas,
    optimal_token_baseline) gets them in ``advantage_inputs`` (e.g. from ``token_signals``).
    The Triton objective takes fp32 log-probs.
    """
    config = LossConfig() if config is None else config
    if not torch.is_tensor(logprobs) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got {getattr(logprobs, 'shape', type(logprobs))}")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating tensor, got {logprobs.dtype}")
    shape, device = logprobs.shape, logprobs.device
    checks = PendingChecks()
    mask = _check_common(mask, shape, device, config, step, global_num_tokens, global_num_seqs, reduce, checks)
    check_per_token("logprobs", logprobs, shape, device, mask, checks)
    if entropy is not None:
        check_per_token("entropy", entropy, shape, device, mask, checks)
        entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
    elif config.entropy_coeff != 0:
        raise ValueError(f"entropy_coeff={config.entropy_coeff} needs the per-token `entropy` (differentiable)")
    elif (rewards is not None and advantages is None and metric is None and config.advantage.estimator == "canon"
          and config.advantage.canon_metric == "entropy"):
        raise ValueError("canon_metric='entropy' needs the per-token `entropy`, or the per-response `metric`")
    check_bool("tensor_metrics", tensor_metrics)
    logp = torch.where(mask, logprobs, torch.zeros_like(logprobs))  # padded positions may hold anything
    return _loss_from_logprobs(logp, entropy, mask, backend=backend, rewards=rewards,
                               group_ids=group_ids, advantages=advantages, old_logprobs=old_logprobs,
                               ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                               rollout_is_weights=rollout_is_weights, metric=metric, config=config, step=step,
                               global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, backends={},
                               checks=checks, advantage_inputs=advantage_inputs, reduce=reduce,
                               tensor_metrics=tensor_metrics)


def policy_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                rewards: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None,
                advantages: Optional[torch.Tensor] = None, old_logprobs: Optional[torch.Tensor] = None,
                ref_logprobs: Optional[torch.Tensor] = None, metric: Optional[torch.Tensor] = None,
                rollout_logprobs: Optional[torch.Tensor] = None, rollout_is_weights: Optional[torch.Tensor] = None,
                config: Optional[LossConfig] = None, step: int = 0,
                global_num_tokens: Optional[float] = None, global_num_seqs: Optional[float] = None,
                backend: str = "auto", inplace_backward: bool = False,
                advantage_inputs: Optional[Dict[str, torch.Tensor]] = None, reduce: bool = True,
                tensor_metrics: bool = False) -> LossOutput:
    """Clipped policy-gradient loss from ``logits [B, T, V]`` of the sampled ``targets [B, T]``.

    Give ``advantages`` ([B] or [B, T]) or ``rewards [B]`` (or [B, K] for K reward functions) + ``group_ids
    [B]`` (the estimator of ``config.advantage`` runs inside the call; CANON's entropy metric is then the masked mean of this
    pass's own token entropy, unless ``metric`` is passed). ``old_logprobs=None`` means on-policy.
    ``global_num_tokens`` / ``global_num_seqs`` are the normalizers over all micro-batches and ranks.
    ``inplace_backward=True`` writes dlogits over the logits buffer (both backends): only when nothing
    else uses these logits afterwards; it saves the ``[B, T, V]`` gradient (a leaf's ``.grad`` then
    shares the leaf's memory: docs/design.md §4.1).
    ``reduce=False`` (Liger's) returns the per-token loss [B, T] as ``LossOutput.loss`` (objective in torch;
    docs/algorithms.md §1.8). ``LossOutput.backends`` says what ran for each stage. A NaN or +inf logit in a
    valid row, or a -inf logit at a valid target, raises a ValueError naming the first such (batch, position).
    ``tensor_metrics=True`` reads nothing back: ``LossOutput.metrics`` are 0-d tensors and the value checks
    wait for ``LossOutput.read_metrics()`` or ``check()`` (docs/design.md §2).

    With ``rewards``, the estimator gets what it declares (``fc.ESTIMATOR_INPUTS``) from this call: the
    mask, ``targets`` as token ids (ktae), ``old_logprobs`` (else this pass's own, on-policy), and the
    signals of these logits (ucas: self-certainty and raw target logit; optimal_token_baseline: sum p^2)
    from the same statistics pass. ``advantage_inputs`` adds the others (gae: ``values``; remax:
    ``baseline_rewards``; ``rollout_is_weights``) or replaces the pass's (e.g. the rollout policy's own
    self-certainty when off-policy), keyed like ``compute_advantages``' keywords.
    """
    config = LossConfig() if config is None else config
    if not torch.is_tensor(logits) or logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {getattr(logits, 'shape', type(logits))}")
    checks = PendingChecks()
    mask = _check_common(mask, logits.shape[:2], logits.device, config, step, global_num_tokens, global_num_seqs,
                         reduce, checks)
    check_bool("inplace_backward", inplace_backward)
    check_bool("tensor_metrics", tensor_metrics)
    targets = check_logits_and_targets(logits, targets, mask, checks)
    stats = select(TOKEN_STATS, backend, logits)
    backends = {TOKEN_STATS: stats.describe()}
    if stats.backend == "triton":
        # The objective's choice depends on the config and the device only (the log-probs it takes are the
        # statistics kernel's fp32): made here, it decides between one read of the logits and two.
        objective = select(OBJECTIVE, backend, torch.empty(0, dtype=torch.float32, device=logits.device),
                           name=config.loss_mode, config=config, reduce=reduce)
        blocker = fused_pass_blocker(
            stats, objective, config, needs_grad=torch.is_grad_enabled() and logits.requires_grad,
            advantages_given=advantages is not None, metric_given=metric is not None,
            old_given=old_logprobs is not None, advantage_inputs=advantage_inputs,
            rollout_weights_from_pass=(rollout_is_weights is None and config.rollout_is is not None
                                       and old_logprobs is None))
        backends[LOGITS_PASS] = describe_logits_pass(blocker)
        if blocker is None:
            backends[OBJECTIVE] = objective.describe()
            return _fused_policy_loss(logits, targets, mask, backends=backends, backend=backend,
                                      rewards=rewards, group_ids=group_ids, advantages=advantages,
                                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                      rollout_logprobs=rollout_logprobs, rollout_is_weights=rollout_is_weights,
                                      metric=metric, config=config, step=step, global_num_tokens=global_num_tokens,
                                      global_num_seqs=global_num_seqs, inplace_backward=inplace_backward,
                                      advantage_inputs=advantage_inputs, checks=checks,
                                      tensor_metrics=tensor_metrics)
    # Every position, the padded ones skipped (row_valid): no list of the valid rows, whose length would be a
    # host sync (the torch backend makes that list itself, to size its chunks).
    outputs = stats.fn(logits, targets, torch.arange(mask.numel(), device=mask.device), config.temperature,
                       inplace_backward=inplace_backward,
                       extra_stats=_needs_extra_signals(config, rewards, advantage_inputs), row_valid=mask.reshape(-1))
    grid = [x.reshape(mask.shape) for x in outputs]
    check_nonfinite_logits(checks, grid[0].detach(), None, mask.shape, valid=mask)
    return _loss_from_logprobs(grid[0], grid[1], mask,
                               backend=backend, rewards=rewards, group_ids=group_ids, advantages=advantages,
                               old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                               rollout_is_weights=rollout_is_weights, metric=metric, config=config,
                               step=step, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                               backends=backends, checks=checks, advantage_inputs=advantage_inputs,
                               pass_inputs=dict(token_ids=targets, **_pass_signals(grid)),
                               reduce=reduce, tensor_metrics=tensor_metrics)


def _fused_policy_loss(logits, targets, mask, *, backends, checks, inplace_backward, config,
                       tensor_metrics, **kwargs) -> LossOutput:
    """policy_loss when every per-token coefficient is known before the pass (backends.fused_pass_blocker):
    stage 2's O(N + B) work first, then one kernel for the statistics, the objective and dlogits
    (docs/design.md §4.3). The kernel walks every position and skips the padded ones: no list of the valid
    rows, whose length would be a host sync."""
    prepared = _before_objective(None, None, mask, config=config, backends=backends, checks=checks,
                                 pass_inputs=dict(token_ids=targets), **kwargs)
    loss, metrics, logp, entropy = fused_policy_loss_launch(config.loss_mode)(
        logits, targets, mask, prepared.token_advantages, prepared.old, prepared.ref, config, prepared.norm,
        prepared.rollout_weights, inplace_backward=inplace_backward)
    check_nonfinite_logits(checks, logp, None, mask.shape, valid=mask)
    return _loss_output(loss, metrics, prepared, logp, entropy, mask, kwargs["rewards"], backends, checks, config,
                        tensor_metrics)


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, rewards: Optional[torch.Tensor] = None,
                       group_ids: Optional[torch.Tensor] = None, advantages: Optional[torch.Tensor] = None,
                       old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                       rollout_logprobs: Optional[torch.Tensor] = None, rollout_is_weights: Optional[torch.Tensor] = None,
                       metric: Optional[torch.Tensor] = None, config: Optional[LossConfig] = None, step: int = 0,
                       global_num_tokens: Optional[float] = None, global_num_seqs: Optional[float] = None,
                       backend: str = "auto", advantage_inputs: Optional[Dict[str, torch.Tensor]] = None,
                       reduce: bool = True, ref_hidden: Optional[torch.Tensor] = None,
                       ref_weight: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
                       tensor_metrics: bool = False) -> LossOutput:
    """``policy_loss`` from the last hidden states ``hidden [B, T, H]`` and the LM head ``weight [V, H]``
    (+ ``bias [V]``), without materialising the [B, T, V] logits (logits = hidden @ weight.T + bias).
    Same keywords and output as ``policy_loss``; the loss is differentiable w.r.t. hidden, weight, bias.
    Non-finite logits of a valid row (NaN or inf in its hidden state, in the weight or the bias) raise
    as in ``policy_loss``.

    ``ref_hidden [B, T, H_ref]`` + ``ref_weight [V, H_ref]`` (+ ``ref_bias [V]``), the reference model's last
    hidden states and LM head (Liger's ``ref_input`` / ``ref_weight``), instead of ``ref_logprobs``: its
    log-probs of the targets come from a forward-only pass of the same LM-head statistics (no [B, T, V]
    logits, no gradient, at ``config.temperature``); ``LossOutput.backends["ref_linear_token_stats"]`` says
    which backend ran it."""
    config = LossConfig() if config is None else config
    if not torch.is_tensor(hidden) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {getattr(hidden, 'shape', type(hidden))}")
    device = hidden.device
    checks = PendingChecks()
    mask = _check_common(mask, hidden.shape[:2], device, config, step, global_num_tokens, global_num_seqs, reduce,
                         checks)
    _check_lm_head("", hidden, weight, bias, hidden.shape[:2])
    check_tensor("targets", targets, device=device)
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be [B, T] = {tuple(hidden.shape[:2])}")
    check_bool("tensor_metrics", tensor_metrics)
    targets = check_targets_in_range(targets, weight.shape[0], mask, checks)
    uses_ref_head = any(x is not None for x in (ref_hidden, ref_weight, ref_bias))
    if uses_ref_head:
        if ref_logprobs is not None:
            raise ValueError("pass either `ref_logprobs` or `ref_hidden` + `ref_weight` (to compute them), not both")
        if ref_hidden is None or ref_weight is None:
            raise ValueError("the reference model's LM head needs both `ref_hidden` [B, T, H_ref] and `ref_weight` "
                             "[V, H_ref] (`ref_bias` [V] optional)")
        _check_lm_head("ref_", ref_hidden, ref_weight, ref_bias, hidden.shape[:2], vocab=weight.shape[0])
    stats = select(LINEAR_TOKEN_STATS, backend, hidden)
    # The valid rows listed (one host sync): the LM head's GEMM tiles and backward workspace are sized by them.
    row_index = valid_row_index(mask)
    outputs = stats.fn(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), row_index,
                       bias=bias, temperature=config.temperature,
                       extra_stats=_needs_extra_signals(config, rewards, advantage_inputs))
    check_nonfinite_logits(checks, outputs[0].detach(), row_index, mask.shape, lm_head=True)
    backends = {LINEAR_TOKEN_STATS: stats.describe()}
    if uses_ref_head:
        ref_logprobs, backends[REF_LINEAR_TOKEN_STATS] = _reference_logprobs(
            ref_hidden, ref_weight, ref_bias, targets, row_index, mask.shape, config, backend, checks)
    grid = [scatter_rows(x, row_index, mask.shape) for x in outputs]
    return _loss_from_logprobs(grid[0], grid[1], mask,
                               backend=backend, rewards=rewards, group_ids=group_ids, advantages=advantages,
                               old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                               rollout_is_weights=rollout_is_weights, metric=metric, config=config,
                               step=step, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                               backends=backends, checks=checks, advantage_inputs=advantage_inputs,
                               pass_inputs=dict(token_ids=targets, **_pass_signals(grid)),
                               reduce=reduce, tensor_metrics=tensor_metrics)


class FusedPolicyLoss(torch.nn.Module):
    """``nn.Module`` wrapper of ``policy_loss`` holding its ``LossConfig`` and backend: ``forward`` takes every
    other keyword of ``policy_loss`` (the config and backend are the module's; change them on the module)."""

    def __init__(self, config: Optional[LossConfig] = None, backend: str = "auto"):
        super().__init__()
        config = LossConfig() if config is None else config
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be a fused_canon.LossConfig, got {type(config).__name__}")
        check_backend(backend)
        self.config = config
        self.backend = backend

    def forward(self, logits, targets, mask, **kwargs) -> LossOutput:
        for name in ("config", "backend"):
            if name in kwargs:
                raise TypeError(f"FusedPolicyLoss.forward got {name}={kwargs[name]!r}: the module's own "
                                f"{name} (self.{name}) applies; set it on the module or build another one")
        return policy_loss(logits, targets, mask, config=self.config, backend=self.backend, **kwargs)
