"""The per-token policy objective on [B, T] vectors: policy losses, KL terms and aggregation.

Formulas: docs/algorithms.md §1.5-1.10 and §4, following verl 0.9.1 (the source of the golden cases).
This module never sees logits: it maps per-token log-probs and entropies to a scalar loss, so it
is shared unchanged by every statistics backend (torch reference, Triton logits path, Triton
LM-head path). Autograd through it yields exactly the per-token coefficients of §8.3.

Each policy loss is one small function registered by name (``register_policy_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import inf, log
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import LossConfig, seeded_generator

__all__ = ["kl_penalty", "agg_loss", "masked_mean", "register_policy_loss", "POLICY_LOSSES", "TokenLoss",
           "policy_objective", "clip_cov_selection", "kl_cov_selection", "token_covariance", "aggregation_weights",
           "zero_padded", "gspo_sequence_log_ratio", "check_ref_for_kl", "policy_token_weights", "top_entropy_mask",
           "kl_importance_ratio", "triton_objective_limit", "check_unreduced",
           "triton_policy_objective", "triton_fused_policy_loss"]

LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi/pi_old) to ±20 in vanilla, cispo (and k3's d)
GSPO_LOG_RATIO_MAX = 10.0
K3_VALUE_CLAMP = 10.0  # verl clamps the k3 value to ±10


def zero_padded(x: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` detached in ``like``'s dtype at valid positions, 0 at padded ones (which may hold garbage)."""
    return torch.where(mask, x.detach().to(like.dtype), torch.zeros_like(like))


def check_ref_for_kl(config: LossConfig, ref_logp: Optional[torch.Tensor]) -> None:
    if ref_logp is None and config.kl_coef != 0:
        raise ValueError("kl_coef != 0 needs ref_logprobs (the reference policy's log-probs)")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's masked_mean: sum(v m) / (sum(m) + 1e-8), over everything."""
    return (values * mask).sum() / (mask.sum() + 1e-8)


# ---------------------------------------------------------------------------------------------
# KL penalty (§1.10)
# ---------------------------------------------------------------------------------------------

def _kl_value(d: torch.Tensor, kind: str, k3_clamp: bool = True) -> torch.Tensor:
    """The KL estimator of d = logp - ref; ``k3_clamp``: verl's clamps of k3 (ref - logp to +-20, value to +-10)."""
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d.square()
    if kind in ("k3", "low_var_kl"):
        if not k3_clamp:
            return torch.exp(-d) + d - 1.0
        neg = torch.clamp(-d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ref - logp
        return torch.clamp(torch.exp(neg) - neg - 1.0, -K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    raise ValueError(f"unknown kl_type {kind!r}; choose one of k1|kl, abs, k2|mse, k3|low_var_kl (optionally with '+')")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str = "k3", *,
               k3_clamp: bool = True) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, differentiable w.r.t. ``logprobs``.

    A ``+`` suffix (e.g. "k3+") keeps the base estimator's value with the k2 gradient (straight-through).
    ``k3_clamp=False`` drops verl's clamps of k3 (TRL and Liger compute it unclamped).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != ref_logprobs shape {tuple(ref_logprobs.shape)}")
    d = logprobs - ref_logprobs.detach()
    if kl_type.endswith("+"):
        base = _kl_value(d, kl_type[:-1], k3_clamp)
        k2 = _kl_value(d, "k2")
        return k2 - k2.detach() + base.detach()
    return _kl_value(d, kl_type, k3_clamp)


# ---------------------------------------------------------------------------------------------
# Aggregation (§1.8, verl 0.9.1 semantics)
# ---------------------------------------------------------------------------------------------

@dataclass
class Normalizers:
    """Denominators of the aggregation. Pass the global counts (all micro-batches, all ranks) so that
    the sum of the micro-batch losses equals the loss of the whole batch."""

    num_tokens: Optional[float] = None
    num_seqs: Optional[float] = None
    loss_scale_factor: Optional[float] = None


def aggregation_weights(tokens_per_seq: torch.Tensor, mode: str, norm: Normalizers, padded_length: int) -> torch.Tensor:
    """Weight w_b of each valid token of row b in the aggregated loss, [B]: agg = sum_b w_b sum_t m l.

    One definition of the normalizers, used by ``agg_loss`` and by the Triton objective kernel.
    Local counts (and the padded length) are floored at 1, so an empty mask gives 0 (with zero gradient),
    never 0/0.
    """
    if mode == "token-mean":
        num_tokens = norm.num_tokens if norm.num_tokens is not None else tokens_per_seq.sum().clamp(min=1)
        return torch.ones_like(tokens_per_seq) / num_tokens
    if mode == "token-sum":  # verl 0.9.1's: the plain sum over the valid tokens (a rank scales by its DP size)
        return torch.ones_like(tokens_per_seq)
    num_seqs = norm.num_seqs if norm.num_seqs is not None else (tokens_per_seq > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return 1.0 / ((tokens_per_seq + 1e-8) * num_seqs)
    if mode == "seq-mean-token-sum":
        return torch.ones_like(tokens_per_seq) / num_seqs
    if mode == "seq-mean-token-sum-norm":
        # The padded T, floored at 1 like the counts: T = 0 has no token, and its loss is 0, not 0 / 0.
        scale = norm.loss_scale_factor if norm.loss_scale_factor is not None else max(padded_length, 1)
        return torch.ones_like(tokens_per_seq) / (num_seqs * scale)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def agg_loss(values: torch.Tensor, mask: torch.Tensor, mode: str, norm: Normalizers = Normalizers()) -> torch.Tensor:
    """Aggregate a per-token quantity [B, T] over the valid tokens (mask: float 0/1)."""
    weights = aggregation_weights(mask.sum(-1), mode, norm, values.shape[-1])
    return ((values * mask).sum(-1) * weights).sum()


# ---------------------------------------------------------------------------------------------
# Policy losses (§1.5-1.7, §4)
# ---------------------------------------------------------------------------------------------

@dataclass
class TokenLoss:
    values: torch.Tensor  # [B, T] per-token loss, differentiable w.r.t. logp
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # scalar tensors, verl names


PolicyLossFn = Callable[..., TokenLoss]
POLICY_LOSSES: Dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str, *, overwrite: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register ``fn(logp, old_logp, advantages, mask, config, *, step) -> TokenLoss`` under ``name``.

    All tensors are [B, T]; ``mask`` is float 0/1; padded positions hold zeros. A name that is already
    registered is refused unless ``overwrite=True`` (replacing a built-in also replaces what its
    Triton kernel computed: the name then runs in torch).
    """

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and not overwrite:
            raise ValueError(f"policy loss {name!r} is already registered ({POLICY_LOSSES[name].__qualname__}); "
                             "pass overwrite=True to replace it")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def _clipped_pair(advantages, ratio, config):
    """-A rho and -A clip(rho, 1 - eps_low, 1 + eps_high)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    return unclipped, clipped


def two_sided_clip(advantages, ratio, unclipped, clipped, mask, config):
    """TRL's and Liger's delta (dual_clip="two_sided"): max(-A min(rho, c), -A clip(rho)); the
    pg_clipfrac_lower metric is the fraction of tokens whose ratio the cap c bounds (rho > c)."""
    capped = -advantages * torch.clamp(ratio, max=config.clip_ratio_c)
    return torch.maximum(capped, clipped), masked_mean((ratio > config.clip_ratio_c).float(), mask)


@register_policy_loss("vanilla")
def vanilla(logp, old_logp, advantages, mask, config, *, step=0):
    """PPO clip with asymmetric (DAPO) ranges and dual clip c: for A < 0 (verl) or two-sided (TRL's delta)."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped, clipped = _clipped_pair(advantages, ratio, config)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"actor/pg_clipfrac": masked_mean((clipped > unclipped).float(), mask),
               "actor/ppo_kl": masked_mean(-log_ratio, mask)}
    if config.clip_ratio_c is None:
        metrics["actor/pg_clipfrac_lower"] = torch.zeros((), device=logp.device)
        return TokenLoss(loss, metrics)
    if config.dual_clip == "two_sided":
        loss, metrics["actor/pg_clipfrac_lower"] = two_sided_clip(advantages, ratio, unclipped, clipped, mask, config)
        return TokenLoss(loss, metrics)
    dual = -advantages * config.clip_ratio_c
    metrics["actor/pg_clipfrac_lower"] = masked_mean(((loss > dual) & (advantages < 0)).float(), mask)
    loss = torch.where(advantages < 0, torch.minimum(loss, dual), loss)
    return TokenLoss(loss, metrics)


@register_policy_loss("gspo")
def gspo(logp, old_logp, advantages, mask, config, *, step=0):
    """Sequence-level ratio exp(mean_t log rho), per-token gradient path, aggregated with loss_agg_mode
    (verl 0.9.1); no dual clip but the two-sided one (TRL's delta at importance_sampling_level="sequence")."""
    log_ratio = logp - old_logp
    seq_log_ratio = gspo_sequence_log_ratio(log_ratio, mask)
    if config.gspo_gradient == "sequence":  # TRL's (B, 1) ratio: each token's gradient is its row's mean
        token_log_ratio = seq_log_ratio[:, None].expand_as(logp)
    else:  # verl's: the value of the sequence ratio, each token's own gradient path
        token_log_ratio = logp - logp.detach() + seq_log_ratio.detach()[:, None]
    ratio = torch.exp(torch.clamp(token_log_ratio, max=GSPO_LOG_RATIO_MAX))
    unclipped, clipped = _clipped_pair(advantages, ratio, config)
    metrics = {"actor/pg_clipfrac": masked_mean((clipped > unclipped).float(), mask),
               "actor/ppo_kl": masked_mean(-log_ratio, mask),
               "actor/pg_clipfrac_lower": torch.zeros((), device=logp.device)}
    if config.clip_ratio_c is not None and config.dual_clip == "two_sided":
        loss, metrics["actor/pg_clipfrac_lower"] = two_sided_clip(advantages, ratio, unclipped, clipped, mask, config)
        return TokenLoss(loss, metrics)
    return TokenLoss(torch.maximum(unclipped, clipped), metrics)


def gspo_sequence_log_ratio(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GSPO's per-row mean log-ratio over the valid tokens, [B, T] -> [B] (0 for an empty row)."""
    return (log_ratio * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def cispo_bounds(config: LossConfig):
    """(lower, upper) of cispo's clipped ratio: verl's relative [1 - low, 1 + high], or TRL's absolute
    (None, clip_ratio_high)."""
    if config.cispo_bound == "absolute":
        return None, config.clip_ratio_high
    return 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high


@register_policy_loss("cispo")
def cispo(logp, old_logp, advantages, mask, config, *, step=0):
    """-sg(clip(rho)) A logp: the clipped ratio weights a REINFORCE gradient, never zeroing it.
    pg_clipfrac counts as the bound's peer does: verl (relative) every token with rho != clip(rho),
    TRL and Liger (absolute) the tokens with rho > cap and A > 0."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    lower, upper = cispo_bounds(config)
    clipped_ratio = torch.clamp(ratio, lower, upper)
    clipped = (ratio > upper) & (advantages > 0) if lower is None else ratio != clipped_ratio
    metrics = {"actor/pg_clipfrac": masked_mean(clipped.float(), mask),
               "actor/ppo_kl": masked_mean(-log_ratio, mask),
               "actor/pg_clipfrac_lower": torch.zeros((), device=logp.device)}
    return TokenLoss(-advantages * clipped_ratio * logp, metrics)


def clip_cov_selection(logp, old, advantages, valid, config: LossConfig, step: int) -> torch.Tensor:
    """Tokens whose loss Clip-Cov multiplies by 0, [B, T] bool: shared by
    ``clip_cov`` and the Triton objective (inputs zero-padded as ``policy_objective`` passes them)."""
    logp = logp.detach()
    unclipped, clipped = _clipped_pair(advantages, torch.exp(logp - old), config)
    is_valid = valid > 0
    # The batch means as verl computes them with its integer mask: its count + 1e-8 is a float32 number,
    # the count itself, so N equal advantages centre to exactly 0 (in float64 too; §4.1).
    count = valid.sum().clamp(min=1)
    cov = (advantages - (advantages * valid).sum() / count) * (logp - (logp * valid).sum() / count)
    eligible = is_valid & ~(clipped > unclipped) & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)
    candidates = eligible.reshape(-1).nonzero().squeeze(-1)
    num_clip = max(int(config.clip_cov_ratio * int(is_valid.sum())), 1)
    generator = seeded_generator(config.seed, step)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:num_clip].to(candidates.device)]
    return torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device).index_fill_(0, chosen, True) \
        .reshape(valid.shape)


def token_covariance(logp, advantages, valid) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Entropy Mechanism's per-token covariance terms (§4.1): ``(flat indices of the valid tokens [N],
    (A - mean A)(logp - mean logp) [N])``, the means plain over the valid tokens, logp detached. Their
    mean is Cov(logp, A), the quantity the paper finds driving the entropy down. KL-Cov selects by it;
    Clip-Cov keeps verl's form, whose means divide by the count + 1e-8 (as upstream)."""
    valid_index = (valid > 0).reshape(-1).nonzero().squeeze(-1)
    valid_adv, valid_logp = advantages.reshape(-1)[valid_index], logp.detach().reshape(-1)[valid_index]
    return valid_index, (valid_adv - valid_adv.mean()) * (valid_logp - valid_logp.mean())


def kl_cov_selection(logp, advantages, valid, config: LossConfig) -> torch.Tensor:
    """Tokens KL-Cov penalises, [B, T] bool: shared by ``kl_cov`` and the Triton objective."""
    penalized = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    valid_index, cov = token_covariance(logp, advantages, valid)
    if len(valid_index) > 0:
        k = max(1, int(len(cov) * config.kl_cov_ratio))
        penalized.index_fill_(0, valid_index[torch.topk(cov, k, largest=True).indices], True)
    return penalized.reshape(valid.shape)


@register_policy_loss("clip_cov")
def clip_cov(logp, old_logp, advantages, mask, config, *, step=0):
    """PPO clip (no dual clip, no log-ratio clamp), plus the loss of a random subset of the tokens with
    lb < cov < ub (and not already PPO-clipped) multiplied by 0. The subset is seeded by config.seed
    and step (upstream: unseeded)."""
    log_ratio = logp - old_logp
    unclipped, clipped = _clipped_pair(advantages, torch.exp(log_ratio), config)
    keep = (~clip_cov_selection(logp, old_logp, advantages, mask, config, step)).to(logp.dtype)
    metrics = {"actor/pg_clipfrac": masked_mean((keep == 0).float(), mask),
               "actor/ppo_kl": masked_mean(-log_ratio, mask)}
    return TokenLoss(torch.maximum(unclipped, clipped) * keep, metrics)


@register_policy_loss("kl_cov")
def kl_cov(logp, old_logp, advantages, mask, config, *, step=0):
    """Unclipped -A rho, plus ppo_kl_coef |logp - old| on the top-k tokens by covariance."""
    log_ratio = logp - old_logp
    abs_kl = log_ratio.abs()
    penalized = kl_cov_selection(logp, advantages, mask, config)
    loss = -advantages * torch.exp(log_ratio) + config.ppo_kl_coef * abs_kl * penalized
    return TokenLoss(loss, {"actor/ppo_kl": masked_mean(abs_kl, mask)})


# ---------------------------------------------------------------------------------------------
# More policy losses of verl 0.9.1 (§1.7): torch only (the objective is O(N) work on [B, T] vectors)
# ---------------------------------------------------------------------------------------------

def _unclipped_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The verl metrics of a loss that clips nothing: clip fractions 0, ppo_kl = masked mean of old - logp."""
    zero = torch.zeros((), device=log_ratio.device)
    return {"actor/pg_clipfrac": zero, "actor/ppo_kl": masked_mean(-log_ratio, mask), "actor/pg_clipfrac_lower": zero}


@register_policy_loss("sapo")
def sapo(logp, old_logp, advantages, mask, config, *, step=0):
    """SAPO: a soft gate instead of a clip, token loss -sigmoid(tau (rho - 1)) (4 / tau) A, with
    tau = sapo_tau_pos where A > 0 and sapo_tau_neg elsewhere, rho = exp(clamp(logp - old, +-20)).
    Aggregated with loss_agg_mode; verl 0.9.1 forces seq-mean-token-mean whatever the config says."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    tau = torch.where(advantages > 0, torch.full_like(advantages, config.sapo_tau_pos),
                      torch.full_like(advantages, config.sapo_tau_neg))
    gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1.0)) * (4.0 / tau)
    return TokenLoss(-gate * advantages, _unclipped_metrics(log_ratio, mask))


@register_policy_loss("gpg")
def gpg(logp, old_logp, advantages, mask, config, *, step=0):
    """GPG: plain policy gradient -A logp, no ratio and no clip (old log-probs only feed ppo_kl)."""
    return TokenLoss(-advantages * logp, _unclipped_metrics(logp - old_logp, mask))


GEO_MEAN_AGG_MODE = "seq-mean-token-mean"


@register_policy_loss("geo_mean")
def geo_mean(logp, old_logp, advantages, mask, config, *, step=0):
    """GMPO, a sequence-level objective: ratio_i = exp(mean_t of the clipped log-ratio) with the clip on
    the log-ratio, d~ = s min(s d, s clamp(d, -clip_ratio_low, clip_ratio_high)), s = sign(A), no +-20
    clamp; loss = -mean over sequences of ratio_i times the sequence's mean advantage. As a token loss
    -A_t ratio_i aggregated seq-mean-token-mean this is exactly verl's value; other modes are refused.
    Clip fractions: masked mean of [d != clamp(d)] where A > 0 (pg_clipfrac) and A < 0 (lower)."""
    if config.loss_agg_mode != GEO_MEAN_AGG_MODE:
        raise ValueError(f"loss_mode='geo_mean' (GMPO) is a sequence-level objective: it needs "
                         f"loss_agg_mode={GEO_MEAN_AGG_MODE!r}, got {config.loss_agg_mode!r}")
    log_ratio = logp - old_logp
    sign = torch.sign(advantages)
    bounded = torch.clamp(log_ratio, -config.clip_ratio_low, config.clip_ratio_high)
    clipped_log_ratio = sign * torch.minimum(sign * log_ratio, sign * bounded)
    seq_ratio = torch.exp((clipped_log_ratio * mask).sum(-1) / (mask.sum(-1) + 1e-8))
    clipped = (log_ratio != bounded).float()
    metrics = {"actor/pg_clipfrac": masked_mean(clipped * (advantages > 0), mask),
               "actor/ppo_kl": masked_mean(-log_ratio, mask),
               "actor/pg_clipfrac_lower": masked_mean(clipped * (advantages < 0), mask)}
    return TokenLoss(-advantages * seq_ratio[:, None], metrics)


def _dppo(logp, old_logp, advantages, mask, config, keep_positive, keep_negative):
    """DPPO's shared form: -A sg(min(rho, c)) logp on the tokens inside the divergence trust region
    (keep_positive where A > 0, keep_negative elsewhere), 0 outside; c = clip_ratio_c (None: no cap)."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    cap = inf if config.clip_ratio_c is None else config.clip_ratio_c
    kept = torch.where(advantages > 0, keep_positive, keep_negative).detach().to(logp.dtype)
    metrics = {"actor/pg_clipfrac": masked_mean(1.0 - kept, mask), "actor/ppo_kl": masked_mean(-log_ratio, mask),
               "actor/pg_clipfrac_lower": masked_mean((ratio > cap).to(logp.dtype) * kept, mask)}
    return TokenLoss(-advantages * torch.clamp(ratio, max=cap).detach() * logp * kept, metrics)


@register_policy_loss("dppo_tv")
def dppo_tv(logp, old_logp, advantages, mask, config, *, step=0):
    """DPPO-Binary-TV (verl 0.9.1): a token stays while p - p_old <= clip_ratio_high (A > 0) or
    >= -clip_ratio_low (A <= 0), p = exp(logp); clip_ratio_low/high are divergence bounds here."""
    gap = torch.exp(logp) - torch.exp(old_logp)
    return _dppo(logp, old_logp, advantages, mask, config, gap <= config.clip_ratio_high, gap >= -config.clip_ratio_low)


@register_policy_loss("dppo_kl")
def dppo_kl(logp, old_logp, advantages, mask, config, *, step=0):
    """DPPO-Binary-KL (verl 0.9.1): the binary KL of (p_old, 1 - p_old) to (p, 1 - p) bounded by
    clip_ratio_high (A > 0; tokens whose p went down always stay) or clip_ratio_low (A <= 0; p went up)."""
    prob, old_prob = torch.exp(logp), torch.exp(old_logp)
    binary_kl = old_prob * (old_logp - logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    return _dppo(logp, old_logp, advantages, mask, config, (binary_kl <= config.clip_ratio_high) | (prob <= old_prob),
                 (binary_kl <= config.clip_ratio_low) | (prob >= old_prob))


@register_policy_loss("dro")
def dro(logp, old_logp, advantages, mask, config, *, step=0):
    """DRO (verl 0.9.1): -(A logp - dro_beta / 2 (logp - old)^2), no ratio and no clip."""
    if config.dro_beta is None:
        raise ValueError("loss_mode='dro' needs dro_beta > 0 (its quadratic log-ratio penalty)")
    log_ratio = logp - old_logp
    return TokenLoss(-(logp * advantages - 0.5 * config.dro_beta * log_ratio.square()),
                     _unclipped_metrics(log_ratio, mask))


VESPO_LOG_WEIGHT_MIN = log(1e-8)  # TRL's floor of log w (and of each rollout IS log-weight)


def vespo_gamma_weight(log_ratio, advantages, mask, config: LossConfig,
                       rollout_is_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """VESPO's detached gamma weight phi(w) = exp(lambda + k log w - lambda w) per token, [B, T] (§1.7):
    log w = the row's sum of clamp(logp - old, +-20) plus its rollout IS log-weights (token level: the
    row's sum of clamp(log w_t, log 1e-8, 20); rollout_is='sequence': the row's one log-weight), clamped
    to [log 1e-8, 20]; (k, lambda) are the _pos pair where A >= 0, the _neg pair elsewhere."""
    log_w = (torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask).sum(-1)
    if rollout_is_weights is not None:
        log_is = torch.clamp(torch.log(rollout_is_weights), VESPO_LOG_WEIGHT_MIN, LOG_RATIO_CLAMP) * mask
        log_w = log_w + (gspo_sequence_log_ratio(log_is, mask) if config.rollout_is == "sequence" else log_is.sum(-1))
    log_w = torch.clamp(log_w, VESPO_LOG_WEIGHT_MIN, LOG_RATIO_CLAMP)[:, None]
    non_negative = advantages >= 0
    k = torch.where(non_negative, config.vespo_k_pos, config.vespo_k_neg)
    rate = torch.where(non_negative, config.vespo_lambda_pos, config.vespo_lambda_neg)
    phi = torch.exp(rate + k * log_w - rate * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0).detach()


@register_policy_loss("vespo")
def vespo(logp, old_logp, advantages, mask, config, *, step=0, rollout_is_weights=None):
    """VESPO (TRL, Liger): -sg(phi(w)) A logp, phi the gamma weight of the row's sequence ratio w
    (``vespo_gamma_weight``), which folds the rollout IS weights in (they do not multiply the token loss)."""
    log_ratio = logp - old_logp
    phi = vespo_gamma_weight(log_ratio.detach(), advantages, mask, config, rollout_is_weights)
    metrics = _unclipped_metrics(log_ratio, mask)
    tokens = mask.sum(-1)
    row_phi = (phi * mask).sum(-1) / tokens.clamp(min=1)  # the mean over the rows with a valid token (TRL's metric)
    metrics["actor/vespo_phi_seq_mean"] = row_phi.sum() / (tokens > 0).sum().clamp(min=1)
    return TokenLoss(-phi * advantages * logp, metrics)


# Losses that take the rollout IS weights themselves (keyword ``rollout_is_weights``) instead of having
# them multiply their token loss.
FOLDS_ROLLOUT_WEIGHTS = frozenset({"vespo"})


# ---------------------------------------------------------------------------------------------
# The whole objective
# ---------------------------------------------------------------------------------------------

def policy_token_weights(loss_mode: str, rollout_is_weights: Optional[torch.Tensor], valid: torch.Tensor):
    """The per-token factor of the policy term, [B, T] or None: the rollout IS weights (§1.12), which
    verl and TRL multiply into every loss's token loss after its clip, except geo_mean, whose sequence
    objective verl weights by the geometric mean of its row's weights, and vespo, which folds them into
    its gamma weight (no factor). Shared by both backends."""
    if rollout_is_weights is None or loss_mode in FOLDS_ROLLOUT_WEIGHTS:
        return None
    if loss_mode == "geo_mean":
        log_weights = (torch.log(rollout_is_weights + 1e-10) * valid).sum(-1) / (valid.sum(-1) + 1e-8)
        return torch.exp(log_weights)[:, None].expand_as(valid)
    return rollout_is_weights


def top_entropy_mask(entropy: Optional[torch.Tensor], valid: torch.Tensor, config: LossConfig):
    """TRL's top_entropy_quantile q (§1.13): 1 on the valid tokens whose entropy is >= the (1 - q)-quantile
    (torch.quantile, linear interpolation) of this call's valid entropies, else 0; None when q == 1."""
    if config.top_entropy_quantile >= 1.0:
        return None
    if entropy is None:
        raise ValueError(f"top_entropy_quantile={config.top_entropy_quantile} needs the per-token `entropy`")
    kept = entropy.detach()[valid > 0]
    if kept.numel() == 0:
        return torch.zeros_like(valid)
    threshold = torch.quantile(kept.float(), 1.0 - config.top_entropy_quantile).to(entropy.dtype)
    return ((entropy.detach() >= threshold) & (valid > 0)).to(valid.dtype)


def kl_importance_ratio(logp, old, valid, config: LossConfig) -> torch.Tensor:
    """The ratio kl_bias_correction multiplies the KL term by (TRL's coef_1, §1.10), differentiable:
    exp(logp - old) per token, or gspo's sequence ratio exp(mean_t (logp - old)) per row, [B, 1]."""
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if config.loss_mode == "gspo":
        return torch.exp(gspo_sequence_log_ratio(logp - old, valid))[:, None]
    return torch.exp(log_ratio)


def policy_objective(logp: torch.Tensor, entropy: Optional[torch.Tensor], mask: torch.Tensor, advantages: torch.Tensor,
                     old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], config: LossConfig,
                     norm: Normalizers, step: int = 0, rollout_is_weights: Optional[torch.Tensor] = None,
                     reduce: bool = True):
    """loss = agg(w policy loss) - entropy_coeff agg(H) + kl_coef agg(KL); returns (loss, metrics).

    ``reduce=False`` returns instead the per-token loss [B, T] before the aggregation,
    w l - entropy_coeff H + kl_coef KL (0 at padding), whose aggregation with loss_agg_mode is the loss
    (``check_unreduced``); the metrics are those of the reduced loss.

    ``logp`` and ``entropy`` are [B, T] with zeros at padded positions; gradients flow through both
    (through entropy only when entropy_coeff != 0). Advantages, old and ref log-probs are constants.
    ``entropy`` may be None when entropy_coeff == 0: there is then no ``actor/entropy`` metric.
    ``rollout_is_weights`` [B, T] (detached, 0 at padding) or None: the factor w (``policy_token_weights``).
    """
    if config.loss_mode not in POLICY_LOSSES:
        raise ValueError(f"unknown loss_mode {config.loss_mode!r}; registered: {sorted(POLICY_LOSSES)}")
    check_ref_for_kl(config, ref_logp)
    valid = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else zero_padded(old_logp, mask, logp)
    folded = {"rollout_is_weights": rollout_is_weights} if config.loss_mode in FOLDS_ROLLOUT_WEIGHTS else {}
    token_loss = POLICY_LOSSES[config.loss_mode](logp, old, zero_padded(advantages, mask, logp), valid, config,
                                                 step=step, **folded)
    token_weight = policy_token_weights(config.loss_mode, rollout_is_weights, valid)
    high_entropy = top_entropy_mask(entropy, valid, config)
    if high_entropy is not None:
        token_weight = high_entropy if token_weight is None else token_weight * high_entropy
    values = token_loss.values if token_weight is None else token_loss.values * token_weight
    pg_loss = agg_loss(values, valid, config.loss_agg_mode, norm)

    metrics = dict(token_loss.metrics)
    metrics["actor/pg_loss"] = pg_loss.detach()
    loss, per_token = pg_loss, values
    if entropy is not None:
        # Under top_entropy_quantile the bonus acts on the kept tokens, normalised by their own count (TRL).
        entropy_valid, entropy_norm = (valid, norm) if high_entropy is None else \
            (valid * high_entropy, Normalizers(loss_scale_factor=norm.loss_scale_factor))
        entropy_term = agg_loss(entropy if config.entropy_coeff != 0 else entropy.detach(), entropy_valid,
                                config.entropy_agg_mode or config.loss_agg_mode, entropy_norm)
        if config.entropy_coeff != 0:
            loss = pg_loss - config.entropy_coeff * entropy_term
            per_token = per_token - config.entropy_coeff * entropy
        metrics["actor/entropy"] = entropy_term.detach()
    elif config.entropy_coeff != 0:
        raise ValueError(f"entropy_coeff={config.entropy_coeff} needs the per-token entropy")
    if ref_logp is not None:
        kl_values = kl_penalty(logp, zero_padded(ref_logp, mask, logp), config.kl_type, k3_clamp=config.kl_k3_clamp)
        if config.kl_bias_correction:
            kl_values = kl_values * kl_importance_ratio(logp, old, valid, config)
        kl_loss = agg_loss(kl_values, valid, config.loss_agg_mode, norm)
        metrics["actor/kl_loss"] = kl_loss.detach()
        metrics["actor/kl_coef"] = torch.tensor(config.kl_coef)
        if config.kl_coef != 0:
            loss = loss + config.kl_coef * kl_loss
            per_token = per_token + config.kl_coef * kl_values
    return (loss if reduce else per_token * valid), metrics


def check_unreduced(config: LossConfig) -> None:
    """``reduce=False`` needs every term aggregated alike, so that the per-token loss aggregates to the loss:
    the entropy bonus must use loss_agg_mode over the same tokens (docs/algorithms.md §1.8)."""
    if config.entropy_coeff == 0:
        return
    if config.entropy_agg_mode not in (None, config.loss_agg_mode):
        raise ValueError(f"reduce=False with entropy_coeff={config.entropy_coeff} needs entropy_agg_mode None or "
                         f"loss_agg_mode={config.loss_agg_mode!r}, got {config.entropy_agg_mode!r}: the per-token "
                         "loss is aggregated with one mode")
    if config.top_entropy_quantile < 1.0:
        raise ValueError(f"reduce=False with entropy_coeff={config.entropy_coeff} and top_entropy_quantile="
                         f"{config.top_entropy_quantile}: the entropy bonus is normalised by the kept tokens' own "
                         "count, so no per-token loss aggregates to the loss; set entropy_coeff=0 or reduce=True")


# ---------------------------------------------------------------------------------------------
# The Triton launch of the built-in losses (kernels/objective.py; backends.py decides when)
# ---------------------------------------------------------------------------------------------

def triton_objective_limit(config: LossConfig, reduce: bool = True) -> Optional[str]:
    """Why the Triton objective cannot run ``config``, or None: the options it leaves to torch."""
    if not reduce:
        return "reduce=False is torch only (the kernel sums the token losses as it computes them)"
    if config.loss_mode == "gspo" and config.gspo_gradient == "sequence":
        return ("gspo_gradient='sequence' is torch only (each token's gradient is its row's mean, a reduction "
                "over the row in the backward)")
    if config.kl_bias_correction and config.loss_mode == "gspo":
        return ("kl_bias_correction=True with gspo is torch only (the KL term times the row's sequence ratio "
                "couples a row's tokens)")
    if config.top_entropy_quantile < 1.0:
        return (f"top_entropy_quantile={config.top_entropy_quantile} is torch only (a quantile of the call's "
                "entropies, and an entropy term over the kept tokens)")
    if config.entropy_agg_mode not in (None, config.loss_agg_mode):
        return (f"entropy_agg_mode={config.entropy_agg_mode!r} != loss_agg_mode={config.loss_agg_mode!r} is torch "
                "only (the kernel weighs the entropy and KL terms alike)")
    return None


def _kernel_kl_type(config: LossConfig):
    """The kernels' KL_TYPE constant of ``config.kl_type`` (a '+' suffix: kl_straight_through)."""
    from .kernels import objective as kernel

    base_kl_type = config.kl_type[:-1] if config.kl_type.endswith("+") else config.kl_type
    kl_types = {"k1": kernel.KL_K1, "kl": kernel.KL_K1, "abs": kernel.KL_ABS, "k2": kernel.KL_K2,
                "mse": kernel.KL_K2, "k3": kernel.KL_K3, "low_var_kl": kernel.KL_K3}
    if base_kl_type not in kl_types:
        raise ValueError(f"unknown kl_type {config.kl_type!r}; choose one of k1|kl, abs, k2|mse, k3|low_var_kl "
                         "(optionally with '+')")
    return kl_types[base_kl_type]


def _objective_inputs(mask, advantages, old_logp, ref_logp, config: LossConfig, norm: Normalizers,
                      rollout_is_weights, loss_mode, *, selected=None, seq_log_ratio=None):
    """Everything the Triton objective kernels take but logp and entropy (kernels/objective.py
    ObjectiveInputs): the per-row aggregation weights, the clip bounds, the coefficients. ``mask`` bool."""
    from .kernels import objective as kernel

    valid = mask.to(torch.float32)
    weight = aggregation_weights(valid.sum(-1), config.loss_agg_mode, norm, mask.shape[1]).float()
    ratio_low, ratio_high = 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high
    if loss_mode == kernel.CISPO:
        lower, ratio_high = cispo_bounds(config)
        ratio_low = -inf if lower is None else lower
    return kernel.ObjectiveInputs(
        mask=mask, advantages=advantages.detach(),
        old=None if old_logp is None else old_logp.detach(),  # None: on-policy, ratio 1, gradient still flows
        ref=None if ref_logp is None else ref_logp.detach(), selected=selected, seq_log_ratio=seq_log_ratio,
        token_weight=policy_token_weights(config.loss_mode, rollout_is_weights, valid),
        pg_weight=weight, weight=weight, loss_mode=loss_mode, kl_type=_kernel_kl_type(config),
        kl_straight_through=config.kl_type.endswith("+"), ratio_low=ratio_low, ratio_high=ratio_high,
        cispo_absolute=loss_mode == kernel.CISPO and config.cispo_bound == "absolute",
        clip_c=config.clip_ratio_c if loss_mode == kernel.VANILLA or (
            loss_mode == kernel.GSPO and config.dual_clip == "two_sided") else None,
        dual_clip_two_sided=config.dual_clip == "two_sided",
        ppo_kl_coef=config.ppo_kl_coef, entropy_coeff=config.entropy_coeff,
        kl_coef=config.kl_coef if ref_logp is not None else 0.0, log_ratio_clamp=LOG_RATIO_CLAMP,
        gspo_log_ratio_max=GSPO_LOG_RATIO_MAX, k3_log_ratio_clamp=LOG_RATIO_CLAMP if config.kl_k3_clamp else inf,
        k3_value_clamp=K3_VALUE_CLAMP if config.kl_k3_clamp else inf, kl_bias_correction=config.kl_bias_correction,
        sapo_tau_pos=config.sapo_tau_pos, sapo_tau_neg=config.sapo_tau_neg)


def _objective_metrics(sums, mask, loss_mode, config: LossConfig, *, has_entropy: bool, has_ref: bool):
    """verl's metrics from the Triton kernels' sums (kernels/objective.py ObjectiveSums)."""
    from .kernels import objective as kernel

    count = mask.sum() + 1e-8  # verl's masked_mean denominators: the local valid count + 1e-8
    metrics = {}
    if loss_mode != kernel.KL_COV:
        metrics["actor/pg_clipfrac"] = sums.clipped / count
    metrics["actor/ppo_kl"] = sums.ppo_kl / count
    if loss_mode in (kernel.VANILLA, kernel.GSPO, kernel.CISPO, kernel.SAPO):
        metrics["actor/pg_clipfrac_lower"] = sums.clipped_lower / count
    metrics["actor/pg_loss"] = sums.pg
    if has_entropy:
        metrics["actor/entropy"] = sums.entropy
    if has_ref:
        metrics["actor/kl_loss"] = sums.kl
        metrics["actor/kl_coef"] = torch.tensor(config.kl_coef)
    return metrics


def triton_policy_objective(logp: torch.Tensor, entropy: Optional[torch.Tensor], mask: torch.Tensor,
                            advantages: torch.Tensor, old_logp: Optional[torch.Tensor],
                            ref_logp: Optional[torch.Tensor], config: LossConfig, norm: Normalizers, step: int = 0,
                            rollout_is_weights: Optional[torch.Tensor] = None, reduce: bool = True, *, loss_mode):
    """``policy_objective`` in one Triton kernel for a built-in loss: same arguments, same ``(loss, metrics)``.

    ``loss_mode`` is the kernel's constant for ``config.loss_mode`` (the dispatch table binds it). logp
    [B, T] fp32; entropy [B, T] or None; mask [B, T] bool; advantages [B, T] (an expanded [B] view is
    read in place); old_logp / ref_logp [B, T] or None. The O(N) pre-passes that need a whole row or
    the whole batch (the per-row aggregation weights, GSPO's sequence log-ratio, Clip-Cov / KL-Cov
    token selection) run here in torch with the reference's own functions, on the reference's
    zero-padded inputs, so they reproduce its numbers exactly.
    """
    from .kernels import objective as kernel

    if not reduce:
        raise ValueError(triton_objective_limit(config, reduce))
    check_ref_for_kl(config, ref_logp)
    mask = mask.to(torch.bool)
    valid = mask.to(logp.dtype)
    seq_log_ratio = selected = None
    if loss_mode in (kernel.GSPO, kernel.CLIP_COV, kernel.KL_COV):
        # logp too is zero-padded: the reference receives zeros there, the kernel tolerates anything.
        padded_logp = zero_padded(logp, mask, logp)
        padded_old = padded_logp if old_logp is None else zero_padded(old_logp, mask, logp)
        padded_adv = zero_padded(advantages, mask, logp)
        if loss_mode == kernel.GSPO:
            seq_log_ratio = gspo_sequence_log_ratio(padded_logp - padded_old, valid).float()
        elif loss_mode == kernel.CLIP_COV:
            selected = clip_cov_selection(padded_logp, padded_old, padded_adv, valid, config, step)
        else:
            selected = kl_cov_selection(padded_logp, padded_adv, valid, config)
    inputs = _objective_inputs(mask, advantages, old_logp, ref_logp, config, norm, rollout_is_weights, loss_mode,
                               selected=selected, seq_log_ratio=seq_log_ratio)
    if entropy is None:
        entropy_in = torch.zeros_like(logp.detach())  # no entropy term, no entropy metric
    else:
        entropy_in = entropy if config.entropy_coeff != 0 else entropy.detach()
    loss, sums = kernel.triton_objective(logp, entropy_in, inputs)
    return loss, _objective_metrics(sums, mask, loss_mode, config, has_entropy=entropy is not None,
                                    has_ref=ref_logp is not None)


def triton_fused_policy_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                             advantages: torch.Tensor, old_logp: Optional[torch.Tensor],
                             ref_logp: Optional[torch.Tensor], config: LossConfig, norm: Normalizers,
                             rollout_is_weights: Optional[torch.Tensor] = None, *, loss_mode,
                             inplace_backward: bool = False):
    """The statistics pass, ``policy_objective`` and dlogits in one Triton kernel (kernels/logits_policy_loss.py),
    for a loss whose coefficients need no statistic of the pass (backends.fused_pass_blocker decides):
    ``(loss, metrics, logp [B, T], entropy [B, T])``, logp and entropy detached with zeros at padded positions.
    The loss is differentiable w.r.t. the logits only; its value and gradient are ``triton_policy_objective``'s
    on the statistics of ``triton_token_stats``."""
    from .kernels import logits_policy_loss as kernel

    check_ref_for_kl(config, ref_logp)
    mask = mask.to(torch.bool)
    inputs = _objective_inputs(mask, advantages, old_logp, ref_logp, config, norm, rollout_is_weights, loss_mode)
    loss, sums, logp, entropy = kernel.triton_policy_loss(logits, targets, inputs, config.temperature,
                                                          inplace_backward=inplace_backward)
    return loss, _objective_metrics(sums, mask, loss_mode, config, has_entropy=True, has_ref=ref_logp is not None), \
        logp, entropy
