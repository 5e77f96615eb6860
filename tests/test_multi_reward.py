"""Several rewards per response (rewards [B, K], reward_weights), gdpo, GRPO's batch std and singleton rule,
and the multi-turn optimal token baseline (docs/algorithms.md §1.1, §1.3, §1.14): worked examples, edge
cases and errors, without the peers (tests/peers/ compares them with verl and TRL)."""

import math

import pytest
import torch

import fused_canon as fc

F64 = torch.float64


def t(values, dtype=F64):
    return torch.as_tensor(values, dtype=dtype)


def advantages(rewards, group_ids, mask=None, **config):
    return fc.compute_advantages(t(rewards), torch.tensor(group_ids), fc.AdvantageConfig(**config), mask=mask)


def zscore(values, eps):
    return (values - values.mean()) / (values.std() + eps)


# Worked examples of docs/algorithms.md ---------------------------------------------------------

def test_batch_std_worked_example():
    out = advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1], std_scope="batch", epsilon=0.0)
    torch.testing.assert_close(out, t([0.866025, -0.866025, -0.866025, 0.866025]), rtol=0, atol=1e-6)


def test_gdpo_worked_example():
    rewards = [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    out = advantages(rewards, [0, 0, 0, 0], estimator="gdpo", gdpo_whiten="responses", epsilon=0.0,
                     reward_weights=[1.0, 0.5])
    torch.testing.assert_close(out, t([0.387298, -1.161895, -0.387298, 1.161895]), rtol=0, atol=1e-6)


def test_tir_optimal_token_baseline_worked_example():
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    inputs = dict(old_logprobs=torch.full((2, 3), math.log(0.25), dtype=F64),
                  sum_pi_squared=torch.full((2, 3), 0.5, dtype=F64))
    expected = {"tir_optimal_token_baseline": [[0.5, 0.0, 0.5], [-0.5, -0.5, 0.0]],
                "optimal_token_baseline": [[0.5, 0.0, 5e-9], [-0.5, 0.0, 0.0]]}
    for estimator, values in expected.items():
        out = fc.compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), fc.AdvantageConfig(estimator=estimator),
                                    mask=mask, **inputs)
        torch.testing.assert_close(out, t(values), rtol=0, atol=1e-8)  # 1e-8: the epsilon in B's denominator


# Semantics ------------------------------------------------------------------------------------

def test_estimators_see_the_weighted_sum_and_an_unscored_reward_counts_zero():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(8, 3, generator=g, dtype=F64)
    rewards[2, 1] = math.nan
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    weights = [0.5, 2.0, 1.0]
    summed = torch.nan_to_num(rewards) @ t(weights)
    mask = torch.ones(8, 4, dtype=torch.bool)
    for estimator in ("grpo", "rloo", "canon"):
        config = fc.AdvantageConfig(estimator=estimator, canon_metric="length")
        weighted = fc.AdvantageConfig(estimator=estimator, canon_metric="length", reward_weights=weights)
        torch.testing.assert_close(fc.compute_advantages(rewards, ids, weighted, mask=mask),
                                   fc.compute_advantages(summed, ids, config, mask=mask), rtol=1e-12, atol=1e-12)


def test_batch_std_divides_by_the_std_of_every_reward():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(9, generator=g, dtype=F64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    out = fc.compute_advantages(rewards, ids, fc.AdvantageConfig(std_scope="batch", epsilon=1e-4))
    group_mean = torch.stack([rewards[ids == i].mean() for i in ids.tolist()])
    torch.testing.assert_close(out, (rewards - group_mean) / (rewards.std() + 1e-4), rtol=1e-12, atol=1e-12)


def test_one_response_batch_std_is_one():
    out = advantages([2.0], [0], std_scope="batch", epsilon=0.0)
    assert out.tolist() == [2.0]


def test_singleton_baseline_own_gives_a_group_of_one_zero():
    rewards, ids = [3.0, 1.0, 0.0, 5.0], [0, 1, 1, 2]
    verl = advantages(rewards, ids, epsilon=0.0)
    trl = advantages(rewards, ids, epsilon=0.0, singleton_baseline="own")
    assert verl[[0, 3]].tolist() == [3.0, 5.0] and trl[[0, 3]].tolist() == [0.0, 0.0]
    assert torch.equal(verl[1:3], trl[1:3])


def test_gdpo_is_per_reward_grpo_summed_then_whitened_over_tokens():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(6, 2, generator=g, dtype=F64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 3, 1, 4, 2])[:, None]
    grpo = fc.AdvantageConfig(epsilon=1e-6)
    summed = sum(w * fc.compute_advantages(rewards[:, k], ids, grpo) for k, w in enumerate([1.0, 3.0]))
    m = mask.to(F64)
    n = m.sum()
    mean = (summed[:, None] * m).sum() / (n + 1e-8)
    var = ((summed[:, None] - mean) ** 2 * m).sum() / (n + 1e-8) * n / (n - 1)
    out = fc.compute_advantages(rewards, ids, fc.AdvantageConfig(estimator="gdpo", reward_weights=[1.0, 3.0]),
                                mask=mask)
    torch.testing.assert_close(out, (summed - mean) / torch.sqrt(var + 1e-8), rtol=1e-12, atol=1e-12)


def test_gdpo_one_column_equals_rewards_b():
    rewards = t([0.3, 1.0, 0.0, 0.7, 0.2])
    ids = torch.tensor([0, 0, 1, 1, 1])
    config = fc.AdvantageConfig(estimator="gdpo", gdpo_whiten="responses")
    assert torch.equal(fc.compute_advantages(rewards, ids, config), fc.compute_advantages(rewards[:, None], ids, config))


def test_gdpo_unscored_entry_leaves_its_column_group_statistics():
    rewards = t([[1.0, 0.0], [0.0, math.nan], [0.5, 1.0], [0.0, 0.25]])
    ids = torch.tensor([0, 0, 0, 0])
    config = fc.AdvantageConfig(estimator="gdpo", gdpo_whiten="responses", epsilon=1e-4)
    first = zscore(rewards[:, 0], 1e-4)
    second = torch.zeros(4, dtype=F64)
    second[[0, 2, 3]] = zscore(rewards[[0, 2, 3], 1], 1e-4)
    torch.testing.assert_close(fc.compute_advantages(rewards, ids, config), zscore(first + second, 1e-4),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("whiten", ["tokens", "responses"])
def test_gdpo_all_equal_rewards_give_zero(whiten):
    out = fc.compute_advantages(torch.full((4, 2), 0.5, dtype=F64), torch.tensor([0, 0, 1, 1]),
                                fc.AdvantageConfig(estimator="gdpo", gdpo_whiten=whiten),
                                mask=torch.ones(4, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(4, dtype=F64))


def test_tir_optimal_token_baseline_equals_otb_on_right_padding_and_not_with_an_empty_sibling():
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 5, 1, 3])[:, None]
    inputs = dict(old_logprobs=-torch.rand(6, 6, generator=g, dtype=F64),
                  sum_pi_squared=torch.rand(6, 6, generator=g, dtype=F64))
    rewards, ids = torch.randn(6, generator=g, dtype=F64), torch.tensor([0, 0, 0, 1, 1, 1])
    for zero_tail in (True, False):
        tir, otb = (fc.compute_advantages(rewards, ids, fc.AdvantageConfig(estimator=e, otb_handle_zero_tail=zero_tail),
                                          mask=mask, **inputs)
                    for e in ("tir_optimal_token_baseline", "optimal_token_baseline"))
        torch.testing.assert_close(tir, otb, rtol=1e-12, atol=1e-12)
    mask[1:3] = False  # group 0: one non-empty response, two empty ones
    config = fc.AdvantageConfig(estimator="tir_optimal_token_baseline", otb_handle_zero_tail=False)
    tir = fc.compute_advantages(rewards, ids, config, mask=mask, **inputs)
    assert torch.equal(tir[0], rewards[0] * mask[0])  # a singleton of non-empty rows: no baseline


def test_policy_loss_takes_reward_columns():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(4, 3, generator=g)
    mask = torch.ones(4, 3, dtype=torch.bool)
    rewards = torch.rand(4, 2, generator=g, dtype=F64)
    ids = torch.tensor([0, 0, 1, 1])
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="gdpo", reward_weights=[1.0, 0.5]))
    out = fc.policy_loss_from_logprobs(logp, mask, rewards=rewards, group_ids=ids, config=config)
    expected = fc.compute_advantages(rewards, ids, config.advantage, mask=mask)
    torch.testing.assert_close(out.advantages, expected)
    assert out.metrics["critic/score/mean"] == pytest.approx((rewards @ t([1.0, 0.5])).mean().item(), rel=1e-12)


# Errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("reward_weights", [], r"reward_weights must be a non-empty list of numbers .* got \[\]"),
    ("reward_weights", "1,2", r"reward_weights must be a non-empty list"),
    ("reward_weights", [1.0, math.nan], r"reward_weights entry must be a finite number, got nan"),
    ("std_scope", "global", r"std_scope='global' is not valid; choose one of \['group', 'batch'\]"),
    ("gdpo_whiten", "token", r"gdpo_whiten='token' is not valid; choose one of \['tokens', 'responses'\]"),
    ("singleton_baseline", "one", r"singleton_baseline='one' is not valid; choose one of \['zero', 'own'\]"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        fc.AdvantageConfig(**{field: value})


@pytest.mark.parametrize("estimator", ["grpo", "gdpo"])
def test_weights_must_match_the_reward_columns(estimator):
    with pytest.raises(ValueError, match=r"reward_weights has 3 entries but the rewards have K=2 column\(s\)"):
        fc.compute_advantages(torch.ones(4, 2), torch.tensor([0, 0, 1, 1]),
                              fc.AdvantageConfig(estimator=estimator, reward_weights=[1.0, 1.0, 1.0]),
                              mask=torch.ones(4, 2, dtype=torch.bool))


@pytest.mark.parametrize("rewards, message", [
    (torch.ones(2, 2, 2), r"rewards must be a tensor \[B\], or \[B, K\] for K reward functions, got \(2, 2, 2\)"),
    (torch.ones(2, 0), r"rewards is empty \(shape \(2, 0\)\)"),
    (t([[1.0, math.nan], [math.nan, math.nan]]), r"rewards \[B, K\] has a response with an infinite score or with "
                                                 r"no score \(NaN in every column\): first at response index 1"),
    (t([[1.0, 0.0], [math.inf, 0.0]]), r"first at response index 1"),
    (t([1.0, math.nan]), r"rewards contains NaN or inf: first at response index 1"),
])
def test_bad_rewards_name_the_response(rewards, message):
    with pytest.raises(ValueError, match=message):
        fc.compute_advantages(rewards, torch.tensor([0, 0]), fc.AdvantageConfig(estimator="gdpo"),
                              mask=torch.ones(2, 2, dtype=torch.bool))


def test_gdpo_token_whitening_needs_the_mask():
    with pytest.raises(ValueError, match=r"gdpo with gdpo_whiten='tokens' whitens over the valid tokens of the "
                                         r"batch: pass `mask`"):
        fc.compute_advantages(torch.ones(2, 2), torch.tensor([0, 0]), fc.AdvantageConfig(estimator="gdpo"))


@pytest.mark.parametrize("field, value, estimator", [("std_scope", "batch", "grpo"),
                                                     ("singleton_baseline", "own", "grpo"),
                                                     ("singleton_baseline", "own", "dr_grpo")])
def test_triton_refuses_what_its_kernel_does_not_compute(field, value, estimator):
    pytest.importorskip("triton")
    config = fc.AdvantageConfig(estimator=estimator, **{field: value})
    with pytest.raises(ValueError, match=rf"backend='triton' cannot run advantages: {field}='{value}'"):
        fc.compute_advantages(torch.rand(4), torch.tensor([0, 0, 1, 1]), config, backend="triton")
