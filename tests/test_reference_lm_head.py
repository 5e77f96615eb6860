"""The reference model inside the fused LM-head loss: ``linear_policy_loss(ref_hidden=, ref_weight=, ref_bias=)``
computes the reference log-probs with a forward-only pass of the LM-head statistics, and gives the loss,
gradients and metrics of passing those log-probs as ``ref_logprobs`` (the unfused path), on both statistics
backends, with no gradient into the reference model."""

import pytest
import torch

import fused_canon as fc

B, T, V, H, H_REF = 3, 4, 19, 8, 6


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    ref_hidden = torch.randn(B, T, H_REF, generator=g, dtype=dtype)
    ref_weight = torch.randn(V, H_REF, generator=g, dtype=dtype) * 0.5
    ref_bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([4, 2, 3])[:, None]
    return hidden, weight, ref_hidden, ref_weight, ref_bias, targets, mask, torch.randn(B, generator=g, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_unfused_reference(backend, with_bias):
    hidden, weight, ref_hidden, ref_weight, ref_bias, targets, mask, adv = inputs()
    ref_bias = ref_bias if with_bias else None
    config = fc.LossConfig(kl_coef=0.1, temperature=0.8)
    ref_logits = ref_hidden @ ref_weight.T + (0 if ref_bias is None else ref_bias)
    ref_logp, _ = fc.token_stats(ref_logits, targets, temperature=config.temperature, backend="torch")

    def run(**ref):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight)]
        out = fc.linear_policy_loss(*leaves, targets, mask, advantages=adv, config=config, backend=backend, **ref)
        out.loss.backward()
        return out, [x.grad for x in leaves]

    fused, fused_grads = run(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    unfused, unfused_grads = run(ref_logprobs=ref_logp)
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert fused.metrics["actor/kl_loss"] == pytest.approx(unfused.metrics["actor/kl_loss"], rel=1e-5, abs=1e-7)
    assert fused.metrics["actor/kl_loss"] > 0
    assert fused.backends["ref_linear_token_stats"] == f"{backend} (requested)"


def test_no_gradient_into_the_reference_model():
    hidden, weight, ref_hidden, ref_weight, ref_bias, targets, mask, adv = inputs()
    ref = [x.clone().requires_grad_(True) for x in (ref_hidden, ref_weight, ref_bias)]
    out = fc.linear_policy_loss(hidden.requires_grad_(True), weight, targets, mask, advantages=adv,
                                config=fc.LossConfig(kl_coef=0.1), ref_hidden=ref[0], ref_weight=ref[1],
                                ref_bias=ref[2])
    out.loss.backward()
    assert hidden.grad is not None and all(x.grad is None for x in ref)


@pytest.mark.parametrize("change, message", [
    (dict(ref_logprobs=torch.zeros(B, T)), r"pass either `ref_logprobs` or `ref_hidden` \+ `ref_weight`"),
    (dict(ref_hidden=None), "the reference model's LM head needs both `ref_hidden`"),
    (dict(ref_weight=torch.zeros(V + 1, H_REF)), rf"ref_weight must be \[V={V}, H={H_REF}\], got \({V + 1}, {H_REF}\)"),
    (dict(ref_hidden=torch.zeros(B, T + 1, H_REF)), r"ref_hidden must be \[B, T, H\] with \[B, T\] = \(3, 4\)"),
    (dict(ref_bias=torch.zeros(V - 1)), rf"ref_bias must be \[V={V}\]"),
])
def test_bad_reference_inputs(change, message):
    hidden, weight, ref_hidden, ref_weight, ref_bias, targets, mask, adv = inputs()
    ref = {**dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias), **change}
    with pytest.raises((ValueError, TypeError), match=message):
        fc.linear_policy_loss(hidden, weight, targets, mask, advantages=adv, config=fc.LossConfig(kl_coef=0.1), **ref)


def test_nonfinite_reference_logits_name_the_reference():
    hidden, weight, ref_hidden, ref_weight, ref_bias, targets, mask, adv = inputs()
    ref_hidden = ref_hidden.clone()
    ref_hidden[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"reference logits \(ref_hidden @ ref_weight.T \+ ref_bias\) are not finite"
                                         r".*first at \(batch, position\) = \(1, 1\)"):
        fc.linear_policy_loss(hidden, weight, targets, mask, advantages=adv, config=fc.LossConfig(kl_coef=0.1),
                              ref_hidden=ref_hidden, ref_weight=ref_weight)
