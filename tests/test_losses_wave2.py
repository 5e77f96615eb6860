"""sapo, geo_mean and gpg beyond their golden cases: aggregation, metrics, gradients, refusals."""

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES

F64 = torch.float64
METRICS = {"actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy"}


def batch(seed=0, lengths=(3, 1, 4), vocab=6, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    logits = torch.randn(len(lengths), width, vocab, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    advantages = torch.tensor([1.0, -0.5, 0.0], dtype=dtype)[: len(lengths)]
    old = -torch.rand(len(lengths), width, generator=g, dtype=dtype) - 1.0
    return logits, targets, mask, advantages, old


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_sapo_honours_loss_agg_mode(mode):
    """On-policy the gate is sigmoid(0) 4 / tau = 2 / tau: the loss is agg(-2 A / tau) in the chosen mode."""
    logits, targets, mask, advantages, _ = batch()
    config = fc.LossConfig(loss_mode="sapo", loss_agg_mode=mode, sapo_tau_pos=1.0, sapo_tau_neg=2.0)
    out = fc.policy_loss(logits, targets, mask, advantages=advantages, config=config, backend="torch")
    tau = torch.where(advantages > 0, 1.0, 2.0).to(F64)
    token_loss = (-2.0 * advantages / tau)[:, None].expand(mask.shape)
    torch.testing.assert_close(out.loss.detach(), fc.agg_loss(token_loss, mask.to(F64), mode), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", [m for m in LOSS_AGG_MODES if m != "seq-mean-token-mean"])
def test_geo_mean_refuses_token_level_modes(mode):
    logits, targets, mask, advantages, old = batch()
    with pytest.raises(ValueError, match=f"geo_mean.*sequence-level.*seq-mean-token-mean.*got '{mode}'"):
        fc.policy_loss(logits, targets, mask, advantages=advantages, old_logprobs=old, backend="torch",
                       config=fc.LossConfig(loss_mode="geo_mean", loss_agg_mode=mode))


def test_geo_mean_is_a_mean_over_non_empty_sequences():
    """An empty row adds nothing and does not count (global_num_seqs semantics; verl divides by B)."""
    logits, targets, mask, advantages, old = batch(lengths=(3, 2, 4))
    config = fc.LossConfig(loss_mode="geo_mean", loss_agg_mode="seq-mean-token-mean")
    full = fc.policy_loss(logits, targets, mask, advantages=advantages, old_logprobs=old, config=config,
                          backend="torch")
    with_empty = mask.clone()
    with_empty[2] = False
    partial = fc.policy_loss(logits, targets, with_empty, advantages=advantages, old_logprobs=old, config=config,
                             backend="torch")
    first_two = fc.policy_loss(logits[:2], targets[:2], mask[:2], advantages=advantages[:2], old_logprobs=old[:2],
                               config=config, backend="torch")
    torch.testing.assert_close(partial.loss, first_two.loss, rtol=1e-12, atol=0)
    assert not torch.isclose(full.loss, partial.loss)


@pytest.mark.parametrize("loss_mode, agg_mode", [("sapo", "token-mean"), ("gpg", "seq-mean-token-sum"),
                                                 ("geo_mean", "seq-mean-token-mean")])
def test_gradcheck_and_metrics(loss_mode, agg_mode):
    logits, targets, mask, advantages, old = batch()
    config = fc.LossConfig(loss_mode=loss_mode, loss_agg_mode=agg_mode, temperature=0.8)

    def loss(x):
        return fc.policy_loss(x, targets, mask, advantages=advantages, old_logprobs=old, config=config,
                              backend="torch").loss

    assert torch.autograd.gradcheck(loss, (logits,))
    out = fc.policy_loss(logits, targets, mask, advantages=advantages, old_logprobs=old, config=config, backend="torch")
    assert METRICS <= set(out.metrics)
    out.loss.backward()
    assert torch.equal(logits.grad[~mask], torch.zeros_like(logits.grad[~mask]))  # padded rows: zero gradient


def test_sapo_config_validation():
    with pytest.raises(ValueError, match="sapo_tau_neg must be > 0, got 0.0"):
        fc.LossConfig(sapo_tau_neg=0.0)
