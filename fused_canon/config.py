"""Configuration of the advantage estimators and the policy loss.

Field names follow docs/design.md §2 (a public contract). Values are checked when a config is built,
so a typo or an out-of-range value fails at construction, never as silent wrong numbers later.
Registry names (estimator, loss_mode, ...) are checked against the registries at the point of
use, so a user-registered name is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .validation import check_bool, check_choice, check_int, check_name, check_number

CANON_METRICS = ("entropy", "length", "random", "custom")
CANON_SCHEDULES = ("constant", "anneal", "cosine_restart", "cosine_restart_r")
BASELINES = ("mean", "quantile")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")
KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
CISPO_BOUNDS = ("relative", "absolute")
# kl_type values: a KL estimator, or one with a "+" suffix (its value, the k2 gradient: docs/algorithms.md §1.10).
KL_TYPE_CHOICES = KL_TYPES + tuple(f"{kind}+" for kind in KL_TYPES)
DUAL_CLIPS = ("negative", "two_sided")
GSPO_GRADIENTS = ("token", "sequence")
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")
# AdvantageConfig.epsilon when left unset: 1e-6 (verl's std guard), except where verl's estimator has its own.
DEFAULT_EPSILON = {"optimal_token_baseline": 1e-8, "tir_optimal_token_baseline": 1e-8}
STD_SCOPES = ("group", "batch")
GDPO_WHITENINGS = ("tokens", "responses")
SINGLETON_BASELINES = ("zero", "own")


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of a seeded random choice (CANON's random split, Clip-Cov's tokens) at ``step``:
    seeded with (seed * 1_000_003 + step) mod 2**64, so any seed >= 0 and step >= 0 is accepted."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**64)


def _check_fields(config, bounds) -> None:
    """Each field in ``bounds`` (name -> check_number keywords) is a finite number within them."""
    for name, limits in bounds.items():
        setattr(config, name, check_number(name, getattr(config, name), **limits))


NON_NEGATIVE = dict(low=0.0)
POSITIVE = dict(low=0.0, low_open=True)
UNIT = dict(low=0.0, high=1.0)  # a weight or a fraction in [0, 1]
ANY = {}
# TRL floors vespo's rate at 1e-4; a smaller one is refused rather than silently raised.
VESPO_RATE = dict(low=1e-4, why=" (vespo's gamma rate; TRL floors it at 1e-4)")


@dataclass
class CosineRestartSchedule:
    """CANON's cosine-with-restarts curve c(step) (docs/algorithms.md §2.4); upstream hard-codes these."""

    max_value: float
    min_value: float
    warmup_steps: int = 30
    total_steps: int = 150
    num_cycles: int = 3

    def __post_init__(self):
        # c(step) is CANON's inter-group weight (or 1 minus it): a weight in [0, 1].
        _check_fields(self, {"max_value": UNIT, "min_value": UNIT})
        for name in ("warmup_steps", "total_steps", "num_cycles"):
            setattr(self, name, check_int(name, getattr(self, name), low=1))
        if self.total_steps - self.warmup_steps < self.num_cycles:
            raise ValueError(f"cosine schedule needs total_steps - warmup_steps >= num_cycles (one step per cycle at "
                             f"least), got total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                             f"num_cycles={self.num_cycles}")


def _schedule(name: str, value) -> CosineRestartSchedule:
    if isinstance(value, Mapping):
        value = CosineRestartSchedule(**value)
    if not isinstance(value, CosineRestartSchedule):
        raise TypeError(f"{name} must be a CosineRestartSchedule (or a dict of its fields), got {type(value).__name__}")
    return value


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"  # a registered name: grpo dr_grpo rloo canon qae reinforce_plus_plus
    # reinforce_plus_plus_baseline remax opo gpg grpo_passk gae optimal_token_baseline tir_optimal_token_baseline
    # ucas ktae adora gdpo (or your own)
    norm_by_std: bool = True  # grpo only; dr_grpo == grpo without std
    # grpo's std (docs/algorithms.md §1.1): "group" (verl; TRL's scale_rewards="group") or "batch", the std of
    # every reward of the call (TRL's scale_rewards="batch"); the baseline stays the group's.
    std_scope: str = "group"
    # The baseline of a group of one response in grpo and dr_grpo (and gdpo's per-reward grpo): "zero" (verl: the
    # advantage is the reward itself, over std 1) or "own" (TRL: its own reward, so the advantage is 0).
    singleton_baseline: str = "zero"
    # Rewards [B, K] of K reward functions (docs/algorithms.md §1.14): their weights, None -> 1 each. Estimators
    # but gdpo see the weighted sum (TRL's sum_then_normalize); gdpo normalises each column first.
    reward_weights: Optional[List[float]] = None
    # gdpo's last step (§1.14): "tokens" whitens over the valid tokens (verl); "responses" z-scores over the
    # responses with (std + epsilon) (TRL's normalize_then_sum).
    gdpo_whiten: str = "tokens"
    epsilon: Optional[float] = None  # None -> the estimator's own: 1e-6, 1e-8 for optimal_token_baseline (verl)
    baseline: str = "mean"  # "mean" | "quantile" (QAE)
    quantile_k: float = 0.4  # used when baseline == "quantile"; torch.quantile linear interpolation
    canon_metric: str = "entropy"  # "entropy" | "length" | "random" | "custom"
    canon_alpha: float = 1.0
    canon_beta: float = 0.0
    canon_lambda: float = 1.0
    canon_favor: Optional[str] = None  # "low" | "high"; None -> "high" for length, else "low"
    canon_schedule: str = "constant"  # "constant" | "anneal" | "cosine_restart" | "cosine_restart_r"
    # Upstream constants of the two cosine schedules (exposed so they can be tuned).
    cosine_restart: CosineRestartSchedule = field(
        default_factory=lambda: CosineRestartSchedule(max_value=0.6, min_value=0.0)
    )
    cosine_restart_r: CosineRestartSchedule = field(
        default_factory=lambda: CosineRestartSchedule(max_value=1.0, min_value=0.4)
    )
    token_budget: float = 1.0  # CANON / Dr.GRPO divisor L of the advantage
    seed: int = 0  # canon_metric="random"
    # Discounted returns (reinforce_plus_plus, gae) and GAE's lambda (docs/algorithms.md §1.3-1.4).
    gamma: float = 1.0  # in [0, 1]
    lam: float = 1.0  # in [0, 1]
    # optimal_token_baseline: give the strictly longest response of a group baseline 0 past the
    # second-longest length (verl 0.9.1's default).
    otb_handle_zero_tail: bool = True
    # UCAS (docs/algorithms.md §5): modifier exp(-beta_pos Cz) for A > 0, exp(beta_neg Cz) otherwise, and the
    # token penalty coefficient of the min-max normalised raw logit (upstream hard-codes these values).
    ucas_beta_pos: float = 0.25
    ucas_beta_neg: float = 0.35
    ucas_token_coef: float = 0.05
    # KTAE (docs/algorithms.md §6): Fisher weight, information-gain weight, output scale, BM25 k1 and b, and
    # token ids whose key-token value is forced to 0 (upstream hard-codes Qwen's <|endoftext|>, 151643).
    ktae_alpha: float = 1.0
    ktae_beta: float = 1.0
    ktae_top: float = 1.0
    ktae_k1: float = 2.0
    ktae_b: float = 0.5
    ktae_ignore_token_ids: List[int] = field(default_factory=list)
    # ADORA (docs/algorithms.md §7): a group without a length advantage is scaled by adora_lambda; a reward
    # above adora_correct_score counts as correct; wrong responses at least adora_max_length long are ignored.
    adora_lambda: float = 0.1
    adora_correct_score: float = 1.01
    adora_max_length: int = 4054

    def __post_init__(self):
        check_name("estimator", self.estimator)
        if self.epsilon is not None:  # None: the estimator's own, resolved at use (effective_epsilon)
            self.epsilon = check_number("epsilon", self.epsilon, low=0.0)
        for name in ("norm_by_std", "otb_handle_zero_tail"):
            check_bool(name, getattr(self, name))
        check_choice("baseline", self.baseline, BASELINES)
        check_choice("std_scope", self.std_scope, STD_SCOPES)
        check_choice("singleton_baseline", self.singleton_baseline, SINGLETON_BASELINES)
        check_choice("gdpo_whiten", self.gdpo_whiten, GDPO_WHITENINGS)
        if self.reward_weights is not None:
            weights = self.reward_weights
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__") or len(weights) == 0:
                raise ValueError(f"reward_weights must be a non-empty list of numbers (one per reward column) or "
                                 f"None, got {weights!r}")
            self.reward_weights = [check_number("reward_weights entry", w) for w in weights]
        check_choice("canon_metric", self.canon_metric, CANON_METRICS)
        check_choice("canon_schedule", self.canon_schedule, CANON_SCHEDULES)
        if self.canon_favor is not None:
            check_choice("canon_favor", self.canon_favor, ("low", "high"))
        self.cosine_restart = _schedule("cosine_restart", self.cosine_restart)
        self.cosine_restart_r = _schedule("cosine_restart_r", self.cosine_restart_r)
        _check_fields(self, {
            "quantile_k": dict(low=0.0, high=1.0, low_open=True, high_open=True),
            "canon_alpha": ANY, "canon_beta": ANY, "canon_lambda": UNIT, "token_budget": POSITIVE,
            "gamma": UNIT, "lam": UNIT, "ucas_beta_pos": NON_NEGATIVE, "ucas_beta_neg": NON_NEGATIVE,
            "ucas_token_coef": NON_NEGATIVE, "ktae_alpha": NON_NEGATIVE, "ktae_beta": NON_NEGATIVE,
            "ktae_top": NON_NEGATIVE, "ktae_k1": dict(POSITIVE, why=" (BM25 saturation)"), "ktae_b": UNIT,
            "adora_lambda": dict(UNIT, why=" (it scales down a group)"), "adora_correct_score": ANY})
        self.seed = check_int("seed", self.seed, low=0)
        self.adora_max_length = check_int("adora_max_length", self.adora_max_length, low=1,
                                          why=" (a length in tokens)")
        if self.ktae_alpha + self.ktae_beta == 0:
            raise ValueError("ktae_alpha + ktae_beta must be > 0 (the key-token score divides by it)")
        ids = self.ktae_ignore_token_ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"ktae_ignore_token_ids must be a list of token ids, got {ids!r}")
        self.ktae_ignore_token_ids = [check_int("ktae_ignore_token_ids entry", i, low=0) for i in ids]

    @property
    def effective_epsilon(self) -> float:
        """The epsilon the estimators use: ``epsilon``, or when it is None the estimator's own default
        (resolved here, at use, so a config built with defaults and given another estimator later, as
        the trainer's config layers do, still gets that estimator's default)."""
        return DEFAULT_EPSILON.get(self.estimator, 1e-6) if self.epsilon is None else self.epsilon

    @property
    def favored_half(self) -> str:
        """The CANON half whose own reward alpha multiplies (upstream: 'high' for length, else 'low')."""
        if self.canon_favor is not None:
            return self.canon_favor
        return "high" if self.canon_metric == "length" else "low"


@dataclass
class LossConfig:
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss_mode: str = "vanilla"  # "vanilla" | "clip_cov" | "kl_cov" | "gspo" | "cispo" (or a registered name)
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0  # dual clip; None disables it
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    ppo_kl_coef: float = 1.0
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: Optional[float] = None  # seq-mean-token-sum-norm divisor; None -> padded T
    entropy_coeff: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "k3"
    temperature: float = 1.0
    seed: int = 0  # clip_cov's random token choice
    # sapo's soft gate temperatures: tau_pos where A > 0, tau_neg elsewhere (docs/algorithms.md §1.7).
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    # k3's clamps (docs/algorithms.md §1.10): verl clamps ref - logp to +-20 and the value to +-10; TRL and
    # Liger do not (False).
    kl_k3_clamp: bool = True
    # cispo's bound (docs/algorithms.md §1.7): "relative" clips rho to [1 - clip_ratio_low, 1 + clip_ratio_high]
    # (verl); "absolute" caps it at clip_ratio_high itself, no lower bound (TRL's and Liger's epsilon_high).
    cispo_bound: str = "relative"
    # vespo's gamma weight phi(w) = exp(lambda + k log w - lambda w) (docs/algorithms.md §1.7): the shape k and
    # the rate lambda where A >= 0 (_pos) and where A < 0 (_neg); TRL's and Liger's defaults.
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # dro's quadratic penalty on log(pi / pi_old) (docs/algorithms.md §1.7); needed by loss_mode="dro".
    dro_beta: Optional[float] = None
    # The dual clip with c = clip_ratio_c (docs/algorithms.md §1.5): "negative" caps the loss of A < 0 tokens at
    # -A c (verl; vanilla only); "two_sided" caps rho at c in the unclipped branch of the PPO max for every
    # token (TRL's and Liger's delta; vanilla and gspo), so it caps the A > 0 side too.
    dual_clip: str = "negative"
    # gspo's gradient path (docs/algorithms.md §1.6): "token" gives each token the gradient of its own log-prob
    # at the sequence ratio's value (verl); "sequence" differentiates the row's mean log-ratio itself, so every
    # token of a row gets the row's mean gradient (TRL's and Liger's importance_sampling_level="sequence").
    # They differ only when a per-token factor (token-level rollout IS weights, the entropy mask) varies in a row.
    gspo_gradient: str = "token"
    # TRL's use_bias_correction_kl (docs/algorithms.md §1.10): the KL term times the importance ratio
    # (gspo: the sequence ratio), with the gradient through both. Torch only with gspo.
    kl_bias_correction: bool = False
    # The entropy bonus's aggregation (docs/algorithms.md §1.9); None: loss_agg_mode (TRL: "token-mean").
    entropy_agg_mode: Optional[str] = None
    # TRL's top_entropy_quantile (docs/algorithms.md §1.13): only the tokens whose entropy is at least the
    # (1 - q)-quantile of this call's valid tokens carry the policy term and the entropy bonus; 1: all.
    top_entropy_quantile: float = 1.0
    # Rollout importance sampling (docs/algorithms.md §1.12), from rollout_logprobs: None (off), "token" or
    # "sequence". "truncate" clamps the weight to [rollout_is_threshold_lower, rollout_is_threshold] (TIS),
    # "mask" zeroes it outside (verl's IcePop, TRL's *_mask); log(pi_old / pi_rollout) is clamped to
    # +-rollout_is_log_ratio_clamp first (verl: 20; TRL: None, no clamp).
    rollout_is: Optional[str] = None
    rollout_is_mode: str = "truncate"
    rollout_is_threshold: float = 2.0
    rollout_is_threshold_lower: Optional[float] = None
    rollout_is_log_ratio_clamp: Optional[float] = 20.0
    rollout_is_batch_normalize: bool = False  # divide the weights by their mean (verl)

    def __post_init__(self):
        if isinstance(self.advantage, Mapping):
            self.advantage = AdvantageConfig(**self.advantage)
        if not isinstance(self.advantage, AdvantageConfig):
            raise TypeError(f"advantage must be an AdvantageConfig, got {type(self.advantage).__name__}")
        check_name("loss_mode", self.loss_mode)
        check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_choice("kl_type", self.kl_type, KL_TYPE_CHOICES)
        check_choice("cispo_bound", self.cispo_bound, CISPO_BOUNDS)
        check_bool("kl_k3_clamp", self.kl_k3_clamp)
        fraction = dict(low=0.0, high=1.0, low_open=True)  # a share of the valid tokens, (0, 1]
        _check_fields(self, {
            "clip_ratio_low": NON_NEGATIVE, "clip_ratio_high": NON_NEGATIVE, "clip_cov_ratio": fraction,
            "clip_cov_lb": ANY, "clip_cov_ub": ANY, "kl_cov_ratio": fraction, "ppo_kl_coef": NON_NEGATIVE,
            "entropy_coeff": ANY, "kl_coef": NON_NEGATIVE, "temperature": POSITIVE, "sapo_tau_pos": POSITIVE,
            "sapo_tau_neg": POSITIVE, "vespo_k_pos": NON_NEGATIVE, "vespo_k_neg": NON_NEGATIVE,
            "vespo_lambda_pos": VESPO_RATE, "vespo_lambda_neg": VESPO_RATE})
        check_choice("dual_clip", self.dual_clip, DUAL_CLIPS)
        check_choice("gspo_gradient", self.gspo_gradient, GSPO_GRADIENTS)
        if self.dro_beta is not None:
            self.dro_beta = check_number("dro_beta", self.dro_beta, **POSITIVE, why=" (None: no dro)")
        if self.loss_mode == "dro" and self.dro_beta is None:
            raise ValueError("loss_mode='dro' needs dro_beta > 0 (its quadratic log-ratio penalty), got None")
        if self.entropy_agg_mode is not None:
            check_choice("entropy_agg_mode", self.entropy_agg_mode, LOSS_AGG_MODES)
        check_bool("kl_bias_correction", self.kl_bias_correction)
        self.top_entropy_quantile = check_number("top_entropy_quantile", self.top_entropy_quantile, low=0.0,
                                                 high=1.0, low_open=True, why=" (the fraction of tokens kept)")
        if self.rollout_is is not None:
            check_choice("rollout_is", self.rollout_is, ROLLOUT_IS_LEVELS)
        check_choice("rollout_is_mode", self.rollout_is_mode, ROLLOUT_IS_MODES)
        check_bool("rollout_is_batch_normalize", self.rollout_is_batch_normalize)
        self.rollout_is_threshold = check_number("rollout_is_threshold", self.rollout_is_threshold, **POSITIVE)
        if self.rollout_is_threshold_lower is not None:
            self.rollout_is_threshold_lower = check_number(
                "rollout_is_threshold_lower", self.rollout_is_threshold_lower, low=0.0, high=self.rollout_is_threshold,
                why=f" (at most rollout_is_threshold={self.rollout_is_threshold}; None: no lower bound)")
        if self.rollout_is_log_ratio_clamp is not None:
            self.rollout_is_log_ratio_clamp = check_number("rollout_is_log_ratio_clamp",
                                                           self.rollout_is_log_ratio_clamp, **POSITIVE,
                                                           why=" (None: no clamp)")
        if self.loss_mode == "cispo" and self.cispo_bound == "absolute" and self.clip_ratio_high <= 0:
            raise ValueError(f"cispo_bound='absolute' caps the ratio at clip_ratio_high: it must be > 0, "
                             f"got {self.clip_ratio_high}")
        if self.clip_ratio_c is not None:
            if self.dual_clip == "negative":
                self.clip_ratio_c = check_number("clip_ratio_c", self.clip_ratio_c, low=1.0, low_open=True,
                                                 why=" (dual clip; None disables it)")
            else:
                self.clip_ratio_c = check_number("clip_ratio_c", self.clip_ratio_c, **POSITIVE,
                                                 why=" (dual_clip='two_sided' caps the ratio at it; None: off)")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be < clip_cov_ub ({self.clip_cov_ub})")
        if self.loss_scale_factor is not None:
            self.loss_scale_factor = check_number("loss_scale_factor", self.loss_scale_factor, **POSITIVE)
        self.seed = check_int("seed", self.seed, low=0)
