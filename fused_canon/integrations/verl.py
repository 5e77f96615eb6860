"""verl 0.9.1 plugin: fused-canon's estimators and fused token statistics inside verl.

``pip install "fused-canon[verl]"`` installs the ``verl.plugins`` entry point that verl loads when it
is imported (``VERL_USE_EXTERNAL_PLUGINS``, default "auto"), in the driver and in every worker.
Loading this module does three things, each in one place below:

1. **Estimators.** Every estimator of ``fused_canon.ESTIMATORS`` is registered in verl's
   ``ADV_ESTIMATOR_REGISTRY`` as ``fc_<name>``, and as plain ``<name>`` where verl has no estimator
   of that name (verl keeps its own ``grpo``, ``rloo``, ...); CANON's script names
   (``dr_entropy_token_budget`` ...) are registered as presets of ``canon``. Options come from the
   Hydra node ``algorithm.fused_canon`` (the fields of ``fused_canon.AdvantageConfig``).
2. **Rollout entropy and step.** verl's V1 trainer keeps the old-policy token entropy in its
   TransferQueue but does not hand it (nor the global step) to the estimator. The trainers
   ``fused_canon_<mode>`` (``trainer.v1.trainer_mode=fused_canon_sync``) are verl's own V1 trainers
   whose ``_compute_advantage`` runs inside ``rollout_context(token_entropy, step)``, which the
   estimators read. They are registered in verl's trainer registry when verl imports
   ``verl.trainer.ppo.v1`` (only the driver does), so workers never import the trainer.
3. **Fused token statistics in the actor.** ``verl_engine.FusedTokenStatsFSDPEngine`` is verl's
   ``FSDPEngineWithLMHead`` whose log-prob and entropy come from ``fused_canon.token_stats`` (Triton
   on CUDA) in one pass over the logits, without verl's ``[N, V]`` fp32 softmax temporaries; it is
   registered for NVIDIA GPUs when verl imports its FSDP engine (workers do) and switched on by
   ``+actor_rollout_ref.model.fused_kernel_options.fused_canon_token_stats=true``.

The config lines are in docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.abc
import importlib.util
import sys
from typing import Optional

import numpy as np
import torch

from verl.trainer.ppo import core_algos

from ..config import AdvantageConfig, CosineRestartSchedule
from ..estimators import ESTIMATORS, compute_advantages, declared_inputs, missing_inputs

__all__ = ["PREFIX", "CANON_SCRIPT_PRESETS", "OPTIONS_KEY", "advantage_config",
           "registered_names", "rollout_context", "register_estimators", "RolloutContextForAdvantages"]

PREFIX = "fc_"
OPTIONS_KEY = "fused_canon"  # algorithm.fused_canon.<AdvantageConfig field>

# CANON's run-script estimator names (biuboomc/CANON core_algos.py) as presets of fused-canon's canon.
# The user's algorithm.fused_canon options override a preset (docs/algorithms.md §2).
CANON_SCRIPT_PRESETS = {
    "dr_entropy_token_budget": dict(estimator="canon", canon_metric="entropy"),
    "dr_length_on_mean": dict(estimator="canon", canon_metric="length"),
    "dr_entropy_token_budget_annel": dict(estimator="canon", canon_metric="entropy", canon_schedule="anneal"),
    "dr_entropy_token_budget_cosine_restart": dict(estimator="canon", canon_metric="entropy",
                                                   canon_schedule="cosine_restart"),
    "dr_entropy_token_budget_cosine_restart_r": dict(estimator="canon", canon_metric="entropy",
                                                     canon_schedule="cosine_restart_r"),
    "dr_random": dict(estimator="canon", canon_metric="random"),
}

_OPTION_FIELDS = {f.name for f in dataclasses.fields(AdvantageConfig)} - {"estimator"}
_SCHEDULE_FIELDS = ("cosine_restart", "cosine_restart_r")


# ---------------------------------------------------------------------------------------------
# 1. Estimators in verl's registry
# ---------------------------------------------------------------------------------------------

def _plain(value):
    """An OmegaConf node (or a plain mapping) as a plain dict, resolving interpolations."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # verl depends on omegaconf; a plain dict needs nothing
        return dict(value)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else dict(value)


def advantage_config(name: str, algorithm_config=None) -> AdvantageConfig:
    """The ``AdvantageConfig`` of registered verl name ``name`` under verl's ``algorithm`` config."""
    preset = dict(CANON_SCRIPT_PRESETS.get(name) or {"estimator": name[len(PREFIX):] if name.startswith(PREFIX)
                                                       else name})
    options = algorithm_config.get(OPTIONS_KEY) if algorithm_config is not None else None
    options = _plain(options) if options is not None else {}
    unknown = sorted(set(options) - _OPTION_FIELDS)
    if unknown:
        hint = " (the estimator is algorithm.adv_estimator)" if "estimator" in unknown else ""
        raise ValueError(f"algorithm.{OPTIONS_KEY} has unknown option(s) {unknown}{hint}; "
                         f"allowed: {sorted(_OPTION_FIELDS)}")
    for schedule in _SCHEDULE_FIELDS:
        if isinstance(options.get(schedule), dict):
            options[schedule] = CosineRestartSchedule(**options[schedule])
    config = AdvantageConfig(**{**preset, **options})
    verl_weights = algorithm_config.get("gdpo_reward_weights") if algorithm_config is not None else None
    if verl_weights is not None and declared_inputs(config.estimator).multi_reward:
        if config.reward_weights is not None:
            raise ValueError(f"algorithm.gdpo_reward_weights and algorithm.{OPTIONS_KEY}.reward_weights are both "
                             "set: give the weights of the reward keys once")
        config = dataclasses.replace(config, reward_weights=list(verl_weights))
    return config


def reward_keys(algorithm_config) -> list:
    """verl's ``algorithm.gdpo_reward_keys``: the per-reward score fields a multi-reward estimator reads."""
    keys = algorithm_config.get("gdpo_reward_keys") if algorithm_config is not None else None
    return list(keys or [])


class _Rollout:
    """What the trainer knows at advantage time and verl does not pass to estimators."""

    def __init__(self, token_entropy: Optional[torch.Tensor], step: int, inputs: dict):
        self.token_entropy = token_entropy
        self.step = step
        self.inputs = inputs


_ROLLOUT: contextvars.ContextVar[Optional[_Rollout]] = contextvars.ContextVar("fused_canon_verl_rollout",
                                                                             default=None)


@contextlib.contextmanager
def rollout_context(*, step: int, token_entropy: Optional[torch.Tensor] = None, inputs: Optional[dict] = None):
    """Hand the global ``step``, the old policy's ``token_entropy [B, T]`` and other estimator ``inputs``
    (keywords of ``fc.compute_advantages``: values, token_ids, ...; in the batch's row order; ``rewards``:
    the [B, K] scores of the reward keys, for gdpo) to the fused-canon estimators that verl's
    ``compute_advantage`` calls inside this block."""
    token = _ROLLOUT.set(_Rollout(token_entropy, int(step), dict(inputs or {})))
    try:
        yield
    finally:
        _ROLLOUT.reset(token)


# The estimator inputs that verl's batch holds: fused-canon keyword -> verl's batch field. verl's
# compute_advantage passes reward_baselines to every registered estimator, and sum_pi_squared,
# old_log_probs, rollout_is_weights only to its own optimal-token-baseline names; the fused_canon_<mode>
# trainers read every field an estimator declares from the batch and hand it over in rollout_context.
VERL_BATCH_FIELDS = {"values": "values", "token_ids": "responses", "baseline_rewards": "reward_baselines",
                     "old_logprobs": "old_log_probs", "sum_pi_squared": "sum_pi_squared",
                     "rollout_is_weights": "rollout_is_weights"}


def _declared_inputs(config: AdvantageConfig) -> tuple:
    declared = declared_inputs(config.estimator)
    return tuple(n for n in declared.required + declared.optional if n != "mask")


def _missing_input_error(name: str, missing: list) -> ValueError:
    where = [f"{n} (verl's batch field {VERL_BATCH_FIELDS[n]!r}: run a fused_canon_<mode> V1 trainer, which hands "
             "it over)" if n in VERL_BATCH_FIELDS else f"{n} (verl's actor does not compute it)" for n in missing]
    return ValueError(f"{name} needs {', '.join(where)}; or call compute_advantage inside "
                      "fused_canon.integrations.verl.rollout_context(inputs={...})")


_NO_CONTEXT = ("verl passes neither the rollout entropy nor the global step to estimators: run verl's V1 trainer "
               "with trainer.v1.trainer_mode=fused_canon_sync (or fused_canon_colocate_async / "
               "fused_canon_separate_async), or call compute_advantage inside "
               "fused_canon.integrations.verl.rollout_context(step=..., token_entropy=...)")


def _needs_step(config: AdvantageConfig) -> bool:
    return config.estimator == "canon" and (config.canon_metric == "random"
                                            or config.canon_schedule in _SCHEDULE_FIELDS)


def _needs_entropy(config: AdvantageConfig) -> bool:
    return config.estimator == "canon" and config.canon_metric == "entropy"


def _group_ids(index, device) -> torch.Tensor:
    """verl's ``uid`` array (any hashable ids) as dense int64 group ids."""
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)


def _rewards(name: str, adv_config: AdvantageConfig, algorithm_config, token_level_rewards, given) -> torch.Tensor:
    """The rewards the estimator reads: [B] from token_level_rewards, or for a multi-reward estimator under
    ``algorithm.gdpo_reward_keys`` the [B, K] scores of those keys (handed over as ``rewards``)."""
    keys = reward_keys(algorithm_config)
    if not (keys and declared_inputs(adv_config.estimator).multi_reward):
        return token_level_rewards.sum(-1)
    if given.get("rewards") is None:
        raise ValueError(f"{name} normalises each of algorithm.gdpo_reward_keys={keys} on its own, and verl passes "
                         "their scores only to its own gdpo: run a fused_canon_<mode> V1 trainer, which hands them "
                         "over, or call compute_advantage inside fused_canon.integrations.verl.rollout_context("
                         "inputs={'rewards': scores [B, K]})")
    scores = given["rewards"].to(token_level_rewards.device)
    if scores.dim() != 2 or scores.shape != (len(token_level_rewards), len(keys)):
        raise ValueError(f"{name}: rollout_context's rewards must be [B={len(token_level_rewards)}, K={len(keys)}] "
                         f"(one column per key of {keys}), got {tuple(scores.shape)}")
    return scores


def _verl_estimator(name: str):
    """verl's estimator contract around ``fc.compute_advantages`` for registered name ``name``."""

    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None, config=None,
                  reward_baselines: Optional[torch.Tensor] = None, sum_pi_squared: Optional[torch.Tensor] = None,
                  old_log_probs: Optional[torch.Tensor] = None, rollout_is_weights: Optional[torch.Tensor] = None):
        adv_config = advantage_config(name, config)
        if index is None:
            raise ValueError(f"{name} groups responses by prompt: the batch needs verl's 'uid' column")
        rollout = _ROLLOUT.get()
        if rollout is None and (_needs_entropy(adv_config) or _needs_step(adv_config)):
            raise ValueError(f"{name} needs the {'rollout entropy' if _needs_entropy(adv_config) else 'global step'}; "
                             + _NO_CONTEXT)
        token_entropy = rollout.token_entropy if rollout is not None else None
        if _needs_entropy(adv_config):
            if token_entropy is None:
                raise ValueError(f"{name} needs the old policy's token entropy, but none was computed for this "
                                 "batch (rollout_correction.bypass_mode skips the old-log-prob pass)")
            token_entropy = token_entropy.to(response_mask.device)
        passed = {"baseline_rewards": reward_baselines, "sum_pi_squared": sum_pi_squared,
                  "old_logprobs": old_log_probs, "rollout_is_weights": rollout_is_weights}
        given = {**{k: v for k, v in passed.items() if v is not None}, **(rollout.inputs if rollout else {})}
        inputs = {n: given[n].to(response_mask.device) for n in _declared_inputs(adv_config) if n in given}
        missing = missing_inputs(adv_config.estimator, {**inputs, "mask": response_mask})
        if missing:
            raise _missing_input_error(name, missing)
        advantages, returns = compute_advantages(
            _rewards(name, adv_config, config, token_level_rewards, given), _group_ids(index, token_level_rewards.device),
            adv_config,
            mask=response_mask.bool(), token_entropy=token_entropy, step=rollout.step if rollout is not None else 0,
            with_returns=True, **inputs)
        return tuple(((x[:, None] if x.dim() == 1 else x) * response_mask).to(token_level_rewards.dtype)
                     for x in (advantages, returns))

    estimator.__name__ = estimator.__qualname__ = f"fused_canon_{name}"
    return estimator


_REGISTERED: dict = {}  # verl name -> our function (re-registering must hand verl the same object)


def registered_names() -> list:
    """The names this plugin put into verl's ADV_ESTIMATOR_REGISTRY."""
    return sorted(_REGISTERED)


def register_estimators() -> list:
    """Register every current fused-canon estimator (and the CANON presets) in verl's registry.

    Runs when the plugin loads; call it again after ``fc.register_estimator`` to expose new ones."""
    names = [PREFIX + n for n in ESTIMATORS]
    names += [n for n in ESTIMATORS if n not in core_algos.ADV_ESTIMATOR_REGISTRY or n in _REGISTERED]
    names += list(CANON_SCRIPT_PRESETS)
    for name in names:
        if name not in _REGISTERED:
            _REGISTERED[name] = _verl_estimator(name)
        core_algos.register_adv_est(name)(_REGISTERED[name])
    return registered_names()


register_estimators()


# ---------------------------------------------------------------------------------------------
# 2. V1 trainers that hand the rollout entropy and the step to the estimators
# ---------------------------------------------------------------------------------------------

TRAINER_PREFIX = "fused_canon_"


class RolloutContextForAdvantages:
    """Mixin over a verl V1 ``PPOTrainer``: ``_compute_advantage`` runs inside ``rollout_context``
    with the trainer's ``global_steps`` and the token entropy its old-log-prob pass stored."""

    def _compute_advantage(self, batch, metrics):
        token_entropy, inputs = None, {}
        algorithm = self.config.algorithm
        name = algorithm.adv_estimator
        if name in _REGISTERED:
            config = advantage_config(name, algorithm)
            wanted = {n: VERL_BATCH_FIELDS[n] for n in _declared_inputs(config) if n in VERL_BATCH_FIELDS}
            keys = reward_keys(algorithm) if declared_inputs(config.estimator).multi_reward else []
            select = (["entropy"] if _needs_entropy(config) else []) + list(wanted.values()) + keys
            if select:
                import transfer_queue as tq

                fields = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=select)
                padded = fields.to_padded_tensor()
                token_entropy = padded["entropy"] if _needs_entropy(config) else None
                inputs = {n: padded[field] for n, field in wanted.items() if field in padded.keys()}
                if keys:
                    inputs["rewards"] = torch.stack([torch.as_tensor(padded[k]).reshape(-1).double() for k in keys], 1)
        with rollout_context(step=self.global_steps, token_entropy=token_entropy, inputs=inputs):
            return super()._compute_advantage(batch, metrics)


def _register_trainers(v1) -> None:
    """Register ``fused_canon_<mode>`` for every trainer mode of verl's V1 trainer registry."""
    for mode, trainer_cls in list(v1.trainer_base.TRAINER_REGISTRY.items()):
        if mode.startswith(TRAINER_PREFIX):
            continue
        cls = type(f"FusedCanon{trainer_cls.__name__}", (RolloutContextForAdvantages, trainer_cls),
                   {"__module__": __name__})
        v1.register_trainer(TRAINER_PREFIX + mode)(cls)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run ``callback(module)`` once, right after ``module_name`` is first imported."""

    def __init__(self, module_name, callback):
        self.module_name, self.callback = module_name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            self.callback(module)

        spec.loader.exec_module = exec_then_callback
        return spec


def _when_imported(module_name, callback) -> None:
    if module_name in sys.modules:
        callback(sys.modules[module_name])
    else:
        sys.meta_path.insert(0, _AfterImport(module_name, callback))


_when_imported("verl.trainer.ppo.v1", _register_trainers)


# ---------------------------------------------------------------------------------------------
# 3. The fused token-statistics engine (fused_canon.integrations.verl_engine)
# ---------------------------------------------------------------------------------------------

def _register_engine(_transformer_impl) -> None:
    from .verl_engine import register_engine

    register_engine()


_when_imported("verl.workers.engine.fsdp.transformer_impl", _register_engine)
