"""The critic of PPO with GAE (Open-Reasoner-Zero's setting): a value model, its loss and its optimizer.

The learner owns one when the estimator reads ``values`` (``config.estimator_reads``) and uses it at
two points of a step:

1. the advantage step: ``values(batch)`` [N, R], the value of the state before each response token,
   from a no-grad pass; ``fc.compute_advantages(..., values=, with_returns=True)`` turns them into the
   advantages and the returns (the value targets);
2. the update, inside the actor's epochs x mini-batches x micro-batches: ``loss`` per micro-batch
   (normalised by the mini-batch's counts, as the actor's loss is), then ``step`` once per mini-batch.

The value loss is verl 0.9.1's (``compute_value_loss``): the new value may move at most
``critic.cliprange_value`` from the rollout's value; the loss is the larger of the clipped and the
unclipped squared errors, halved, aggregated with the actor's ``loss_agg_mode`` (docs/algorithms.md §1.4).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

import fused_canon as fc
from fused_canon.losses import Normalizers

from . import checkpoint
from .config import TrainConfig
from .model import build_optimizer, build_value_model, clipped_optimizer_step, model_inputs

Batch = Dict[str, torch.Tensor]


def clipped_value_loss(vpreds: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float, loss_agg_mode: str, norm: Normalizers = Normalizers()
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the value loss, the fraction of valid tokens where the clipped error is the larger one), all [N, R]
    inputs; mask 0/1. The clip keeps one update from moving a value far from the one the advantages used."""
    clipped = old_values + (vpreds - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (vpreds - returns).square(), (clipped - returns).square()
    loss = 0.5 * fc.agg_loss(torch.maximum(unclipped_error, clipped_error), mask, loss_agg_mode, norm)
    clipfrac = ((clipped_error > unclipped_error).float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, clipfrac


class Critic:
    def __init__(self, cfg: TrainConfig, tokenizer, device: torch.device):
        self.cfg = cfg.critic
        self.loss_agg_mode, self.loss_scale_factor = cfg.algorithm.loss_agg_mode, cfg.algorithm.loss_scale_factor
        self.model = build_value_model(cfg.model, tokenizer, cfg.trainer.seed).to(device).train()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.critic)

    def _values(self, batch: Batch, rows: slice) -> torch.Tensor:
        inputs, response_len = model_inputs(batch, rows)
        return self.model(**inputs)[:, -response_len - 1:-1]  # the positions that predict the response

    @torch.no_grad()
    def values(self, batch: Batch, micro_rows: int) -> torch.Tensor:
        """The values [N, R] of the batch's responses (0 at padding), one pass per micro-batch."""
        self.model.eval()
        num_rows = batch["response_ids"].shape[0]
        values = torch.cat([self._values(batch, slice(i, min(i + micro_rows, num_rows)))
                            for i in range(0, num_rows, micro_rows)])
        self.model.train()
        return values * batch["response_mask"]

    def loss(self, batch: Batch, rows: slice, global_num_tokens: int, global_num_seqs: int
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The micro-batch's share of the mini-batch's value loss, and its metrics (verl's names)."""
        mask = batch["response_mask"][rows].float()
        vpreds = self._values(batch, rows)
        norm = Normalizers(global_num_tokens, global_num_seqs, self.loss_scale_factor)
        loss, clipfrac = clipped_value_loss(vpreds, batch["values"][rows], batch["returns"][rows], mask,
                                            self.cfg.cliprange_value, self.loss_agg_mode, norm)
        vpred_mean = (vpreds.detach() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"critic/vf_loss": float(loss.detach()), "critic/vf_clipfrac": float(clipfrac),
                      "critic/vpred_mean": float(vpred_mean)}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """One optimizer step on the accumulated gradient; returns its norm."""
        return clipped_optimizer_step(self.model, self.optimizer, self.cfg.grad_clip)

    @staticmethod
    def batch_metrics(batch: Batch) -> Dict[str, float]:
        """Over the whole batch's valid tokens: the values the advantages used, the returns, and how much
        of the returns' variance the values explain (verl's critic/vf_explained_var)."""
        mask = batch["response_mask"]
        values, returns = batch["values"][mask], batch["returns"][mask]
        explained = 1.0 - torch.var(returns - values) / (torch.var(returns) + 1e-5)
        return {"critic/values/mean": float(values.mean()), "critic/values/max": float(values.max()),
                "critic/values/min": float(values.min()), "critic/returns/mean": float(returns.mean()),
                "critic/returns/max": float(returns.max()), "critic/returns/min": float(returns.min()),
                "critic/vf_explained_var": float(explained)}

    def save(self, directory: str) -> None:
        checkpoint.save_tensors(self.model.state_dict(), directory, "critic_model.pt")
        checkpoint.save_tensors(self.optimizer.state_dict(), directory, "critic_optimizer.pt")

    def load(self, directory: str, device: torch.device) -> None:
        self.model.load_state_dict(checkpoint.load_tensors(directory, "critic_model.pt", device))
        self.optimizer.load_state_dict(checkpoint.load_tensors(directory, "critic_optimizer.pt", device))
