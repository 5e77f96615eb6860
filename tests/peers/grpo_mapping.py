"""The GRPO loss options of TRL 1.16 (``GRPOTrainer._compute_loss``) and Liger-Kernel 0.8.5 (its chunked
``ppo_loss_fn``, which mirrors TRL), the grid the differential tests run over, and the ``LossConfig`` that
computes each (docs/integrations.md's TRL / Liger table)."""

import pytest
import torch

import fused_canon as fc
from fused_canon.backends import OBJECTIVE, triton_names
from peers import unsupported

B, T = 5, 6
EPS_LOW, EPS_HIGH = 0.2, 0.28
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL = [(0.0, False), (0.04, False), (0.04, True)]
# Loss types whose per-token loss TRL and Liger refuse at importance_sampling_level="sequence" or leave delta out of.
TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")


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
    """The LossConfig that computes TRL's (and Liger's) loss_type (docs/integrations.md) and its normalisers."""
    base = dict(clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH, clip_ratio_c=delta, dual_clip="two_sided",
                kl_coef=beta, kl_type="k3", kl_k3_clamp=False, kl_bias_correction=bias_kl)
    if rollout is not None:
        base.update(rollout_is=rollout, rollout_is_threshold=2.0, rollout_is_log_ratio_clamp=None)
    norm = {}
    if loss_type in ("grpo", "sapo"):
        base["loss_agg_mode"] = "seq-mean-token-mean"
        norm["global_num_seqs"] = B  # TRL and Liger divide by all B rows
    elif loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        base["loss_agg_mode"] = "token-mean"
    elif loss_type == "dr_grpo":
        base.update(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=T)
        norm["global_num_seqs"] = B
    elif loss_type == "luspo":  # each row's loss times its length: the row's token sum, mean over all B rows
        base["loss_agg_mode"] = "seq-mean-token-sum"
        norm["global_num_seqs"] = B
    if loss_type == "cispo":
        base.update(loss_mode="cispo", cispo_bound="absolute", clip_ratio_high=EPS_HIGH, clip_ratio_c=None)
    elif loss_type in ("sapo", "vespo"):
        base.update(loss_mode=loss_type, clip_ratio_c=None)
    else:
        base["loss_mode"] = "gspo" if level == "sequence" else "vanilla"
        if level == "sequence" and rollout == "token":  # a per-token weight that varies within the row
            base["gspo_gradient"] = "sequence"
    return fc.LossConfig(**base), norm


def skip_inapplicable(loss_type, level, delta):
    if level == "sequence" and loss_type in TOKEN_LEVEL_ONLY:
        pytest.skip(f"TRL and Liger refuse importance_sampling_level='sequence' for {loss_type}")
    if delta is not None and loss_type in TOKEN_LEVEL_ONLY:
        pytest.skip(f"delta does not apply to {loss_type} (TRL, Liger)")


def skip_unsupported_backend(request, peer, config, backend):
    if backend != "triton":
        return
    if config.loss_mode not in triton_names(OBJECTIVE):
        unsupported(request, peer, f"{config.loss_mode}: torch only (no Triton objective kernel)")
    reason = fc.losses.triton_objective_limit(config)
    if reason is not None:
        unsupported(request, peer, reason)


def peer_is_ratio(weights, mask, rollout):
    """fused-canon's rollout IS weights as TRL passes them: [B, T] with 1 at padding (TRL's masked
    log-ratio is 0 there: vespo sums their logs over the whole row), or [B, 1] at sequence level."""
    if weights is None:
        return None
    if rollout == "sequence":
        return weights[:, :1]
    return torch.where(mask, weights, torch.ones_like(weights))


def rollout_weights(old, rollout_logp, mask, config, rollout):
    """The rollout IS weights fused-canon computes for ``config`` (None without rollout IS)."""
    return None if rollout is None else fc.rollout_is_weights(old, rollout_logp, mask, config)[0]


def assert_ours_matches(theirs, theirs_logp, logp, old, ref, adv, mask, weights, beta, config, backend, norm):
    """fused-canon's loss of the same log-probs (``policy_loss_from_logprobs``): its loss and its gradient on the
    valid tokens equal the peer's (``theirs``, backpropagated into ``theirs_logp``); returns fused-canon's output."""
    ours_logp = logp.clone().requires_grad_(True)
    out = fc.policy_loss_from_logprobs(ours_logp, mask, advantages=adv, old_logprobs=old,
                                       ref_logprobs=ref if beta else None, rollout_is_weights=weights,
                                       config=config, backend=backend, **norm)
    out.loss.backward()
    valid = mask.float()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(ours_logp.grad * valid, theirs_logp.grad * valid, rtol=1e-5, atol=1e-6)
    return out
