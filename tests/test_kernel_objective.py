"""The Triton policy objective (kernels/objective.py, launched through ``fused_canon.losses.triton_policy_objective``)
against the reference ``fused_canon.losses.policy_objective``.

Runs under Triton's interpreter on CPU (tests/conftest.py), fp32. Every case compares the loss, every
metric and the gradients w.r.t. logp and entropy (torch.autograd.grad on both) at relative error 1e-4.
"""

import math

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES
from fused_canon.backends import OBJECTIVE, select, triton_names
from fused_canon.losses import POLICY_LOSSES, Normalizers, policy_objective
from helpers import relative_error

TOL = 1e-4
TRITON_LOSS_MODES = triton_names(OBJECTIVE)


def triton_policy_objective(logp, entropy, mask, advantages, old_logp, ref_logp, config, norm, step=0):
    """The objective as backend="triton" runs it: the dispatch table's launch for ``config.loss_mode``."""
    objective = select(OBJECTIVE, "triton", logp, name=config.loss_mode, config=config)
    assert objective.backend == "triton"
    return objective.fn(logp, entropy, mask, advantages, old_logp, ref_logp, config, norm, step=step)
SCALE_FLOOR = 1e-6  # relative errors are taken against at least this scale: metrics can be exactly 0


def _inputs(B=5, T=11, seed=0, padded_fill=None):
    """Random [B, T] inputs: a ragged mask (one empty row), log-ratios on both sides of the clip range,
    a few tokens past the dual clip (|log rho| = 1.5), per-response advantages of both signs.
    ``padded_fill`` puts garbage at the padded positions of every input (the reference zeroes them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g) * 3
    entropy = torch.rand(B, T, generator=g) * 2
    # Per-row shifts of the log-ratio so that GSPO's sequence-level ratio leaves the clip range too.
    old = logp + 0.4 * torch.randn(B, T, generator=g) + 0.5 * torch.randn(B, 1, generator=g)
    old[:, ::4] = logp[:, ::4] + 1.5 * torch.sign(torch.randn(B, T, generator=g)[:, ::4])
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, generator=g)[:, None].expand(B, T)
    inputs = {"logp": logp * mask, "entropy": entropy * mask, "mask": mask, "advantages": advantages,
              "old_logp": old, "ref_logp": ref}
    if padded_fill is not None:
        for name in ("old_logp", "ref_logp", "advantages"):
            inputs[name] = torch.where(mask, inputs[name], torch.full((B, T), padded_fill))
    return inputs


def _run(fn, inputs, config, norm, step=0):
    logp = inputs["logp"].clone().requires_grad_()
    entropy = inputs["entropy"].clone().requires_grad_()
    loss, metrics = fn(logp, entropy, inputs["mask"], inputs["advantages"], inputs["old_logp"], inputs["ref_logp"],
                       config, norm, step=step)
    grads = torch.autograd.grad(loss, [logp, entropy], allow_unused=True)
    return loss, metrics, grads


def _assert_matches_reference(inputs, config, norm=Normalizers(), step=0, kernel_inputs=None):
    ref_loss, ref_metrics, ref_grads = _run(policy_objective, inputs, config, norm, step)
    loss, metrics, grads = _run(triton_policy_objective, kernel_inputs or inputs, config, norm, step)
    assert loss.shape == () and loss.dtype == ref_loss.dtype
    assert relative_error(loss, ref_loss, scale_floor=SCALE_FLOOR) <= TOL, (loss.item(), ref_loss.item())
    assert list(metrics) == list(ref_metrics)
    for name in ref_metrics:
        assert metrics[name].shape == ()
        error = relative_error(metrics[name], ref_metrics[name], scale_floor=SCALE_FLOOR)
        assert error <= TOL, (name, metrics[name], ref_metrics[name])
    for name, grad, ref_grad in zip(("logp", "entropy"), grads, ref_grads):
        assert (grad is None) == (ref_grad is None), name
        if ref_grad is not None:
            assert relative_error(grad, ref_grad, scale_floor=SCALE_FLOOR) <= TOL, name
            assert (grad[~inputs["mask"]] == 0).all(), f"padded positions get a {name} gradient"
    return ref_loss, ref_metrics, ref_grads


def _config(loss_mode, **kw):
    # Generous Clip-Cov / KL-Cov fractions and a wide Clip-Cov band: several tokens are selected.
    kw = {"clip_cov_ratio": 0.2, "kl_cov_ratio": 0.2, "clip_cov_lb": -2.0, "clip_cov_ub": 2.0, **kw}
    return fc.LossConfig(loss_mode=loss_mode, **kw)


GLOBAL = Normalizers(num_tokens=57.0, num_seqs=9.0, loss_scale_factor=6.0)


@pytest.mark.parametrize("norm", [Normalizers(), GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("loss_mode", sorted(TRITON_LOSS_MODES))
def test_loss_mode_x_aggregation(loss_mode, agg, norm):
    config = _config(loss_mode, loss_agg_mode=agg, clip_ratio_high=0.28, entropy_coeff=0.01, kl_coef=0.05)
    _, metrics, _ = _assert_matches_reference(_inputs(seed=LOSS_AGG_MODES.index(agg)), config, norm)
    if loss_mode in ("vanilla", "gspo", "clip_cov"):
        assert metrics["actor/pg_clipfrac"] > 0  # the inputs do exercise the clipping


@pytest.mark.parametrize("kl_type", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3+", "abs+", "k1+"])
def test_kl_types(kl_type):
    config = _config("vanilla", kl_coef=0.3)
    config.kl_type = kl_type  # LossConfig's check lists the base names only; the '+' forms are kl_penalty's
    inputs = _inputs(seed=3)
    inputs["ref_logp"][0, :3] = inputs["logp"][0, :3]  # d = 0: abs has gradient 0 there
    _assert_matches_reference(inputs, config)


def test_k3_clamps_and_zero_gradient_where_clamped():
    config = _config("vanilla", kl_coef=1.0, kl_type="k3")
    inputs = _inputs(seed=4)
    inputs["ref_logp"] = inputs["logp"] + torch.tensor([-30.0, -15.0, -3.0, 0.0, 3.0, 15.0, 30.0])[
        torch.arange(inputs["logp"].numel()) % 7].reshape(inputs["logp"].shape)
    _assert_matches_reference(inputs, config)


@pytest.mark.parametrize("loss_mode", sorted(TRITON_LOSS_MODES))
def test_no_entropy_bonus_no_kl_on_policy(loss_mode):
    """entropy_coeff = 0 (no entropy gradient at all), no ref, old_logp None (ratio 1)."""
    inputs = dict(_inputs(seed=5), old_logp=None, ref_logp=None)
    _, _, grads = _assert_matches_reference(inputs, _config(loss_mode))
    assert grads[1] is None


def test_no_dual_clip_and_kl_metric_only():
    inputs = _inputs(seed=6)
    _assert_matches_reference(inputs, _config("vanilla", clip_ratio_c=None, kl_coef=0.0))
    _, metrics, _ = _assert_matches_reference(inputs, _config("vanilla", clip_ratio_c=2.0))
    assert metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("loss_mode", ["vanilla", "cispo", "clip_cov", "kl_cov"])
def test_extreme_log_ratios(loss_mode):
    """|logp - old| beyond 20: vanilla and cispo clamp it (zero gradient past the clamp), the others do not.
    A < 0 without dual clip, so the unclipped exp(20) term wins and its gradient is visible."""
    inputs = _inputs(seed=7)
    inputs["old_logp"] = inputs["old_logp"].clone()
    inputs["advantages"] = inputs["advantages"].clone()
    inputs["advantages"][2] = -0.7
    shifts = [-25.0, 25.0, -20.0, 20.0] if loss_mode in ("vanilla", "cispo") else [-6.0, 6.0, -5.0, 5.0]
    inputs["old_logp"][2, :4] = inputs["logp"][2, :4] + torch.tensor(shifts)
    _assert_matches_reference(inputs, _config(loss_mode, entropy_coeff=0.02, clip_ratio_c=None))


def test_gspo_sequence_ratio_clamped_at_10():
    inputs = _inputs(seed=8)
    inputs["old_logp"] = inputs["old_logp"].clone()
    inputs["old_logp"][0] = inputs["logp"][0] - 12.0  # the row's mean log-ratio is 12 > 10
    inputs["advantages"] = inputs["advantages"].clone()
    inputs["advantages"][0] = -1.0
    for agg in LOSS_AGG_MODES:  # GSPO forces seq-mean-token-mean for its own term, not for entropy/KL
        _assert_matches_reference(inputs, _config("gspo", loss_agg_mode=agg, entropy_coeff=0.1, kl_coef=0.1), GLOBAL)


def test_garbage_at_padded_positions():
    """Finite garbage (and NaN in the kernel's own copy of logp / entropy) at padded positions: ignored."""
    inputs = _inputs(seed=9, padded_fill=1e3)
    kernel_inputs = dict(inputs)
    nan = torch.full_like(inputs["logp"], math.nan)
    kernel_inputs["logp"] = torch.where(inputs["mask"], inputs["logp"], nan)
    kernel_inputs["entropy"] = torch.where(inputs["mask"], inputs["entropy"], nan)
    kernel_inputs["old_logp"] = torch.where(inputs["mask"], inputs["old_logp"], nan)
    for loss_mode in sorted(TRITON_LOSS_MODES):
        config = _config(loss_mode, loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01, kl_coef=0.1)
        _assert_matches_reference(inputs, config, kernel_inputs=kernel_inputs)


@pytest.mark.parametrize("loss_mode", sorted(TRITON_LOSS_MODES))
def test_empty_mask_gives_zero_loss_and_zero_gradient(loss_mode):
    inputs = _inputs(seed=10)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    inputs["logp"] = torch.zeros_like(inputs["logp"])
    inputs["entropy"] = torch.zeros_like(inputs["entropy"])
    loss, _, grads = _assert_matches_reference(inputs, _config(loss_mode, entropy_coeff=0.01, kl_coef=0.1))
    assert loss.item() == 0.0 and not grads[0].any() and not grads[1].any()


def test_row_longer_than_one_tile_and_token_advantages():
    """T > MAX_BLOCK_T (several programs per row) and per-token [B, T] advantages."""
    inputs = _inputs(B=2, T=700, seed=11)
    inputs["advantages"] = torch.randn(2, 700, generator=torch.Generator().manual_seed(1))
    for agg in ("token-mean", "seq-mean-token-mean"):
        _assert_matches_reference(inputs, _config("vanilla", loss_agg_mode=agg, entropy_coeff=0.01))


@pytest.mark.parametrize("step", [0, 3])
def test_clip_cov_selection_follows_seed_and_step(step):
    """Clip-Cov's random subset is the reference's (same seed and step); kl_cov's top-k too."""
    inputs = _inputs(B=6, T=16, seed=12)
    _assert_matches_reference(inputs, _config("clip_cov", seed=7, clip_cov_ratio=0.05), step=step)
    _assert_matches_reference(inputs, _config("kl_cov", kl_cov_ratio=0.01, ppo_kl_coef=2.0), step=step)


def test_unsupported_inputs_raise(monkeypatch):
    inputs = _inputs(seed=13)
    args = (inputs["logp"], inputs["entropy"], inputs["mask"], inputs["advantages"], inputs["old_logp"])
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
        triton_policy_objective(*args, None, _config("vanilla", kl_coef=0.1), Normalizers())
    monkeypatch.setitem(POLICY_LOSSES, "my_registered_mode", lambda *args, **kwargs: None)
    config = _config("vanilla")
    config.loss_mode = "my_registered_mode"
    with pytest.raises(ValueError, match="loss_mode 'my_registered_mode' has no Triton kernel"):
        triton_policy_objective(*args, inputs["ref_logp"], config, Normalizers())
    with pytest.raises(ValueError, match="fp64 log-probs: the Triton kernel takes fp32"):
        triton_policy_objective(inputs["logp"].double(), *args[1:], inputs["ref_logp"], _config("vanilla"),
                                Normalizers())


def test_backward_scales_by_grad_output_and_is_deterministic():
    inputs = _inputs(seed=14)
    config = _config("vanilla", entropy_coeff=0.01, kl_coef=0.1)
    results = []
    for _ in range(2):
        logp = inputs["logp"].clone().requires_grad_()
        entropy = inputs["entropy"].clone().requires_grad_()
        loss, _ = triton_policy_objective(logp, entropy, inputs["mask"], inputs["advantages"], inputs["old_logp"],
                                          inputs["ref_logp"], config, Normalizers())
        results.append((loss, torch.autograd.grad(loss, [logp, entropy], grad_outputs=torch.tensor(-2.5))))
    (loss, grads), (loss_again, grads_again) = results
    assert torch.equal(loss, loss_again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    _, _, unit_grads = _run(policy_objective, inputs, config, Normalizers())
    for grad, unit in zip(grads, unit_grads):
        assert relative_error(grad, -2.5 * unit, scale_floor=SCALE_FLOOR) <= TOL


@pytest.mark.parametrize("loss_mode", TRITON_LOSS_MODES)
def test_a_nan_log_prob_gives_a_nan_loss_as_in_the_reference(loss_mode):
    """The clamps of the kernel (tl.minimum / tl.maximum drop a NaN operand) must not turn a NaN log-prob at a
    valid position into a finite loss."""
    inputs = _inputs(seed=4)
    inputs["logp"][0, 0] = float("nan")  # row 0 has a valid token at position 0 (lengths >= 1)
    config = fc.LossConfig(loss_mode=loss_mode, kl_coef=0.1)
    for fn in (policy_objective, triton_policy_objective):
        loss, _, _ = _run(fn, inputs, config, Normalizers())
        assert torch.isnan(loss), (fn.__name__, loss)
