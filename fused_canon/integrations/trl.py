"""TRL 1.16: ``FusedGRPOTrainer``, a ``GRPOTrainer`` whose advantages and loss are fused-canon's.

    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data,
                               loss_config=fc.LossConfig(advantage=fc.AdvantageConfig(estimator="canon")))

Everything else is ``GRPOTrainer`` (generation, reward functions, logging, accelerate/DDP). Three
things change:

* **Advantages**: after TRL scores a generation batch, the rewards of every process (TRL gathers
  them; its reward weights applied) go through ``fc.compute_advantages`` with ``loss_config.advantage``,
  one group per prompt (``num_generations`` consecutive rows), and each process keeps its own rows.
  CANON's entropy is the rollout policy's token entropy from one no-grad pass over the generation
  batch at TRL's temperature; its step is ``state.global_step + 1`` (1 at the first optimizer step,
  as verl and CANON count). ``GRPOConfig.scale_rewards`` is replaced by the estimator's own rule.
* **Loss**: the backbone's last hidden states go through ``fc.linear_policy_loss`` with the model's LM
  head (fused-canon's fused LM-head path: the [B, T, V] logits are never built), with TRL's
  old/ref log-probs. Normalizers follow TRL's accounting so the loss under DDP's gradient averaging
  is the global one (docs/integrations.md, "DDP").
* **Metrics**: fused-canon's metrics (verl names: ``actor/pg_loss``, ``actor/pg_clipfrac``,
  ``actor/entropy``, ``critic/advantages/mean`` ...) averaged over processes, through TRL's logger.

One temperature: ``loss_config.temperature`` must equal ``GRPOConfig.temperature`` (the sampling one).
One KL coefficient: ``loss_config.kl_coef`` must equal ``GRPOConfig.beta`` (TRL computes the reference
log-probs only when ``beta != 0``). TRL options that change the loss in ways ``LossConfig`` does not
express are refused at construction (``UNSUPPORTED_OPTIONS``), never silently ignored.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
from trl import GRPOTrainer

from ..api import linear_policy_loss
from ..config import LossConfig
from ..estimators import compute_advantages
from .hf import lm_head_of

__all__ = ["FusedGRPOTrainer", "UNSUPPORTED_OPTIONS"]

# GRPOConfig fields whose non-default values change the loss outside LossConfig: (field, default, why).
UNSUPPORTED_OPTIONS = (
    ("top_entropy_quantile", 1.0, "entropy-quantile token masking"),
    ("off_policy_mask_threshold", None, "the off-policy sequence mask"),
    ("importance_sampling_level", "token", "sequence-level ratios: use LossConfig(loss_mode='gspo')"),
    ("delta", None, "two-sided clipping: use LossConfig(clip_ratio_c=...)"),
    ("entropy_coef", 0.0, "TRL's entropy bonus: use LossConfig(entropy_coeff=...)"),
    ("use_adaptive_entropy", False, "TRL's adaptive entropy bonus"),
    ("scale_rewards", "group", "reward scaling: the estimator of LossConfig.advantage defines it"),
    ("multi_objective_aggregation", "sum_then_normalize", "per-function normalisation of the rewards"),
)


def _add_last_hidden_state_forward(model: torch.nn.Module) -> None:
    """``model(..., last_hidden_state_only=True)`` returns the backbone's last hidden states [B, L, H].

    Called through the (DDP-)wrapped model, so the data-parallel hooks see a normal forward; the LM
    head is applied by fused-canon's kernel instead of the model."""
    forward = model.forward

    @functools.wraps(type(model).forward)
    def forward_or_hidden_states(self, *args, last_hidden_state_only=False, **kwargs):
        if not last_hidden_state_only:
            return forward(*args, **kwargs)
        return self.get_decoder()(*args, use_cache=False, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward_or_hidden_states, model)


class FusedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with fused-canon's estimators and fused LM-head loss (``loss_config``)."""

    def __init__(self, *args, loss_config: Optional[LossConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or LossConfig()
        if not isinstance(self.loss_config, LossConfig):
            raise TypeError(f"loss_config must be a fused_canon.LossConfig, got {type(self.loss_config).__name__}")
        self._check_options()
        _add_last_hidden_state_forward(self.model)
        self._rewards_per_func = None

    def _check_options(self) -> None:
        args, config = self.args, self.loss_config
        if config.temperature != args.temperature:
            raise ValueError(f"loss_config.temperature={config.temperature} must equal GRPOConfig.temperature="
                             f"{args.temperature}: the loss scores the tokens at the temperature they were sampled at")
        if config.kl_coef != args.beta:
            raise ValueError(f"loss_config.kl_coef={config.kl_coef} must equal GRPOConfig.beta={args.beta} "
                             "(TRL computes reference log-probs only when beta != 0)")
        for name, default, why in UNSUPPORTED_OPTIONS:
            if getattr(args, name, default) != default:
                raise ValueError(f"GRPOConfig.{name}={getattr(args, name)!r} is not supported by FusedGRPOTrainer "
                                 f"({why}); allowed: {default!r}")
        if args.beta != 0 and args.use_bias_correction_kl:
            raise ValueError("GRPOConfig.use_bias_correction_kl=True (TRL's default) weights the KL term by the "
                             "importance ratio, which LossConfig does not; set use_bias_correction_kl=False")
        if args.use_vllm and args.vllm_importance_sampling_correction:
            raise ValueError("GRPOConfig.vllm_importance_sampling_correction=True is not supported by FusedGRPOTrainer "
                             "(vLLM importance-sampling weights); set it to False")
        if self.aux_loss_enabled:
            raise ValueError("FusedGRPOTrainer does not add the MoE router auxiliary loss")
        if config.advantage.estimator == "canon" and config.advantage.canon_metric == "custom":
            raise ValueError("canon_metric='custom' needs a per-response metric that TRL does not produce")

    # -- advantages ---------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func  # [all processes' completions, reward functions]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        rewards_per_func, self._rewards_per_func = self._rewards_per_func, None
        if torch.isnan(rewards_per_func).all(dim=1).any():
            raise ValueError("a completion has no reward (every reward function returned None): fused-canon's "
                             "estimators need a reward for every completion of a group")
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(len(rewards), device=rewards.device) // num_generations

        mask = self._response_mask(output)
        gather = self.accelerator.pad_across_processes
        all_mask = self.accelerator.gather(gather(mask.long(), dim=1)).bool()
        token_entropy = None
        advantage = self.loss_config.advantage
        if advantage.estimator == "canon" and advantage.canon_metric == "entropy":
            token_entropy = self.accelerator.gather(gather(self._rollout_entropy(output), dim=1))
        advantages = compute_advantages(rewards, group_ids, advantage, mask=all_mask, token_entropy=token_entropy,
                                        step=self.state.global_step + 1)
        rows = slice(self.accelerator.process_index * len(mask), (self.accelerator.process_index + 1) * len(mask))
        advantages = advantages[rows] if advantages.dim() == 1 else advantages[rows, : mask.shape[1]]
        output["advantages"] = advantages.to(mask.device)
        return output

    @staticmethod
    def _response_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    @torch.no_grad()
    def _rollout_entropy(self, output) -> torch.Tensor:
        """The generating policy's token entropy of the completions [B, C] (TRL's fused head, TRL's temperature)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        _, entropy, _ = self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask,
                                                                output["completion_ids"].size(1),
                                                                batch_size=batch_size, compute_entropy=True)
        return entropy

    # -- loss -----------------------------------------------------------------------------------

    def _normalizers(self, inputs, mode):
        """(global_num_tokens, global_num_seqs) for this micro-batch's loss on this process.

        TRL's accounting: ``num_items_in_batch`` counts the completion tokens of the whole generation
        batch over all processes, and one optimizer step (the accumulation window) sees
        ``gradient_accumulation_steps / steps_per_generation`` of it. fused-canon divides the
        micro-batch's sum by these counts, so the losses of all micro-batches and processes add up to
        the global loss; DDP *averages* gradients over the P processes, so each process passes 1/P of
        the global counts (TRL's dapo normalizer is the same)."""
        processes = self.accelerator.num_processes
        num_tokens = float(inputs["num_items_in_batch"]) / processes
        num_seqs = float(inputs["completion_ids"].size(0))
        if mode == "train":
            num_tokens *= self.current_gradient_accumulation_steps / self.args.steps_per_generation
            num_seqs *= self.current_gradient_accumulation_steps
        return max(num_tokens, 1.0), num_seqs

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, last_hidden_state_only=True)
        completion_hidden = hidden[:, prompt_ids.size(1) - 1: -1]  # position t predicts token t + 1
        weight, bias = lm_head_of(self.accelerator.unwrap_model(model))
        num_tokens, num_seqs = self._normalizers(inputs, mode)
        out = linear_policy_loss(completion_hidden.to(weight.dtype), weight, completion_ids,
                                 self._response_mask(inputs).bool(), bias=bias, advantages=inputs["advantages"],
                                 old_logprobs=inputs.get("old_per_token_logps"),
                                 ref_logprobs=inputs.get("ref_per_token_logps"), config=self.loss_config,
                                 step=self.state.global_step + 1, global_num_tokens=num_tokens,
                                 global_num_seqs=num_seqs)
        self._log_fused_canon_metrics(out.metrics, mode)
        return out.loss

    def _log_fused_canon_metrics(self, metrics, mode) -> None:
        """fused-canon's metrics, averaged over processes, into TRL's per-step metric lists."""
        if not metrics:
            return
        names = sorted(metrics)
        local = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.accelerator.device)
        averaged = self.accelerator.gather(local[None]).mean(dim=0).tolist()
        for name, value in zip(names, averaged):
            self._metrics[mode][name].append(value)
