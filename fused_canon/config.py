"""Configuration of the advantage estimators and the policy loss.

Field names follow DESIGN.md §2 (a public contract). Values are checked when a config is built,
so a typo or an out-of-range value fails at construction, never as silent wrong numbers later.
Registry names (estimator, loss_mode, ...) are checked against the registries at the point of
use, so a user-registered name is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

CANON_METRICS = ("entropy", "length", "random", "custom")
CANON_SCHEDULES = ("constant", "anneal", "cosine_restart", "cosine_restart_r")
BASELINES = ("mean", "quantile")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class CosineRestartSchedule:
    """CANON's cosine-with-restarts curve c(step) (ALGORITHMS.md §2.4); upstream hard-codes these."""

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
    estimator: str = "grpo"  # "grpo" | "dr_grpo" | "rloo" | "canon" (or a registered name)
    norm_by_std: bool = True  # grpo only; dr_grpo == grpo without std
    epsilon: float = 1e-6
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

    def __post_init__(self):
        _check_choice("baseline", self.baseline, BASELINES)
        _check_choice("canon_metric", self.canon_metric, CANON_METRICS)
        _check_choice("canon_schedule", self.canon_schedule, CANON_SCHEDULES)
        if self.canon_favor is not None:
            _check_choice("canon_favor", self.canon_favor, ("low", "high"))
        for name in ("epsilon", "quantile_k", "canon_alpha", "canon_beta", "canon_lambda", "token_budget"):
            _check_finite(name, getattr(self, name))
        if self.baseline == "quantile" and not 0.0 < self.quantile_k < 1.0:
            raise ValueError(f"quantile_k must lie in (0, 1) for baseline='quantile', got {self.quantile_k}")
        if self.token_budget <= 0:
            raise ValueError(f"token_budget must be > 0, got {self.token_budget}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

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

    def __post_init__(self):
        if isinstance(self.advantage, dict):
            self.advantage = AdvantageConfig(**self.advantage)
        if not isinstance(self.advantage, AdvantageConfig):
            raise TypeError(f"advantage must be an AdvantageConfig, got {type(self.advantage).__name__}")
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("kl_type", self.kl_type, KL_TYPES)
        for name in ("clip_ratio_low", "clip_ratio_high", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub",
                     "kl_cov_ratio", "ppo_kl_coef", "entropy_coeff", "kl_coef", "temperature"):
            _check_finite(name, getattr(self, name))
        if self.clip_ratio_low < 0 or self.clip_ratio_high < 0:
            raise ValueError("clip_ratio_low and clip_ratio_high must be >= 0")
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
