"""fused-canon: a fused policy-gradient loss for RL training of language models.

    import fused_canon as fc
    out = fc.policy_loss(logits, targets, mask, rewards=rewards, group_ids=group_ids,
                         config=fc.LossConfig(advantage=fc.AdvantageConfig(estimator="canon")))
    out.loss.backward()

See docs/design.md §2 for the contract; ``backend="torch"`` is the reference that defines the semantics.
"""

from .config import AdvantageConfig, CosineRestartSchedule, LossConfig
from .estimators import ESTIMATOR_INPUTS, ESTIMATORS, compute_advantages, register_estimator
from . import ktae, token_estimators  # noqa: F401  (register the token-level estimators)
from .losses import POLICY_LOSSES, TokenLoss, agg_loss, kl_penalty, register_policy_loss
from .rollout_correction import rollout_is_weights, rollout_offpolicy_metrics
from .api import (SIGNALS, FusedPolicyLoss, LossOutput, linear_policy_loss, policy_loss, policy_loss_from_logprobs,
                  token_signals, token_stats)

__version__ = "0.1.0"

__all__ = [
    "AdvantageConfig", "CosineRestartSchedule", "LossConfig", "LossOutput", "FusedPolicyLoss",
    "token_stats", "token_signals", "SIGNALS", "kl_penalty", "compute_advantages", "policy_loss", "linear_policy_loss", "policy_loss_from_logprobs",
    "agg_loss", "register_estimator", "register_policy_loss", "ESTIMATORS", "ESTIMATOR_INPUTS", "POLICY_LOSSES",
    "TokenLoss", "rollout_is_weights", "rollout_offpolicy_metrics",
]
