"""FusedGRPOTrainer against the real TRL 1.16 on a tiny model and char tokenizer built in code:
train() runs for grpo, qae and canon, and for each TRL loss_type the mapped LossConfig gives the same
loss and gradients as stock GRPOTrainer on the same batch."""

import dataclasses
import math
import re

import pytest
import torch

import fused_canon as fc
from peers import require

require("trl")
import datasets  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fused_canon.integrations.trl import (FusedGRPOTrainer, advantage_config_from_grpo_config,  # noqa: E402
                                          loss_config_from_grpo_config)

ALPHABET = "abcdefgh +=0123456789"


def char_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(ALPHABET)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=len(ALPHABET) + 3, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.Qwen2ForCausalLM(config)


def count_a(completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def grpo_args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                   use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True)
    return GRPOConfig(**{**options, **overrides})


def trainer(cls, tmp_path, args_overrides=None, **kwargs):
    """A trainer of the tiny model, saved first: with beta != 0 TRL loads the reference model from its path."""
    model_dir = tmp_path / "tiny-model"
    if not model_dir.exists():
        tiny_model().save_pretrained(model_dir)
    data = datasets.Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"] * 2})
    return cls(model=str(model_dir), reward_funcs=count_a, args=grpo_args(tmp_path, **(args_overrides or {})),
               train_dataset=data, processing_class=char_tokenizer(), **kwargs)


ESTIMATORS = {
    "grpo": fc.AdvantageConfig(estimator="grpo"),
    "qae": fc.AdvantageConfig(estimator="grpo", baseline="quantile", quantile_k=0.4),
    "canon": fc.AdvantageConfig(estimator="canon", canon_metric="entropy", canon_lambda=0.8, canon_alpha=1.2),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_train_runs_and_logs_fused_canon_metrics(tmp_path, name):
    t = trainer(FusedGRPOTrainer, tmp_path, loss_config=fc.LossConfig(advantage=ESTIMATORS[name]))
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    logged = [entry for entry in t.state.log_history if "actor/pg_loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"])
        assert {"actor/entropy", "actor/pg_clipfrac", "critic/advantages/mean"} <= set(entry)
    assert any(entry["grad_norm"] > 0 for entry in logged)
    assert any(not torch.equal(p, b) for p, b in zip(t.model.parameters(), before))


def test_canon_advantages_use_the_rollout_entropy(tmp_path):
    """The advantages of a generation batch are fc.compute_advantages of TRL's rewards with the token
    entropy of the generating policy (one group per prompt)."""
    config = fc.LossConfig(advantage=ESTIMATORS["canon"])
    t = trainer(FusedGRPOTrainer, tmp_path, loss_config=config)
    t.model.train()
    batch = [{"prompt": p} for p in ["ab", "ab", "ab", "ab", "cd", "cd", "cd", "cd"]]
    captured = {}
    original = t._calculate_rewards
    t._calculate_rewards = lambda *a: captured.setdefault("rewards", original(*a))
    output = t._generate_and_score_completions(batch)
    mask = output["completion_mask"].bool()
    entropy = t._rollout_entropy(output)
    expected = fc.compute_advantages(captured["rewards"][:, 0], torch.arange(8) // 4, config.advantage, mask=mask,
                                     token_entropy=entropy, step=1)
    torch.testing.assert_close(output["advantages"], expected)


# TRL loss_type -> the LossConfig with the same loss, passed explicitly (docs/integrations.md's table).
MAPPING = {
    "grpo": dict(loss_agg_mode="seq-mean-token-mean"),
    "bnpo": dict(loss_agg_mode="token-mean"),
    "dapo": dict(loss_agg_mode="token-mean"),
    "dr_grpo": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=6),  # = max_completion_length
}


def fixed_batch(t):
    """One micro-batch with unequal completion lengths and off-policy old log-probs (so clipping acts)."""
    g = torch.Generator().manual_seed(3)
    b, p, c = 4, 3, 6
    prompt_ids = torch.randint(3, 24, (b, p), generator=g)
    completion_ids = torch.randint(3, 24, (b, c), generator=g)
    completion_mask = (torch.arange(c) < torch.tensor([6, 2, 4, 5])[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones(b, p, dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2]),
              "num_items_in_batch": completion_mask.sum()}
    with torch.no_grad():
        logps, _, _ = t._get_per_token_logps_and_entropies(t.model, torch.cat([prompt_ids, completion_ids], 1),
                                                           torch.cat([inputs["prompt_mask"], completion_mask], 1), c)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(b, c, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(b, c, generator=g)
    return inputs


def loss_and_grads(t, inputs):
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    loss = t._compute_loss(t.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in t.model.parameters()]


def assert_same_loss_and_grads(stock, ours, inputs):
    stock_loss, stock_grads = loss_and_grads(stock, inputs)
    our_loss, our_grads = loss_and_grads(ours, inputs)
    assert abs(our_loss - stock_loss) <= 1e-6, (our_loss, stock_loss)
    assert max((a - b).abs().max().item() for a, b in zip(our_grads, stock_grads)) <= 1e-6
    assert max(g.abs().max().item() for g in stock_grads) > 1e-3  # the batch moves the model


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", sorted(MAPPING))
def test_mapped_loss_type_equals_stock_grpo_trainer(tmp_path, loss_type, beta):
    overrides = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=False)
    stock = trainer(GRPOTrainer, tmp_path, overrides)
    config = fc.LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=None, kl_coef=beta, kl_type="k3",
                           kl_k3_clamp=False, **MAPPING[loss_type])
    ours = trainer(FusedGRPOTrainer, tmp_path, overrides, loss_config=config)
    assert_same_loss_and_grads(stock, ours, fixed_batch(stock))


LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")
# TRL options on top of a loss_type, with the vLLM IS ratio (mode, shape) that the batch carries, if any.
OPTIONS = {
    "plain": {},
    "kl+bias-correction": dict(beta=0.04),  # use_bias_correction_kl=True is TRL's default
    "kl-no-correction": dict(beta=0.04, use_bias_correction_kl=False),
    "delta": dict(delta=1.1),
    "sequence-level": dict(importance_sampling_level="sequence"),
    "entropy-quantile": dict(top_entropy_quantile=0.5),
    "entropy-bonus": dict(entropy_coef=0.05),
    "entropy-bonus+quantile": dict(entropy_coef=0.05, top_entropy_quantile=0.5),
    "vllm-token-truncate": dict(vllm_importance_sampling_mode="token_truncate"),
    "vllm-sequence-mask": dict(vllm_importance_sampling_mode="sequence_mask"),
    "sequence-level+entropy-quantile": dict(importance_sampling_level="sequence", top_entropy_quantile=0.5),
    "sequence-level+vllm-token": dict(importance_sampling_level="sequence",
                                      vllm_importance_sampling_mode="token_truncate"),
}
# Combinations FusedGRPOTrainer refuses (test_refused_combinations): not in the grid.
def refused(loss_type, option):
    """What FusedGRPOTrainer refuses (or TRL has no form of): test_refused_combinations, not in the grid."""
    return (loss_type in ("cispo", "sapo", "vespo") and (option.startswith("sequence") or option == "delta")) or \
        (loss_type in ("dapo", "cispo", "vespo") and option.startswith("entropy-bonus"))


GRID = [(loss_type, option) for loss_type in LOSS_TYPES for option in sorted(OPTIONS) if not refused(loss_type, option)]


def with_vllm_ratio(stock, ours, inputs, mode):
    """TRL's vLLM IS correction on a batch without vLLM: both trainers as if built with use_vllm=True (ours
    derives its config again), and the batch carries a ratio as TRL computes it (1 at padding)."""
    for t in (stock, ours):
        t.use_vllm = t.args.use_vllm = True
        t.vllm_importance_sampling_correction = True
    ours.loss_config = loss_config_from_grpo_config(ours.args)
    g = torch.Generator().manual_seed(5)
    mask = inputs["completion_mask"].bool()
    ratio = torch.exp(0.4 * torch.randn(mask.shape, generator=g))
    ratio = torch.where(mask, ratio, torch.ones_like(ratio)) if mode.startswith("token") else ratio[:, :1]
    inputs["importance_sampling_ratio"] = ratio.clamp(max=1.3) if mode.endswith("truncate") else \
        ratio.masked_fill(ratio > 1.3, 0.0)
    assert (inputs["importance_sampling_ratio"] != 1).any()


@pytest.mark.parametrize("loss_type, option", GRID)
def test_trl_options_without_loss_config_equal_stock_grpo_trainer(tmp_path, loss_type, option):
    """No loss_config: FusedGRPOTrainer derives it from GRPOConfig and computes stock TRL's loss and gradients."""
    overrides = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28 if loss_type != "cispo" else 1.2,
                     **OPTIONS[option])
    stock = trainer(GRPOTrainer, tmp_path, overrides)
    ours = trainer(FusedGRPOTrainer, tmp_path, overrides)
    inputs = fixed_batch(stock)
    if "vllm_importance_sampling_mode" in overrides:
        with_vllm_ratio(stock, ours, inputs, overrides["vllm_importance_sampling_mode"])
    assert_same_loss_and_grads(stock, ours, inputs)


def test_derived_loss_config_is_the_documented_mapping():
    config = loss_config_from_grpo_config(GRPOConfig(output_dir="unused", loss_type="dr_grpo", epsilon=0.1,
                                                     epsilon_high=0.3, delta=2.0, beta=0.02,
                                                     importance_sampling_level="sequence",
                                                     max_completion_length=64, report_to=[], use_cpu=True, bf16=False),
                                          advantage=fc.AdvantageConfig(estimator="canon"))
    assert (config.loss_mode, config.loss_agg_mode, config.loss_scale_factor) == ("gspo", "seq-mean-token-sum-norm", 64)
    assert (config.clip_ratio_low, config.clip_ratio_high, config.clip_ratio_c, config.dual_clip) == \
        (0.1, 0.3, 2.0, "two_sided")
    assert (config.kl_coef, config.kl_k3_clamp, config.kl_bias_correction) == (0.02, False, True)
    assert config.advantage.estimator == "canon"


@pytest.mark.parametrize("overrides, match", [
    (dict(loss_type="ppo"), "loss_type='ppo'"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(loss_type="vespo", entropy_coef=0.05), "entropy_coef=0.05 with loss_type='vespo'"),
    (dict(entropy_coef=0.05), "entropy_coef=0.05 with loss_type='dapo'"),
    (dict(loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.5, gradient_accumulation_steps=2),
     "gradient_accumulation_steps"),
    (dict(loss_type="sapo", delta=2.0), "no effect here"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
])
def test_refused_combinations(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        trainer(FusedGRPOTrainer, tmp_path, overrides)


def test_an_explicit_loss_config_must_agree_with_trl_options(tmp_path):
    with pytest.raises(ValueError, match="GRPOConfig.temperature"):
        trainer(FusedGRPOTrainer, tmp_path, {"temperature": 0.7}, loss_config=fc.LossConfig())
    with pytest.raises(ValueError, match=r"GRPOConfig.beta=0.1 means LossConfig\(kl_coef=0.1\)"):
        trainer(FusedGRPOTrainer, tmp_path, {"beta": 0.1}, loss_config=fc.LossConfig())
    with pytest.raises(ValueError, match=r"use_bias_correction_kl=True means LossConfig\(kl_bias_correction=True\)"):
        trainer(FusedGRPOTrainer, tmp_path, {"beta": 0.1},
                loss_config=fc.LossConfig(kl_coef=0.1, kl_k3_clamp=False))
    with pytest.raises(ValueError, match=r"GRPOConfig.delta=2.0 means LossConfig\(clip_ratio_c=2.0\)"):
        trainer(FusedGRPOTrainer, tmp_path, {"delta": 2.0}, loss_config=fc.LossConfig())
    with pytest.raises(ValueError, match="top_entropy_quantile=0.2"):
        trainer(FusedGRPOTrainer, tmp_path, {"top_entropy_quantile": 0.2}, loss_config=fc.LossConfig())
    # What agrees is accepted: TRL's defaults leave the explicit LossConfig's own choices alone.
    trainer(FusedGRPOTrainer, tmp_path, {"delta": 2.0},
            loss_config=fc.LossConfig(clip_ratio_c=2.0, dual_clip="two_sided"))


def count_b(completions, **kwargs):
    return [float(c.count("b")) for c in completions]


def test_reward_scaling_options_need_the_advantage_config_that_computes_them(tmp_path):
    with pytest.raises(ValueError, match=r"GRPOConfig.scale_rewards='batch' needs loss_config.advantage = "
                                         r"AdvantageConfig\(estimator='grpo', std_scope='batch'"):
        trainer(FusedGRPOTrainer, tmp_path, {"scale_rewards": "batch"}, loss_config=fc.LossConfig())
    with pytest.raises(ValueError, match=r"multi_objective_aggregation='normalize_then_sum' needs loss_config.advantage "
                                         r"= AdvantageConfig\(estimator='gdpo', gdpo_whiten='responses'"):
        trainer(FusedGRPOTrainer, tmp_path, {"multi_objective_aggregation": "normalize_then_sum"},
                loss_config=fc.LossConfig())
    with pytest.raises(ValueError, match=r"GRPOConfig.scale_rewards='none' needs"):
        trainer(FusedGRPOTrainer, tmp_path, {"scale_rewards": "none"}, loss_config=fc.LossConfig())
    with pytest.raises(ValueError, match=r"loss_config.advantage.reward_weights=\[2.0\] must be None"):
        trainer(FusedGRPOTrainer, tmp_path, loss_config=fc.LossConfig(advantage=fc.AdvantageConfig(reward_weights=[2.0])))
    batch_std = fc.LossConfig(advantage=fc.AdvantageConfig(std_scope="batch", epsilon=1e-4))
    assert trainer(FusedGRPOTrainer, tmp_path, {"scale_rewards": "batch"}, loss_config=batch_std).loss_config is batch_std


@pytest.mark.parametrize("advantage, options", [
    (fc.AdvantageConfig(estimator="gdpo", gdpo_whiten="responses", epsilon=1e-4),
     {"multi_objective_aggregation": "normalize_then_sum"}),
    (fc.AdvantageConfig(std_scope="batch", epsilon=1e-4), {"scale_rewards": "batch"}),
    (None, {"multi_objective_aggregation": "normalize_then_sum"}),
    (None, {"scale_rewards": "batch"}),
], ids=["normalize_then_sum", "scale_rewards_batch", "trl_normalize_then_sum", "trl_scale_rewards_batch"])
def test_several_reward_functions_reach_the_estimator_with_trl_weights(tmp_path, advantage, options):
    """The advantages are fc.compute_advantages of TRL's [B, K] rewards with GRPOConfig.reward_weights; without
    loss_config, with the AdvantageConfig of TRL's options."""
    config = None if advantage is None else fc.LossConfig(advantage=advantage)
    model_dir = tmp_path / "tiny-model"
    tiny_model().save_pretrained(model_dir)
    t = FusedGRPOTrainer(model=str(model_dir), reward_funcs=[count_a, count_b],
                         args=grpo_args(tmp_path, reward_weights=[1.0, 0.25], **options),
                         train_dataset=datasets.Dataset.from_dict({"prompt": ["ab", "cd"] * 4}),
                         processing_class=char_tokenizer(), loss_config=config)
    t.model.train()
    captured = {}
    original = t._calculate_rewards
    t._calculate_rewards = lambda *a: captured.setdefault("rewards", original(*a))
    output = t._generate_and_score_completions([{"prompt": p} for p in ["ab"] * 4 + ["cd"] * 4])
    rewards = captured["rewards"]
    assert rewards.shape == (8, 2)
    if advantage is None:
        advantage = advantage_config_from_grpo_config(t.args)
        trl = (dict(estimator="gdpo", gdpo_whiten="responses") if "multi_objective_aggregation" in options
               else dict(std_scope="batch"))
        assert advantage == fc.AdvantageConfig(**trl, epsilon=1e-4, singleton_baseline="own")
    expected = fc.compute_advantages(rewards, torch.arange(8) // 4,
                                     dataclasses.replace(advantage, reward_weights=[1.0, 0.25]),
                                     mask=output["completion_mask"].bool())
    torch.testing.assert_close(output["advantages"], expected)
