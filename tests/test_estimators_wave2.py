"""The wave-2 estimators beyond their golden cases: the worked examples of docs/algorithms.md (§1.4, §1.11,
§5.3, §6.2), one error per missing input, invariants, and the inputs where upstream crashes.

The spec prints six significant digits, so worked examples are compared at that precision.
"""

import math

import pytest
import torch

import fused_canon as fc
from fused_canon.estimators import ADVANTAGE_INPUTS, ESTIMATOR_INPUTS
from fused_canon.ktae import fisher_exact_p

F64 = torch.float64


def t(values, dtype=F64):
    return torch.as_tensor(values, dtype=dtype)


def length_mask(lengths, width=None):
    width = width or max(lengths)
    return (torch.arange(width)[None, :] < t(lengths, torch.long)[:, None]).to(F64)


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), t(expected), rtol=0, atol=atol)


def advantages(estimator, rewards, group_ids=None, *, mask=None, with_returns=False, **inputs_and_config):
    config_fields = {k: v for k, v in inputs_and_config.items() if k not in ADVANTAGE_INPUTS}
    inputs = {k: v for k, v in inputs_and_config.items() if k in ADVANTAGE_INPUTS}
    rewards = t(rewards)
    group_ids = torch.zeros(len(rewards), dtype=torch.long) if group_ids is None else torch.tensor(group_ids)
    return fc.compute_advantages(rewards, group_ids, fc.AdvantageConfig(estimator=estimator, **config_fields),
                                 mask=mask, with_returns=with_returns, **inputs)


def whiten(values, mask):
    """verl's masked_whiten, written out for the tests."""
    n = mask.sum()
    mean = (values * mask).sum() / (n + 1e-8)
    var = ((values - mean) ** 2 * mask).sum() / (n + 1e-8) * n / (n - 1)
    return (values - mean) / torch.sqrt(var + 1e-8) * mask


# §1.11 and §1.4 ----------------------------------------------------------------------------------

def test_reinforce_plus_plus_baseline_worked_example():
    """r = [1, 0, 0, 1], lengths [3, 5, 2, 6]: token statistics mu = 0.0625, var = 0.2625."""
    expected = [0.853913, -1.097888, -1.097888, 0.853913]
    mask = length_mask([3, 5, 2, 6])
    assert_close(advantages("reinforce_plus_plus_baseline", [1, 0, 0, 1], mask=mask), expected)
    # REINFORCE++ (gamma = 1) ignores the groups: same token statistics after the shift.
    assert_close(advantages("reinforce_plus_plus", [1, 0, 0, 1], mask=mask), t(expected)[:, None] * mask)


def test_gae_worked_example():
    """V = [0.2, 0.4, 0.5], R = 1, gamma = lam = 1: A = [0.8, 0.6, 0.5] before whitening, returns [1, 1, 1]."""
    mask = torch.ones(1, 3, dtype=F64)
    adv, returns = advantages("gae", [1.0], mask=mask, values=t([[0.2, 0.4, 0.5]]), with_returns=True)
    assert_close(returns, [[1, 1, 1]])
    assert_close(adv, whiten(t([[0.8, 0.6, 0.5]]), mask), atol=1e-12)


# §5.3 UCAS ----------------------------------------------------------------------------------------

UCAS_LOGITS = [[25, 18, 0], [30, 22, 27], [15, 0, 0], [20, 28, 0]]
UCAS_MASK = length_mask([2, 3, 1, 2])


def ucas_inputs(certainty_sums):
    # Any split of C over the valid tokens: only the sum counts. Padding holds garbage that is never read.
    certainty = UCAS_MASK * (t(certainty_sums)[:, None] / UCAS_MASK.sum(-1, keepdim=True))
    certainty = torch.where(UCAS_MASK > 0, certainty, torch.full_like(certainty, math.inf))
    return dict(mask=UCAS_MASK, self_certainty=certainty, target_logits=t(UCAS_LOGITS))


@pytest.mark.parametrize("rewards, expected", [
    ([1, 0, 0, 1], [[0.930109, 0.953443, 0], [-1.405105, -1.378438, -1.395105], [-0.596340, 0, 0],
                    [0.804407, 0.777740, 0]]),
    ([1, 1, 1, 1], [[-0.033333, -0.010, 0], [-0.05, -0.023333, -0.04], [0, 0, 0], [-0.016667, -0.043333, 0]]),
])
def test_ucas_worked_example(rewards, expected):
    assert_close(advantages("ucas", rewards, **ucas_inputs([12, 20, 9, 15])), expected)


def test_ucas_equal_logits_give_half():
    """All valid raw logits equal (torch.isclose): zn = 0.5 on every valid token."""
    inputs = ucas_inputs([1, 2, 3, 4])
    inputs["target_logits"] = torch.full((4, 3), 7.0, dtype=F64)
    assert_close(advantages("ucas", [1, 1, 1, 1], **inputs), -0.05 * 0.5 * UCAS_MASK)


# §6.2 KTAE ----------------------------------------------------------------------------------------

KTAE_TOKENS = [[5, 7, 9], [5, 8, 8], [6, 8, 9], [5, 7, 7]]


def test_ktae_worked_example():
    """Exact Fisher p: KT(5) = 0.162285 (p = 1 exactly gives F = 0)."""
    adv = advantages("ktae", [1, 0, 0, 1], mask=torch.ones(4, 3, dtype=F64), token_ids=t(KTAE_TOKENS, torch.long))
    assert_close(adv, [[1.028309, 1.866024, 0.866024], [-0.703739, -1.866024, -1.866024],
                       [-1.866024, -1.866024, -0.866024], [1.028309, 1.866024, 1.866024]])


@pytest.mark.parametrize("table, p", [((2, 1, 0, 1), 1), ((0, 1, 2, 1), 1), ((2, 0, 0, 2), "1/3"),
                                      ((1, 1, 1, 1), 1), ((3, 0, 0, 3), "1/10")])
def test_fisher_exact_p(table, p):
    from fractions import Fraction

    assert fisher_exact_p(*table) == Fraction(p)


def test_ktae_ignored_ids_get_grpo_only():
    grpo = advantages("grpo", [1, 0, 0, 1])
    adv = advantages("ktae", [1, 0, 0, 1], mask=torch.ones(4, 3, dtype=F64), token_ids=t(KTAE_TOKENS, torch.long),
                     ktae_ignore_token_ids=[7, 8])
    tokens = t(KTAE_TOKENS, torch.long)
    ignored = (tokens == 7) | (tokens == 8)
    assert torch.equal(adv[ignored], grpo[:, None].expand(4, 3)[ignored])
    assert not torch.equal(adv[~ignored], grpo[:, None].expand(4, 3)[~ignored])


def test_ktae_where_upstream_crashes():
    """Upstream raises IndexError for a singleton holding the batch's largest id, and for a mixed group
    whose ids stay below 151643. Here: the singleton gets r / (1 + eps), the mixed group its key tokens."""
    tokens = t([[3, 4, 0], [3, 5, 0], [99, 1, 0]], torch.long)
    mask = length_mask([2, 2, 2], 3)
    adv = advantages("ktae", [1.0, 0.0, 2.0], [10, 10, 11], mask=mask, token_ids=tokens)
    assert_close(adv[2], [2 / (1 + 1e-6), 2 / (1 + 1e-6), 0], atol=1e-12)
    grpo = advantages("grpo", [1.0, 0.0, 2.0], [10, 10, 11])
    assert (adv[0, 1] > grpo[0]) and (adv[1, 1] < grpo[1])  # tokens 4 and 5: one side each
    assert torch.isfinite(adv).all()


# the other estimators ------------------------------------------------------------------------

def test_qae_is_grpo_with_the_quantile_baseline():
    rewards, ids = [0.3, 1.0, 0.0, 0.7, 0.2], [1, 1, 1, 2, 2]
    expected = advantages("grpo", rewards, ids, baseline="quantile", quantile_k=0.3)
    assert torch.equal(advantages("qae", rewards, ids, quantile_k=0.3), expected)


def test_grpo_passk_best_response_only():
    adv = advantages("grpo_passk", [0.2, 0.9, 0.5, 1.0, 1.0], [0, 0, 0, 1, 1], norm_by_std=False)
    assert_close(adv, [0, 0.4, 0, 0, 0], atol=1e-12)


def test_grpo_passk_refuses_singletons():
    with pytest.raises(ValueError, match="grpo_passk.*at least 2 responses"):
        advantages("grpo_passk", [1.0, 0.0, 1.0], [0, 0, 1])


def test_estimator_with_own_baseline_refuses_quantile():
    with pytest.raises(ValueError, match="opo.*baseline of its own.*quantile"):
        advantages("opo", [1.0, 0.0], mask=torch.ones(2, 2, dtype=F64), baseline="quantile")


def test_gpg_all_zero_batch():
    assert torch.equal(advantages("gpg", [0.0, 0.0, 0.0], [0, 0, 1]), torch.zeros(3, dtype=F64))


def test_optimal_token_baseline_singleton_and_zero_tail():
    """A singleton's advantage is its reward-to-go; the strictly longest response of a group has baseline
    0 from the second-longest length on (advantage = reward-to-go there)."""
    mask = length_mask([2, 4, 3], 4)
    logp = torch.log(torch.full((3, 4), 0.5, dtype=F64))
    inputs = dict(mask=mask, old_logprobs=logp, sum_pi_squared=torch.full((3, 4), 0.3, dtype=F64))
    adv = advantages("optimal_token_baseline", [0.0, 1.0, 2.0], [0, 0, 1], **inputs)
    assert_close(adv[2], [2, 2, 2, 0], atol=1e-12)
    assert_close(adv[1, 2:], [1, 1], atol=1e-12)  # baseline zeroed from the second-longest length, 2, on
    assert (adv[1, :2] > 0).all() and (adv[0, :2] < 0).all()
    # Without it the longest response is its own baseline there: advantage 0.
    no_tail = advantages("optimal_token_baseline", [0.0, 1.0, 2.0], [0, 0, 1], otb_handle_zero_tail=False, epsilon=0.0,
                         **inputs)
    assert_close(no_tail[1, 2:], [0, 0], atol=1e-12)
    assert_close(no_tail[:, :2], adv[:, :2], atol=1e-5)  # only epsilon differs


def test_token_level_estimators_are_zero_on_padding():
    mask = length_mask([1, 3, 2])
    inputs = dict(mask=mask, values=torch.rand(3, 3, dtype=F64), token_ids=torch.randint(0, 5, (3, 3)),
                  self_certainty=torch.rand(3, 3, dtype=F64), target_logits=torch.randn(3, 3, dtype=F64),
                  old_logprobs=-torch.rand(3, 3, dtype=F64), sum_pi_squared=torch.rand(3, 3, dtype=F64))
    for estimator in ("reinforce_plus_plus", "gae", "optimal_token_baseline", "tir_optimal_token_baseline", "ucas",
                      "ktae"):
        adv = advantages(estimator, [1.0, 0.0, 1.0], [0, 0, 0], **inputs)
        assert adv.shape == (3, 3), estimator
        assert torch.equal(adv[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=F64)), estimator


# errors: one per missing input ----------------------------------------------------------------

REQUIRED = sorted((name, needed) for name, declared in ESTIMATOR_INPUTS.items() for needed in declared.required)
SAMPLE_INPUTS = dict(mask=torch.ones(2, 2, dtype=F64), values=torch.zeros(2, 2, dtype=F64),
                     baseline_rewards=torch.zeros(2, dtype=F64), token_ids=torch.zeros(2, 2, dtype=torch.long),
                     self_certainty=torch.zeros(2, 2, dtype=F64), target_logits=torch.zeros(2, 2, dtype=F64),
                     old_logprobs=torch.zeros(2, 2, dtype=F64), sum_pi_squared=torch.zeros(2, 2, dtype=F64))


def test_every_declared_input_has_a_source():
    assert REQUIRED
    assert all(needed in ADVANTAGE_INPUTS for _, needed in REQUIRED)


@pytest.mark.parametrize("estimator, missing", REQUIRED, ids=[f"{e}-{m}" for e, m in REQUIRED])
def test_missing_input_names_it_and_its_source(estimator, missing):
    inputs = {name: x for name, x in SAMPLE_INPUTS.items() if name != missing}
    with pytest.raises(ValueError, match=f"^{estimator} needs {missing}") as error:
        fc.compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), fc.AdvantageConfig(estimator=estimator),
                              **inputs)
    source = ADVANTAGE_INPUTS[missing].format(them="it")
    assert source in str(error.value)


def test_ucas_missing_signals_message():
    with pytest.raises(ValueError) as error:
        fc.compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), fc.AdvantageConfig(estimator="ucas"),
                              mask=torch.ones(2, 2))
    assert str(error.value) == ("ucas needs self_certainty and target_logits: pass them, compute them with "
                                "fc.token_signals, or call policy_loss with rewards= so the fused pass computes them")


def test_wrong_input_shape_and_dtype():
    config = fc.AdvantageConfig(estimator="gae")
    with pytest.raises(ValueError, match=r"values must be \[B, T\]"):
        fc.compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), config, mask=torch.ones(2, 3),
                              values=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="token_ids must be an integer tensor"):
        fc.compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), fc.AdvantageConfig(estimator="ktae"),
                              mask=torch.ones(2, 2), token_ids=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="values contains NaN or inf at valid"):
        fc.compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), config, mask=torch.ones(2, 2),
                              values=torch.full((2, 2), math.nan))


def test_whitening_needs_two_valid_tokens():
    with pytest.raises(ValueError, match="reinforce_plus_plus whitens.*at least 2.*got 1"):
        advantages("reinforce_plus_plus", [1.0], mask=torch.ones(1, 1, dtype=F64))


@pytest.mark.parametrize("field, value", [("gamma", 1.5), ("lam", -0.1), ("ktae_b", 2.0), ("ucas_beta_pos", -1.0),
                                          ("ktae_k1", 0.0), ("adora_lambda", 1.5), ("adora_max_length", 0),
                                          ("ktae_ignore_token_ids", [1.5]), ("ucas_token_coef", math.inf)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        fc.AdvantageConfig(**{field: value})


def test_config_rejects_zero_ktae_weights():
    with pytest.raises(ValueError, match="ktae_alpha \\+ ktae_beta"):
        fc.AdvantageConfig(ktae_alpha=0.0, ktae_beta=0.0)


# invariants ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_shifting_a_group_leaves_remax_and_opo_differences(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(8, generator=g, dtype=F64)
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1])
    mask = length_mask(torch.randint(1, 6, (8,), generator=g).tolist(), 5)
    baseline = torch.randn(8, generator=g, dtype=F64)
    shifted = rewards + 3.7 * (ids == 1)
    for estimator, inputs in (("remax", dict(baseline_rewards=baseline)), ("opo", dict(mask=mask))):
        before = advantages(estimator, rewards.tolist(), ids.tolist(), **inputs)
        after = advantages(estimator, shifted.tolist(), ids.tolist(), **inputs)
        in_group = ids == 1
        diff_before = before[in_group][:, None] - before[in_group][None, :]
        diff_after = after[in_group][:, None] - after[in_group][None, :]
        torch.testing.assert_close(diff_after, diff_before, rtol=0, atol=1e-12)
        torch.testing.assert_close(after[~in_group], before[~in_group], rtol=0, atol=0)
    # ReMax with the greedy reward shifted too: the advantages themselves are unchanged.
    torch.testing.assert_close(advantages("remax", shifted.tolist(), ids.tolist(),
                                          baseline_rewards=baseline + 3.7 * (ids == 1)),
                               advantages("remax", rewards.tolist(), ids.tolist(), baseline_rewards=baseline),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(6, generator=g, dtype=F64)
    mask = length_mask(torch.randint(1, 7, (6,), generator=g).tolist(), 6)
    adv, returns = advantages("gae", rewards.tolist(), mask=mask, values=torch.zeros(6, 6, dtype=F64),
                              with_returns=True)
    reward_to_go = rewards[:, None] * mask
    torch.testing.assert_close(returns, reward_to_go, rtol=0, atol=0)
    torch.testing.assert_close(adv, whiten(reward_to_go, mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, advantages("reinforce_plus_plus", rewards.tolist(), mask=mask),
                               rtol=1e-12, atol=1e-12)


def test_discounted_returns_count_valid_tokens_only():
    adv, returns = advantages("reinforce_plus_plus", [1.0, 2.0], mask=t([[1, 0, 1, 1], [1, 1, 0, 0]]),
                              gamma=0.5, with_returns=True)
    assert_close(returns, [[0.25, 0, 0.5, 1.0], [1.0, 2.0, 0, 0]], atol=0)


def test_float32_rewards_give_float32():
    adv = fc.compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
                                fc.AdvantageConfig(estimator="gae"), mask=torch.ones(2, 2),
                                values=torch.zeros(2, 2))
    assert adv.dtype == torch.float32


def test_epsilon_default_is_the_estimators_own():
    """Unset, epsilon is 1e-6, or 1e-8 for optimal_token_baseline (verl 0.9.1), resolved at use: a config
    built with defaults and given that estimator later (the trainer's config layers) still gets 1e-8."""
    from dataclasses import replace

    assert fc.AdvantageConfig().effective_epsilon == 1e-6
    assert fc.AdvantageConfig(estimator="optimal_token_baseline").effective_epsilon == 1e-8
    assert replace(fc.AdvantageConfig(), estimator="optimal_token_baseline").effective_epsilon == 1e-8
    assert fc.AdvantageConfig(estimator="optimal_token_baseline", epsilon=1e-6).effective_epsilon == 1e-6
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        fc.AdvantageConfig(epsilon=-1.0)
