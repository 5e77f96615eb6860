"""The worked examples of docs/algorithms.md (§1.8, §1.10, §1.11, §2.5, §2.7, §2.8, §3.2, §4.5, §8.1-8.3).

The spec prints six significant digits, so values are compared at the precision printed.
"""

import math

import pytest
import torch

import fused_canon as fc
from fused_canon.losses import POLICY_LOSSES, Normalizers, agg_loss

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def advantages(rewards, metric=None, group_ids=None, **config):
    rewards = t(rewards)
    group_ids = torch.zeros(len(rewards), dtype=torch.long) if group_ids is None else torch.tensor(group_ids)
    return fc.compute_advantages(rewards, group_ids, fc.AdvantageConfig(**config),
                                 metric=None if metric is None else t(metric))


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), t(expected), rtol=0, atol=atol)


# §1.8 ---------------------------------------------------------------------------------------

AGG_MASK = t([[1, 1, 1, 0], [1, 1, 0, 0]])
AGG_LOSS = t([[0.5, -0.2, 0.3, 99.0], [1.0, 0.4, -99.0, 7.0]])  # padded values must not matter


@pytest.mark.parametrize("mode, scale, expected", [
    ("token-mean", None, 0.4),
    ("seq-mean-token-sum", None, 1.0),
    ("seq-mean-token-mean", None, 0.45),
    ("seq-mean-token-sum-norm", 4, 0.25),
    ("seq-mean-token-sum-norm", 8192, 1.2207e-4),
])
def test_aggregation_table(mode, scale, expected):
    value = agg_loss(AGG_LOSS, AGG_MASK, mode, Normalizers(loss_scale_factor=scale))
    assert math.isclose(value.item(), expected, rel_tol=1e-4)


def test_seq_mean_token_sum_norm_defaults_to_padded_length():
    value = agg_loss(AGG_LOSS, AGG_MASK, "seq-mean-token-sum-norm")
    assert math.isclose(value.item(), 1.0 / 4, rel_tol=1e-12)


# §1.10 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kl_type, values, grads", [
    ("k1", [0.2, 0, -1.3], [1, 1, 1]),
    ("abs", [0.2, 0, 1.3], None),
    ("k2", [0.02, 0, 0.845], [0.2, 0, -1.3]),
    ("k3", [0.018731, 0, 1.369297], [0.181269, 0, -2.669297]),
])
def test_kl_table(kl_type, values, grads):
    logp = t([-1.0, -0.5, -2.0]).requires_grad_()
    kl = fc.kl_penalty(logp, t([-1.2, -0.5, -0.7]), kl_type)
    assert_close(kl.detach(), values)
    if grads is not None:
        kl.sum().backward()
        assert_close(logp.grad, grads)


def test_kl_plus_suffix_keeps_value_with_k2_gradient():
    logp = t([-1.0, -0.5, -2.0]).requires_grad_()
    kl = fc.kl_penalty(logp, t([-1.2, -0.5, -0.7]), "k3+")
    kl.sum().backward()
    assert_close(kl.detach(), [0.018731, 0, 1.369297])
    assert_close(logp.grad, [0.2, 0, -1.3])


# §1.11 --------------------------------------------------------------------------------------

R = [1, 0, 0, 1]


@pytest.mark.parametrize("config, expected", [
    (dict(estimator="grpo"), [0.866024, -0.866024, -0.866024, 0.866024]),
    (dict(estimator="dr_grpo"), [0.5, -0.5, -0.5, 0.5]),
    (dict(estimator="grpo", norm_by_std=False), [0.5, -0.5, -0.5, 0.5]),
    (dict(estimator="rloo"), [0.666667, -0.666667, -0.666667, 0.666667]),
])
def test_base_estimators(config, expected):
    assert_close(advantages(R, **config), expected)


def test_dr_grpo_canon_form_token_budget():
    assert_close(advantages(R, estimator="dr_grpo", token_budget=8192), [6.1035e-5, -6.1035e-5, -6.1035e-5, 6.1035e-5],
                 atol=1e-9)


def test_grpo_all_equal_and_singleton():
    assert_close(advantages([1, 1, 1, 1]), [0, 0, 0, 0], atol=0)
    assert_close(advantages([1]), [0.999999])
    assert_close(advantages([1], estimator="rloo"), [1.0], atol=0)  # verl's looped RLOO keeps r


PPO_ROWS = [  # A, logp, loss (0.2/0.2), loss DAPO (0.2/0.28), dloss/dlogp
    (+1, -1.0, -1.000000, -1.000000, -1.000000),
    (+1, -0.5, -1.200000, -1.280000, 0.0),
    (+1, -1.2, -0.818731, -0.818731, -0.818731),
    (-1, -1.0, 1.000000, 1.000000, 1.000000),
    (-1, -1.5, 0.800000, 0.800000, 0.0),
    (-1, -0.5, 1.648721, 1.648721, 1.648721),
    (-1, +0.5, 3.000000, 3.000000, 0.0),
]


@pytest.mark.parametrize("high, column", [(0.2, 2), (0.28, 3)])
def test_ppo_token_table(high, column):
    adv = t([[row[0]] for row in PPO_ROWS])
    logp = t([[row[1]] for row in PPO_ROWS]).requires_grad_()
    config = fc.LossConfig(clip_ratio_low=0.2, clip_ratio_high=high, clip_ratio_c=3.0)
    out = POLICY_LOSSES["vanilla"](logp, torch.full_like(adv, -1.0), adv, torch.ones_like(adv), config)
    out.values.sum().backward()
    assert_close(out.values.detach().squeeze(1), [row[column] for row in PPO_ROWS])
    assert_close(logp.grad.squeeze(1), [row[4] for row in PPO_ROWS])


# §2.5, §2.7, §2.8 ---------------------------------------------------------------------------

def canon(rewards, metric, **config):
    config.setdefault("estimator", "canon")
    config.setdefault("canon_metric", "custom")
    return advantages(rewards, metric, **config)


def test_canon_equals_dr_grpo_for_even_n_only():
    metric = [0, 1, 2, 3, 4]
    assert_close(canon([1, 0, 1, 1, 0], metric, canon_lambda=0.5), [0.416667, -0.583333, 0.416667, 0.416667, -0.583333])
    assert_close(advantages([1, 0, 1, 1, 0], estimator="dr_grpo"), [0.4, -0.6, 0.4, 0.4, -0.6])


EXAMPLE_A = ([1, 0, 0, 1], [0.2, 0.9, 0.5, 0.1])


@pytest.mark.parametrize("config, expected", [
    (dict(canon_lambda=1.0), [1, -1, -1, 1]),
    (dict(canon_lambda=0.5), [0.5, -0.5, -0.5, 0.5]),
    (dict(canon_lambda=0.0), [0, 0, 0, 0]),
    (dict(canon_alpha=1.2, canon_lambda=0.8), [0.96, -0.96, -0.96, 0.96]),
    (dict(canon_alpha=1.2, canon_lambda=0.8, canon_favor="high"), [0.8, -0.8, -0.8, 0.8]),  # the length variant
    (dict(canon_lambda=1.0, token_budget=8192), [1.2207e-4, -1.2207e-4, -1.2207e-4, 1.2207e-4]),
])
def test_canon_example_a(config, expected):
    assert_close(canon(*EXAMPLE_A, **config), expected, atol=1e-8 if "token_budget" in config else 1e-6)


def test_canon_length_metric_uses_length_variant_by_default():
    # Example A with the metric given as response lengths (via mask) and the length variant.
    lengths = [2, 9, 5, 1]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths], dtype=F64)
    adv = fc.compute_advantages(t(R), torch.zeros(4, dtype=torch.long),
                                fc.AdvantageConfig(estimator="canon", canon_metric="length", canon_alpha=1.2,
                                                   canon_lambda=0.8), mask=mask)
    assert_close(adv, [0.8, -0.8, -0.8, 0.8])


@pytest.mark.parametrize("accuracy, extra_rewards", [(0.1, [0] * 16), (0.5, []), (0.9, [1] * 16)])
def test_canon_anneal_uses_batch_accuracy(accuracy, extra_rewards):
    rewards = R + extra_rewards
    metric = EXAMPLE_A[1] + [0.0] * len(extra_rewards)
    group_ids = [0] * 4 + [1 + i // 4 for i in range(len(extra_rewards))]
    adv = advantages(rewards, metric, group_ids, estimator="canon", canon_metric="custom", canon_schedule="anneal")
    assert_close(adv[:4], [accuracy, -accuracy, -accuracy, accuracy])


EXAMPLE_B = ([1, 0, 1, 0, 1, 0], [0.3, 0.1, 0.7, 0.4, 0.2, 0.9])


@pytest.mark.parametrize("config, expected", [
    (dict(canon_lambda=1.0), [0.666667, -0.333333, 0.333333, -0.666667, 0.666667, -0.666667]),
    (dict(canon_lambda=0.5), [0.5, -0.5, 0.5, -0.5, 0.5, -0.5]),
    (dict(canon_lambda=0.0), [0.333333, -0.666667, 0.666667, -0.333333, 0.333333, -0.333333]),
    (dict(canon_alpha=1.2, canon_lambda=0.8), [0.76, -0.4, 0.293333, -0.706667, 0.76, -0.706667]),
    (dict(canon_alpha=1.2, canon_lambda=0.8, canon_favor="high"), [0.546667, -0.453333, 0.56, -0.6, 0.546667, -0.6]),
])
def test_canon_example_b(config, expected):
    assert_close(canon(*EXAMPLE_B, **config), expected)


def test_canon_ties_broken_by_batch_order():
    assert_close(canon([0, 1, 1, 0], [0.3, 0.5, 0.5, 0.7]), [-0.5, 0.5, 0.5, -0.5])


def test_canon_edge_cases():
    # All-correct group with alpha != 1: non-zero advantages; the length variant flips the signs.
    assert_close(canon([1, 1, 1, 1], [0.2, 0.9, 0.5, 0.1], canon_alpha=1.2), [0.2, -0.2, -0.2, 0.2])
    assert_close(canon([1, 1, 1, 1], [0.2, 0.9, 0.5, 0.1], canon_alpha=1.2, canon_favor="high"), [-0.2, 0.2, 0.2, -0.2])
    # All-wrong group: beta shifts each half by ±lambda beta.
    assert_close(canon([0, 0, 0, 0], [0.2, 0.9, 0.5, 0.1], canon_beta=0.1, canon_lambda=0.7),
                 [-0.07, 0.07, 0.07, -0.07])
    # Singletons (r = 1, L = 1).
    assert_close(canon([1], [0.3], canon_lambda=0.7, canon_beta=0.1), [1.07])
    assert_close(canon([1], [0.3], canon_lambda=0.7, canon_alpha=1.2, canon_favor="high"), [1.14])


SCHEDULE_TABLE = [  # step, cosine_restart w, cosine_restart_r w
    (1, 0.96, 0.066667), (15, 0.68, 0.533333), (29, 0.40, 1.0), (30, 0.40, 1.0), (50, 0.70, 0.70),
    (69, 0.999075, 0.400925), (70, 0.40, 1.0), (110, 0.40, 1.0), (150, 0.40, 1.0), (190, 0.40, 1.0),
]


@pytest.mark.parametrize("step, w_restart, w_restart_r", SCHEDULE_TABLE)
def test_canon_schedule_table(step, w_restart, w_restart_r):
    # With Example A (mu- = 1, mu+ = 0) the inter weight w is exactly a_0.
    for schedule, w in (("cosine_restart", w_restart), ("cosine_restart_r", w_restart_r)):
        adv = fc.compute_advantages(t(R), torch.zeros(4, dtype=torch.long),
                                    fc.AdvantageConfig(estimator="canon", canon_metric="custom",
                                                       canon_schedule=schedule), metric=t(EXAMPLE_A[1]), step=step)
        assert_close(adv, [w, -w, -w, w])


# §3.2 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [
    (0.4, [1.385638, -0.346410, -0.346410, 1.385638]),
    (0.5, [0.866024, -0.866024, -0.866024, 0.866024]),
    (0.6, [0.346410, -1.385638, -1.385638, 0.346410]),
    (0.8, [0, -1.732048, -1.732048, 0]),
])
def test_qae_quantile_table(k, expected):
    assert_close(advantages(R, baseline="quantile", quantile_k=k), expected)


def test_qae_without_std():
    assert_close(advantages(R, baseline="quantile", quantile_k=0.4, norm_by_std=False), [0.8, -0.2, -0.2, 0.8])


@pytest.mark.parametrize("num_correct, a_correct, a_wrong", [(3, 2.480689, 0), (9, 1.951796, 0),
                                                              (10, 0, -1.999996), (12, 0, -2.236063)])
def test_qae_two_regime_gate_n16(num_correct, a_correct, a_wrong):
    rewards = [1] * num_correct + [0] * (16 - num_correct)
    adv = advantages(rewards, baseline="quantile", quantile_k=0.4)
    assert_close(adv, [a_correct] * num_correct + [a_wrong] * (16 - num_correct))


def test_grpo_n16_three_correct():
    adv = advantages([1] * 3 + [0] * 13)
    assert_close(adv, [2.015559] * 3 + [-0.465129] * 13)


# §4.5 ---------------------------------------------------------------------------------------

COV_LOGP = [[-0.05, -2.5, -0.1], [-4.0, -0.2, 0.0], [-0.3, -3.5, -1.0], [-0.02, 0.0, 0.0]]
COV_MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
COV_ADV = [0.866024, -0.866024, -0.866024, 0.866024]


def cov_inputs(logp=COV_LOGP):
    mask = t(COV_MASK)
    logp = t(logp).requires_grad_()
    old = logp.detach().clone()
    old[0, 0] = -0.5
    if logp[1, 0] != -4.0:
        old[1, 0] = -4.0
    return logp, old, t(COV_ADV)[:, None].expand(4, 3) * mask, mask


def test_clip_cov_picks_one_eligible_token():
    eligible = {(0, 2), (1, 0), (2, 1), (3, 0)}
    chosen = set()
    for seed in range(12):
        logp, old, adv, mask = cov_inputs()
        out = POLICY_LOSSES["clip_cov"](logp, old, adv, mask, fc.LossConfig(seed=seed))
        unclipped = POLICY_LOSSES["clip_cov"](logp, old, adv, mask, fc.LossConfig(clip_cov_lb=4.0, clip_cov_ub=5.0))
        zeroed = {tuple(i) for i in ((out.values != unclipped.values) & (mask > 0)).nonzero().tolist()}
        assert len(zeroed) == 1 and zeroed <= eligible, zeroed
        assert out.metrics["actor/pg_clipfrac"].item() == pytest.approx(1 / 9, rel=1e-6)
        chosen |= zeroed
    assert len(chosen) > 1  # the choice is random across seeds, not top-k


def test_kl_cov_on_and_off_policy():
    logp, _, adv, mask = cov_inputs()
    out = POLICY_LOSSES["kl_cov"](logp, logp.detach(), adv, mask, fc.LossConfig())
    out.values[1, 0].backward()
    assert out.values[1, 0].item() == pytest.approx(0.866024, abs=1e-6)
    assert logp.grad[1, 0].item() == pytest.approx(0.866024, abs=1e-6)  # the KL term adds no gradient on-policy

    moved = [row[:] for row in COV_LOGP]
    moved[1][0] = -3.8
    logp, old, adv, mask = cov_inputs(moved)
    out = POLICY_LOSSES["kl_cov"](logp, old, adv, mask, fc.LossConfig())
    penalized = (out.values.detach() != (-adv * torch.exp(logp.detach() - old))) & (mask > 0)
    assert penalized.nonzero().tolist() == [[1, 0]]  # the top-1 covariance token
    out.values[1, 0].backward()
    assert out.values[1, 0].item() == pytest.approx(1.257764, abs=1e-6)
    assert logp.grad[1, 0].item() == pytest.approx(2.057764, abs=1e-6)


# §8.1-8.3 -----------------------------------------------------------------------------------

Z = [2.0, 1.0, 0.5, -1.0, 3.0]


def test_entropy_of_large_logits_does_not_overflow():
    _, entropy = fc.token_stats(t([[1000.0, 999.0, 0.0]]), torch.tensor([0]), backend="torch")
    assert entropy.item() == pytest.approx(0.582203, abs=1e-6)


@pytest.mark.parametrize("temperature, expected", [
    (1.0, [-0.190051, 0.604766, -0.065440, -0.019741, -0.329534]),
    (0.7, [-0.254424, 0.912559, -0.049285, -0.008062, -0.600788]),
])
def test_coefficient_form_gradient(temperature, expected):
    logits = t([Z]).requires_grad_()
    logp, entropy = fc.token_stats(logits, torch.tensor([1]), temperature=temperature, backend="torch")
    if temperature == 1.0:
        assert logp.item() == pytest.approx(-2.472261, abs=1e-6)
        assert entropy.item() == pytest.approx(1.044109, abs=1e-6)
    (0.7 * logp + -0.3 * entropy).sum().backward()
    assert_close(logits.grad[0], expected)


def test_full_ppo_token_gradient():
    logits = t([[Z]]).requires_grad_()
    out = fc.policy_loss(logits, torch.tensor([[1]]), torch.ones(1, 1), advantages=t([0.866025]),
                         old_logprobs=t([[-2.3]]), config=fc.LossConfig(entropy_coeff=0.001), backend="torch")
    out.loss.backward()
    assert_close(logits.grad[0, 0], [0.167136, -0.667584, 0.037216, 0.008287, 0.454945])
