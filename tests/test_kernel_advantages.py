"""The Triton advantage kernel (kernels/advantages.py) against the reference estimators and the golden cases.

Runs under Triton's interpreter on CPU (tests/conftest.py), fp32, relative error 1e-4, through
``compute_advantages(..., backend="triton")``, which runs the kernel or raises (it never falls back);
the CANON sort key is reduced from mask / token entropy by the reference's own ``_canon_metric`` first.
"""

import pytest
import torch

import fused_canon as fc
from fused_canon.backends import ADVANTAGES, triton_names
from fused_canon.estimators import ESTIMATORS, Groups, triton_advantages
from fused_canon.kernels.advantages import CANON, MAX_GROUP_SIZE
from golden import load_cases
from helpers import relative_error

TOL = 1e-4
TRITON_ESTIMATORS = triton_names(ADVANTAGES)


def _triton_advantages(rewards, group_ids, config, metric=None, mask=None, token_entropy=None, step=0):
    """``compute_advantages`` on float32 rewards with the Triton estimator."""
    return fc.compute_advantages(rewards.float(), group_ids, config, metric=metric, mask=mask,
                                 token_entropy=token_entropy, step=step, backend="triton")


def _assert_matches_reference(rewards, group_ids, config, **kw):
    expected = fc.compute_advantages(rewards, group_ids, config, **kw)
    actual = _triton_advantages(rewards, group_ids, config, **kw)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    error = relative_error(actual, expected)
    assert error <= TOL, f"relative error {error:.3e}\nkernel    {actual}\nreference {expected}"
    return expected


def _batch(seed=0):
    """19 responses in groups of 7, 5, 4, 2 and 1, interleaved (not contiguous), with tied rewards
    and tied lengths; group 3 has all-equal rewards (exact in fp32: std 0 and advantage 0)."""
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.tensor([10] * 7 + [4] * 5 + [7] * 4 + [2] * 2 + [99])[torch.randperm(19, generator=g)]
    rewards = torch.where(torch.rand(19, generator=g) < 0.5, torch.rand(19, generator=g),
                          torch.randint(0, 2, (19,), generator=g).float())
    rewards[group_ids == 7] = 0.5
    mask = torch.arange(9)[None, :] < torch.randint(1, 10, (19,), generator=g)[:, None]
    token_entropy = torch.rand(19, 9, generator=g) * 3
    return rewards, group_ids, mask, token_entropy


@pytest.mark.parametrize("baseline", ["mean", "quantile"])
@pytest.mark.parametrize("config", [
    {"estimator": "grpo"}, {"estimator": "grpo", "norm_by_std": False}, {"estimator": "grpo", "epsilon": 0.0},
    {"estimator": "dr_grpo", "token_budget": 7.0}, {"estimator": "rloo"}, {"estimator": "rloo", "quantile_k": 0.9},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_group_estimators(config, baseline):
    rewards, group_ids, _, _ = _batch(seed=1)
    if config.get("epsilon") == 0.0:  # no all-equal group: std 0 with epsilon 0 divides by zero
        rewards[group_ids == 7] = torch.tensor([0.0, 1.0, 0.25, 0.5])
    _assert_matches_reference(rewards, group_ids, fc.AdvantageConfig(**config, baseline=baseline))


@pytest.mark.parametrize("metric", ["entropy", "length", "custom", "random"])
@pytest.mark.parametrize("baseline", ["mean", "quantile"])
@pytest.mark.parametrize("favor", [None, "low", "high"])
def test_canon_metrics_baselines_favor(metric, baseline, favor):
    rewards, group_ids, mask, token_entropy = _batch(seed=2)
    config = fc.AdvantageConfig(estimator="canon", canon_metric=metric, baseline=baseline, canon_favor=favor,
                                canon_alpha=1.3, canon_beta=0.2, canon_lambda=0.6, token_budget=4.0, seed=3)
    custom = torch.randint(0, 3, (19,), generator=torch.Generator().manual_seed(5)).float()  # many ties
    _assert_matches_reference(rewards, group_ids, config, metric=custom if metric == "custom" else None, mask=mask,
                              token_entropy=token_entropy, step=2)


@pytest.mark.parametrize("schedule,steps", [("constant", [0]), ("anneal", [0]),
                                            ("cosine_restart", [0, 29, 30, 77, 149]),
                                            ("cosine_restart_r", [3, 64, 120])])
def test_canon_schedules(schedule, steps):
    rewards, group_ids, mask, token_entropy = _batch(seed=3)
    config = fc.AdvantageConfig(estimator="canon", canon_schedule=schedule, canon_alpha=0.8, canon_beta=0.1)
    for step in steps:
        _assert_matches_reference(rewards, group_ids, config, mask=mask, token_entropy=token_entropy, step=step)


@pytest.mark.parametrize("estimator", sorted(TRITON_ESTIMATORS))
def test_large_group_ranks_in_several_tiles(estimator):
    """A group of 150 (BLOCK_N 256: the pairwise ranks take 10 tiles of 16), a group of 3, a singleton."""
    g = torch.Generator().manual_seed(4)
    group_ids = torch.cat([torch.zeros(150, dtype=torch.long), torch.tensor([5, 5, 5, 9])])
    order = torch.randperm(154, generator=g)
    rewards = torch.randint(0, 5, (154,), generator=g).float() / 4  # ties everywhere
    metric = torch.randint(0, 10, (154,), generator=g).float()
    for baseline in ("mean", "quantile"):
        config = fc.AdvantageConfig(estimator=estimator, baseline=baseline, canon_metric="custom", canon_alpha=1.5,
                                    canon_lambda=0.7, quantile_k=0.3)
        _assert_matches_reference(rewards[order], group_ids[order], config, metric=metric[order])


def test_all_singletons_and_one_group():
    rewards = torch.tensor([0.3, 1.0, 0.0, 0.7, 0.7])
    for group_ids in (torch.arange(5), torch.zeros(5, dtype=torch.long)):
        for estimator in sorted(TRITON_ESTIMATORS):
            for baseline in ("mean", "quantile"):
                config = fc.AdvantageConfig(estimator=estimator, baseline=baseline, canon_metric="custom",
                                            canon_beta=0.3)
                _assert_matches_reference(rewards, group_ids, config, metric=torch.tensor([2.0, 1.0, 2.0, 0.0, 1.0]))


def test_group_larger_than_the_limit_raises():
    rewards = torch.zeros(MAX_GROUP_SIZE + 1)
    with pytest.raises(ValueError, match="MAX_GROUP_SIZE"):
        _triton_advantages(rewards, torch.zeros(MAX_GROUP_SIZE + 1, dtype=torch.long), fc.AdvantageConfig())


def test_unknown_estimator_and_missing_metric_raise(monkeypatch):
    rewards, group_ids = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    monkeypatch.setitem(ESTIMATORS, "my_estimator", lambda rewards, groups, config, **kwargs: rewards)
    with pytest.raises(ValueError, match="estimator 'my_estimator' has no Triton kernel"):
        _triton_advantages(rewards, group_ids, fc.AdvantageConfig(estimator="my_estimator"))
    with pytest.raises(ValueError, match="sort key"):
        triton_advantages(rewards, Groups.from_ids(group_ids), fc.AdvantageConfig(estimator="canon"), estimator=CANON)


GOLDEN = [(i, c) for i, c in enumerate(load_cases()) if c["kind"] == "advantage"]


def test_golden_advantage_cases_fp32():
    """Every upstream advantage case (verl, CANON, QAE) through the kernel, float32 inputs."""
    assert len(GOLDEN) == 120
    for index, case in GOLDEN:
        inputs = case["inputs"]
        mask = torch.tensor(inputs["mask"], dtype=torch.float32)
        token_entropy = torch.tensor(inputs["token_entropy"]) if "token_entropy" in inputs else None
        advantages = _triton_advantages(torch.tensor(inputs["rewards"], dtype=torch.float32),
                                        torch.tensor(inputs["group_ids"], dtype=torch.long),
                                        fc.AdvantageConfig(**case["config"]), mask=mask,
                                        token_entropy=token_entropy, step=case.get("step", 0))
        pairs = {"expected_token": (advantages[:, None] * mask, case["expected_token"])}
        if "advantages" in case.get("expected", {}):
            pairs["advantages"] = (advantages, case["expected"]["advantages"])
        for name, (actual, expected) in pairs.items():
            error = relative_error(actual, torch.tensor(expected, dtype=torch.float64))
            assert error <= TOL, f"case {index} {name}: relative error {error:.3e} ({case['source']})"
