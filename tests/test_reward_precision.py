"""Advantages at any reward scale (docs/design.md §4.1): every estimator computes its O(B) statistics in
float64, so float32 rewards of any finite scale give the float64 answer, and ``policy_loss`` never
downcasts the caller's rewards."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_canon as fc
from fused_canon.estimators import ESTIMATOR_INPUTS
from helpers import relative_error

F32, F64 = torch.float32, torch.float64
TOL = 1e-6  # relative to the largest advantage (relative_error)
SETTINGS = settings(max_examples=40, deadline=None)

# Every built-in estimator, with the options that exercise its means, stds and quantiles.
CONFIGS = {
    "grpo": dict(estimator="grpo"),
    "grpo_quantile": dict(estimator="grpo", baseline="quantile", quantile_k=0.3),
    "dr_grpo": dict(estimator="dr_grpo", token_budget=7.0),
    "rloo": dict(estimator="rloo"),
    "rloo_quantile": dict(estimator="rloo", baseline="quantile", quantile_k=0.6),
    "canon": dict(estimator="canon", canon_metric="custom", canon_alpha=1.3, canon_beta=0.1, canon_lambda=0.6),
    "canon_quantile": dict(estimator="canon", canon_metric="custom", baseline="quantile", quantile_k=0.4),
    "qae": dict(estimator="qae"),
    "reinforce_plus_plus": dict(estimator="reinforce_plus_plus", gamma=0.9),
    "reinforce_plus_plus_baseline": dict(estimator="reinforce_plus_plus_baseline"),
    "remax": dict(estimator="remax"),
    "opo": dict(estimator="opo"),
    "gpg": dict(estimator="gpg"),
    "grpo_passk": dict(estimator="grpo_passk"),
    "gae": dict(estimator="gae", gamma=0.95, lam=0.9),
    "optimal_token_baseline": dict(estimator="optimal_token_baseline"),
    "tir_optimal_token_baseline": dict(estimator="tir_optimal_token_baseline"),
    "grpo_batch_std": dict(estimator="grpo", std_scope="batch"),
    "gdpo": dict(estimator="gdpo"),
    "gdpo_responses": dict(estimator="gdpo", gdpo_whiten="responses"),
    "ucas": dict(estimator="ucas"),
    "ktae": dict(estimator="ktae"),
    "adora": dict(estimator="adora"),
}
TRITON_CONFIGS = ["grpo", "grpo_quantile", "dr_grpo", "rloo", "rloo_quantile", "canon", "canon_quantile"]


def test_every_builtin_estimator_is_covered():
    builtin = {name for name, fn in fc.ESTIMATORS.items() if fn.__module__.startswith("fused_canon.")}
    assert builtin <= {config["estimator"] for config in CONFIGS.values()}


@st.composite
def scaled_batches(draw):
    """Rewards = scale * draws (scale 1e-30 .. 1e30, or a large offset plus a small spread), two to four
    groups of 2..6, a distinct CANON key, and the [B, T] inputs the token-level estimators read."""
    sizes = draw(st.lists(st.integers(2, 6), min_size=2, max_size=4))
    batch = sum(sizes)
    values = np.asarray(draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=batch, max_size=batch)))
    if draw(st.booleans()):
        values = 10.0 ** draw(st.integers(-30, 30)) * values
    else:  # cancellation: a common offset far above the spread
        values = 10.0 ** draw(st.integers(2, 5)) + values * 10.0 ** draw(st.integers(-3, 0))
    group_ids = torch.tensor(np.repeat(np.arange(len(sizes)) * 5 + 2, sizes))
    order = torch.tensor(draw(st.permutations(range(batch))))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    length = 5
    mask = torch.arange(length)[None, :] < torch.randint(2, length + 1, (batch,), generator=g)[:, None]
    rewards = torch.tensor(values, dtype=F32)[order]  # float32: the caller's dtype
    scale = rewards.abs().max().clamp(min=1e-30)
    inputs = dict(
        metric=torch.randperm(batch, generator=g).float(), mask=mask,
        values=scale * torch.rand(batch, length, generator=g), baseline_rewards=scale * torch.randn(batch, generator=g),
        token_ids=torch.randint(0, 6, (batch, length), generator=g),
        self_certainty=torch.rand(batch, length, generator=g), target_logits=torch.randn(batch, length, generator=g),
        old_logprobs=-torch.rand(batch, length, generator=g), sum_pi_squared=torch.rand(batch, length, generator=g))
    return rewards, group_ids[order], inputs


def _advantages(name, rewards, group_ids, inputs, dtype, backend="torch"):
    config = fc.AdvantageConfig(**CONFIGS[name])
    declared = ESTIMATOR_INPUTS[config.estimator]
    wanted = set(declared.required) | set(declared.optional) | ({"metric"} if config.estimator == "canon" else set())
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items() if k in wanted}
    return fc.compute_advantages(rewards.to(dtype), group_ids, config, backend=backend, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
@SETTINGS
@given(batch=scaled_batches())
def test_float32_rewards_of_any_scale_give_the_float64_answer(name, batch):
    rewards, group_ids, inputs = batch
    expected = _advantages(name, rewards, group_ids, inputs, F64)  # the same float32 values, as float64
    actual = _advantages(name, rewards, group_ids, inputs, F32)
    assert actual.dtype == F32 and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= TOL, (actual, expected)


@pytest.mark.parametrize("name", TRITON_CONFIGS)
@settings(max_examples=15, deadline=None)
@given(batch=scaled_batches())
def test_the_triton_estimator_gives_the_float64_answer_at_any_scale(name, batch):
    rewards, group_ids, inputs = batch
    expected = _advantages(name, rewards, group_ids, inputs, F64)
    actual = _advantages(name, rewards, group_ids, inputs, F32, backend="triton")
    assert actual.dtype == F32
    assert relative_error(actual, expected) <= TOL, (actual, expected)


def _python_grpo(rewards, group_ids, epsilon=1e-6):
    """GRPO from Python floats (math.fsum): an independent float64 reference."""
    out = []
    for r, gid in zip(rewards.tolist(), group_ids.tolist()):
        group = [x for x, g in zip(rewards.tolist(), group_ids.tolist()) if g == gid]
        mean = math.fsum(group) / len(group)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in group) / (len(group) - 1))
        out.append((r - mean) / (std + epsilon))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1.0, 1e10, 1e30])
def test_grpo_matches_a_plain_python_reference_at_every_scale(backend, scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.25, -2.0, 3.0], dtype=F32) * scale
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    expected = _python_grpo(rewards.double(), group_ids)
    assert relative_error(fc.compute_advantages(rewards, group_ids, backend=backend), expected) <= TOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_rewards_beyond_1e154_keep_their_std(backend):
    """Their squares overflow float64: the std is formed as scale * sqrt(sum((r - mean) / scale)^2 / (n - 1))."""
    rewards = torch.tensor([1e200, 0.0, 0.0, 1e200], dtype=F64)
    advantages = fc.compute_advantages(rewards, torch.zeros(4, dtype=torch.long), backend=backend)
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64) * math.sqrt(3) / 2
    assert relative_error(advantages, expected) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_loss_keeps_float64_rewards(backend):
    """[1e8 + 1, 1e8, 1e8, 1e8 + 1] is four equal numbers in float32: the loss must not cast them."""
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(4, 3, 5, generator=g), torch.randint(0, 5, (4, 3), generator=g)
    rewards = torch.tensor([1e8 + 1, 1e8, 1e8, 1e8 + 1], dtype=F64)
    out = fc.policy_loss(logits, targets, torch.ones(4, 3, dtype=torch.bool), rewards=rewards,
                         group_ids=torch.zeros(4, dtype=torch.long), backend=backend)
    assert out.advantages.dtype == F64
    assert relative_error(out.advantages, _python_grpo(rewards, torch.zeros(4))) <= 1e-12  # about +-0.866
    assert out.metrics["critic/score/mean"] == pytest.approx(1e8 + 0.5, rel=1e-15)
