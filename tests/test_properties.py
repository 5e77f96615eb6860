"""Property tests of the estimators (hypothesis) and fp64 gradchecks of the losses."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def grouped_batches(draw, min_groups=1, max_groups=4, min_size=1, max_size=6, even=False):
    """Rewards, shuffled group ids and a distinct metric (no ties) for a few groups."""
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=min_groups, max_size=max_groups))
    if even:
        sizes = [2 * max(1, s // 2) for s in sizes]
    group_ids = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)  # arbitrary, non-contiguous ids
    batch = len(group_ids)
    binary = draw(st.booleans())
    if binary:
        rewards = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=batch, max_size=batch))
    else:
        rewards = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=batch, max_size=batch))
    order = np.asarray(draw(st.permutations(range(batch))))
    metric = np.asarray(draw(st.permutations(range(batch))), dtype=np.float64) / batch
    return (torch.tensor(rewards, dtype=F64)[order], torch.tensor(group_ids)[order], torch.tensor(metric))


@SETTINGS
@given(ids=st.lists(st.integers(-2**40, 2**40) | st.integers(-3, 3), max_size=24),
       dtype=st.sampled_from([torch.int64, torch.int32]))
def test_groups_number_the_ids_as_unique_does(ids, dtype):
    """Groups.from_ids (a sort, no host sync) gives torch.unique's numbering and counts; the B - G entries
    after the last group are empty."""
    group_ids = torch.tensor(ids, dtype=torch.int64).clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
    groups = fc.estimators.Groups.from_ids(group_ids)
    _, index, count = torch.unique(group_ids, return_inverse=True, return_counts=True)
    assert torch.equal(groups.index, index)
    assert torch.equal(groups.count, torch.cat([count, torch.zeros(len(ids) - len(count), dtype=torch.int64)]))
    assert int(groups.num_groups) == len(count)


ESTIMATOR_CONFIGS = [
    dict(estimator="grpo"), dict(estimator="dr_grpo"), dict(estimator="rloo"),
    dict(estimator="grpo", baseline="quantile", quantile_k=0.3),
    dict(estimator="rloo", baseline="quantile", quantile_k=0.6),
    dict(estimator="canon", canon_metric="custom", canon_alpha=1.3, canon_beta=0.1, canon_lambda=0.6),
    dict(estimator="canon", canon_metric="custom", baseline="quantile", quantile_k=0.4),
]


@pytest.mark.parametrize("config", ESTIMATOR_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@SETTINGS
@given(batch=grouped_batches(), data=st.data())
def test_permuting_the_batch_permutes_advantages(config, batch, data):
    rewards, group_ids, metric = batch
    config = fc.AdvantageConfig(**config)
    perm = torch.tensor(data.draw(st.permutations(range(len(rewards)))))
    base = fc.compute_advantages(rewards, group_ids, config, metric=metric)
    permuted = fc.compute_advantages(rewards[perm], group_ids[perm], config, metric=metric[perm])
    torch.testing.assert_close(permuted, base[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [dict(estimator="grpo"), dict(estimator="dr_grpo"),
                                    dict(estimator="canon", canon_metric="custom", canon_lambda=0.3)],
                         ids=["grpo", "dr_grpo", "canon"])
@SETTINGS
@given(batch=grouped_batches(min_size=2), shift=st.floats(-10, 10))
def test_shifting_a_group_leaves_advantages_unchanged(config, batch, shift):
    rewards, group_ids, metric = batch
    config = fc.AdvantageConfig(**config)
    shifted = rewards + torch.where(group_ids == group_ids[0], shift, 0.0)
    base = fc.compute_advantages(rewards, group_ids, config, metric=metric)
    moved = fc.compute_advantages(shifted, group_ids, config, metric=metric)
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-6)  # 1e-6: (r+c)-(mu+c) cancels to ~1e-15·|c|/std


@SETTINGS
@given(batch=grouped_batches(min_size=2, even=True), budget=st.sampled_from([1.0, 8192.0]))
def test_canon_half_lambda_equals_dr_grpo_for_even_groups(batch, budget):
    rewards, group_ids, metric = batch
    canon = fc.compute_advantages(rewards, group_ids, fc.AdvantageConfig(
        estimator="canon", canon_metric="custom", canon_lambda=0.5, token_budget=budget), metric=metric)
    dr_grpo = fc.compute_advantages(rewards, group_ids, fc.AdvantageConfig(estimator="dr_grpo", token_budget=budget))
    torch.testing.assert_close(canon, dr_grpo, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(batch=grouped_batches(min_size=2), norm_by_std=st.booleans())
def test_quantile_half_is_the_median_baseline(batch, norm_by_std):
    rewards, group_ids, _ = batch
    adv = fc.compute_advantages(rewards, group_ids, fc.AdvantageConfig(baseline="quantile", quantile_k=0.5,
                                                                        norm_by_std=norm_by_std))
    expected = torch.empty_like(rewards)
    for gid in group_ids.unique():
        members = group_ids == gid
        r = rewards[members].numpy()
        value = r - np.median(r)
        if norm_by_std:
            value = value / (np.std(r, ddof=1) + 1e-6)
        expected[members] = torch.tensor(value)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# gradcheck of policy_loss w.r.t. logits, every loss mode x aggregation mode
# ---------------------------------------------------------------------------------------------

def _loss_inputs(seed=0, batch=4, length=5, vocab=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=F64)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(batch, length, generator=g, dtype=F64)  # off-policy: some tokens clip
    ref = logp + 0.2 * torch.randn(batch, length, generator=g, dtype=F64)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    return logits, targets, mask, old, ref, rewards


@pytest.mark.parametrize("loss_mode, agg_mode", list(itertools.product(
    ["vanilla", "clip_cov", "kl_cov", "gspo", "cispo"], LOSS_AGG_MODES)))
def test_policy_loss_gradcheck(loss_mode, agg_mode):
    logits, targets, mask, old, ref, rewards = _loss_inputs()
    config = fc.LossConfig(loss_mode=loss_mode, loss_agg_mode=agg_mode, clip_ratio_high=0.28, entropy_coeff=0.01,
                           kl_coef=0.05, temperature=0.8, clip_cov_ratio=0.2, clip_cov_lb=-1.0, kl_cov_ratio=0.2,
                           advantage=fc.AdvantageConfig(estimator="canon"))

    def loss_of(x):
        old_logprobs = old
        if loss_mode == "cispo":
            # CISPO's gradient is by design -sg(clip(rho)) A dlogp, not the derivative of its value.
            # Let old follow x (policy_loss detaches it) so rho is constant under the finite difference.
            logp = torch.log_softmax(x / config.temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
            old_logprobs = logp - (logp0 - old)
        return fc.policy_loss(x, targets, mask, rewards=rewards, group_ids=torch.tensor([0, 0, 1, 1]),
                              old_logprobs=old_logprobs, ref_logprobs=ref, config=config, backend="torch").loss

    logp0 = torch.log_softmax(logits / config.temperature, -1).gather(-1, targets[..., None]).squeeze(-1)

    assert torch.autograd.gradcheck(loss_of, (logits.requires_grad_(),), eps=1e-6, atol=1e-7)


def test_linear_policy_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(9, generator=g, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 9, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    config = fc.LossConfig(entropy_coeff=0.01, temperature=0.7)

    def loss_of(h, w, b):
        return fc.linear_policy_loss(h, w, targets, mask, bias=b, advantages=torch.tensor([0.5, -1.0], dtype=F64),
                                     old_logprobs=torch.full((2, 3), -2.0, dtype=F64), config=config,
                                     backend="torch").loss

    assert torch.autograd.gradcheck(loss_of, (hidden, weight, bias), eps=1e-6, atol=1e-7)
