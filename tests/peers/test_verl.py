"""fused-canon against verl 0.9.1's own functions on random inputs: the rollout correction
(``compute_rollout_correction_and_rejection_mask``: weights and every metric) and the policy losses
(``core_algos.get_policy_loss_fn``: loss, gradient, metrics) over the aggregation modes, with and
without rollout IS weights, on both objective backends (docs/algorithms.md §1.5-1.8, §1.12)."""

import pytest
import torch

import fused_canon as fc
from fused_canon.backends import OBJECTIVE, triton_names
from peers import compared, require, unsupported

require("verl")
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

PEER = "verl 0.9.1"
B, T = 6, 7


def batch(seed=0, gap=0.3, empty_row=True):
    """log-probs, old and rollout log-probs, advantages [B, T] and a ragged mask (one row empty unless
    ``empty_row=False``)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 2 - 0.05
    old = logp + 0.15 * torch.randn(B, T, generator=g)
    rollout = old + gap * torch.randn(B, T, generator=g)
    lengths = torch.tensor([T, 3, 5, 0 if empty_row else 2, 1, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    return logp, old, rollout, adv, mask


# Rollout correction: weights and metrics ------------------------------------------------------
# verl raises ZeroDivisionError (its effective sample size) when the mask mode zeroes every weight; the
# grid's bounds keep some weight in every configuration.

# (level, verl's threshold spec, batch_normalize) -> our config fields
ROLLOUT_GRID = [(level, spec, norm) for level in ("token", "sequence") for spec in (2.0, 1.5, "0.5_2.0", "0.2_5.0")
                for norm in (False, True)]


def rollout_config(level, spec, normalize, **kwargs):
    if isinstance(spec, str):
        lower, upper = (float(x) for x in spec.split("_"))
        return fc.LossConfig(rollout_is=level, rollout_is_mode="mask", rollout_is_threshold=upper,
                             rollout_is_threshold_lower=lower, rollout_is_batch_normalize=normalize, **kwargs)
    return fc.LossConfig(rollout_is=level, rollout_is_threshold=spec, rollout_is_batch_normalize=normalize, **kwargs)


@pytest.mark.parametrize("level, spec, normalize", ROLLOUT_GRID)
@pytest.mark.parametrize("gap", [0.05, 0.3])
def test_rollout_is_weights_and_metrics(request, level, spec, normalize, gap):
    compared(request, PEER)
    _, old, rollout, _, mask = batch(seed=1, gap=gap)
    proto, _, theirs = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask.float(), rollout_is=level, rollout_is_threshold=spec, rollout_is_batch_normalize=normalize)
    config = rollout_config(level, spec, normalize)
    weights, ours = fc.rollout_is_weights(old, rollout, mask, config)
    ours.update(fc.rollout_offpolicy_metrics(old, rollout, mask))
    torch.testing.assert_close(weights, proto.batch["rollout_is_weights"], rtol=1e-6, atol=1e-7)
    assert set(theirs) <= set(ours), f"metrics we do not report: {sorted(set(theirs) - set(ours))}"
    for name, value in theirs.items():
        assert ours[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


# Policy losses with rollout IS weights -------------------------------------------------------

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm")
VERL_LOSSES = ("vanilla", "gspo", "cispo", "clip_cov", "kl_cov", "gpg", "sapo", "geo_mean", "dppo_tv", "dppo_kl",
               "dro")
SEQ_MEAN_TOKEN_MEAN_ONLY = {"sapo": "verl 0.9.1's sapo aggregates seq-mean-token-mean whatever loss_agg_mode says "
                                    "(docs/algorithms.md §9.15); fused-canon uses loss_agg_mode",
                            "geo_mean": "verl 0.9.1's geo_mean ignores loss_agg_mode; fused-canon refuses any mode "
                                        "but seq-mean-token-mean (docs/algorithms.md §9.16)"}
ROLLOUT = (None, ("token", 2.0), ("sequence", "0.5_3.0"))


DRO_BETA = 0.3


def verl_actor(loss_mode, agg, clip_low=0.2, clip_high=0.28, clip_c=3.0):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                       clip_ratio_low=clip_low, clip_ratio_high=clip_high, clip_ratio_c=clip_c, loss_agg_mode=agg,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode, ppo_kl_coef=0.1, dro_beta=DRO_BETA),
                       use_torch_compile=False)


def backend_or_unsupported(request, loss_mode, backend):
    if backend == "triton" and loss_mode not in triton_names(OBJECTIVE):
        unsupported(request, PEER, f"{loss_mode}: torch only (no Triton objective kernel)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rollout", ROLLOUT, ids=lambda r: "no-is" if r is None else f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_mode", VERL_LOSSES)
def test_policy_loss_with_rollout_weights(request, loss_mode, agg, rollout, backend):
    if loss_mode in SEQ_MEAN_TOKEN_MEAN_ONLY and agg != "seq-mean-token-mean":
        unsupported(request, PEER, SEQ_MEAN_TOKEN_MEAN_ONLY[loss_mode])
    backend_or_unsupported(request, loss_mode, backend)
    compared(request, PEER)
    # geo_mean: verl averages over all B rows, fused-canon over the non-empty ones (docs/algorithms.md §9.16)
    logp, old, rollout_logp, adv, mask = batch(seed=2, empty_row=loss_mode != "geo_mean")
    valid = mask.float()
    weights = None
    extra = {}
    if rollout is not None:
        proto, _, _ = compute_rollout_correction_and_rejection_mask(old, rollout_logp, valid, rollout_is=rollout[0],
                                                                    rollout_is_threshold=rollout[1])
        weights = proto.batch["rollout_is_weights"]
        extra = {k: getattr(rollout_config(rollout[0], rollout[1], False), k)
                 for k in ("rollout_is", "rollout_is_mode", "rollout_is_threshold", "rollout_is_threshold_lower")}

    theirs_logp = logp.clone().requires_grad_(True)
    theirs, their_metrics = core_algos.get_policy_loss_fn(loss_mode)(
        old, theirs_logp, adv, valid, agg, verl_actor(loss_mode, agg), weights)
    theirs.backward()

    config = fc.LossConfig(loss_mode=loss_mode, loss_agg_mode=agg, clip_ratio_low=0.2, clip_ratio_high=0.28,
                           clip_ratio_c=3.0, ppo_kl_coef=0.1, clip_cov_lb=1.0, clip_cov_ub=5.0,
                           dro_beta=DRO_BETA, **extra)
    ours_logp = logp.clone().requires_grad_(True)
    out = fc.policy_loss_from_logprobs(ours_logp, mask, advantages=adv, old_logprobs=old,
                                       rollout_logprobs=None if rollout is None else rollout_logp,
                                       config=config, backend=backend)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(ours_logp.grad * valid, theirs_logp.grad * valid, rtol=1e-5, atol=1e-6)
    for name, value in their_metrics.items():
        assert out.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
