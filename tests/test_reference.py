"""Behaviour of the torch reference beyond the spec tables: registries, normalizers, paths, metrics."""

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES
from helpers import make_batch

F64 = torch.float64


def batch(dtype=F64):
    """helpers.make_batch [6, 5, 11] as (logits, targets, mask, rewards, group_ids, old_logprobs)."""
    inputs = make_batch(6, 5, 11, dtype=dtype)
    return tuple(inputs[name] for name in ("logits", "targets", "mask", "rewards", "group_ids", "old_logprobs"))


def test_custom_estimator_and_loss_are_usable_by_name():
    @fc.register_estimator("test_sign")
    def sign(rewards, groups, config, *, metric=None, step=0):
        return torch.sign(rewards - 0.5)

    @fc.register_policy_loss("test_reinforce")
    def reinforce(logp, old_logp, advantages, mask, config, *, step=0):
        return fc.TokenLoss(-advantages * logp, {"actor/test": (logp * mask).sum()})

    logits, targets, mask, rewards, group_ids, _ = batch()
    config = fc.LossConfig(loss_mode="test_reinforce", advantage=fc.AdvantageConfig(estimator="test_sign"))
    out = fc.policy_loss(logits, targets, mask, rewards=rewards, group_ids=group_ids, config=config, backend="torch")
    torch.testing.assert_close(out.advantages, torch.sign(rewards - 0.5))
    expected = (-(torch.sign(rewards - 0.5)[:, None] * out.logprobs) * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss.detach(), expected)
    assert "actor/test" in out.metrics


def test_registries_refuse_to_replace_a_name_unless_asked(monkeypatch):
    with pytest.raises(ValueError, match=r"estimator 'grpo' is already registered .*overwrite=True"):
        fc.register_estimator("grpo")(lambda rewards, groups, config, **kwargs: rewards)
    with pytest.raises(ValueError, match=r"policy loss 'vanilla' is already registered .*overwrite=True"):
        fc.register_policy_loss("vanilla")(lambda logp, old_logp, advantages, mask, config, **kwargs: None)
    assert fc.ESTIMATORS["grpo"].__name__ == "grpo" and fc.POLICY_LOSSES["vanilla"].__name__ == "vanilla"

    monkeypatch.setitem(fc.ESTIMATORS, "grpo", fc.ESTIMATORS["grpo"])  # restored after the test
    monkeypatch.setitem(fc.POLICY_LOSSES, "vanilla", fc.POLICY_LOSSES["vanilla"])

    @fc.register_estimator("grpo", overwrite=True)
    def doubled(rewards, groups, config, *, metric=None, step=0):
        return 2 * rewards

    @fc.register_policy_loss("vanilla", overwrite=True)
    def reinforce(logp, old_logp, advantages, mask, config, *, step=0):
        return fc.TokenLoss(-advantages * logp)

    logits, targets, mask, rewards, group_ids, _ = batch()
    out = fc.policy_loss(logits, targets, mask, rewards=rewards, group_ids=group_ids, backend="torch")
    torch.testing.assert_close(out.advantages, 2 * rewards)
    expected = (-(2 * rewards[:, None] * out.logprobs) * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss.detach(), expected)


@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
def test_micro_batches_with_global_normalizers_sum_to_the_full_batch(agg_mode):
    logits, targets, mask, _, _, old = batch()
    advantages = torch.linspace(-1, 1, 6, dtype=F64)
    config = fc.LossConfig(loss_agg_mode=agg_mode, entropy_coeff=0.01, loss_scale_factor=5)
    full_logits = logits.clone().requires_grad_()
    full = fc.policy_loss(full_logits, targets, mask, advantages=advantages, old_logprobs=old, config=config,
                          backend="torch")
    full.loss.backward()

    micro_logits = logits.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        out = fc.policy_loss(micro_logits[rows], targets[rows], mask[rows], advantages=advantages[rows],
                             old_logprobs=old[rows], config=config, backend="torch",
                             global_num_tokens=mask.sum().item(), global_num_seqs=mask.any(-1).sum().item())
        out.loss.backward()
        total = total + out.loss.detach()
    torch.testing.assert_close(total, full.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(micro_logits.grad, full_logits.grad, rtol=1e-10, atol=1e-12)


def test_canon_random_metric_is_seeded_and_splits_each_group_in_halves():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0])
    group_ids = torch.tensor([0] * 8)
    config = lambda seed: fc.AdvantageConfig(estimator="canon", canon_metric="random", seed=seed)  # noqa: E731
    runs = {seed: fc.compute_advantages(rewards, group_ids, config(seed), step=3) for seed in range(6)}
    torch.testing.assert_close(fc.compute_advantages(rewards, group_ids, config(0), step=3), runs[0])
    assert len({tuple(a.tolist()) for a in runs.values()}) > 1  # not a fixed row-order split
    for adv in runs.values():  # lambda = 1: a = r - mean(other half), each half of size 4
        assert set(torch.round(adv * 4).tolist()) <= {-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0}


def test_canon_entropy_metric_comes_from_the_pass_itself():
    logits, targets, mask, rewards, group_ids, _ = batch()
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="canon", canon_alpha=1.3, canon_lambda=0.7))
    out = fc.policy_loss(logits, targets, mask, rewards=rewards, group_ids=group_ids, config=config, backend="torch")
    _, entropy = fc.token_stats(logits, targets, backend="torch")
    expected = fc.compute_advantages(rewards, group_ids, config.advantage, mask=mask, token_entropy=entropy)
    torch.testing.assert_close(out.advantages, expected)
    metric = (entropy * mask).sum(-1) / mask.sum(-1)
    given = fc.policy_loss(logits, targets, mask, rewards=rewards, group_ids=group_ids, metric=-metric,
                           config=config, backend="torch")
    flipped = fc.compute_advantages(rewards, group_ids, config.advantage, metric=-metric)
    torch.testing.assert_close(given.advantages, flipped)


def test_canon_quantile_half_baselines():
    # Example A with K = 0.5: each half of two has its median = its mean, so the result is unchanged.
    rewards, metric = torch.tensor([1.0, 0, 0, 1]), torch.tensor([0.2, 0.9, 0.5, 0.1])
    base = dict(estimator="canon", canon_metric="custom", canon_lambda=0.8, canon_alpha=1.2)
    mean = fc.compute_advantages(rewards, torch.zeros(4, dtype=torch.long), fc.AdvantageConfig(**base), metric=metric)
    quantile = fc.compute_advantages(rewards, torch.zeros(4, dtype=torch.long),
                                     fc.AdvantageConfig(baseline="quantile", quantile_k=0.5, **base), metric=metric)
    torch.testing.assert_close(quantile, mean)
    # Halves of three: low {1, 0, 1}, high {0, 0, 1}; K = 0.25 gives baselines 0.5 (low) and 0 (high).
    rewards6, metric6 = torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.arange(6.0)
    adv = fc.compute_advantages(rewards6, torch.zeros(6, dtype=torch.long),
                                fc.AdvantageConfig(estimator="canon", canon_metric="custom", baseline="quantile",
                                                   quantile_k=0.25), metric=metric6)
    torch.testing.assert_close(adv, rewards6 - torch.tensor([0.0, 0, 0, 0.5, 0.5, 0.5]))


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "cispo", "kl_cov", "clip_cov"])
def test_linear_path_equals_logits_path(loss_mode):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, 8, generator=g, dtype=F64)
    weight = torch.randn(13, 8, generator=g, dtype=F64)
    bias = torch.randn(13, generator=g, dtype=F64)
    targets = torch.randint(0, 13, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    config = fc.LossConfig(loss_mode=loss_mode, temperature=0.9, entropy_coeff=0.01, kl_cov_ratio=0.3,
                           clip_cov_ratio=0.3, clip_cov_lb=-1.0, advantage=fc.AdvantageConfig(estimator="canon"))
    kwargs = dict(rewards=torch.tensor([1.0, 0.0, 1.0], dtype=F64), group_ids=torch.tensor([0, 0, 0]),
                  old_logprobs=torch.full((3, 4), -2.5, dtype=F64), config=config, backend="torch")

    h1, w1, b1 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    linear = fc.linear_policy_loss(h1, w1, targets, mask, bias=b1, **kwargs)
    linear.loss.backward()
    h2, w2, b2 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    logits = h2 @ w2.T + b2
    reference = fc.policy_loss(logits, targets, mask, **kwargs)
    reference.loss.backward()
    torch.testing.assert_close(linear.loss, reference.loss)
    for a, b in ((h1.grad, h2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad)):
        torch.testing.assert_close(a, b)
    assert linear.metrics == pytest.approx(reference.metrics)


def test_linear_reference_chunks_rows(monkeypatch):
    import fused_canon.statistics as module

    monkeypatch.setattr(module, "LINEAR_REFERENCE_CHUNK_ROWS", 2)
    test_linear_path_equals_logits_path("vanilla")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_give_fp32_statistics(dtype):
    logits, targets, mask, _, _, _ = batch(dtype=torch.float32)
    low = logits.to(dtype).requires_grad_()
    out = fc.policy_loss(low, targets, mask, advantages=torch.ones(6), backend="torch")
    out.loss.backward()
    assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    assert low.grad.dtype == dtype
    exact_lp, exact_ent = fc.token_stats(low.detach().to(F64), targets, backend="torch")
    torch.testing.assert_close(out.logprobs, (exact_lp * mask).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, (exact_ent * mask).float(), rtol=1e-5, atol=1e-5)


def test_module_wrapper_and_metrics():
    logits, targets, mask, rewards, group_ids, old = batch()
    module = fc.FusedPolicyLoss(fc.LossConfig(kl_coef=0.01, entropy_coeff=0.001), backend="torch")
    out = module(logits.requires_grad_(), targets, mask, rewards=rewards, group_ids=group_ids, old_logprobs=old,
                 ref_logprobs=old)
    assert set(out.metrics) >= {"actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl",
                                "actor/entropy", "actor/kl_loss", "actor/kl_coef", "critic/advantages/mean",
                                "critic/advantages/max", "critic/advantages/min", "critic/score/mean"}
    assert all(isinstance(v, float) for v in out.metrics.values())
    assert out.logprobs.shape == mask.shape and not out.logprobs.requires_grad
    assert (out.logprobs[~mask] == 0).all() and (out.entropy[~mask] == 0).all()
    expected = out.metrics["actor/pg_loss"] - 0.001 * out.metrics["actor/entropy"] + 0.01 * out.metrics["actor/kl_loss"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_token_level_advantages():
    logits, targets, mask, _, _, old = batch()
    per_response = torch.linspace(-1, 1, 6, dtype=F64)
    a = fc.policy_loss(logits, targets, mask, advantages=per_response, old_logprobs=old, backend="torch")
    b = fc.policy_loss(logits, targets, mask, advantages=per_response[:, None].expand(6, 5).clone(),
                       old_logprobs=old, backend="torch")
    torch.testing.assert_close(a.loss, b.loss)
