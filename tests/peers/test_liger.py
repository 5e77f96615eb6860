"""fused-canon against Liger-Kernel 0.8.5's GRPO loss (``LigerFusedLinearGRPOFunction.ppo_loss_fn``, the
per-chunk loss of its fused linear GRPO, which mirrors TRL 1.16's ``_compute_loss``) on random inputs:
each TRL/Liger loss_type at both importance-sampling levels, with and without the two-sided clip
``delta``, the KL term with and without ``use_bias_correction_kl``, and the vLLM IS ratio, on both
objective backends: loss, gradient w.r.t. the log-probs, and Liger's metrics (docs/algorithms.md §1.5-1.12,
docs/integrations.md's loss_type table)."""

import pytest
import torch

import fused_canon as fc
from peers import compared, require, unsupported
from peers.grpo_mapping import (B, EPS_HIGH, EPS_LOW, KL, LOSS_TYPES, T, assert_ours_matches, batch, our_config,
                                peer_is_ratio, rollout_weights, skip_inapplicable, skip_unsupported_backend)

require("liger_kernel")
from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction  # noqa: E402

PEER = "Liger-Kernel 0.8.5"
# Liger's luspo aggregates (per_token_loss * L_i).sum() / (B * per_token_loss.shape[1]): right for a [B, 1]
# token loss (sequence level, no KL, no token-level IS weight); a [B, T] one is summed over the padded
# positions too and divided by T, where TRL 1.16 masks and does not divide (compared in test_trl.py).
LIGER_LUSPO_DIFFERS = ("Liger 0.8.5's luspo with a [B, T] token loss (token level, KL or token IS weights) "
                       "sums the padded positions and divides by T, unlike TRL 1.16 (fused-canon follows TRL, "
                       "compared in test_trl.py)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rollout", [None, "token", "sequence"], ids=lambda r: f"is-{r}")
@pytest.mark.parametrize("beta, bias_kl", KL, ids=lambda x: str(x))
@pytest.mark.parametrize("delta", [None, 1.5], ids=lambda d: f"delta-{d}")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss(request, loss_type, level, delta, beta, bias_kl, rollout, backend):
    skip_inapplicable(loss_type, level, delta)
    if loss_type == "luspo" and (level == "token" or beta or rollout == "token"):
        unsupported(request, PEER, LIGER_LUSPO_DIFFERS)
    config, norm = our_config(loss_type, level, delta, beta, bias_kl, rollout)
    skip_unsupported_backend(request, PEER, config, backend)
    compared(request, PEER)
    logp, old, ref, rollout_logp, adv, mask = batch(seed=4)
    valid = mask.float()
    weights = rollout_weights(old, rollout_logp, mask, config, rollout)

    theirs_logp = logp.clone().requires_grad_(True)
    theirs, their_metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        theirs_logp, valid, adv, valid, ref_per_token_logps=ref, old_per_token_logps=old, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, beta=beta, loss_type=loss_type, max_completion_length=T,
        importance_sampling_level=level, vllm_is_ratio=peer_is_ratio(weights, mask, rollout), delta=delta,
        use_bias_correction_kl=bias_kl)
    theirs.backward()

    out = assert_ours_matches(theirs, theirs_logp, logp, old, ref, adv, mask, weights, beta, config, backend, norm)
    clip_fraction = their_metrics[-1].item()
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(clip_fraction, abs=1e-6)
    if beta and config.loss_agg_mode == "token-mean":
        assert out.metrics["actor/kl_loss"] == pytest.approx(their_metrics[0].item(), rel=1e-5, abs=1e-6)


V = 13
UNREDUCED_TYPES = ("dapo", "cispo", "sapo", "vespo")  # the per-token losses; reduce=False leaves out the aggregation


@pytest.mark.parametrize("rollout", [None, "token", "sequence"], ids=lambda r: f"is-{r}")
@pytest.mark.parametrize("beta, bias_kl", KL, ids=lambda x: str(x))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", UNREDUCED_TYPES)
def test_unreduced_loss(request, loss_type, level, beta, bias_kl, rollout):
    """reduce=False against Liger's Triton GRPO loss (``triton_grpo_loss(reduce=False)``, on logits): the
    per-token loss and the gradient of its sum w.r.t. the logits (docs/algorithms.md §1.8)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    skip_inapplicable(loss_type, level, None)
    config, _ = our_config(loss_type, level, None, beta, bias_kl, rollout)
    compared(request, PEER)
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(B, T + 1, V, generator=g)  # Liger's logits hold one position past the completion
    targets = torch.randint(0, V, (B, T), generator=g)
    _, old, ref, rollout_logp, adv, mask = batch(seed=5)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets[..., None])[..., 0]
    old, ref, rollout_logp = (x - x.detach().mean() + logp.mean() for x in (old, ref, rollout_logp))
    weights = rollout_weights(old, rollout_logp, mask, config, rollout)

    theirs_logits = logits.clone().requires_grad_(True)
    theirs = triton_grpo_loss(theirs_logits, old, ref, targets, adv, completion_mask=mask.int(), temperature=1.0,
                              beta=beta, eps_low=EPS_LOW, eps_high=EPS_HIGH, inplace=False, loss_type=loss_type,
                              importance_sampling_level=level, reduce=False,
                              vllm_is_ratio=peer_is_ratio(weights, mask, rollout), use_bias_correction_kl=bias_kl)[0]
    theirs.sum().backward()

    ours_logits = logits[:, :-1].clone().requires_grad_(True)
    out = fc.policy_loss(ours_logits, targets, mask, advantages=adv, old_logprobs=old,
                         ref_logprobs=ref if beta else None, rollout_is_weights=weights, config=config,
                         backend="torch", reduce=False)
    out.loss.sum().backward()
    torch.testing.assert_close(out.loss, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_logits.grad, theirs_logits.grad[:, :-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_reference_model_in_the_fused_lm_head(request, loss_type, backend):
    """linear_policy_loss(ref_hidden=, ref_weight=, ref_bias=) against Liger's chunked fused-linear GRPO with a
    reference model (ref_input, ref_weight, ref_bias): loss, gradients w.r.t. the hidden states and the LM head,
    the KL metric (docs/algorithms.md §1.10)."""
    compared(request, PEER)
    hidden_size, vocab = 8, 17
    g = torch.Generator().manual_seed(13)
    hidden, ref_hidden = torch.randn(B, T, hidden_size, generator=g), torch.randn(B, T, hidden_size, generator=g)
    weight, ref_weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5 for _ in range(2))
    bias, ref_bias = (torch.randn(vocab, generator=g) * 0.1 for _ in range(2))
    targets = torch.randint(0, vocab, (B, T), generator=g)
    _, old, _, _, adv, mask = batch(seed=6)
    config, norm = our_config(loss_type, "token", None, 0.04, False, None)

    theirs_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    theirs, their_metrics = LigerFusedLinearGRPOFunction.apply(
        theirs_leaves[0], theirs_leaves[1], targets, mask.float(), adv, theirs_leaves[2], None, old, ref_hidden,
        ref_weight, ref_bias, 0.04, EPS_LOW, EPS_HIGH, loss_type, T, "token", 1.0, 1.05, 1.0, False, True, B)
    theirs.backward()

    ours_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = fc.linear_policy_loss(ours_leaves[0], ours_leaves[1], targets, mask, bias=ours_leaves[2], advantages=adv,
                                old_logprobs=old, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                config=config, backend=backend, **norm)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    for ours, reference in zip(ours_leaves, theirs_leaves):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-5)
    if config.loss_agg_mode == "token-mean":
        assert out.metrics["actor/kl_loss"] == pytest.approx(their_metrics[0].item(), rel=1e-5, abs=1e-6)
