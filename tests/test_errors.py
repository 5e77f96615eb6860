"""Bad input fails loudly with a clear message; degenerate but valid input gives exact, finite numbers."""

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES
from helpers import make_batch


def batch(dtype=torch.float32):
    """logits [2, 3, 5] (a leaf that requires grad), targets, an all-valid mask."""
    inputs = make_batch(2, 3, 5, dtype=dtype, ragged=False)
    return inputs["logits"].requires_grad_(), inputs["targets"], inputs["mask"]


def call(logits, targets, mask, **kwargs):
    kwargs.setdefault("advantages", torch.tensor([1.0, -1.0]))
    return fc.policy_loss(logits, targets, mask, backend="torch", **kwargs)


# shapes, dtypes, devices ---------------------------------------------------------------------

def test_mismatched_target_shape():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="targets shape"):
        call(logits, targets[:, :2], mask)


def test_mismatched_mask_shape():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="mask shape"):
        call(logits, targets, mask[:, :2])


def test_logits_must_be_3d():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        call(logits[0], targets, mask)


def test_mismatched_per_token_shape():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="old_logprobs shape"):
        call(logits, targets, mask, old_logprobs=torch.zeros(2, 4))


def test_mismatched_rewards_length():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="rewards must be"):
        call(logits, targets, mask, advantages=None, rewards=torch.ones(3), group_ids=torch.zeros(3, dtype=torch.long))


def test_mismatched_devices():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="is on meta"):
        call(logits, targets, mask.to("meta"))
    with pytest.raises(ValueError, match="is on meta"):
        fc.token_stats(logits, targets.to("meta"), backend="torch")


def test_non_integer_targets():
    logits, targets, mask = batch()
    with pytest.raises(TypeError, match="integer"):
        call(logits, targets.float(), mask)


def test_integer_logits_rejected():
    _, targets, mask = batch()
    with pytest.raises(TypeError, match="logits must be"):
        call(torch.ones(2, 3, 5, dtype=torch.long), targets, mask)


@pytest.mark.parametrize("bad_id", [-1, 5, 10**6])
def test_targets_out_of_range(bad_id):
    logits, targets, mask = batch()
    targets[1, 2] = bad_id
    with pytest.raises(ValueError, match=r"\[0, V=5\)"):
        call(logits, targets, mask)
    with pytest.raises(ValueError, match=r"\[0, V=5\)"):
        fc.token_stats(logits, targets, backend="torch")


def test_padding_targets_outside_range_are_ignored():
    logits, targets, mask = batch()
    targets[1, 2] = -100  # a typical ignore id at a padded position
    mask[1, 2] = False
    out = call(logits, targets, mask)
    assert torch.isfinite(out.loss)


def test_mask_must_be_binary():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="only 0 and 1"):
        call(logits, targets, mask.float() * 2)


# non-finite inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards(bad):
    with pytest.raises(ValueError, match="rewards contains NaN or inf"):
        fc.compute_advantages(torch.tensor([1.0, bad]), torch.tensor([0, 0]))


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_advantages(bad):
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="advantages contain NaN or inf"):
        call(logits, targets, mask, advantages=torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        call(logits, targets, mask, advantages=torch.tensor([[1.0, bad, 0.0], [0.0, 0.0, 0.0]]))


def test_non_finite_old_logprobs_at_valid_positions():
    logits, targets, mask = batch()
    old = torch.zeros(2, 3)
    old[0, 1] = float("nan")
    with pytest.raises(ValueError, match="old_logprobs contains NaN"):
        call(logits, targets, mask, old_logprobs=old)
    mask[0, 1] = False  # a NaN at a padded position is ignored (and cannot leak into the loss)
    out = call(logits, targets, mask, old_logprobs=old)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()


def test_empty_rewards():
    with pytest.raises(ValueError, match="empty"):
        fc.compute_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long))


def test_float_group_ids_rejected():
    with pytest.raises(TypeError, match="group_ids must be an integer"):
        fc.compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))


# config values -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.0, 1.0, -0.2, 1.5])
def test_quantile_k_outside_open_unit_interval(k):
    with pytest.raises(ValueError, match=r"quantile_k must lie in \(0, 1\)"):
        fc.AdvantageConfig(baseline="quantile", quantile_k=k)


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_dual_clip_ratio_must_exceed_one(c):
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        fc.LossConfig(clip_ratio_c=c)


def test_dual_clip_can_be_disabled():
    logits, targets, mask = batch()
    out = call(logits, targets, mask, config=fc.LossConfig(clip_ratio_c=None))
    assert out.metrics["actor/pg_clipfrac_lower"] == 0.0


@pytest.mark.parametrize("field, value", [("baseline", "median"), ("canon_metric", "perplexity"),
                                          ("canon_schedule", "linear"), ("canon_favor", "middle")])
def test_unknown_advantage_config_names(field, value):
    with pytest.raises(ValueError, match="choose one of"):
        fc.AdvantageConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("loss_agg_mode", "token-sum"), ("kl_type", "k4")])
def test_unknown_loss_config_names(field, value):
    with pytest.raises(ValueError, match="choose one of"):
        fc.LossConfig(**{field: value})


def test_unknown_estimator_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown estimator 'ppo'.*'canon'.*'grpo'"):
        fc.compute_advantages(torch.tensor([1.0]), torch.tensor([0]), fc.AdvantageConfig(estimator="ppo"))


def test_unknown_loss_mode_lists_registered_names():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match=r"unknown loss_mode 'no_such_loss'.*'cispo'.*'sapo'"):
        call(logits, targets, mask, config=fc.LossConfig(loss_mode="no_such_loss"))


def test_unknown_backend():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="backend='cuda'"):
        fc.policy_loss(logits, targets, mask, advantages=torch.tensor([1.0, -1.0]), backend="cuda")


def test_kl_coef_needs_reference():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="ref_logprobs"):
        call(logits, targets, mask, config=fc.LossConfig(kl_coef=0.1))


def test_advantages_or_rewards_required():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="needs `advantages`"):
        call(logits, targets, mask, advantages=None)
    with pytest.raises(ValueError, match="either `advantages` or `rewards`"):
        call(logits, targets, mask, rewards=torch.ones(2), group_ids=torch.zeros(2, dtype=torch.long))


def test_custom_canon_metric_required():
    with pytest.raises(ValueError, match="custom"):
        fc.compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
                              fc.AdvantageConfig(estimator="canon", canon_metric="custom"))


def test_bad_global_normalizer():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="global_num_tokens must be > 0"):
        call(logits, targets, mask, global_num_tokens=0)


# degenerate but valid input ------------------------------------------------------------------

@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("loss_mode", ["vanilla", "clip_cov", "kl_cov", "gspo", "cispo"])
def test_empty_mask_gives_zero_loss_and_zero_gradient(agg_mode, loss_mode):
    logits, targets, mask = batch()
    config = fc.LossConfig(loss_mode=loss_mode, loss_agg_mode=agg_mode, entropy_coeff=0.01,
                           advantage=fc.AdvantageConfig(estimator="canon"))
    out = call(logits, targets, torch.zeros_like(mask), advantages=None, rewards=torch.tensor([1.0, 0.0]),
               group_ids=torch.tensor([0, 0]), config=config)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_empty_mask_linear_path():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    out = fc.linear_policy_loss(hidden, weight, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3),
                                advantages=torch.tensor([1.0, -1.0]), backend="torch")
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_masked_vocabulary_rows_are_exact_and_finite():
    logits, targets, mask = batch(dtype=torch.float64)
    with torch.no_grad():
        logits[0, 0, :] = float("-inf")
        logits[0, 0, targets[0, 0]] = 2.0  # -inf everywhere but the target
        logits[1, 1, (targets[1, 1] + 1) % 5] = float("-inf")  # one masked entry
    out = call(logits, targets, mask, config=fc.LossConfig(entropy_coeff=0.1))
    out.loss.backward()
    assert out.logprobs[0, 0].item() == 0.0 and out.entropy[0, 0].item() == 0.0
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 0], torch.zeros(5, dtype=torch.float64))  # p is 1 or 0: no gradient
    assert logits.grad[1, 1, (targets[1, 1] + 1) % 5].item() == 0.0
    finite = logits.detach().clone()
    finite[1, 1, (targets[1, 1] + 1) % 5] = -1e4  # -inf behaves as a very small logit
    lp, ent = fc.token_stats(finite[1, 1][None], targets[1, 1][None], backend="torch")
    assert lp.item() == pytest.approx(out.logprobs[1, 1].item(), abs=1e-12)
    assert ent.item() == pytest.approx(out.entropy[1, 1].item(), abs=1e-12)
