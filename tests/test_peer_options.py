"""The options that make fused-canon compute what verl 0.9.1, TRL 1.16 and Liger-Kernel 0.8.5 compute
(docs/algorithms.md, each test names its section), on the worked examples of the docs and on both
backends. The differential tests against the installed peers themselves are in tests/peers/."""

import math
import re

import pytest
import torch

import fused_canon as fc
from fused_canon.losses import Normalizers, clip_cov_selection, policy_objective

F64 = torch.float64
BACKENDS = ["torch", "triton"]


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def loss_and_grad(logp, mask, backend="torch", **kwargs):
    """fc.policy_loss_from_logprobs and dL/dlogp."""
    logp = logp.clone().requires_grad_(True)
    out = fc.policy_loss_from_logprobs(logp, mask, backend=backend, **kwargs)
    out.loss.backward()
    return out, logp.grad


# §1.6: GSPO aggregates with loss_agg_mode (verl 0.9.1) ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_gspo_aggregates_with_loss_agg_mode(mode, backend):
    """On ragged rows the modes differ; GSPO's loss is its token loss aggregated with the configured mode."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 5, generator=g) - 0.2
    old = logp + 0.1 * torch.randn(3, 5, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([[5], [2], [4]])
    adv = torch.tensor([1.0, -0.5, 0.3])
    config = fc.LossConfig(loss_mode="gspo", loss_agg_mode=mode, clip_ratio_low=0.05, clip_ratio_high=0.05)
    out, _ = loss_and_grad(logp, mask, backend, advantages=adv, old_logprobs=old, config=config)
    valid = mask.float()
    seq_log_ratio = ((logp - old) * valid).sum(-1) / valid.sum(-1)
    ratio = torch.exp(seq_log_ratio)[:, None].expand(3, 5)
    token_loss = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.95, 1.05))
    assert math.isclose(out.loss.item(), fc.agg_loss(token_loss, valid, mode).item(), rel_tol=1e-6)


# §1.10: k3 with and without verl's clamps ------------------------------------------------------

def test_k3_clamp_table():
    logp, ref = t([-8.0, -3.0, -1.0]), torch.zeros(3, dtype=F64)
    for clamp, values, grads in [(False, [2971.957987, 16.085537, 0.718282], [-2979.957987, -19.085537, -1.718282]),
                                 (True, [10.0, 10.0, 0.718282], [0.0, 0.0, -1.718282])]:
        x = logp.clone().requires_grad_(True)
        kl = fc.kl_penalty(x, ref, "k3", k3_clamp=clamp)
        kl.sum().backward()
        torch.testing.assert_close(kl.detach(), t(values), rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad, t(grads), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamp", [True, False])
def test_k3_clamp_option_in_the_loss(clamp, backend):
    logp = torch.tensor([[-8.0, -3.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    config = fc.LossConfig(kl_coef=1.0, kl_k3_clamp=clamp)
    out, grad = loss_and_grad(logp, mask, backend, advantages=torch.zeros(1), ref_logprobs=torch.zeros(1, 3),
                              config=config)
    expected = fc.kl_penalty(logp.double(), torch.zeros(1, 3, dtype=F64), "k3", k3_clamp=clamp).mean()
    assert math.isclose(out.metrics["actor/kl_loss"], expected.item(), rel_tol=1e-6)
    assert (grad[0, :2] == 0).all() == clamp


# §1.7: CISPO's two bounds ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_absolute_bound_example(backend):
    """old = -1, cap 0.5: rho 1.648721 (A = +1, counted; A = -1, not counted) and 0.606531 (A = +1, counted)."""
    logp = torch.tensor([[-0.5], [-0.5], [-1.5]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    config = fc.LossConfig(loss_mode="cispo", cispo_bound="absolute", clip_ratio_high=0.5,
                           loss_agg_mode="seq-mean-token-sum")
    out, grad = loss_and_grad(logp, mask, backend, advantages=torch.tensor([1.0, -1.0, 1.0]),
                              old_logprobs=torch.full((3, 1), -1.0), config=config)
    torch.testing.assert_close(grad * 3, torch.tensor([[-0.5], [0.5], [-0.5]]))
    assert math.isclose(out.loss.item(), (0.25 - 0.25 + 0.75) / 3, rel_tol=1e-6)
    assert math.isclose(out.metrics["actor/pg_clipfrac"], 2 / 3, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_relative_bound_counts_every_clipped_token(backend):
    logp = torch.tensor([[-0.5], [-0.5], [-1.5]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    out, _ = loss_and_grad(logp, mask, backend, advantages=torch.tensor([1.0, -1.0, 1.0]),
                           old_logprobs=torch.full((3, 1), -1.0), config=fc.LossConfig(loss_mode="cispo"))
    assert math.isclose(out.metrics["actor/pg_clipfrac"], 1.0, rel_tol=1e-6)


def test_cispo_absolute_bound_must_be_positive():
    with pytest.raises(ValueError, match="clip_ratio_high"):
        fc.LossConfig(loss_mode="cispo", cispo_bound="absolute", clip_ratio_high=0.0)
    with pytest.raises(ValueError, match="cispo_bound"):
        fc.LossConfig(cispo_bound="upper")


# §4.1: clip_cov's exact means --------------------------------------------------------------------

def test_clip_cov_shared_advantage_selects_nothing_in_fp64():
    """With the count N (not N + 1e-8, verl's integer mask) equal advantages centre to 0, so cov = 0 and
    lb = 0 selects no token. (0.75 sums exactly: the test is about the count, not the summation's rounding,
    which verl's arithmetic shares and tests/peers/ compares.)"""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g, dtype=F64) - 0.1
    valid = torch.ones(4, 6, dtype=F64)
    adv = torch.full((4, 6), 0.75, dtype=F64)
    config = fc.LossConfig(loss_mode="clip_cov", clip_cov_lb=0.0, clip_cov_ub=5.0, clip_cov_ratio=0.5)
    assert not clip_cov_selection(logp, logp, adv, valid, config, step=0).any()
    loss, metrics = policy_objective(logp, None, valid.bool(), adv, logp, None, config, Normalizers())
    assert metrics["actor/pg_clipfrac"] == 0
    assert math.isclose(loss.item(), -0.75, rel_tol=1e-12)


# §1.12: rollout importance sampling -----------------------------------------------------------

ROLLOUT_OLD = [[-1.0, -2.0, -0.5]]
ROLLOUT_Q = [[-1.5, -1.0, -0.5]]


@pytest.mark.parametrize("level, mode, lower, expected", [
    ("token", "truncate", None, [1.5, 0.367879, 1.0]),
    ("token", "mask", 0.5, [0.0, 0.0, 1.0]),
    ("sequence", "truncate", None, [0.606531] * 3),
    ("sequence", "mask", 0.5, [0.606531] * 3),
    ("sequence", "mask", 0.7, [0.0] * 3),
])
def test_rollout_is_weights_example(level, mode, lower, expected):
    config = fc.LossConfig(rollout_is=level, rollout_is_mode=mode, rollout_is_threshold=1.5,
                           rollout_is_threshold_lower=lower)
    weights, metrics = fc.rollout_is_weights(t(ROLLOUT_OLD), t(ROLLOUT_Q), torch.ones(1, 3, dtype=torch.bool), config)
    torch.testing.assert_close(weights, t([expected]), rtol=0, atol=1e-6)
    assert metrics["rollout_corr/rollout_is_mean"].item() == pytest.approx(sum(expected) / 3, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "token-sum"])
def test_rollout_weights_scale_the_policy_term_only(backend, agg):
    """vanilla, A = 1 on-policy-free ratios: the token loss -A rho times w; the KL term is not weighted."""
    old, q = torch.tensor(ROLLOUT_OLD), torch.tensor(ROLLOUT_Q)
    logp = old + torch.tensor([[0.05, -0.1, 0.02]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    config = fc.LossConfig(rollout_is="token", rollout_is_threshold=1.5, kl_coef=0.5, kl_type="k2",
                           loss_agg_mode=agg, clip_ratio_low=0.5, clip_ratio_high=0.5)
    out, grad = loss_and_grad(logp, mask, backend, advantages=torch.ones(1), old_logprobs=old,
                              ref_logprobs=old, rollout_logprobs=q, config=config)
    w = torch.tensor([1.5, 0.367879, 1.0])
    ratio = torch.exp(logp - old)[0]
    scale = 1.0 if agg == "token-sum" else 1.0 / 3
    kl = 0.5 * (logp - old)[0].square()
    assert out.loss.item() == pytest.approx(scale * ((-ratio * w).sum() + 0.5 * kl.sum()).item(), rel=1e-5)
    torch.testing.assert_close(grad[0], scale * (-ratio * w + 0.5 * (logp - old)[0]), rtol=1e-5, atol=1e-6)
    assert out.metrics["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3)
    assert "rollout_corr/kl" in out.metrics and "rollout_corr/chi2_seq" in out.metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_rollout_is_weights_equal_computed_ones(backend):
    old, q = torch.tensor(ROLLOUT_OLD), torch.tensor(ROLLOUT_Q)
    mask = torch.ones(1, 3, dtype=torch.bool)
    config = fc.LossConfig(rollout_is="sequence", rollout_is_threshold=1.5)
    weights, _ = fc.rollout_is_weights(old, q, mask, config)
    kwargs = dict(advantages=torch.tensor([-0.7]), old_logprobs=old)
    computed, _ = loss_and_grad(old + 0.1, mask, backend, rollout_logprobs=q, config=config, **kwargs)
    given, _ = loss_and_grad(old + 0.1, mask, backend, rollout_is_weights=weights, config=fc.LossConfig(), **kwargs)
    assert computed.loss.item() == pytest.approx(given.loss.item(), rel=1e-6)


def test_rollout_inputs_are_checked():
    logp, mask, adv = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.ones(1)
    q = torch.full((1, 3), -0.5)
    with pytest.raises(ValueError, match="needs `rollout_logprobs`"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=adv, config=fc.LossConfig(rollout_is="token"))
    with pytest.raises(ValueError, match="config.rollout_is is None"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=adv, rollout_logprobs=q)
    with pytest.raises(ValueError, match="not both"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=adv, rollout_logprobs=q, rollout_is_weights=q.exp())
    with pytest.raises(ValueError, match=r"rollout_is_weights must be finite and >= 0.*\[0, 1\] = -0.5"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=adv, rollout_is_weights=torch.tensor([[1.0, -0.5, 1.0]]))
    with pytest.raises(ValueError, match="rollout_logprobs shape"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=adv, rollout_logprobs=q[:, :2],
                                     config=fc.LossConfig(rollout_is="token"))
    for bad, match in [(dict(rollout_is="tokens"), "rollout_is"), (dict(rollout_is_mode="clip"), "rollout_is_mode"),
                       (dict(rollout_is_threshold=0.0), "rollout_is_threshold must be > 0"),
                       (dict(rollout_is_threshold_lower=3.0), "rollout_is_threshold_lower must lie in"),
                       (dict(rollout_is_log_ratio_clamp=-1.0), "rollout_is_log_ratio_clamp"),
                       (dict(rollout_is_batch_normalize=1), "rollout_is_batch_normalize")]:
        with pytest.raises(ValueError, match=match):
            fc.LossConfig(**bad)


def test_token_sum_example():
    """docs/algorithms.md §1.8's example: token-sum = 2.0."""
    values = t([[0.5, -0.2, 0.3, 0.0], [1.0, 0.4, 0.0, 0.0]])
    valid = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert fc.agg_loss(values, valid, "token-sum").item() == pytest.approx(2.0)


# §1.5: the two-sided dual clip (TRL's and Liger's delta) ---------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_two_sided_dual_clip_example(backend, loss_mode):
    """old = -1, logp = -0.5 (rho 1.648721), c = 1.5, eps 0.2 / 0.28: A = +1 -> -1.28, A = -1 -> 1.5 (grad 0)."""
    logp = torch.tensor([[-0.5], [-0.5]])
    config = fc.LossConfig(loss_mode=loss_mode, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.5,
                           dual_clip="two_sided", loss_agg_mode="token-sum")
    out, grad = loss_and_grad(logp, torch.ones(2, 1, dtype=torch.bool), backend, advantages=torch.tensor([1.0, -1.0]),
                              old_logprobs=torch.full((2, 1), -1.0), config=config)
    assert out.loss.item() == pytest.approx(-1.28 + 1.5, abs=1e-6)
    torch.testing.assert_close(grad, torch.zeros(2, 1))
    assert out.metrics["actor/pg_clipfrac_lower"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        fc.LossConfig(clip_ratio_c=0.9)
    fc.LossConfig(clip_ratio_c=0.9, dual_clip="two_sided")


# §1.10: TRL's bias-corrected KL; §1.9, §1.13: entropy selection and the entropy bonus ----------

@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_bias_correction_example(backend):
    dtype = F64 if backend == "torch" else torch.float32  # the Triton objective takes fp32
    config = fc.LossConfig(kl_coef=1.0, kl_bias_correction=True, clip_ratio_c=None)
    out, grad = loss_and_grad(t([[-1.0]], dtype), torch.ones(1, 1, dtype=torch.bool), backend=backend,
                              advantages=torch.zeros(1, dtype=dtype), old_logprobs=t([[-1.5]], dtype),
                              ref_logprobs=t([[-1.2]], dtype), config=config)
    assert out.backends["objective"] == f"{backend} (requested)"
    assert out.metrics["actor/kl_loss"] == pytest.approx(0.030882, abs=1e-6)
    assert grad.item() == pytest.approx(0.329744, abs=1e-6)


def test_top_entropy_quantile_example():
    """H = [0.1, 0.5, 0.9, 0.3], q = 0.5: tau = 0.4, the policy term and the bonus act on tokens 2 and 3."""
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3]], dtype=F64, requires_grad=True)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    config = fc.LossConfig(top_entropy_quantile=0.5, entropy_coeff=0.1, loss_agg_mode="token-sum",
                           entropy_agg_mode="token-mean")
    out, grad = loss_and_grad(logp, mask, entropy=entropy, advantages=torch.ones(1), config=config)
    torch.testing.assert_close(grad, t([[0.0, -1.0, -1.0, 0.0]]))  # on-policy: -A rho, rho = 1, kept tokens
    assert out.metrics["actor/entropy"] == pytest.approx(0.7)
    torch.testing.assert_close(entropy.grad, t([[0.0, -0.05, -0.05, 0.0]]))
    with pytest.raises(ValueError, match="needs the per-token `entropy`"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=torch.ones(1), config=config.__class__(
            top_entropy_quantile=0.5))


@pytest.mark.parametrize("option, match", [(dict(kl_bias_correction=True, loss_mode="gspo"), "kl_bias_correction"),
                                           (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
                                           (dict(entropy_agg_mode="seq-mean-token-mean"), "entropy_agg_mode")])
def test_torch_only_options_are_refused_by_triton(option, match):
    logp = torch.full((1, 2), -1.0)
    config = fc.LossConfig(**option)
    with pytest.raises(ValueError, match=f"backend='triton' cannot run objective: {match}.*torch only"):
        fc.policy_loss_from_logprobs(logp, torch.ones(1, 2, dtype=torch.bool), entropy=torch.ones(1, 2),
                                     advantages=torch.ones(1), config=config, backend="triton")
    out = fc.policy_loss_from_logprobs(logp, torch.ones(1, 2, dtype=torch.bool), entropy=torch.ones(1, 2),
                                       advantages=torch.ones(1), config=config, backend="auto")
    assert out.backends["objective"].startswith("torch (auto:")


# §1.7: verl's dppo_tv, dppo_kl, dro -------------------------------------------------------------

@pytest.mark.parametrize("loss_mode", ["dppo_tv", "dppo_kl"])
def test_dppo_example(loss_mode):
    """old = -1, c = 3, bounds 0.2 / 0.28: tokens (A, logp) (+1, -0.5) kept, (+1, -0.2) dropped (p - p_old =
    0.450851, binary KL 0.495276), (-1, -1.5) kept, (-1, -2.5) dropped (-0.285794; 0.316023)."""
    logp = torch.tensor([[-0.5, -0.2, -1.5, -2.5]], dtype=F64)
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    config = fc.LossConfig(loss_mode=loss_mode, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token-sum")
    out, grad = loss_and_grad(logp, torch.ones(1, 4, dtype=torch.bool), advantages=adv,
                              old_logprobs=torch.full((1, 4), -1.0, dtype=F64), config=config)
    assert out.loss.item() == pytest.approx(0.824361 - 0.909796, abs=1e-6)  # -A sg(rho) logp on the kept tokens
    torch.testing.assert_close(grad, t([[-1.648721, 0.0, 0.606531, 0.0]]), rtol=0, atol=1e-6)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(0.5)


def test_dro_example():
    """A = 1, logp = -0.5, old = -1, beta = 0.3: -(A logp - beta/2 (0.5)^2) = 0.5375, gradient -(A - 0.15) = -0.85."""
    config = fc.LossConfig(loss_mode="dro", dro_beta=0.3)
    out, grad = loss_and_grad(t([[-0.5]]), torch.ones(1, 1, dtype=torch.bool), advantages=torch.ones(1),
                              old_logprobs=t([[-1.0]]), config=config)
    assert out.loss.item() == pytest.approx(0.5375)
    assert grad.item() == pytest.approx(-0.85)
    with pytest.raises(ValueError, match="dro_beta"):
        fc.LossConfig(loss_mode="dro")
    with pytest.raises(ValueError, match="backend='triton' cannot run objective: loss_mode 'dro' has no Triton kernel"):
        fc.policy_loss_from_logprobs(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), advantages=torch.ones(1),
                                     config=config, backend="triton")


def test_vespo_example():
    """old = -1; row 0 A = +1, logp [-0.5, -1.0]: w = e^0.5, phi = e^(3 + 1 - 3 e^0.5) = 0.388227; row 1 A = -1,
    logp [-1.5]: w = e^-0.5, phi = e^(2 - 1.5 - 2 e^-0.5) = 0.490141; token-sum loss -phi A logp summed = -0.152871."""
    logp = t([[-0.5, -1.0], [-1.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    config = fc.LossConfig(loss_mode="vespo", loss_agg_mode="token-sum")
    out, grad = loss_and_grad(logp, mask, advantages=t([1.0, -1.0]), old_logprobs=torch.full((2, 2), -1.0,
                              dtype=F64), config=config)
    assert out.loss.item() == pytest.approx(-0.152871, abs=1e-6)
    torch.testing.assert_close(grad * mask, t([[-0.388227, -0.388227], [0.490141, 0.0]]), rtol=0, atol=1e-6)
    assert out.metrics["actor/vespo_phi_seq_mean"] == pytest.approx((0.388227 + 0.490141) / 2, abs=1e-6)
    assert out.metrics["actor/pg_clipfrac"] == 0


def test_vespo_folds_rollout_weights_into_phi():
    """Token weights [0.5, 1] add log 0.5 to the row's log w instead of multiplying the token loss."""
    logp, mask, old = t([[-0.5, -1.0]]), torch.ones(1, 2, dtype=torch.bool), torch.full((1, 2), -1.0, dtype=F64)
    config = fc.LossConfig(loss_mode="vespo", loss_agg_mode="token-sum")
    out, _ = loss_and_grad(logp, mask, advantages=t([1.0]), old_logprobs=old, config=config,
                           rollout_is_weights=t([[0.5, 1.0]]))
    log_w = 0.5 + math.log(0.5)
    phi = math.exp(3 + 2 * log_w - 3 * math.exp(log_w))
    assert out.loss.item() == pytest.approx(1.5 * phi, rel=1e-9)


@pytest.mark.parametrize("field, value, message", [
    ("vespo_lambda_pos", 0.0, "vespo_lambda_pos must be >= 0.0001, got 0.0 (vespo's gamma rate; TRL floors it at 1e-4)"),
    ("vespo_k_neg", -1.0, "vespo_k_neg must be >= 0, got -1.0"),
    ("gspo_gradient", "mean", "gspo_gradient"),
])
def test_vespo_and_gspo_gradient_fields_are_checked(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fc.LossConfig(**{field: value})


@pytest.mark.parametrize("gradient, expected", [("token", [-1.105171, -0.552585]),
                                                ("sequence", [-0.828878, -0.828878])])
def test_gspo_gradient_paths(gradient, expected):
    """One row, A = +1, logp [-0.8, -1.0], old -1, token weights [1, 0.5], token-sum: s = e^0.1 = 1.105171,
    loss -1.5 s; verl's path gives each token w_t times -s, TRL's sequence path the row's mean."""
    config = fc.LossConfig(loss_mode="gspo", clip_ratio_high=0.28, loss_agg_mode="token-sum", gspo_gradient=gradient)
    out, grad = loss_and_grad(t([[-0.8, -1.0]]), torch.ones(1, 2, dtype=torch.bool), advantages=t([1.0]),
                              old_logprobs=torch.full((1, 2), -1.0, dtype=F64), config=config,
                              rollout_is_weights=t([[1.0, 0.5]]))
    assert out.loss.item() == pytest.approx(-1.657756, abs=1e-6)
    torch.testing.assert_close(grad, t([expected]), rtol=0, atol=1e-6)
