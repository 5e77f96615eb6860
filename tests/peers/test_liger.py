"""fused-canon against Liger-Kernel 0.8.5's GRPO loss (``LigerFusedLinearGRPOFunction.ppo_loss_fn``, the
per-chunk loss of its fused linear GRPO, which mirrors TRL 1.16's ``_compute_loss``) on random inputs:
each TRL/Liger loss_type at both importance-sampling levels, with and without the two-sided clip
``delta``, the KL term with and without ``use_bias_correction_kl``, and the vLLM IS ratio, on both
objective backends: loss, gradient w.r.t. the log-probs, and Liger's metrics (docs/algorithms.md §1.5-1.12,
docs/integrations.md's loss_type table)."""

import pytest
import torch

import fused_canon as fc
from fused_canon.backends import OBJECTIVE, triton_names
from peers import compared, require, unsupported

require("liger_kernel")
from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction  # noqa: E402

PEER = "Liger-Kernel 0.8.5"
B, T = 5, 6
EPS_LOW, EPS_HIGH = 0.2, 0.28


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 2 - 0.05
    old = logp + 0.25 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    rollout = old + 0.3 * torch.randn(B, T, generator=g)
    lengths = torch.tensor([T, 3, 5, 1, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)
    return logp, old, ref, rollout, adv, mask


def our_config(loss_type, level, delta, beta, bias_kl, rollout):
    """The LossConfig that computes Liger's (and TRL's) loss_type (docs/integrations.md) and its normalisers."""
    base = dict(clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH, clip_ratio_c=delta, dual_clip="two_sided",
                kl_coef=beta, kl_type="k3", kl_k3_clamp=False, kl_bias_correction=bias_kl)
    if rollout is not None:
        base.update(rollout_is=rollout, rollout_is_threshold=2.0, rollout_is_log_ratio_clamp=None)
    norm = {}
    if loss_type in ("grpo", "sapo"):
        base["loss_agg_mode"] = "seq-mean-token-mean"
        norm["global_num_seqs"] = B  # Liger divides by all B rows
    elif loss_type in ("bnpo", "dapo", "cispo"):
        base["loss_agg_mode"] = "token-mean"
    elif loss_type == "dr_grpo":
        base.update(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=T)
        norm["global_num_seqs"] = B
    if loss_type == "cispo":
        base.update(loss_mode="cispo", cispo_bound="absolute", clip_ratio_high=EPS_HIGH, clip_ratio_c=None)
    elif loss_type == "sapo":
        base.update(loss_mode="sapo", clip_ratio_c=None)
    else:
        base["loss_mode"] = "gspo" if level == "sequence" else "vanilla"
    return fc.LossConfig(**base), norm


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
NOT_YET = {"luspo": "loss_type='luspo' is not implemented in fused-canon yet",
           "vespo": "loss_type='vespo' is not implemented in fused-canon yet"}
KL = [(0.0, False), (0.04, False), (0.04, True)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rollout", [None, "token", "sequence"], ids=lambda r: f"is-{r}")
@pytest.mark.parametrize("beta, bias_kl", KL, ids=lambda x: str(x))
@pytest.mark.parametrize("delta", [None, 1.5], ids=lambda d: f"delta-{d}")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss(request, loss_type, level, delta, beta, bias_kl, rollout, backend):
    if loss_type in NOT_YET:
        unsupported(request, PEER, NOT_YET[loss_type])
    if level == "sequence" and loss_type in ("cispo", "sapo"):
        pytest.skip("Liger (and TRL) refuse importance_sampling_level='sequence' for cispo and sapo")
    if delta is not None and loss_type in ("cispo", "sapo"):
        pytest.skip("delta does not apply to cispo and sapo (Liger, TRL)")
    if level == "sequence" and rollout == "token":
        unsupported(request, PEER, "a sequence-level ratio with token-level IS weights: Liger's and TRL's gradient "
                                   "goes through the row's mean log-ratio, so every token gets the row's mean weight; "
                                   "fused-canon's gspo keeps each token's own weight, as verl's (same loss value)")
    config, norm = our_config(loss_type, level, delta, beta, bias_kl, rollout)
    if backend == "triton":
        if config.loss_mode not in triton_names(OBJECTIVE):
            unsupported(request, PEER, f"{config.loss_mode}: torch only (no Triton objective kernel)")
        reason = fc.losses.triton_objective_limit(config)
        if reason is not None:
            unsupported(request, PEER, reason)
    compared(request, PEER)
    logp, old, ref, rollout_logp, adv, mask = batch(seed=4)
    valid = mask.float()
    weights = None
    if rollout is not None:
        weights, _ = fc.rollout_is_weights(old, rollout_logp, mask, config)

    theirs_logp = logp.clone().requires_grad_(True)
    theirs, their_metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        theirs_logp, valid, adv, valid, ref_per_token_logps=ref, old_per_token_logps=old, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, beta=beta, loss_type=loss_type, max_completion_length=T,
        importance_sampling_level=level, vllm_is_ratio=None if weights is None else weights[:, :1] if
        rollout == "sequence" else weights, delta=delta, use_bias_correction_kl=bias_kl)
    theirs.backward()

    ours_logp = logp.clone().requires_grad_(True)
    out = fc.policy_loss_from_logprobs(ours_logp, mask, advantages=adv, old_logprobs=old,
                                       ref_logprobs=ref if beta else None, rollout_is_weights=weights,
                                       config=config, backend=backend, **norm)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(ours_logp.grad * valid, theirs_logp.grad * valid, rtol=1e-5, atol=1e-6)
    clip_fraction = their_metrics[-1].item()
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(clip_fraction, abs=1e-6)
    if beta and config.loss_agg_mode == "token-mean":
        assert out.metrics["actor/kl_loss"] == pytest.approx(their_metrics[0].item(), rel=1e-5, abs=1e-6)
