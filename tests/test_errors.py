"""Bad input fails loudly with a clear message; degenerate but valid input gives exact, finite numbers."""

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES
from helpers import make_batch, relative_error


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


@pytest.mark.parametrize("field, value", [("loss_agg_mode", "token-sums"), ("kl_type", "k4")])
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


# non-finite logits: one error on every path and backend, naming the first offending position ----------

BACKENDS = ["torch", "triton"]  # Triton in its interpreter on CPU
NONFINITE = r"logits.* are not finite in a valid row .*: first at \(batch, position\) = \(1, 0\)"


def _poisoned(bad, at_target=False):
    """The batch with ``bad`` in the logits of rows (1, 0) and (1, 2) (the first in row-major order is
    (1, 0)), at a non-target entry or at the target."""
    logits, targets, mask = batch()
    with torch.no_grad():
        for b, t in ((1, 0), (1, 2)):
            column = targets[b, t] if at_target else (targets[b, t] + 1) % 5
            logits[b, t, column] = bad
    return logits, targets, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, at_target", [(float("nan"), False), (float("inf"), False), (float("nan"), True),
                                            (float("-inf"), True)])
def test_nonfinite_logits_in_a_valid_row_raise_on_every_logits_path(backend, bad, at_target):
    logits, targets, mask = _poisoned(bad, at_target)
    with pytest.raises(ValueError, match=NONFINITE):
        fc.token_stats(logits, targets, backend=backend)
    with pytest.raises(ValueError, match=NONFINITE):
        fc.token_signals(logits, targets, ["entropy", "sum_pi_squared"], mask=mask, backend=backend)
    with pytest.raises(ValueError, match=NONFINITE):
        fc.policy_loss(logits, targets, mask, advantages=torch.tensor([1.0, -1.0]), backend=backend)
    canon = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="canon"))  # the estimator reads this pass's entropy
    with pytest.raises(ValueError, match=NONFINITE):
        fc.policy_loss(logits, targets, mask, rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
                       config=canon, backend=backend)
    with pytest.raises(ValueError, match=NONFINITE):  # CPU tensors: auto runs torch
        fc.FusedPolicyLoss(fc.LossConfig(temperature=0.7))(logits, targets, mask, advantages=torch.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_logits_at_padded_positions_and_minus_inf_elsewhere_are_fine(backend):
    logits, targets, mask = _poisoned(float("nan"))
    with torch.no_grad():
        logits[0, 1, (targets[0, 1] + 2) % 5] = float("-inf")  # a masked vocabulary entry: legal
    mask[1] = False  # the NaN rows are padding: never read
    out = fc.policy_loss(logits, targets, mask, advantages=torch.tensor([1.0, -1.0]), backend=backend,
                         config=fc.LossConfig(entropy_coeff=0.1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    assert torch.isfinite(logits.grad).all() and not logits.grad[1].any()


def _lm_head(poison):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 4, generator=g)
    weight, bias = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    targets, mask = torch.randint(0, 5, (2, 3), generator=g), torch.ones(2, 3, dtype=torch.bool)
    mask[0] = False
    poison(hidden, weight, bias, targets)
    return hidden, weight, bias, targets, mask


def _set_target_bias(hidden, weight, bias, targets):
    bias[targets[1, 0]] = float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [
    lambda hidden, weight, bias, targets: hidden[1, 0, 2].fill_(float("nan")),
    lambda hidden, weight, bias, targets: hidden[1, 0, 1].fill_(float("inf")),
    lambda hidden, weight, bias, targets: weight[4, 3].fill_(float("nan")),  # every row: the first valid is (1, 0)
    lambda hidden, weight, bias, targets: bias[2].fill_(float("inf")),
    _set_target_bias,  # -inf at the sampled token of (1, 0)
], ids=["nan_hidden", "inf_hidden", "nan_weight", "inf_bias", "minus_inf_target"])
def test_nonfinite_logits_raise_on_the_lm_head_path(backend, poison):
    hidden, weight, bias, targets, mask = _lm_head(poison)
    with pytest.raises(ValueError, match=r"logits \(hidden @ weight.T \+ bias\) are not finite in a valid row .*"
                                         r"first at \(batch, position\) = \(1, 0\); look at that row's hidden state"):
        fc.linear_policy_loss(hidden, weight, targets, mask, bias=bias, advantages=torch.ones(2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_is_a_masked_vocabulary_on_the_lm_head_path(backend):
    """A -inf bias entry (not at a target) is legal: finite statistics and gradients, equal to the
    logits path on the same logits."""
    hidden, weight, bias, targets, mask = _lm_head(lambda *_: None)
    mask[0] = True
    with torch.no_grad():
        masked_column = next(v for v in range(5) if not (targets == v).any())
        bias[masked_column] = float("-inf")
    grads = {}
    for path in ("linear", "logits"):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        config = fc.LossConfig(entropy_coeff=0.1)
        if path == "linear":
            out = fc.linear_policy_loss(h, w, targets, mask, bias=b, advantages=torch.tensor([1.0, -0.5]),
                                        config=config, backend=backend)
        else:
            out = fc.policy_loss(h @ w.T + b, targets, mask, advantages=torch.tensor([1.0, -0.5]), config=config,
                                 backend="torch")
        out.loss.backward()
        grads[path] = (out.loss.detach(), out.entropy, h.grad, w.grad, b.grad)
    for linear, logits in zip(grads["linear"], grads["logits"]):
        assert torch.isfinite(linear).all()
        assert relative_error(linear, logits) <= 1e-5


# CANON's entropy metric: padded positions never matter, non-finite valid ones raise ---------------

def _canon_entropy_inputs():
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    entropy = torch.rand(4, 4, generator=g)
    entropy[3] += 5.0  # the one row without padding has the largest metric: garbage padding would move the others
    return torch.tensor([1.0, 0.0, 0.25, 0.5]), torch.tensor([0, 0, 0, 0]), mask, entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_canon_entropy_metric_never_reads_padded_positions(backend, padding):
    rewards, group_ids, mask, entropy = _canon_entropy_inputs()
    # alpha and beta break the symmetry of the two halves: a split that moves a row changes its advantage
    config = fc.AdvantageConfig(estimator="canon", canon_metric="entropy", canon_lambda=0.7, canon_alpha=1.3,
                                canon_beta=0.1)
    clean = fc.compute_advantages(rewards, group_ids, config, mask=mask, token_entropy=entropy, backend="torch")
    garbage = torch.where(mask, entropy, torch.full_like(entropy, padding))
    assert torch.equal(fc.compute_advantages(rewards, group_ids, config, mask=mask, token_entropy=garbage,
                                             backend=backend), clean)
    # policy_loss_from_logprobs passes the caller's entropy on to the estimator
    out = fc.policy_loss_from_logprobs(-torch.ones(4, 4), mask, entropy=garbage, rewards=rewards,
                                       group_ids=group_ids, config=fc.LossConfig(advantage=config), backend=backend)
    assert torch.equal(out.advantages, clean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_canon_entropy_metric_rejects_nonfinite_valid_entries(backend, bad):
    rewards, group_ids, mask, entropy = _canon_entropy_inputs()
    entropy[1, 2] = bad
    config = fc.AdvantageConfig(estimator="canon", canon_metric="entropy")
    with pytest.raises(ValueError, match=r"token_entropy contains NaN or inf at valid \(mask=1\) positions; first "
                                         r"at \(batch, position\) = \(1, 2\)"):
        fc.compute_advantages(rewards, group_ids, config, mask=mask, token_entropy=entropy, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantage_metrics_are_over_the_valid_tokens_only(backend):
    """critic/advantages/{mean,max,min} are masked reductions: NaN or huge [B, T] advantages at padded positions
    do not reach them, fp16 advantages whose sum exceeds fp16's range give a finite mean, and an empty mask
    reports 0 for all three."""
    logits = torch.randn(2, 40, 5, requires_grad=True)
    targets = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    advantages = torch.full((2, 40), 2000.0)
    advantages[1, :30] = 1500.0
    advantages[1, 30:] = float("nan")
    out = fc.policy_loss(logits, targets, mask, advantages=advantages.half(), backend=backend)  # sum 125,000
    assert out.metrics["critic/advantages/mean"] == pytest.approx((40 * 2000.0 + 30 * 1500.0) / 70)
    assert (out.metrics["critic/advantages/max"], out.metrics["critic/advantages/min"]) == (2000.0, 1500.0)
    empty = fc.policy_loss(logits, targets, torch.zeros_like(mask), advantages=advantages, backend=backend)
    assert [empty.metrics[f"critic/advantages/{name}"] for name in ("mean", "max", "min")] == [0.0, 0.0, 0.0]


# empty batches: loss 0, zero gradient, the same on both backends ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("length, vocab", [(0, 5), (3, 0)], ids=["T=0", "V=0"])
def test_empty_batches_give_zero_loss_and_gradient(backend, agg_mode, length, vocab):
    logits = torch.zeros(2, length, vocab, requires_grad=True)
    targets, mask = torch.zeros(2, length, dtype=torch.long), torch.zeros(2, length, dtype=torch.bool)
    for kwargs in (dict(advantages=torch.ones(2)),
                   dict(rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]))):
        out = fc.policy_loss(logits, targets, mask, config=fc.LossConfig(loss_agg_mode=agg_mode, entropy_coeff=0.1),
                             backend=backend, **kwargs)
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.logprobs.shape == (2, length)
        assert logits.grad.shape == logits.shape and not logits.grad.any()
    hidden, weight = torch.zeros(2, length, 4, requires_grad=True), torch.zeros(vocab, 4, requires_grad=True)
    out = fc.linear_policy_loss(hidden, weight, targets, mask, advantages=torch.ones(2), backend=backend,
                                config=fc.LossConfig(loss_agg_mode=agg_mode))
    out.loss.backward()
    assert out.loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_vocabulary_with_a_valid_row_is_an_error(backend):
    message = r"the vocabulary is empty \(V = 0\) but .* valid positions: a valid token needs V >= 1"
    targets, mask = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 1] = True
    with pytest.raises(ValueError, match=message):
        fc.policy_loss(torch.zeros(2, 3, 0), targets, mask, advantages=torch.ones(2), backend=backend)
    with pytest.raises(ValueError, match=message):
        fc.linear_policy_loss(torch.zeros(2, 3, 4), torch.zeros(0, 4), targets, mask, advantages=torch.ones(2),
                              backend=backend)
    with pytest.raises(ValueError, match=message):
        fc.token_stats(torch.zeros(2, 3, 0), targets, backend=backend)


# every config value and argument is checked where it is given ---------------------------------------

@pytest.mark.parametrize("kl_type", ["k1+", "kl+", "abs+", "k2+", "mse+", "k3+", "low_var_kl+"])
def test_straight_through_kl_types_are_accepted(kl_type):
    logits, targets, mask = batch()
    ref = torch.zeros(2, 3)
    config = fc.LossConfig(kl_type=kl_type, kl_coef=0.1)
    out = call(logits, targets, mask, ref_logprobs=ref, config=config)
    expected = fc.agg_loss(fc.kl_penalty(out.logprobs, ref, kl_type), mask.float(), "token-mean")
    assert out.metrics["actor/kl_loss"] == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("canon_lambda", 1.5, r"canon_lambda must lie in \[0, 1\], got 1.5"),
    ("canon_lambda", -0.1, r"canon_lambda must lie in \[0, 1\], got -0.1"),
    ("norm_by_std", "false", "norm_by_std must be True or False, got 'false'"),
    ("otb_handle_zero_tail", 1, "otb_handle_zero_tail must be True or False, got 1"),
    ("seed", 1.5, "seed must be an int, got 1.5"),
    ("seed", -1, "seed must be an int >= 0, got -1"),
    ("estimator", 3, r"estimator must be a registered name \(a str\), got 3"),
    ("canon_alpha", True, "canon_alpha must be a finite number, got True"),
    ("epsilon", -1e-6, "epsilon must be >= 0, got -1e-06"),
    ("token_budget", 0, "token_budget must be > 0, got 0"),
    ("quantile_k", 1.0, r"quantile_k must lie in \(0, 1\), got 1.0"),
    ("adora_max_length", 10.5, r"adora_max_length must be an int, got 10.5 \(a length in tokens\)"),
    ("ktae_ignore_token_ids", 151643, "ktae_ignore_token_ids must be a list of token ids, got 151643"),
    ("ktae_ignore_token_ids", [-1], "ktae_ignore_token_ids entry must be an int >= 0, got -1"),
    ("cosine_restart", dict(max_value=1.5, min_value=0.0), r"max_value must lie in \[0, 1\], got 1.5"),
    ("cosine_restart_r", dict(max_value=1.0, min_value=0.4, warmup_steps=2.5),
     "warmup_steps must be an int, got 2.5"),
    ("cosine_restart", "fast", "cosine_restart must be a CosineRestartSchedule"),
])
def test_advantage_config_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError if "Schedule" not in message else TypeError, match=message):
        fc.AdvantageConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("seed", 2.0, "seed must be an int, got 2.0"),
    ("loss_mode", None, r"loss_mode must be a registered name \(a str\), got None"),
    ("kl_type", "k3++", r"kl_type='k3\+\+' is not valid; choose one of \[.*'k3\+'"),
    ("kl_coef", -0.1, "kl_coef must be >= 0, got -0.1"),
    ("ppo_kl_coef", -1.0, "ppo_kl_coef must be >= 0, got -1.0"),
    ("temperature", float("inf"), "temperature must be a finite number, got inf"),
    ("clip_cov_ratio", 0.0, r"clip_cov_ratio must lie in \(0, 1\], got 0.0"),
    ("entropy_coeff", "0.1", "entropy_coeff must be a finite number, got '0.1'"),
    ("loss_scale_factor", -2, "loss_scale_factor must be > 0, got -2"),
    ("kl_k3_clamp", "false", "kl_k3_clamp must be True or False, got 'false'"),
    ("cispo_bound", "abs", r"cispo_bound='abs' is not valid; choose one of \['relative', 'absolute'\]"),
])
def test_loss_config_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        fc.LossConfig(**{field: value})


def test_large_seeds_are_accepted_and_used():
    """Any int seed >= 0 seeds the generator (mod 2**64): 2**62 used to overflow inside the call."""
    rewards, group_ids = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 0])
    config = fc.AdvantageConfig(estimator="canon", canon_metric="random", seed=2**62)
    first = fc.compute_advantages(rewards, group_ids, config, step=3)
    assert torch.equal(first, fc.compute_advantages(rewards, group_ids, config, step=3))
    logits, targets, mask = batch()
    out = call(logits, targets, mask, config=fc.LossConfig(loss_mode="clip_cov", seed=2**62), step=2**40)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("step, message", [(None, "step must be an int, got None"),
                                           ("3", "step must be an int, got '3'"),
                                           (1.5, "step must be an int, got 1.5"),
                                           (-1, "step must be an int >= 0, got -1")])
def test_bad_step(step, message):
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match=message):
        call(logits, targets, mask, step=step)
    with pytest.raises(ValueError, match=message):
        fc.compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), step=step)


@pytest.mark.parametrize("name, value, message", [
    ("global_num_tokens", torch.tensor(6.0), "global_num_tokens must be a finite number, got a Tensor"),
    ("global_num_tokens", float("nan"), "global_num_tokens must be a finite number, got nan"),
    ("global_num_tokens", 5, "global_num_tokens=5 is below this micro-batch's own 6 valid tokens"),
    ("global_num_seqs", 1.5, "global_num_seqs=1.5 is below this micro-batch's own 2 sequences with a valid token"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_global_normalizers(name, value, message, backend):
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match=message):
        fc.policy_loss(logits, targets, mask, advantages=torch.ones(2), backend=backend, **{name: value})
    assert torch.isfinite(fc.policy_loss(logits, targets, mask, advantages=torch.ones(2), backend=backend,
                                         global_num_tokens=6, global_num_seqs=2).loss)


def test_compute_advantages_refuses_a_loss_config():
    with pytest.raises(TypeError, match=r"config must be a fused_canon.AdvantageConfig \(its `advantage` field"):
        fc.compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), fc.LossConfig())


def test_module_config_is_never_dropped():
    logits, targets, mask = batch()
    module = fc.FusedPolicyLoss(fc.LossConfig(entropy_coeff=0.5), backend="torch")
    for name, value in (("config", None), ("config", fc.LossConfig()), ("backend", "triton")):
        with pytest.raises(TypeError, match=f"FusedPolicyLoss.forward got {name}=.*the module's own {name}"):
            module(logits, targets, mask, advantages=torch.ones(2), **{name: value})
    out = module(logits, targets, mask, advantages=torch.ones(2))
    assert out.loss.item() == pytest.approx(call(logits, targets, mask, config=module.config,
                                                 advantages=torch.ones(2)).loss.item())
    with pytest.raises(TypeError, match="config must be a fused_canon.LossConfig, got AdvantageConfig"):
        fc.FusedPolicyLoss(fc.AdvantageConfig())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8])
def test_targets_of_a_dtype_no_backend_indexes_with(backend, dtype):
    logits, targets, mask = batch()
    with pytest.raises(TypeError, match=f"targets must be an integer tensor of token ids, int64 or int32, got {dtype}"):
        fc.policy_loss(logits, targets.to(dtype), mask, advantages=torch.ones(2), backend=backend)
    with pytest.raises(TypeError, match="int64 or int32"):
        fc.token_stats(logits, targets.to(dtype), backend=backend)
    with pytest.raises(TypeError, match="int64 or int32"):
        fc.linear_policy_loss(torch.zeros(2, 3, 4), torch.zeros(5, 4), targets.to(dtype), mask,
                              advantages=torch.ones(2), backend=backend)
    int32 = fc.policy_loss(logits, targets.int(), mask, advantages=torch.ones(2), backend=backend).loss
    assert int32.item() == fc.policy_loss(logits, targets, mask, advantages=torch.ones(2), backend=backend).loss.item()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(temperature=torch.tensor(1.0)), "temperature must be a finite number, got a Tensor"),
    (dict(temperature=0), "temperature must be > 0, got 0"),
])
def test_token_stats_arguments(kwargs, message):
    logits, targets, _ = batch()
    with pytest.raises(ValueError, match=message):
        fc.token_stats(logits, targets, **kwargs)


def test_flag_arguments_are_bools():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match="inplace_backward must be True or False, got 'yes'"):
        call(logits, targets, mask, inplace_backward="yes")
    with pytest.raises(ValueError, match="with_returns must be True or False, got 1"):
        fc.compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), with_returns=1)


# the value checks cost no host sync of their own ---------------------------------------------------

class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Where a call reads the device: aten's scalar reads (bool(), int(), .item()) and nonzero, by call site;
    ``.tolist()`` is counted by the monkeypatch in the test."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def record(self, what):
        import traceback
        frames = [f for f in traceback.extract_stack() if "fused_canon" in f.filename or "/kernels/" in f.filename]
        self.sites.append((what, frames[-1].filename.rsplit("/", 2)[-2:], frames[-1].line))


# The host reads of a loss call: on the fused Triton path (advantages known before the pass) only the one
# batched read; the torch backend also lists the valid rows (mask.nonzero(), its grid).
VALID_ROWS = {"triton": [], "torch": ["aten.nonzero.default"]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=["bool", "int64", "float32"])
def test_value_checks_share_the_one_batched_read(backend, mask_dtype, monkeypatch):
    """With advantages, old/ref log-probs and global counts given, a loss call reads the device once: the
    .tolist() of the metrics with every pending value check (target range, finite logits, advantages,
    log-probs, normalizers, a 0/1 mask of another dtype), after the valid rows on the torch backend. The
    launchers do not re-check what the API built."""
    logits, targets, mask = batch()
    mask[1, 2] = False
    reads = HostReads()
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.record("tolist"), tolist(self))[1])
    with reads:
        out = fc.policy_loss(logits, targets, mask.to(mask_dtype), advantages=torch.tensor([1.0, -1.0]),
                             old_logprobs=-torch.ones(2, 3), ref_logprobs=-torch.ones(2, 3),
                             config=fc.LossConfig(kl_coef=0.1), global_num_tokens=5, backend=backend)
    assert [what for what, _, _ in reads.sites] == VALID_ROWS[backend] + ["tolist"], reads.sites
    assert not any(site[0] == "kernels" for _, site, _ in reads.sites), reads.sites
    assert out.backends["token_stats"].startswith(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mask_value_other_than_0_and_1_raises_at_the_read(backend):
    logits, targets, mask = batch()
    bad = mask.float()
    bad[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"mask must be bool or contain only 0 and 1; found another value at "
                                         r"\(batch, position\) = \(1, 2\)"):
        fc.policy_loss(logits, targets, bad, advantages=torch.tensor([1.0, -1.0]), backend=backend)
    out = fc.policy_loss(logits, targets, bad, advantages=torch.tensor([1.0, -1.0]), backend=backend,
                         tensor_metrics=True)
    with pytest.raises(ValueError, match="mask must be bool or contain only 0 and 1"):
        out.check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_metrics_leave_the_checks_to_the_callers_read(backend, monkeypatch):
    """tensor_metrics=True: the call reads nothing back on the fused path, only the valid rows (mask.nonzero())
    on the torch backend; the metrics are 0-d tensors, and a bad value (here an out-of-range target) raises
    its usual message at read_metrics() or check()."""
    logits, targets, mask = batch()
    targets[0, 1] = 50
    reads = HostReads()
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.record("tolist"), tolist(self))[1])
    with reads:
        out = fc.policy_loss(logits, targets, mask, advantages=torch.tensor([1.0, -1.0]), backend=backend,
                             tensor_metrics=True)
    assert [what for what, _, _ in reads.sites] == VALID_ROWS[backend], reads.sites
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in out.metrics.values())
    message = r"targets must lie in \[0, V=5\) at valid positions; found ids in \[\d+, 50\]"
    with pytest.raises(ValueError, match=message):
        out.check()
    targets[0, 1] = 3
    out = fc.policy_loss(logits, targets, mask, advantages=torch.tensor([1.0, -1.0]), backend=backend,
                         tensor_metrics=True)
    floats = fc.policy_loss(logits, targets, mask, advantages=torch.tensor([1.0, -1.0]), backend=backend).metrics
    assert out.read_metrics().metrics == floats


def _entry_point_calls():
    """Each loss entry point as a function of tensor_metrics (rewards + group ids, so every check and metric runs)."""
    g = torch.Generator().manual_seed(3)
    inputs = make_batch(4, 3, 7)
    logits, targets, mask = inputs["logits"], inputs["targets"], inputs["mask"]
    common = dict(rewards=inputs["rewards"], group_ids=inputs["group_ids"], old_logprobs=inputs["old_logprobs"].float())
    hidden, weight = torch.randn(4, 3, 8, generator=g), torch.randn(7, 8, generator=g)
    ref_hidden, ref_weight = torch.randn(4, 3, 6, generator=g), torch.randn(7, 6, generator=g)
    kl = fc.LossConfig(kl_coef=0.1)
    return {
        "policy_loss, triton (fused pass)": lambda tm: fc.policy_loss(
            logits.clone().requires_grad_(), targets, mask, backend="triton", tensor_metrics=tm, **common),
        "policy_loss, triton (two passes: gspo)": lambda tm: fc.policy_loss(
            logits.clone().requires_grad_(), targets, mask, backend="triton", tensor_metrics=tm,
            config=fc.LossConfig(loss_mode="gspo"), **common),
        "policy_loss, torch": lambda tm: fc.policy_loss(
            logits.clone().requires_grad_(), targets, mask, backend="torch", tensor_metrics=tm, **common),
        "policy_loss, reduce=False": lambda tm: fc.policy_loss(
            logits.clone().requires_grad_(), targets, mask, backend="torch", reduce=False, tensor_metrics=tm, **common),
        "linear_policy_loss, reference LM head": lambda tm: fc.linear_policy_loss(
            hidden.clone().requires_grad_(), weight, targets, mask, ref_hidden=ref_hidden, ref_weight=ref_weight,
            config=kl, backend="torch", tensor_metrics=tm, **common),
        "policy_loss_from_logprobs": lambda tm: fc.policy_loss_from_logprobs(
            inputs["old_logprobs"].float().requires_grad_(), mask, tensor_metrics=tm, **common),
        "FusedPolicyLoss": lambda tm: fc.FusedPolicyLoss(backend="torch")(
            logits.clone().requires_grad_(), targets, mask, tensor_metrics=tm, **common),
    }


@pytest.mark.parametrize("entry", list(_entry_point_calls()))
def test_tensor_metrics_on_every_entry_point(entry):
    """tensor_metrics=True on each entry point: 0-d tensor metrics, checks pending; read_metrics() gives the
    default call's floats and the loss is the same."""
    call_with = _entry_point_calls()[entry]
    floats = call_with(False)
    out = call_with(True)
    assert out.pending_checks is not None and out.metrics.keys() == floats.metrics.keys()
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in out.metrics.values()), out.metrics
    assert torch.equal(out.loss.detach(), floats.loss.detach())
    assert out.read_metrics().metrics == floats.metrics and out.pending_checks is None


def test_tensor_metrics_defer_the_target_range_on_the_lm_head_path():
    """linear_policy_loss with tensor_metrics: an out-of-range target raises its message at check(), not at the
    call (the statistics gathered a clamped id meanwhile)."""
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    targets = torch.zeros(2, 3, dtype=torch.long)
    targets[1, 0] = 9
    out = fc.linear_policy_loss(hidden, weight, targets, torch.ones(2, 3), advantages=torch.ones(2), backend="torch",
                                tensor_metrics=True)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=5\) at valid positions; found ids in \[0, 9\]"):
        out.check()
