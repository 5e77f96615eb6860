"""fused-canon's gdpo and the two optimal token baselines against verl 0.9.1's own estimators
(``core_algos.compute_gdpo_outcome_advantage``, ``compute_optimal_token_baseline_advantage``,
``compute_multi_turn_optimal_token_baseline_advantage``) and through verl's ``compute_advantage`` with the
plugin's ``fc_`` names, on random float64 inputs over group layouts (singletons, ties, empty rows), masks
(right padding, mask-0 spans inside a row) and the options (docs/algorithms.md §1.3, §1.14).

verl's singleton std is a float32 tensor, so its ``1 + epsilon`` is rounded to float32: the fp64
comparisons use epsilon = 2**-20, for which 1 + epsilon is exact in float32, and compare at 1e-9 relative.
"""

import numpy as np
import pytest
import torch

import fused_canon as fc
from peers import compared, require

require("verl")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.utils import torch_functional as verl_F  # noqa: E402

import fused_canon.integrations.verl as plugin  # noqa: E402  (registers the fc_ names)

PEER = "verl 0.9.1"
EXACT_EPS = 2.0 ** -20
T = 8
TIGHT = dict(rtol=1e-9, atol=1e-12)

# Group layouts: group id per row. "singletons" has groups of one; "mixed" sizes 1 to 4.
LAYOUTS = {"one_group": [0] * 6, "pairs": [0, 0, 1, 1, 2, 2], "mixed": [3, 0, 0, 1, 1, 1, 2, 0, 0],
           "singletons": [0, 1, 2, 3], "interleaved": [1, 0, 1, 0, 2, 2, 1]}
MASKS = ("right_padded", "spans", "empty_rows")


def sample(layout, mask_kind, seed, ties=False, num_rewards=1):
    """rewards [B, K], group ids [B], a float64 mask [B, T], old log-probs and sum pi^2 [B, T]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(LAYOUTS[layout])
    n = len(ids)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    if mask_kind == "spans":  # tool output inside a response: mask-0 positions before later valid tokens
        mask = mask * (torch.rand(n, T, generator=g) > 0.3).double()
        mask[:, 0] = 1.0
    if mask_kind == "empty_rows":
        mask[:: 3] = 0.0
    rewards = (torch.randint(0, 3, (n, num_rewards), generator=g).double() / 2 if ties
               else torch.randn(n, num_rewards, generator=g, dtype=torch.float64))
    probs = torch.rand(n, T, generator=g, dtype=torch.float64) * 0.9 + 0.05
    sum_pi_squared = probs ** 2 + torch.rand(n, T, generator=g, dtype=torch.float64) * (1 - probs) ** 2
    return rewards, ids, mask, probs.log(), sum_pi_squared


def token_rewards(rewards, mask):
    """verl's token_level_rewards: each score at its row's last valid token (nothing on an empty row)."""
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return rewards[:, None] * last


# Optimal token baselines -------------------------------------------------------------------

OTB = {"optimal_token_baseline": core_algos.compute_optimal_token_baseline_advantage,
       "tir_optimal_token_baseline": core_algos.compute_multi_turn_optimal_token_baseline_advantage}


@pytest.mark.parametrize("with_is", [False, True], ids=["no-is", "is"])
@pytest.mark.parametrize("zero_tail", [True, False], ids=["zero-tail", "no-zero-tail"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("estimator", sorted(OTB))
def test_optimal_token_baselines(request, estimator, layout, mask_kind, zero_tail, with_is):
    compared(request, PEER)
    rewards, ids, mask, old, sum_pi_squared = sample(layout, mask_kind, seed=len(layout) + 7 * MASKS.index(mask_kind))
    rewards = rewards[:, 0]
    weights = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
               if with_is else None)
    theirs, their_returns = OTB[estimator](token_rewards(rewards, mask), mask, ids.numpy(), old, sum_pi_squared,
                                           rollout_is_weights=weights, handle_zero_tail=zero_tail)
    config = fc.AdvantageConfig(estimator=estimator, otb_handle_zero_tail=zero_tail)
    ours, returns = fc.compute_advantages(rewards, ids, config, mask=mask.bool(), old_logprobs=old,
                                          sum_pi_squared=sum_pi_squared, rollout_is_weights=weights,
                                          with_returns=True)
    torch.testing.assert_close(ours, theirs, **TIGHT)
    torch.testing.assert_close(returns * mask, their_returns * mask, **TIGHT)


# GDPO ------------------------------------------------------------------------------------

def verl_gdpo_keys(rewards, ids, mask, weights, norm_by_std, epsilon):
    """verl's gdpo as its trainer calls it: the scores of each reward key in non_tensor_batch (verl reads them
    as float32), the keys and weights in the algorithm config."""
    keys = [f"reward_{k}" for k in range(rewards.shape[1])]
    config = OmegaConf.create({"gdpo_reward_keys": keys, "gdpo_reward_weights": weights})
    prompt = torch.zeros(len(ids), 2, dtype=torch.long)
    batch = {"prompts": prompt, "attention_mask": torch.cat([torch.ones_like(prompt), mask.long()], 1)}
    columns = {key: rewards[:, k].numpy() for k, key in enumerate(keys)}
    advantages, _ = core_algos.compute_gdpo_outcome_advantage(
        torch.zeros_like(mask), mask, ids.numpy(), epsilon=epsilon, norm_adv_by_std_in_grpo=norm_by_std,
        config=config, non_tensor_batch=columns, batch=batch)
    return advantages


def verl_gdpo_fp64(rewards, ids, mask, weights, norm_by_std, epsilon):
    """verl's gdpo steps in float64 from verl's own pieces: compute_grpo_outcome_advantage on each reward
    column, the weighted sum, masked_whiten (its keys path reads the scores as float32)."""
    combined = sum(w * core_algos.compute_grpo_outcome_advantage(
        token_rewards(rewards[:, k], torch.ones_like(mask)), mask, ids.numpy(), epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_by_std)[0] for k, w in enumerate(weights))
    return verl_F.masked_whiten(combined, mask) * mask


def ours_gdpo(rewards, ids, mask, weights, norm_by_std, epsilon):
    config = fc.AdvantageConfig(estimator="gdpo", reward_weights=weights, norm_by_std=norm_by_std, epsilon=epsilon)
    return fc.compute_advantages(rewards, ids, config, mask=mask.bool())[:, None] * mask


GDPO_WEIGHTS = {1: [[1.0]], 3: [[1.0, 1.0, 1.0], [0.5, 2.0, 0.25]]}


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("norm_by_std", [True, False], ids=["std", "no-std"])
@pytest.mark.parametrize("mask_kind", ("right_padded", "spans"))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("num_rewards, weights", [(k, w) for k, ws in GDPO_WEIGHTS.items() for w in ws])
def test_gdpo(request, num_rewards, weights, layout, mask_kind, norm_by_std, ties):
    compared(request, PEER)
    rewards, ids, mask, _, _ = sample(layout, mask_kind, seed=11 + len(layout), ties=ties, num_rewards=num_rewards)
    ours = ours_gdpo(rewards, ids, mask, weights, norm_by_std, EXACT_EPS)
    torch.testing.assert_close(ours, verl_gdpo_fp64(rewards, ids, mask, weights, norm_by_std, EXACT_EPS), **TIGHT)
    if num_rewards == 1:  # verl's gdpo without reward keys: token_level_rewards as the one reward, in float64
        theirs, _ = core_algos.compute_gdpo_outcome_advantage(
            token_rewards(rewards[:, 0], mask), mask, ids.numpy(), epsilon=EXACT_EPS, norm_adv_by_std_in_grpo=norm_by_std)
        torch.testing.assert_close(ours, theirs, **TIGHT)
    # The trainer's path reads the scores as float32: its statistics carry float32 rounding.
    rewards32 = rewards.float().double()
    torch.testing.assert_close(ours_gdpo(rewards32, ids, mask, weights, norm_by_std, 1e-6),
                               verl_gdpo_keys(rewards32, ids, mask, weights, norm_by_std, 1e-6).double(),
                               rtol=2e-5, atol=2e-5)


# Through verl's compute_advantage with the plugin's names ----------------------------------

def data_proto(rewards, ids, mask, old, sum_pi_squared):
    columns = {f"reward_{k}": rewards[:, k].float().numpy() for k in range(rewards.shape[1])}
    prompt = torch.zeros(len(ids), 2, dtype=torch.long)
    tensors = {"token_level_rewards": token_rewards(rewards.sum(1), mask).float(), "response_mask": mask.float(),
               "old_log_probs": old.float(), "sum_pi_squared": sum_pi_squared.float(), "prompts": prompt,
               "attention_mask": torch.cat([torch.ones_like(prompt), mask.long()], 1)}
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": np.array([f"p{i}" for i in ids.tolist()],
                                                                             dtype=object), **columns})


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout", ["mixed", "interleaved"])
@pytest.mark.parametrize("verl_name", ["gdpo", "tir_optimal_token_baseline"])
def test_plugin_names_under_compute_advantage(request, verl_name, layout, mask_kind):
    if verl_name == "gdpo" and mask_kind == "empty_rows":
        mask_kind = "spans"  # verl's gdpo reads a score at position -1 of an empty row; nothing to compare there
    compared(request, PEER)
    rewards, ids, mask, old, sum_pi_squared = sample(layout, mask_kind, seed=5, num_rewards=2)
    rewards = rewards.float().double()
    algorithm = OmegaConf.create({"gdpo_reward_keys": ["reward_0", "reward_1"], "gdpo_reward_weights": [1.0, 0.5]})
    theirs = compute_advantage(data_proto(rewards, ids, mask, old, sum_pi_squared), verl_name, config=algorithm)
    with plugin.rollout_context(step=0, inputs={"rewards": rewards, "old_logprobs": old.float(),
                                                "sum_pi_squared": sum_pi_squared.float()}):
        ours = compute_advantage(data_proto(rewards, ids, mask, old, sum_pi_squared), plugin.PREFIX + verl_name,
                                 config=algorithm)
    torch.testing.assert_close(ours.batch["advantages"], theirs.batch["advantages"], rtol=1e-5, atol=1e-6)
