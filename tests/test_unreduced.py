"""reduce=False (docs/algorithms.md §1.8): LossOutput.loss is the per-token loss [B, T], 0 at padding, whose
aggregation with loss_agg_mode's row weights is the reduced loss, with the same gradient, on the three entry
points; the objective runs in torch; configurations with no such per-token loss are refused."""

import itertools

import pytest
import torch

import fused_canon as fc
from fused_canon import backends
from fused_canon.config import LOSS_AGG_MODES
from fused_canon.losses import Normalizers, aggregation_weights

B, T, V, H = 4, 5, 11, 6
LENGTHS = torch.tensor([5, 2, 4, 1])


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < LENGTHS[:, None]
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] + 0.3 * torch.randn(B, T, generator=g,
                                                                                                   dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return logits, targets, mask, torch.randn(B, generator=g, dtype=torch.float64), old, ref, weights


def aggregate(per_token, mask, config):
    """The reduced loss from the per-token loss: sum_i w_i sum_t u[i, t]."""
    weights = aggregation_weights(mask.to(per_token.dtype).sum(-1), config.loss_agg_mode,
                                  Normalizers(loss_scale_factor=config.loss_scale_factor), T)
    return (per_token.sum(-1) * weights).sum()


@pytest.mark.parametrize("loss_mode, agg_mode", list(itertools.product(sorted(fc.POLICY_LOSSES), LOSS_AGG_MODES)))
def test_per_token_loss_aggregates_to_the_loss(loss_mode, agg_mode):
    if loss_mode == "geo_mean" and agg_mode != "seq-mean-token-mean":
        pytest.skip("geo_mean accepts only seq-mean-token-mean (docs/algorithms.md §9.16)")
    logits, targets, mask, adv, old, ref, weights = inputs()
    config = fc.LossConfig(loss_mode=loss_mode, loss_agg_mode=agg_mode, dro_beta=0.3, kl_coef=0.1,
                           entropy_coeff=0.01, clip_ratio_high=0.28)
    kwargs = dict(advantages=adv, old_logprobs=old, ref_logprobs=ref, rollout_is_weights=weights, config=config,
                  backend="torch")
    reduced_logits = logits.clone().requires_grad_(True)
    reduced = fc.policy_loss(reduced_logits, targets, mask, **kwargs)
    reduced.loss.backward()
    per_token_logits = logits.clone().requires_grad_(True)
    out = fc.policy_loss(per_token_logits, targets, mask, reduce=False, **kwargs)
    assert out.loss.shape == (B, T)
    assert bool((out.loss[~mask] == 0).all())
    total = aggregate(out.loss, mask, config)
    total.backward()
    torch.testing.assert_close(total, reduced.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_token_logits.grad, reduced_logits.grad, rtol=1e-10, atol=1e-12)
    assert out.metrics == reduced.metrics


def test_every_entry_point_returns_the_same_per_token_loss():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    _, targets, mask, adv, old, ref, _ = inputs()
    config = fc.LossConfig(kl_coef=0.05)
    kwargs = dict(advantages=adv, old_logprobs=old, ref_logprobs=ref, config=config, backend="torch", reduce=False)
    from_hidden = fc.linear_policy_loss(hidden, weight, targets, mask, **kwargs).loss
    from_logits = fc.policy_loss(hidden @ weight.T, targets, mask, **kwargs).loss
    logp, entropy = fc.token_stats(hidden @ weight.T, targets)
    from_logprobs = fc.policy_loss_from_logprobs(logp, mask, entropy=entropy, **kwargs).loss
    torch.testing.assert_close(from_hidden, from_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_logprobs, from_logits, rtol=1e-12, atol=1e-12)


def test_objective_runs_in_torch(monkeypatch):
    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))
    logits, targets, mask, adv, old, _, _ = inputs()
    logits = logits.float().requires_grad_(True)
    out = fc.policy_loss(logits, targets, mask, advantages=adv.float(), old_logprobs=old.float(), reduce=False)
    assert out.backends["objective"] == ("torch (auto: reduce=False is torch only (the kernel sums the token "
                                         "losses as it computes them))")
    assert out.backends["token_stats"].startswith("triton")
    out.loss.sum().backward()  # the Triton statistics backward takes a per-token dL/dlogp
    reference = logits.detach().clone().requires_grad_(True)
    fc.policy_loss(reference, targets, mask, advantages=adv.float(), old_logprobs=old.float(), backend="torch",
                   reduce=False).loss.sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run objective: reduce=False is torch only"):
        fc.policy_loss_from_logprobs(out.logprobs, mask, advantages=adv.float(), backend="triton", reduce=False)


@pytest.mark.parametrize("config, message", [
    (fc.LossConfig(entropy_coeff=0.01, entropy_agg_mode="seq-mean-token-mean"),
     "reduce=False with entropy_coeff=0.01 needs entropy_agg_mode None or loss_agg_mode='token-mean', got "
     "'seq-mean-token-mean'"),
    (fc.LossConfig(entropy_coeff=0.01, top_entropy_quantile=0.5),
     "reduce=False with entropy_coeff=0.01 and top_entropy_quantile=0.5"),
])
def test_refused_where_no_per_token_loss_aggregates_to_the_loss(config, message):
    logits, targets, mask, adv, _, _, _ = inputs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fc.policy_loss(logits, targets, mask, advantages=adv, config=config, reduce=False)


def test_reduce_must_be_a_bool():
    logits, targets, mask, adv, _, _, _ = inputs()
    with pytest.raises(ValueError, match="reduce"):
        fc.policy_loss(logits, targets, mask, advantages=adv, reduce="no")
