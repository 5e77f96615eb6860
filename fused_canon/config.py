"""Configuration of the advantage estimators and the policy loss.

Field names follow docs/design.md §2 (a public contract). Values are checked when a config is built,
so a typo or an out-of-range value fails at construction, never as silent wrong numbers later.
Registry names (estimator, loss_mode, ...) are checked against the registries at the point of
use, so a user-registered name is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

CANON_METRICS = ("entropy", "length", "random", "custom")
CANON_SCHEDULES = ("constant", "anneal", "cosine_restart", "cosine_restart_r")
BASELINES = ("mean", "quantile")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
CISPO_BOUNDS = ("relative", "absolute")
# AdvantageConfig.epsilon when left unset: 1e-6 (verl's std guard), except where verl's estimator has its own.
DEFAULT_EPSILON = {"optimal_token_baseline": 1e-8}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class CosineRestartSchedule:
    """CANON's cosine-with-restarts curve c(step) (docs/algorithms.md §2.4); upstream hard-codes these."""

    max_value: float
    min_value: float
    warmup_steps: int = 30
    total_steps: int = 150
    num_cycles: int = 3

    def __post_init__(self):
        if self.warmup_steps < 1 or self.num_cycles < 1 or self.total_steps - self.warmup_steps < self.num_cycles:
            raise ValueError(
                "cosine schedule needs warmup_steps >= 1, num_cycles >= 1 and "
                f"total_steps - warmup_steps >= num_cycles, got {self}"
            )


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"  # a registered name: grpo dr_grpo rloo canon qae reinforce_plus_plus
    # reinforce_plus_plus_baseline remax opo gpg grpo_passk gae optimal_token_baseline ucas ktae adora (or your own)
    norm_by_std: bool = True  # grpo only; dr_grpo == grpo without std
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
        _check_choice("baseline", self.baseline, BASELINES)
        _check_choice("canon_metric", self.canon_metric, CANON_METRICS)
        _check_choice("canon_schedule", self.canon_schedule, CANON_SCHEDULES)
        if self.canon_favor is not None:
            _check_choice("canon_favor", self.canon_favor, ("low", "high"))
        if self.epsilon is not None:
            _check_finite("epsilon", self.epsilon)
        for name in ("quantile_k", "canon_alpha", "canon_beta", "canon_lambda", "token_budget"):
            _check_finite(name, getattr(self, name))
        if self.baseline == "quantile" and not 0.0 < self.quantile_k < 1.0:
            raise ValueError(f"quantile_k must lie in (0, 1) for baseline='quantile', got {self.quantile_k}")
        if self.token_budget <= 0:
            raise ValueError(f"token_budget must be > 0, got {self.token_budget}")
        if self.effective_epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        for name in ("gamma", "lam", "ucas_beta_pos", "ucas_beta_neg", "ucas_token_coef", "ktae_alpha", "ktae_beta",
                     "ktae_top", "ktae_k1", "ktae_b", "adora_lambda", "adora_correct_score", "adora_max_length"):
            _check_finite(name, getattr(self, name))
        for name in ("gamma", "lam", "ktae_b"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("ucas_beta_pos", "ucas_beta_neg", "ucas_token_coef", "ktae_alpha", "ktae_beta", "ktae_top"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ktae_alpha + self.ktae_beta == 0:
            raise ValueError("ktae_alpha + ktae_beta must be > 0 (the key-token score divides by it)")
        if self.ktae_k1 <= 0:
            raise ValueError(f"ktae_k1 must be > 0 (BM25 saturation), got {self.ktae_k1}")
        self.ktae_ignore_token_ids = list(self.ktae_ignore_token_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.ktae_ignore_token_ids):
            raise ValueError(f"ktae_ignore_token_ids must be a list of int token ids, got {self.ktae_ignore_token_ids}")
        if not 0.0 <= self.adora_lambda <= 1.0:
            raise ValueError(f"adora_lambda must lie in [0, 1] (it scales down a group), got {self.adora_lambda}")
        if self.adora_max_length <= 0:
            raise ValueError(f"adora_max_length must be > 0 (a length in tokens), got {self.adora_max_length}")

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

    def __post_init__(self):
        if isinstance(self.advantage, dict):
            self.advantage = AdvantageConfig(**self.advantage)
        if not isinstance(self.advantage, AdvantageConfig):
            raise TypeError(f"advantage must be an AdvantageConfig, got {type(self.advantage).__name__}")
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("kl_type", self.kl_type, KL_TYPES)
        _check_choice("cispo_bound", self.cispo_bound, CISPO_BOUNDS)
        if not isinstance(self.kl_k3_clamp, bool):
            raise ValueError(f"kl_k3_clamp must be True or False, got {self.kl_k3_clamp!r}")
        for name in ("clip_ratio_low", "clip_ratio_high", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub",
                     "kl_cov_ratio", "ppo_kl_coef", "entropy_coeff", "kl_coef", "temperature", "sapo_tau_pos",
                     "sapo_tau_neg"):
            _check_finite(name, getattr(self, name))
        if self.sapo_tau_pos <= 0 or self.sapo_tau_neg <= 0:
            raise ValueError(f"sapo_tau_pos and sapo_tau_neg must be > 0, got {self.sapo_tau_pos}, {self.sapo_tau_neg}")
        if self.clip_ratio_low < 0 or self.clip_ratio_high < 0:
            raise ValueError("clip_ratio_low and clip_ratio_high must be >= 0")
        if self.loss_mode == "cispo" and self.cispo_bound == "absolute" and self.clip_ratio_high <= 0:
            raise ValueError(f"cispo_bound='absolute' caps the ratio at clip_ratio_high: it must be > 0, "
                             f"got {self.clip_ratio_high}")
        if self.clip_ratio_c is not None:
            _check_finite("clip_ratio_c", self.clip_ratio_c)
            if self.clip_ratio_c <= 1.0:
                raise ValueError(f"clip_ratio_c must be > 1 (dual clip), or None to disable it; got {self.clip_ratio_c}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.clip_cov_ratio <= 1 or not 0 < self.kl_cov_ratio <= 1:
            raise ValueError("clip_cov_ratio and kl_cov_ratio are fractions in (0, 1]")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be < clip_cov_ub ({self.clip_cov_ub})")
        if self.loss_scale_factor is not None:
            _check_finite("loss_scale_factor", self.loss_scale_factor)
            if self.loss_scale_factor <= 0:
                raise ValueError(f"loss_scale_factor must be > 0, got {self.loss_scale_factor}")
