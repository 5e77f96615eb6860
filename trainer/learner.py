"""The learner: policy model + optimizer, updated with the fused policy-gradient loss.

One ``update`` consumes one rollout batch. In the simplest case (one epoch, the whole batch in
one micro-batch, no KL) it is a single ``fc.policy_loss(..., rewards=, group_ids=)`` call that
computes the advantages, the loss and its gradient in one fused pass. Otherwise:
  1. a no-grad pass over the batch gives the old log-probs (the policy that sampled, up to
     engine numerics), the token entropy (CANON's metric) and, with a KL loss, the frozen
     reference model's log-probs;
  2. advantages for the whole batch (``fc.compute_advantages``), so that splitting the batch
     into micro-batches never splits a group;
  3. ppo_epochs x mini-batches (one optimizer step each) x micro-batches (gradient accumulation).
     Every micro-batch loss is normalised by the *mini-batch's* token and sequence counts
     (global_num_tokens / global_num_seqs), so the accumulated gradient is exactly the gradient
     of the mini-batch loss, whatever the micro-batch size.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Tuple

import torch

import fused_canon as fc

from .config import TrainConfig
from .model import build_model, resolve_device
from .tasks import import_plugins


# Loss terms fc aggregates with the global normalizers: the micro-batch values add up to the
# mini-batch's value. The other metrics (clip fractions, ppo_kl) are means over one micro-batch.
GLOBALLY_NORMALIZED = ("actor/pg_loss", "actor/entropy", "actor/kl_loss")


class _MetricAverages:
    """Weighted running means of metrics over micro-batches, mini-batches and epochs."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.weights: Dict[str, float] = {}

    def add(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def means(self) -> Dict[str, float]:
        return {key: self.sums[key] / self.weights[key] for key in self.sums if self.weights[key] > 0}


class Learner:
    def __init__(self, cfg: TrainConfig, tokenizer):
        import_plugins(cfg.trainer.plugins)  # also runs inside a Ray actor: registries are per process
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        self.cfg = cfg
        self.loss_config: fc.LossConfig = cfg.algorithm
        self.device = resolve_device(cfg.trainer.device)
        self.model = build_model(cfg.model, tokenizer, cfg.trainer.seed).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.actor.lr, betas=tuple(cfg.actor.betas),
                                           weight_decay=cfg.actor.weight_decay)
        # The KL loss pulls the policy towards its starting point, so keep a frozen copy of it.
        self.ref_model = None
        if self.loss_config.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ forward passes

    def _response_tensors(self, model, batch: Dict[str, torch.Tensor], rows: slice, hidden: bool) -> torch.Tensor:
        """Logits (or last hidden states) at the positions that predict the response tokens."""
        prompt_ids, response_ids = batch["prompt_ids"][rows], batch["response_ids"][rows]
        attention_mask = torch.cat([batch["prompt_mask"][rows], batch["response_mask"][rows]], dim=1).long()
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        # Prompts are left-padded: count positions from each row's first real token, as generate() does.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        response_len = response_ids.shape[1]
        if hidden:
            states = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids).last_hidden_state
            return states[:, -response_len - 1:-1]
        # Position t predicts token t+1: the last response_len+1 positions hold the ones we need.
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=response_len + 1).logits
        return logits[:, :-1]

    @torch.no_grad()
    def token_stats(self, model, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-prob and entropy [N, R] of the batch's responses under ``model``."""
        logprobs, entropy = [], []
        for rows in self._row_slices(0, batch["response_ids"].shape[0], self._micro_rows(batch)):
            logits = self._response_tensors(model, batch, rows, hidden=False)
            lp, ent = fc.token_stats(logits, batch["response_ids"][rows], temperature=self.loss_config.temperature)
            logprobs.append(lp)
            entropy.append(ent)
        return torch.cat(logprobs), torch.cat(entropy)

    # ------------------------------------------------------------------ the update

    def update(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mask = batch["response_mask"]
        num_rows = mask.shape[0]
        mini_rows = self._mini_rows(num_rows)
        micro_rows = self._micro_rows(batch)
        # One update on the whole batch in one piece: a single fused call computes the advantages
        # from the rewards (CANON's entropy from this very pass), the loss and its gradient.
        single_fused_call = (self.cfg.actor.ppo_epochs == 1 and mini_rows == micro_rows == num_rows
                             and self.ref_model is None)
        advantages = old_logprobs = ref_logprobs = None
        if not single_fused_call:
            self.model.eval()  # no dropout in the statistics pass
            old_logprobs, entropy = self.token_stats(self.model, batch)
            if self.ref_model is not None:
                ref_logprobs = self.token_stats(self.ref_model, batch)[0]
            advantages = fc.compute_advantages(batch["rewards"], batch["group_ids"],
                                               config=self.loss_config.advantage, mask=mask,
                                               token_entropy=entropy, step=step)
            self.model.train()

        averages = _MetricAverages()
        grad_norms: List[float] = []
        for _epoch in range(self.cfg.actor.ppo_epochs):
            for mini in self._row_slices(0, num_rows, mini_rows):
                # One sync for both counts; sequences = rows with a valid token, as agg_loss counts.
                global_num_tokens, global_num_seqs = torch.stack([mask[mini].sum(), mask[mini].any(-1).sum()]).tolist()
                self.optimizer.zero_grad(set_to_none=True)
                mini_batch_terms: Dict[str, float] = {}
                for rows in self._row_slices(mini.start, mini.stop, micro_rows):
                    out = self._loss(batch, rows, advantages, old_logprobs, ref_logprobs, step,
                                     global_num_tokens, global_num_seqs)
                    out.loss.backward()
                    if single_fused_call:  # what the call computed, for the metrics below
                        advantages, old_logprobs = out.advantages, out.logprobs
                    tokens = float(mask[rows].sum())  # the weight of this micro-batch's token means
                    for key, value in out.metrics.items():
                        if key.startswith("critic/"):  # reported once below (advantages) and by the trainer (score)
                            continue
                        if key in GLOBALLY_NORMALIZED:  # a micro-batch's share of the mini-batch value
                            mini_batch_terms[key] = mini_batch_terms.get(key, 0.0) + value
                        else:  # a mean over this micro-batch's tokens
                            averages.add(key, value, weight=tokens)
                for key, value in mini_batch_terms.items():
                    averages.add(key, value, weight=1.0)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.actor.grad_clip)
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                else:  # a non-finite gradient would poison Adam's moments: skip this step
                    self.optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float(grad_norm))

        metrics = averages.means()
        # Over the whole batch's [B] advantages, not averaged over micro-batches.
        metrics.update({"critic/advantages/mean": float(advantages.mean()),
                        "critic/advantages/max": float(advantages.max()),
                        "critic/advantages/min": float(advantages.min())})
        metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        if "rollout_logprobs" in batch:  # how far the engine's sampling distribution is from the learner's
            gap = (batch["rollout_logprobs"] - old_logprobs).abs()
            metrics["rollout/logprob_abs_diff_mean"] = float((gap * mask).sum() / mask.sum().clamp(min=1))
        return metrics

    def _loss(self, batch, rows: slice, advantages, old_logprobs, ref_logprobs, step: int,
              global_num_tokens: int, global_num_seqs: int):
        common = dict(config=self.loss_config, step=step, global_num_tokens=global_num_tokens,
                      global_num_seqs=global_num_seqs, backend=self.cfg.actor.loss_backend)
        if advantages is None:  # on-policy single call: advantages computed inside, ratio 1
            common.update(rewards=batch["rewards"][rows], group_ids=batch["group_ids"][rows])
        else:
            common.update(advantages=advantages[rows], old_logprobs=old_logprobs[rows],
                          ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows])
        targets, mask = batch["response_ids"][rows], batch["response_mask"][rows]
        if self.cfg.actor.loss_fn == "linear_policy_loss":  # LM head fused into the loss: no [N, V] logits
            hidden = self._response_tensors(self.model, batch, rows, hidden=True)
            head = self.model.get_output_embeddings()
            return fc.linear_policy_loss(hidden, head.weight, targets, mask, bias=head.bias, **common)
        logits = self._response_tensors(self.model, batch, rows, hidden=False)
        return fc.policy_loss(logits, targets, mask, **common)

    def _mini_rows(self, num_rows: int) -> int:
        """Rows per optimizer step: ppo_mini_batch_size prompts x n samples (0: the whole batch)."""
        return self.cfg.actor.ppo_mini_batch_size * self.cfg.rollout.n or num_rows

    def _micro_rows(self, batch) -> int:
        return self.cfg.actor.micro_batch_size or self._mini_rows(batch["response_ids"].shape[0])

    @staticmethod
    def _row_slices(start: int, stop: int, size: int) -> List[slice]:
        return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]

    # ------------------------------------------------------------------ weights and checkpoints

    def named_weights(self) -> List[Tuple[str, torch.Tensor]]:
        """The parameters in HF naming, on CPU: what the rollout engine loads after every update."""
        return [(name, param.detach().cpu()) for name, param in self.model.named_parameters()]

    def save(self, directory: str) -> None:
        torch.save(self.model.state_dict(), os.path.join(directory, "model.pt"))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load(self, directory: str) -> None:
        self.model.load_state_dict(torch.load(os.path.join(directory, "model.pt"), map_location=self.device))
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device))
