"""TRL 1.16: ``FusedGRPOTrainer``, a ``GRPOTrainer`` whose advantages and loss are fused-canon's.

    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data)
    # or fused-canon's estimators with TRL's loss options:
    loss_config = loss_config_from_grpo_config(args, advantage=fc.AdvantageConfig(estimator="canon"))
    trainer = FusedGRPOTrainer(..., args=args, loss_config=loss_config)

Everything else is ``GRPOTrainer`` (generation, reward functions, logging, accelerate/DDP). Three
things change:

* **Advantages**: after TRL scores a generation batch, the rewards of every process (TRL gathers
  them) go through ``fc.compute_advantages`` with ``loss_config.advantage``,
  one group per prompt (``num_generations`` consecutive rows), and each process keeps its own rows.
  CANON's entropy is the rollout policy's token entropy from one no-grad pass over the generation
  batch at TRL's temperature; its step is ``state.global_step + 1`` (1 at the first optimizer step,
  as verl and CANON count). The rewards of each reward function reach the estimator as [B, K] with
  TRL's ``reward_weights``. Without ``loss_config`` the advantages are TRL's
  (``advantage_config_from_grpo_config``: scale_rewards, multi_objective_aggregation); with it,
  those two options set to other than their defaults must be what ``loss_config.advantage``
  computes (``REWARD_OPTIONS``).
* **Loss**: the backbone's last hidden states go through ``fc.linear_policy_loss`` with the model's LM
  head (fused-canon's fused LM-head path: the [B, T, V] logits are never built), with TRL's
  old/ref log-probs. Normalizers follow TRL's accounting so the loss under DDP's gradient averaging
  is the global one (docs/integrations.md, "DDP").
* **Metrics**: fused-canon's metrics (verl names: ``actor/pg_loss``, ``actor/pg_clipfrac``,
  ``actor/entropy``, ``critic/advantages/mean`` ...) averaged over processes, through TRL's logger.

Without ``loss_config`` the loss is TRL's: ``loss_config_from_grpo_config(args)`` maps loss_type, epsilon,
epsilon_high, delta, importance_sampling_level, beta, use_bias_correction_kl, top_entropy_quantile,
entropy_coef and the SAPO temperatures onto ``LossConfig``, and TRL's vLLM importance-sampling ratio is
passed as ``rollout_is_weights``. With ``loss_config``, it defines the loss; the sampling temperature and
beta must agree with it, and so must every TRL loss option set to a non-default value. What no
``LossConfig`` computes is refused at construction (``UNSUPPORTED_OPTIONS`` and the combinations named in
the errors), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Optional

import torch
from trl import GRPOConfig, GRPOTrainer

from ..api import linear_policy_loss
from ..config import AdvantageConfig, LossConfig
from ..estimators import compute_advantages
from .hf import lm_head_of

__all__ = ["FusedGRPOTrainer", "UNSUPPORTED_OPTIONS", "REWARD_OPTIONS", "loss_config_from_grpo_config",
           "advantage_config_from_grpo_config"]

# GRPOConfig fields whose non-default values change the loss in ways LossConfig does not express:
# (field, default, why). Refused at construction, never silently ignored.
UNSUPPORTED_OPTIONS = (
    ("off_policy_mask_threshold", None, "the off-policy sequence mask"),
    ("use_adaptive_entropy", False, "TRL's adaptive entropy bonus"),
)

# GRPOConfig's reward scaling other than its default, and the AdvantageConfig that computes the same advantages
# (docs/integrations.md): (field, value, does the AdvantageConfig express it, the config to use). TRL's
# normalize_then_sum ignores scale_rewards, so gdpo is not checked against it.
REWARD_OPTIONS = (
    ("scale_rewards", "batch", lambda a: a.estimator == "grpo" and a.norm_by_std and a.std_scope == "batch",
     "AdvantageConfig(estimator='grpo', std_scope='batch', epsilon=1e-4)"),
    ("scale_rewards", "none", lambda a: (a.estimator == "grpo" and not a.norm_by_std) or a.estimator == "dr_grpo",
     "AdvantageConfig(estimator='grpo', norm_by_std=False)"),
    ("multi_objective_aggregation", "normalize_then_sum",
     lambda a: a.estimator == "gdpo" and a.gdpo_whiten == "responses" and a.norm_by_std,
     "AdvantageConfig(estimator='gdpo', gdpo_whiten='responses', epsilon=1e-4)"),
)

# TRL's loss_type -> the loss_agg_mode that computes its aggregation (docs/integrations.md's table; the
# counts it divides by: FusedGRPOTrainer._normalizers).
_AGGREGATION = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                "dapo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
                "dr_grpo": "seq-mean-token-sum-norm", "luspo": "seq-mean-token-sum"}
# Loss types without TRL's PPO clip: no sequence-level ratio (TRL refuses it), no delta.
_TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")
# Loss types that TRL divides by the accumulation window's share of the generation batch's tokens.
_WINDOW_TOKEN_MEAN = ("dapo", "cispo", "vespo")


def _grpo_loss_options(args) -> list:
    """[(GRPOConfig field, {LossConfig field: value})]: the LossConfig fields that each of TRL's loss options
    sets (docs/integrations.md, "TRL"); raises for a combination that LossConfig does not compute."""
    loss_type, level = args.loss_type, args.importance_sampling_level
    if loss_type not in _AGGREGATION:
        raise ValueError(f"GRPOConfig.loss_type={loss_type!r} is not supported by FusedGRPOTrainer; "
                         f"allowed: {sorted(_AGGREGATION)}")
    if level not in ("token", "sequence"):
        raise ValueError(f"GRPOConfig.importance_sampling_level={level!r}: allowed 'token' or 'sequence'")
    sequence_ratio = level == "sequence"
    if sequence_ratio and loss_type in _TOKEN_LEVEL_ONLY:
        raise ValueError(f"GRPOConfig.importance_sampling_level='sequence' with loss_type={loss_type!r}: TRL has "
                         "no sequence-level form of it; allowed: 'token'")
    if args.delta is not None and loss_type in _TOKEN_LEVEL_ONLY:
        raise ValueError(f"GRPOConfig.delta={args.delta} with loss_type={loss_type!r}: TRL applies delta to the PPO "
                         "clip only (grpo, bnpo, dapo, dr_grpo, luspo), so it has no effect here; leave it None")
    if args.entropy_coef != 0 and loss_type in _WINDOW_TOKEN_MEAN:
        raise ValueError(f"GRPOConfig.entropy_coef={args.entropy_coef} with loss_type={loss_type!r} is not supported "
                         "by FusedGRPOTrainer: TRL normalises the bonus by the micro-batch's tokens and this policy "
                         "term by the generation batch's, and fused-canon's loss has one token count")
    if args.entropy_coef != 0 and args.top_entropy_quantile < 1.0 and args.gradient_accumulation_steps > 1:
        raise ValueError("GRPOConfig.entropy_coef != 0 with top_entropy_quantile < 1 and gradient_accumulation_steps "
                         f"={args.gradient_accumulation_steps} is not supported by FusedGRPOTrainer: fused-canon "
                         "normalises the masked bonus by this micro-batch's kept tokens, TRL also by the steps")
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if loss_type == "cispo":
        loss_type_fields = dict(loss_mode="cispo", cispo_bound="absolute", clip_ratio_high=epsilon_high,
                                loss_agg_mode="token-mean")
    elif loss_type == "sapo":
        loss_type_fields = dict(loss_mode="sapo", loss_agg_mode=_AGGREGATION[loss_type])
    elif loss_type == "vespo":
        loss_type_fields = dict(loss_mode="vespo", loss_agg_mode=_AGGREGATION[loss_type])
    else:
        loss_type_fields = dict(loss_agg_mode=_AGGREGATION[loss_type])
        if loss_type == "dr_grpo":
            loss_type_fields["loss_scale_factor"] = float(args.max_completion_length)
    options = [("loss_type", loss_type_fields)]
    if loss_type not in _TOKEN_LEVEL_ONLY:
        level_fields = dict(loss_mode="gspo" if sequence_ratio else "vanilla")
        token_weights = args.top_entropy_quantile < 1.0 or (
            args.use_vllm and args.vllm_importance_sampling_correction
            and args.vllm_importance_sampling_mode.startswith("token"))
        if sequence_ratio and token_weights:  # TRL's (B, 1) ratio gives each token its row's mean weight
            level_fields["gspo_gradient"] = "sequence"
        options.append(("importance_sampling_level", level_fields))
    if loss_type != "cispo":
        options += [("epsilon", dict(clip_ratio_low=args.epsilon)), ("epsilon_high", dict(clip_ratio_high=epsilon_high))]
    if loss_type == "sapo":
        options += [("sapo_temperature_pos", dict(sapo_tau_pos=args.sapo_temperature_pos)),
                    ("sapo_temperature_neg", dict(sapo_tau_neg=args.sapo_temperature_neg))]
    if loss_type == "vespo":
        options += [(f"vespo_{name}", {f"vespo_{name}": getattr(args, f"vespo_{name}")})
                    for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")]
    if loss_type not in _TOKEN_LEVEL_ONLY:
        options.append(("delta", dict(clip_ratio_c=args.delta, dual_clip="two_sided" if args.delta is not None
                                      else "negative")))
    kl = dict(kl_coef=args.beta) if args.beta == 0 else dict(kl_coef=args.beta, kl_type="k3", kl_k3_clamp=False)
    options += [("beta", kl),
                ("use_bias_correction_kl", dict(kl_bias_correction=bool(args.use_bias_correction_kl and args.beta))),
                ("top_entropy_quantile", dict(top_entropy_quantile=args.top_entropy_quantile)),
                ("entropy_coef", dict(entropy_coeff=args.entropy_coef, entropy_agg_mode="token-mean")),
                ("temperature", dict(temperature=args.temperature))]
    if args.use_vllm and args.vllm_importance_sampling_correction:
        # The weights are TRL's own ratio (rollout_is_weights); the level tells vespo whether a row holds one.
        level = "token" if args.vllm_importance_sampling_mode.startswith("token") else "sequence"
        options.append(("vllm_importance_sampling_mode", dict(rollout_is=level)))
    return options


def advantage_config_from_grpo_config(args) -> AdvantageConfig:
    """The AdvantageConfig that computes TRL's advantages for ``args`` (docs/integrations.md's reward table):
    grpo with scale_rewards' std (sum_then_normalize) or gdpo z-scored over the responses
    (normalize_then_sum, which ignores scale_rewards); TRL's epsilon 1e-4 and its groups of one (advantage 0)."""
    trl = dict(epsilon=1e-4, singleton_baseline="own")
    if args.multi_objective_aggregation == "normalize_then_sum":
        return AdvantageConfig(estimator="gdpo", gdpo_whiten="responses", **trl)
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(f"GRPOConfig.multi_objective_aggregation={args.multi_objective_aggregation!r}: allowed "
                         "'sum_then_normalize' or 'normalize_then_sum'")
    if args.scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"GRPOConfig.scale_rewards={args.scale_rewards!r}: allowed 'group', 'batch' or 'none'")
    return AdvantageConfig(estimator="grpo", norm_by_std=args.scale_rewards != "none",
                           std_scope="batch" if args.scale_rewards == "batch" else "group", **trl)


def loss_config_from_grpo_config(args, advantage: Optional[AdvantageConfig] = None) -> LossConfig:
    """The LossConfig that computes TRL's loss for ``args`` (a ``GRPOConfig``), with ``advantage`` (default:
    TRL's own advantages, ``advantage_config_from_grpo_config``) for the advantages. ``FusedGRPOTrainer`` uses
    it when no ``loss_config`` is given. TRL has no verl dual clip: ``clip_ratio_c`` is ``delta`` (two-sided)
    or None."""
    fields = {}
    for _, option_fields in _grpo_loss_options(args):
        fields.update(option_fields)
    return LossConfig(advantage=advantage or advantage_config_from_grpo_config(args), **fields)


_TRL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


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
        if loss_config is not None and not isinstance(loss_config, LossConfig):
            raise TypeError(f"loss_config must be a fused_canon.LossConfig, got {type(loss_config).__name__}")
        self._check_options(loss_config)
        self.loss_config = loss_config or loss_config_from_grpo_config(self.args)
        _add_last_hidden_state_forward(self.model)
        self._rewards_per_func = None

    def _check_options(self, loss_config: Optional[LossConfig]) -> None:
        """Refuse what FusedGRPOTrainer would otherwise compute differently from TRL, naming the option.

        Without ``loss_config`` the loss comes from GRPOConfig (``loss_config_from_grpo_config``). With it,
        ``loss_config`` defines the loss, and every TRL loss option set to a non-default value must agree
        with it: a disagreement is an error, never a silently ignored option."""
        args = self.args
        for name, default, why in UNSUPPORTED_OPTIONS:
            if getattr(args, name, default) != default:
                raise ValueError(f"GRPOConfig.{name}={getattr(args, name)!r} is not supported by FusedGRPOTrainer "
                                 f"({why}); allowed: {default!r}")
        if self.aux_loss_enabled:
            raise ValueError("FusedGRPOTrainer does not add the MoE router auxiliary loss")
        options = _grpo_loss_options(args)  # raises for what LossConfig cannot compute
        if loss_config is None:
            return
        # Checked at any value: TRL samples at its temperature, computes the reference log-probs only when
        # beta != 0, and then weights the KL by the ratio by default (use_bias_correction_kl=True).
        always = {"temperature", "beta"} | ({"use_bias_correction_kl"} if args.beta != 0 else set())
        for name, fields in options:
            if getattr(args, name) == _TRL_DEFAULTS[name] and name not in always:
                continue
            for field_name, value in fields.items():
                if getattr(loss_config, field_name) != value:
                    raise ValueError(
                        f"GRPOConfig.{name}={getattr(args, name)!r} means LossConfig({field_name}={value!r}), but "
                        f"loss_config.{field_name}={getattr(loss_config, field_name)!r}: make them agree, or leave "
                        "loss_config out and FusedGRPOTrainer derives it from GRPOConfig")
        for name, value, expresses, needed in REWARD_OPTIONS:
            if getattr(args, name) == value and not (name == "scale_rewards" and loss_config.advantage.estimator == "gdpo"):
                if not expresses(loss_config.advantage):
                    raise ValueError(f"GRPOConfig.{name}={value!r} needs loss_config.advantage = {needed} (the "
                                     f"estimator computes the advantages), got estimator="
                                     f"{loss_config.advantage.estimator!r}")
        if loss_config.advantage.reward_weights is not None:
            raise ValueError(f"loss_config.advantage.reward_weights={loss_config.advantage.reward_weights} must be "
                             "None: the trainer weighs the reward functions with GRPOConfig.reward_weights")
        if loss_config.advantage.estimator == "canon" and loss_config.advantage.canon_metric == "custom":
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
        # [B, K] with TRL's weights (float32, as TRL multiplies by them); NaN: a function returned None
        advantage = dataclasses.replace(self.loss_config.advantage, reward_weights=self.reward_weights.tolist())
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(len(rewards_per_func), device=rewards_per_func.device) // num_generations

        mask = self._response_mask(output)
        gather = self.accelerator.pad_across_processes
        all_mask = self.accelerator.gather(gather(mask.long(), dim=1)).bool()
        token_entropy = None
        if advantage.estimator == "canon" and advantage.canon_metric == "entropy":
            token_entropy = self.accelerator.gather(gather(self._rollout_entropy(output), dim=1))
        advantages = compute_advantages(rewards_per_func, group_ids, advantage, mask=all_mask, token_entropy=token_entropy,
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
        ``gradient_accumulation_steps / steps_per_generation`` of it; dapo, cispo and vespo divide by that
        count. bnpo, and the token-mean entropy bonus of every loss type, divide by the micro-batch's own
        tokens, grpo, sapo, dr_grpo and luspo by its rows, each then divided by the accumulation steps.
        fused-canon divides the micro-batch's sum by these counts, so the losses of all micro-batches and
        processes add up to the global loss; DDP *averages* gradients over the P processes, so each
        process passes 1/P of the global counts (TRL's dapo normalizer is the same)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_seqs = float(inputs["completion_ids"].size(0)) * accumulation
        if self.args.loss_type in _WINDOW_TOKEN_MEAN:
            num_tokens = float(inputs["num_items_in_batch"]) / self.accelerator.num_processes
            if mode == "train":
                num_tokens *= self.current_gradient_accumulation_steps / self.args.steps_per_generation
        else:
            num_tokens = float(self._response_mask(inputs).sum()) * accumulation
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
        mask = self._response_mask(inputs).bool()
        rollout_is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL's own vLLM IS ratio ([B, T] for token_* modes, [B, 1] for sequence_* ones), computed and
            # truncated or masked by TRL in _generate_and_score_completions.
            rollout_is_weights = inputs["importance_sampling_ratio"].expand(mask.shape)
        out = linear_policy_loss(completion_hidden.to(weight.dtype), weight, completion_ids, mask, bias=bias,
                                 advantages=inputs["advantages"], old_logprobs=inputs.get("old_per_token_logps"),
                                 ref_logprobs=inputs.get("ref_per_token_logps"), rollout_is_weights=rollout_is_weights,
                                 config=self.loss_config, step=self.state.global_step + 1,
                                 global_num_tokens=num_tokens, global_num_seqs=num_seqs)
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
