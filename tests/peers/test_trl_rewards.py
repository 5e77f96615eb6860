"""fused-canon's advantages against TRL 1.16's reward aggregation and scaling (``multi_objective_aggregation``
x ``scale_rewards`` x ``reward_weights``), docs/integrations.md's mapping.

TRL computes the advantages inline in ``GRPOTrainer._generate_and_score_completions`` (after generation and
the reward calls), so the oracle runs TRL's own lines: the block of that method from the unscorable-row
mask to ``advantages = torch.nan_to_num(...)``, taken from the installed source and executed on a stub
trainer holding the options. If TRL's code moves, the markers are not found and the test fails.
"""

import inspect
import textwrap
import types

import pytest
import torch

import fused_canon as fc
from peers import compared, require, unsupported

require("trl")
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

PEER = "TRL 1.16"
FIRST_LINE = "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)"
LAST_LINE = "advantages = torch.nan_to_num(advantages, nan=0.0)"
TRL_EPS = 1e-4  # TRL's constant in both aggregations


def trl_advantage_block():
    """TRL's advantage lines, compiled: they read ``self``, ``rewards_per_func``, ``num_generations``, ``device``."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip() == FIRST_LINE)
    last = next(i for i, line in enumerate(lines) if line.strip() == LAST_LINE)
    return compile(textwrap.dedent("\n".join(lines[first:last + 1])), "trl_grpo_advantages", "exec")


BLOCK = trl_advantage_block()


def trl_advantages(rewards_per_func, num_generations, aggregation, scale_rewards, weights):
    stub = types.SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                                 reward_weights=torch.tensor(weights, dtype=torch.float64),
                                 reward_funcs=[None] * rewards_per_func.shape[1])
    scope = {"self": stub, "rewards_per_func": rewards_per_func, "num_generations": num_generations,
             "device": rewards_per_func.device, "torch": torch, "nanstd": nanstd}
    # TRL's nanstd forms its Bessel factor count / (count - 1) from integer counts, in the default dtype:
    # float64 here, so the whole block runs in float64.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        exec(BLOCK, scope)
    finally:
        torch.set_default_dtype(default)
    return scope["advantages"]


def advantage_config(aggregation, scale_rewards, weights):
    """docs/integrations.md's mapping of TRL's options."""
    trl = dict(epsilon=TRL_EPS, reward_weights=weights, singleton_baseline="own")
    if aggregation == "normalize_then_sum":  # TRL divides by the std here whatever scale_rewards says
        return fc.AdvantageConfig(estimator="gdpo", gdpo_whiten="responses", **trl)
    return fc.AdvantageConfig(estimator="grpo", **trl,
                              norm_by_std=scale_rewards != "none",
                              std_scope="batch" if scale_rewards == "batch" else "group")


def sample(num_prompts, num_generations, num_rewards, kind, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (num_prompts * num_generations, num_rewards)
    if kind == "ties":
        return torch.randint(0, 2, shape, generator=g).double()
    rewards = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "equal_group":  # one group where every function gives every completion the same score
        rewards[:num_generations] = 0.5
    if kind == "unscored":  # reward functions returning None for some completions, each row keeps one score
        unscored = torch.rand(shape, generator=g) < 0.35
        unscored[:, 0] &= (~unscored[:, 1:]).any(1)  # K = 1: nothing unscored
        rewards[unscored] = float("nan")
    if kind == "unscorable_row":  # no function scores the second completion
        rewards[1] = float("nan")
    return rewards


WEIGHTS = {1: [[1.0], [2.5]], 3: [[1.0, 1.0, 1.0], [0.3, 1.0, 2.0]]}


@pytest.mark.parametrize("kind", ["random", "ties", "equal_group", "unscored", "unscorable_row"])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
@pytest.mark.parametrize("num_rewards, weights", [(k, w) for k, ws in WEIGHTS.items() for w in ws])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_trl_reward_aggregation(request, aggregation, scale_rewards, num_rewards, weights, num_generations, kind):
    if kind == "unscorable_row":
        unsupported(request, PEER, "a completion no reward function scored (all NaN): TRL gives it advantage 0 and "
                                   "leaves it out of the statistics; fused-canon refuses it (FusedGRPOTrainer raises)")
    compared(request, PEER)
    rewards = sample(3, num_generations, num_rewards, kind, seed=num_generations * 10 + num_rewards)
    theirs = trl_advantages(rewards, num_generations, aggregation, scale_rewards, weights)
    group_ids = torch.arange(len(rewards)) // num_generations
    ours = fc.compute_advantages(rewards, group_ids, advantage_config(aggregation, scale_rewards, weights))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
