"""The learner: policy model + optimizer, updated with the fused policy-gradient loss.

A step hands it the rollout batch twice:

1. ``compute_advantages(batch, step)``, the advantage step. In the simplest case (one epoch, the
   whole batch in one micro-batch, no KL) it returns the batch as it is: the update's single
   ``fc.policy_loss(..., rewards=, group_ids=)`` call computes the advantages (CANON's entropy
   from that very pass), the loss and its gradient in one fused pass. Otherwise a no-grad pass
   gives the old log-probs (the policy that sampled, up to engine numerics), the token entropy
   (CANON's metric) and, with a KL loss, the frozen reference model's log-probs; then
   ``fc.compute_advantages`` runs over the whole batch, so that micro-batches never split a group.
   With a critic (gae), its values go in too and the returns come out beside the advantages.
2. ``update(batch, step)``: ppo_epochs x mini-batches (one optimizer step each) x micro-batches
   (gradient accumulation). Every micro-batch loss is normalised by the *mini-batch's* token and
   sequence counts (global_num_tokens / global_num_seqs), so the accumulated gradient is exactly
   the gradient of the mini-batch loss, whatever the micro-batch size. The critic (critic.py), where
   there is one, takes its value-loss step in the same loops.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import fused_canon as fc
from fused_canon.integrations.hf import last_hidden_states, lm_head_of
from fused_canon.statistics import EXTRA_SIGNALS

from . import checkpoint, warmup
from .config import ConfigError, TrainConfig, estimator_reads
from .critic import Critic
from .diagnostics import batch_diagnostics
from .model import build_model, build_optimizer, clipped_optimizer_step, model_inputs, resolve_device

Batch = Dict[str, torch.Tensor]

# Loss terms aggregated with the global normalizers: the micro-batch values add up to the mini-batch's
# value. The other metrics (clip fractions, ppo_kl, vpred_mean) are means over one micro-batch.
GLOBALLY_NORMALIZED = ("actor/pg_loss", "actor/entropy", "actor/kl_loss", "critic/vf_loss")
# Estimator inputs the driver puts into the batch (the greedy rollout's rewards, for remax).
ROLLOUT_INPUTS = ("baseline_rewards",)


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
        self.cfg = cfg
        self.loss_config: fc.LossConfig = cfg.algorithm
        self.device = resolve_device(cfg.trainer.device)
        self.tokenizer = tokenizer
        self.model = build_model(cfg.model, tokenizer, cfg.trainer.seed).to(self.device).train()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.actor)
        # (weight, bias) of the output layer. lm_head_of refuses a model whose logits are more than
        # that linear map (e.g. Gemma's soft-capping), which the fused LM-head loss would get wrong.
        self.lm_head = None
        if cfg.actor.loss_fn == "linear_policy_loss":
            try:
                self.lm_head = lm_head_of(self.model)
            except (NotImplementedError, TypeError) as error:
                raise ConfigError(f"actor.loss_fn=linear_policy_loss is not valid for model.path={cfg.model.path!r}: "
                                  f"{error}") from None
        # The KL loss pulls the policy towards its starting point, so keep a frozen copy of it.
        self.ref_model = None
        if self.loss_config.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # The value model, for an estimator that reads values (gae).
        self.critic: Optional[Critic] = None
        if estimator_reads(self.loss_config.advantage, "values"):
            self.critic = Critic(cfg, tokenizer, self.device)

    def warm_start(self) -> Dict[str, float]:
        """Make the model the base model RL starts from (model.sft_steps; warmup.py). The driver calls
        it before the first step of a new run, before the KL reference is taken; a resumed run loads
        its checkpoint instead."""
        result = warmup.warm_start(self.model, self.tokenizer, self.cfg, self.device)
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict())
        return result

    # ------------------------------------------------------------------ forward passes

    def _response_logits(self, model, batch: Batch, rows: slice) -> torch.Tensor:
        """Logits [n, R, V] at the positions that predict the response tokens."""
        inputs, response_len = model_inputs(batch, rows)
        # Position t predicts token t+1: the last R+1 positions hold the ones we need.
        return model(**inputs, logits_to_keep=response_len + 1).logits[:, :-1]

    def _response_hidden_states(self, batch: Batch, rows: slice) -> torch.Tensor:
        """The last hidden states [n, R, H] that the LM head maps to the response logits."""
        inputs, response_len = model_inputs(batch, rows)
        return last_hidden_states(self.model, **inputs)[:, -response_len - 1:-1]

    @torch.no_grad()
    def token_signals(self, model, batch: Batch, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``fc.token_signals`` [N, R] of the batch's responses under ``model`` (log-prob, entropy and the
        signals some estimators read), one statistics pass per micro-batch."""
        parts: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
        for rows in self._row_slices(0, self._num_rows(batch), self._micro_rows(batch)):
            logits = self._response_logits(model, batch, rows)
            signals = fc.token_signals(logits, batch["response_ids"][rows], names,
                                       temperature=self.loss_config.temperature)
            for name in names:
                parts[name].append(signals[name])
        return {name: torch.cat(values) for name, values in parts.items()}

    def token_stats(self, model, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-prob and entropy [N, R] of the batch's responses under ``model``."""
        signals = self.token_signals(model, batch, ("logprobs", "entropy"))
        return signals["logprobs"], signals["entropy"]

    # ------------------------------------------------------------------ the advantage step

    def _fuses_advantages(self, batch: Batch) -> bool:
        """One update on the whole batch in one piece, no reference model and no critic: the loss call
        itself computes the advantages from the rewards, in the same pass as the loss and its gradient."""
        num_rows = self._num_rows(batch)
        return (self.cfg.actor.ppo_epochs == 1 and self._mini_rows(num_rows) == self._micro_rows(batch) == num_rows
                and self.ref_model is None and self.critic is None)

    def compute_advantages(self, batch: Batch, step: int) -> Batch:
        """The batch with ``advantages`` [B] or [B, T], ``old_logprobs`` [N, R] (and ``ref_logprobs`` with
        a KL loss; the critic's ``values`` and the ``returns`` with a critic) added; unchanged when
        ``update``'s fused call computes them itself."""
        if self._fuses_advantages(batch):
            return batch
        on_device = self._to_device(batch)
        self.model.eval()  # no dropout in the statistics pass
        # The logits' signals the estimator reads (UCAS, the optimal token baseline) come from the same pass.
        extra = [name for name in EXTRA_SIGNALS if estimator_reads(self.loss_config.advantage, name)]
        signals = self.token_signals(self.model, on_device, ("logprobs", "entropy", *extra))
        old_logprobs = signals["logprobs"]
        added = {"old_logprobs": old_logprobs, "token_entropy": signals["entropy"]}
        if self.ref_model is not None:
            added["ref_logprobs"] = self.token_stats(self.ref_model, on_device)[0]
        if self.critic is not None:
            added["values"] = self.critic.values(on_device, self._micro_rows(on_device))
        added["advantages"], returns = fc.compute_advantages(
            on_device["rewards"], on_device["group_ids"], config=self.loss_config.advantage,
            mask=on_device["response_mask"], token_entropy=signals["entropy"], step=step,
            token_ids=on_device["response_ids"], old_logprobs=old_logprobs, values=added.get("values"),
            **{name: signals[name] for name in extra}, **self._rollout_inputs(on_device, slice(None)),
            with_returns=True)
        if self.critic is not None:
            added["returns"] = returns  # the critic's targets
        self.model.train()
        return {**batch, **{key: value.cpu() for key, value in added.items()}}  # the driver may be elsewhere

    # ------------------------------------------------------------------ the update

    @staticmethod
    def _rollout_inputs(batch: Batch, rows: slice) -> Dict[str, torch.Tensor]:
        """The estimator inputs that came with the rollout batch (remax's greedy rewards), for ``rows``."""
        return {name: batch[name][rows] for name in ROLLOUT_INPUTS if name in batch}

    def update(self, batch: Batch, step: int) -> Dict[str, float]:
        """ppo_epochs x mini-batches optimizer steps on the batch; returns the update's metrics."""
        batch = self._to_device(batch)
        fused = "advantages" not in batch
        if fused and not self._fuses_advantages(batch):
            raise ValueError("this update needs the batch's advantages: pass it through compute_advantages first")
        averages, grad_norms = _MetricAverages(), []
        for _epoch in range(self.cfg.actor.ppo_epochs):
            for mini in self._row_slices(0, self._num_rows(batch), self._mini_rows(self._num_rows(batch))):
                grad_norms.append(self._optimizer_step(batch, mini, step, fused, averages))
        metrics = averages.means()
        metrics.update(self._batch_metrics(batch))
        if self.critic is not None:
            metrics.update(self.critic.batch_metrics(batch))
            metrics["critic/lr"] = self.critic.optimizer.param_groups[0]["lr"]
        metrics.update(batch_diagnostics(batch, self.loss_config.advantage, step))
        metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        if "rollout_logprobs" in batch:
            metrics.update(self._rollout_gap(batch))
        return metrics

    def _optimizer_step(self, batch: Batch, mini: slice, step: int, fused: bool, averages: _MetricAverages) -> float:
        """Gradient accumulation over the mini-batch's micro-batches, then one clipped optimizer step
        (skipped if the gradient is not finite), for the policy and the critic. Returns the policy's
        gradient norm."""
        mask = batch["response_mask"]
        # One sync for both counts; sequences = rows with a valid token, as agg_loss counts.
        global_num_tokens, global_num_seqs = torch.stack([mask[mini].sum(), mask[mini].any(-1).sum()]).tolist()
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic.zero_grad()
        mini_batch_terms: Dict[str, float] = {}
        for rows in self._row_slices(mini.start, mini.stop, self._micro_rows(batch)):
            out = self._loss(batch, rows, step, fused, global_num_tokens, global_num_seqs)
            out.loss.backward()
            if fused:  # what the call computed, reported as the advantage step's outputs
                batch["advantages"], batch["old_logprobs"] = out.advantages, out.logprobs
                if out.entropy is not None:
                    batch["token_entropy"] = out.entropy
            # fc's critic/* metrics (the advantages) are reported once, from the whole batch.
            metrics = {key: value for key, value in out.metrics.items() if not key.startswith("critic/")}
            if self.critic is not None:
                vf_loss, critic_metrics = self.critic.loss(batch, rows, global_num_tokens, global_num_seqs)
                vf_loss.backward()
                metrics.update(critic_metrics)
            tokens = float(mask[rows].sum())  # the weight of this micro-batch's token means
            for key, value in metrics.items():
                if key in GLOBALLY_NORMALIZED:  # a micro-batch's share of the mini-batch value
                    mini_batch_terms[key] = mini_batch_terms.get(key, 0.0) + value
                else:  # a mean over this micro-batch's tokens
                    averages.add(key, value, weight=tokens)
        for key, value in mini_batch_terms.items():
            averages.add(key, value, weight=1.0)
        if self.critic is not None:
            averages.add("critic/grad_norm", self.critic.step(), weight=1.0)
        return clipped_optimizer_step(self.model, self.optimizer, self.cfg.actor.grad_clip)

    def _loss(self, batch: Batch, rows: slice, step: int, fused: bool, global_num_tokens: int,
              global_num_seqs: int) -> fc.LossOutput:
        common = dict(config=self.loss_config, step=step, global_num_tokens=global_num_tokens,
                      global_num_seqs=global_num_seqs, backend=self.cfg.actor.loss_backend)
        if fused:  # on-policy single call: advantages computed inside, ratio 1
            common.update(rewards=batch["rewards"][rows], group_ids=batch["group_ids"][rows],
                          advantage_inputs=self._rollout_inputs(batch, rows) or None)
        else:
            ref_logprobs = batch.get("ref_logprobs")
            common.update(advantages=batch["advantages"][rows], old_logprobs=batch["old_logprobs"][rows],
                          ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows])
        targets, mask = batch["response_ids"][rows], batch["response_mask"][rows]
        if self.lm_head is not None:  # LM head fused into the loss: no [N, V] logits
            weight, bias = self.lm_head
            return fc.linear_policy_loss(self._response_hidden_states(batch, rows), weight, targets, mask,
                                         bias=bias, **common)
        return fc.policy_loss(self._response_logits(self.model, batch, rows), targets, mask, **common)

    @staticmethod
    def _batch_metrics(batch: Batch) -> Dict[str, float]:
        """Over the whole batch's advantages ([B], or the valid tokens of [B, T]), not per micro-batch."""
        advantages = batch["advantages"]
        if advantages.dim() == 2:  # a token-level estimator: padding holds zeros, not advantages
            advantages = advantages[batch["response_mask"]]
        return {"critic/advantages/mean": float(advantages.mean()), "critic/advantages/max": float(advantages.max()),
                "critic/advantages/min": float(advantages.min())}

    @staticmethod
    def _rollout_gap(batch: Batch) -> Dict[str, float]:
        """How far the engine's sampling distribution is from the learner's."""
        mask = batch["response_mask"]
        gap = (batch["rollout_logprobs"] - batch["old_logprobs"]).abs()
        return {"rollout/logprob_abs_diff_mean": float((gap * mask).sum() / mask.sum().clamp(min=1))}

    # ------------------------------------------------------------------ batch geometry

    def _to_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.device) for key, value in batch.items()}

    @staticmethod
    def _num_rows(batch: Batch) -> int:
        return batch["response_ids"].shape[0]

    def _mini_rows(self, num_rows: int) -> int:
        """Rows per optimizer step: ppo_mini_batch_size prompts x n samples (0: the whole batch)."""
        return self.cfg.actor.ppo_mini_batch_size * self.cfg.rollout.n or num_rows

    def _micro_rows(self, batch: Batch) -> int:
        return self.cfg.actor.micro_batch_size or self._mini_rows(self._num_rows(batch))

    @staticmethod
    def _row_slices(start: int, stop: int, size: int) -> List[slice]:
        return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]

    # ------------------------------------------------------------------ weights and checkpoints

    def named_weights(self) -> List[Tuple[str, torch.Tensor]]:
        """The parameters in HF naming, on CPU: what the rollout engine loads after every update."""
        return [(name, param.detach().cpu()) for name, param in self.model.named_parameters()]

    def save(self, directory: str) -> None:
        checkpoint.save_tensors(self.model.state_dict(), directory, "model.pt")
        checkpoint.save_tensors(self.optimizer.state_dict(), directory, "optimizer.pt")
        if self.critic is not None:
            self.critic.save(directory)

    def load(self, directory: str) -> None:
        self.model.load_state_dict(checkpoint.load_tensors(directory, "model.pt", self.device))
        self.optimizer.load_state_dict(checkpoint.load_tensors(directory, "optimizer.pt", self.device))
        if self.critic is not None:
            self.critic.load(directory, self.device)
