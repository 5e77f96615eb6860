"""fc.policy_loss_from_logprobs: the one objective path, entered with log-probs the caller computed itself.

The caller here computes log-probs and entropy with a plain torch log_softmax (as TRL and verl do);
the loss, the gradient that reaches the logits through them, the metrics and the advantages must equal
fc.policy_loss on the same logits.
"""

import itertools
import re

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES
from helpers import make_batch, relative_error

F64 = torch.float64
CONFIG = dict(clip_ratio_high=0.28, entropy_coeff=0.01, kl_coef=0.05, temperature=0.8, clip_cov_ratio=0.2,
              clip_cov_lb=-1.0, kl_cov_ratio=0.2, advantage=fc.AdvantageConfig(estimator="canon", canon_lambda=0.7))


def own_logprobs(logits, targets, temperature):
    """Log-prob of the targets and entropy by torch autograd: what a framework computes itself."""
    log_p = torch.log_softmax(logits / temperature, -1)
    return log_p.gather(-1, targets[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def both_entry_points(batch, config, backend="torch", **extra):
    kwargs = dict(rewards=batch["rewards"], group_ids=batch["group_ids"], old_logprobs=batch["old_logprobs"],
                  ref_logprobs=batch["ref_logprobs"], config=config, step=2, backend=backend, **extra)
    logits = batch["logits"].clone().requires_grad_()
    reference = fc.policy_loss(logits, batch["targets"], batch["mask"], **kwargs)
    reference.loss.backward()
    x = batch["logits"].clone().requires_grad_()
    logp, entropy = own_logprobs(x, batch["targets"], config.temperature)
    out = fc.policy_loss_from_logprobs(logp, batch["mask"], entropy=entropy, **kwargs)
    out.loss.backward()
    return (reference, logits.grad), (out, x.grad)


@pytest.mark.parametrize("loss_mode, agg_mode", list(itertools.product(sorted(fc.POLICY_LOSSES), LOSS_AGG_MODES)))
def test_equals_policy_loss_fp64(loss_mode, agg_mode):
    batch = make_batch(6, 5, 11, dtype=F64, seed=1)
    # dro needs its penalty coefficient (the other losses ignore it)
    config = fc.LossConfig(loss_mode=loss_mode, loss_agg_mode=agg_mode, dro_beta=0.3, **CONFIG)
    try:
        reference = fc.policy_loss(batch["logits"], batch["targets"], batch["mask"], advantages=torch.ones(6),
                                   config=config, backend="torch")
    except ValueError as refused:  # a loss that refuses this aggregation (geo_mean) refuses it here too
        logp, entropy = own_logprobs(batch["logits"], batch["targets"], config.temperature)
        with pytest.raises(ValueError, match=f"^{re.escape(str(refused))}$"):
            fc.policy_loss_from_logprobs(logp, batch["mask"], entropy=entropy, advantages=torch.ones(6),
                                         config=config, backend="torch")
        return
    (reference, reference_grad), (out, grad) = both_entry_points(batch, config)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-13)
    assert grad.abs().max() > 0
    assert out.metrics.keys() == reference.metrics.keys()
    assert out.metrics == pytest.approx(reference.metrics, rel=1e-10, abs=1e-13)
    torch.testing.assert_close(out.advantages, reference.advantages, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.logprobs, reference.logprobs, rtol=1e-12, atol=1e-14)  # 0 at padded positions
    torch.testing.assert_close(out.entropy, reference.entropy, rtol=1e-12, atol=1e-14)
    assert out.backends == {"advantages": "torch (requested)", "objective": "torch (requested)"}


TRITON_LOSSES = ["vanilla", "clip_cov", "kl_cov", "gspo", "cispo", "sapo"]


@pytest.mark.parametrize("loss_mode, options", [(mode, {}) for mode in TRITON_LOSSES]
                         + [(mode, {"kl_bias_correction": True}) for mode in TRITON_LOSSES if mode != "gspo"]
                         + [("vanilla", {"kl_bias_correction": True, "kl_type": "k2+"})])
def test_triton_objective_equals_torch(loss_mode, options):
    """fp32 log-probs through the Triton estimator and objective against the torch ones (relative 1e-4)."""
    batch = make_batch(6, 5, 11, seed=2)
    config = fc.LossConfig(loss_mode=loss_mode, **CONFIG, **options)
    results = {}
    for backend in ("torch", "triton"):
        x = batch["logits"].clone().requires_grad_()
        logp, entropy = own_logprobs(x, batch["targets"], config.temperature)
        out = fc.policy_loss_from_logprobs(logp, batch["mask"], entropy=entropy, rewards=batch["rewards"],
                                           group_ids=batch["group_ids"], old_logprobs=batch["old_logprobs"],
                                           ref_logprobs=batch["ref_logprobs"], config=config, backend=backend)
        out.loss.backward()
        results[backend] = (out, x.grad)
    (reference, reference_grad), (out, grad) = results["torch"], results["triton"]
    assert out.backends == {"advantages": "triton (requested)", "objective": "triton (requested)"}
    assert relative_error(out.loss, reference.loss, scale_floor=1e-2) <= 1e-4
    assert relative_error(grad, reference_grad) <= 1e-4
    for name, value in reference.metrics.items():
        assert relative_error(out.metrics[name], value, scale_floor=1e-2) <= 1e-4, name


def test_gradients_reach_the_callers_tensors():
    batch = make_batch(6, 5, 11, dtype=F64, seed=3)
    logp, entropy = own_logprobs(batch["logits"], batch["targets"], 1.0)
    for entropy_coeff in (0.0, 0.1):
        lp, ent = logp.detach().clone().requires_grad_(), entropy.detach().clone().requires_grad_()
        out = fc.policy_loss_from_logprobs(lp, batch["mask"], entropy=ent, advantages=torch.linspace(-1, 1, 6),
                                           config=fc.LossConfig(entropy_coeff=entropy_coeff), backend="torch")
        out.loss.backward()
        assert lp.grad is not None and lp.grad[batch["mask"]].abs().min() > 0 and (lp.grad[~batch["mask"]] == 0).all()
        assert (ent.grad is None) == (entropy_coeff == 0)  # as the reference: no entropy gradient without the bonus
        if entropy_coeff:
            assert (ent.grad[~batch["mask"]] == 0).all() and ent.grad[batch["mask"]].abs().min() > 0


def test_padded_positions_may_hold_anything():
    batch = make_batch(6, 5, 11, dtype=F64, seed=4)
    logp, entropy = own_logprobs(batch["logits"], batch["targets"], 1.0)
    kwargs = dict(rewards=batch["rewards"], group_ids=batch["group_ids"], backend="torch",
                  config=fc.LossConfig(entropy_coeff=0.1))
    clean = fc.policy_loss_from_logprobs(logp, batch["mask"], entropy=entropy, **kwargs)
    garbage = torch.full_like(logp, float("nan"))
    lp = torch.where(batch["mask"], logp, garbage).requires_grad_()
    dirty = fc.policy_loss_from_logprobs(lp, batch["mask"], entropy=torch.where(batch["mask"], entropy, garbage),
                                         **kwargs)
    dirty.loss.backward()
    assert torch.equal(dirty.loss, clean.loss) and dirty.metrics == clean.metrics
    assert torch.isfinite(lp.grad).all() and (lp.grad[~batch["mask"]] == 0).all()
    assert (dirty.logprobs[~batch["mask"]] == 0).all() and (dirty.entropy[~batch["mask"]] == 0).all()


def test_without_entropy():
    batch = make_batch(6, 5, 11, dtype=F64, seed=5)
    logp, entropy = own_logprobs(batch["logits"], batch["targets"], 1.0)
    rewards, group_ids, mask = batch["rewards"], batch["group_ids"], batch["mask"]
    canon = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="canon"))
    with pytest.raises(ValueError, match="entropy_coeff=0.01 needs the per-token `entropy`"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=torch.ones(6), config=fc.LossConfig(entropy_coeff=0.01))
    with pytest.raises(ValueError, match="canon_metric='entropy' needs the per-token `entropy`, or the per-response "
                                         "`metric`"):
        fc.policy_loss_from_logprobs(logp, mask, rewards=rewards, group_ids=group_ids, config=canon)
    metric = (entropy * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    without = fc.policy_loss_from_logprobs(logp, mask, rewards=rewards, group_ids=group_ids, metric=metric,
                                           config=canon, backend="torch")
    with_entropy = fc.policy_loss_from_logprobs(logp, mask, entropy=entropy, rewards=rewards, group_ids=group_ids,
                                                config=canon, backend="torch")
    assert without.entropy is None and "actor/entropy" not in without.metrics
    torch.testing.assert_close(without.advantages, with_entropy.advantages)
    torch.testing.assert_close(without.loss, with_entropy.loss)
    assert without.metrics == {k: v for k, v in with_entropy.metrics.items() if k != "actor/entropy"}


def test_same_errors_as_policy_loss():
    batch = make_batch(6, 5, 11, dtype=F64, seed=6)
    logp, entropy = own_logprobs(batch["logits"], batch["targets"], 1.0)
    mask = batch["mask"]
    with pytest.raises(ValueError, match=r"logprobs must be \[B, T\]"):
        fc.policy_loss_from_logprobs(logp[0], mask, advantages=torch.ones(6))
    with pytest.raises(TypeError, match="logprobs must be a floating tensor"):
        fc.policy_loss_from_logprobs(batch["targets"], mask, advantages=torch.ones(6))
    with pytest.raises(ValueError, match="mask shape"):
        fc.policy_loss_from_logprobs(logp, mask[:, :2], advantages=torch.ones(6))
    with pytest.raises(ValueError, match="entropy shape"):
        fc.policy_loss_from_logprobs(logp, mask, entropy=entropy[:, :2], advantages=torch.ones(6))
    bad = logp.detach().clone()
    bad[tuple(mask.nonzero()[0].tolist())] = float("nan")  # one valid position
    with pytest.raises(ValueError, match="logprobs contains NaN or inf at valid"):
        fc.policy_loss_from_logprobs(bad, mask, advantages=torch.ones(6))
    with pytest.raises(ValueError, match="needs `advantages`"):
        fc.policy_loss_from_logprobs(logp, mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=torch.ones(6), config=fc.LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="unknown loss_mode 'sapo_typo'"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=torch.ones(6), config=fc.LossConfig(loss_mode="sapo_typo"))
    with pytest.raises(ValueError, match="global_num_tokens must be > 0"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=torch.ones(6), global_num_tokens=0)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fc.policy_loss_from_logprobs(logp, mask, advantages=torch.ones(6), backend="cuda")
    with pytest.raises(ValueError, match="cannot run objective: bf16 log-probs: the Triton kernel takes fp32"):
        fc.policy_loss_from_logprobs(logp.bfloat16(), mask, advantages=torch.ones(6), backend="triton")
