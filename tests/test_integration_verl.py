"""The verl plugin against the real verl 0.9.1: its own compute_advantage on a DataProto for every
registered estimator (with the inputs it declares handed over as the fused_canon_<mode> trainers do),
CANON's golden cases under CANON's script names, agreement with verl's grpo/rloo. The V1 trainers'
TransferQueue read is not exercised here (it needs a running verl trainer)."""

import numpy as np
import pytest
import torch

import fused_canon as fc
from golden import load_cases
from helpers import relative_error
from peers import require

require("verl")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

import fused_canon.integrations.verl as fc_verl  # noqa: E402


def verl_batch(rewards, group_ids, mask):
    """A DataProto as verl's trainer holds it: the outcome reward on the last valid token, uid strings."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    token_rewards = torch.as_tensor(rewards, dtype=torch.float32)[:, None] * last
    uids = np.array([f"prompt-{int(g)}" for g in group_ids], dtype=object)
    return DataProto.from_dict(tensors={"token_level_rewards": token_rewards, "response_mask": mask},
                               non_tensors={"uid": uids})


def random_batch(seed=0, sizes=(4, 3, 1, 4), length=6):
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    group_ids = group_ids[torch.randperm(len(group_ids), generator=g)]
    lengths = torch.randint(1, length + 1, (len(group_ids),), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (len(group_ids),), generator=g).float()
    entropy = torch.rand(len(group_ids), length, generator=g) * mask
    return rewards, group_ids, mask, entropy


def run_verl(name, data, options=None, step=3, token_entropy=None, inputs=None):
    config = OmegaConf.create({"adv_estimator": name, "fused_canon": options or {}})
    with fc_verl.rollout_context(step=step, token_entropy=token_entropy, inputs=inputs):
        return compute_advantage(data, adv_estimator=name, config=config).batch


def estimator_inputs(mask, seed=1):
    """A random value for every compute_advantages input an estimator may declare, shaped like the batch."""
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    return {"values": torch.randn(B, T, generator=g), "token_ids": torch.randint(0, 50, (B, T), generator=g),
            "baseline_rewards": torch.rand(B, generator=g), "old_logprobs": -torch.rand(B, T, generator=g) * 3,
            "sum_pi_squared": torch.rand(B, T, generator=g), "rollout_is_weights": torch.rand(B, T, generator=g) + 0.5,
            "self_certainty": torch.rand(B, T, generator=g) * 4, "target_logits": torch.randn(B, T, generator=g)}


def test_entry_point_registers_every_estimator_and_canon_name():
    import importlib.metadata

    (entry,) = [e for e in importlib.metadata.entry_points(group="verl.plugins") if e.name == "fused_canon"]
    assert entry.value == "fused_canon.integrations.verl"
    names = set(core_algos.ADV_ESTIMATOR_REGISTRY)
    assert {fc_verl.PREFIX + n for n in fc.ESTIMATORS} <= names
    assert set(fc_verl.CANON_SCRIPT_PRESETS) <= names
    # verl keeps its own estimators; fused-canon's twins are reachable with the prefix
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
    for name in fc.ESTIMATORS:
        assert core_algos.get_adv_estimator_fn(fc_verl.PREFIX + name).__name__ == f"fused_canon_{fc_verl.PREFIX + name}"
        if name in fc_verl.registered_names():  # verl had no estimator of that name
            assert core_algos.get_adv_estimator_fn(name).__name__ == f"fused_canon_{name}"
    assert core_algos.get_adv_estimator_fn("reinforce_plus_plus_baseline").__module__ == core_algos.__name__


@pytest.mark.parametrize("name", sorted(fc_verl.registered_names()))
def test_verl_compute_advantage_runs_each_registered_estimator(name):
    """verl's compute_advantage with the estimator's declared inputs handed over in rollout_context (as the
    fused_canon_<mode> trainers do) equals fc.compute_advantages: advantages and returns."""
    rewards, group_ids, mask, entropy = random_batch(sizes=(4, 3, 2, 4))
    options = {"quantile_k": 0.6} if name.endswith("qae") else {}
    config = fc_verl.advantage_config(name, OmegaConf.create({"fused_canon": options}))
    declared = fc.ESTIMATOR_INPUTS.get(config.estimator)
    wanted = set(declared.required + declared.optional) - {"mask"} if declared else set()
    inputs = {k: v for k, v in estimator_inputs(mask).items() if k in wanted}
    batch = run_verl(name, verl_batch(rewards, group_ids, mask), options, step=5, token_entropy=entropy, inputs=inputs)
    expected = fc.compute_advantages(rewards, group_ids, config, mask=mask.bool(), token_entropy=entropy, step=5,
                                     with_returns=True, **inputs)
    for key, value in zip(("advantages", "returns"), expected):
        value = (value[:, None] if value.dim() == 1 else value) * mask
        torch.testing.assert_close(batch[key], value, rtol=0, atol=0)


def test_verl_batch_fields_reach_the_estimators_and_missing_ones_are_named():
    """reward_baselines in verl's batch reaches fc_remax through compute_advantage itself; an input neither
    verl nor the context provides is an error naming it and where it comes from."""
    rewards, group_ids, mask, _ = random_batch(sizes=(4, 3, 2, 4))
    baselines = estimator_inputs(mask)["baseline_rewards"]
    data = verl_batch(rewards, group_ids, mask)
    data.batch["reward_baselines"] = baselines
    actual = run_verl("fc_remax", data)["advantages"]
    expected = fc.compute_advantages(rewards, group_ids, fc.AdvantageConfig(estimator="remax"), mask=mask.bool(),
                                     baseline_rewards=baselines)
    torch.testing.assert_close(actual, expected[:, None] * mask, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fc_gae needs values .verl's batch field 'values'"):
        run_verl("fc_gae", verl_batch(rewards, group_ids, mask))
    with pytest.raises(ValueError, match="ucas needs self_certainty .verl's actor does not compute it"):
        run_verl("ucas", verl_batch(rewards, group_ids, mask))


CANON_SCRIPT_NAME = {("entropy", "constant"): "dr_entropy_token_budget", ("length", "constant"): "dr_length_on_mean",
                     ("entropy", "anneal"): "dr_entropy_token_budget_annel",
                     ("entropy", "cosine_restart"): "dr_entropy_token_budget_cosine_restart",
                     ("entropy", "cosine_restart_r"): "dr_entropy_token_budget_cosine_restart_r"}
CANON_CASES = [c for c in load_cases() if c["kind"] == "advantage" and c["config"]["estimator"] == "canon"]


@pytest.mark.parametrize("case", CANON_CASES, ids=lambda c: c["source"].split()[-1] + f"-step{c.get('step', 0)}")
def test_canon_script_names_reproduce_canon_upstream(case):
    """CANON's own outputs (biuboomc/CANON, float64 upstream) through verl's compute_advantage and the
    script name CANON's run scripts use, options set as a Hydra config would set them."""
    config = dict(case["config"])
    name = CANON_SCRIPT_NAME[config.pop("canon_metric"), config.pop("canon_schedule", "constant")]
    config.pop("estimator")
    inputs = case["inputs"]
    entropy = torch.tensor(inputs["token_entropy"], dtype=torch.float32) if "token_entropy" in inputs else None
    data = verl_batch(inputs["rewards"], inputs["group_ids"], inputs["mask"])
    actual = run_verl(name, data, config, step=case.get("step", 0), token_entropy=entropy)["advantages"]
    assert relative_error(actual, torch.tensor(case["expected_token"])) < 1e-6


@pytest.mark.parametrize("ours, theirs, norm_by_std", [("fc_grpo", "grpo", True), ("fc_rloo", "rloo", True),
                                                        ("dr_grpo", "grpo", False)])
def test_agrees_with_verls_own_estimators(ours, theirs, norm_by_std):
    rewards, group_ids, mask, _ = random_batch(seed=4, sizes=(5, 5, 2, 1, 3))
    expected = compute_advantage(verl_batch(rewards, group_ids, mask), adv_estimator=theirs,
                                 norm_adv_by_std_in_grpo=norm_by_std,
                                 config=OmegaConf.create({"adv_estimator": theirs})).batch["advantages"]
    actual = run_verl(ours, verl_batch(rewards, group_ids, mask))["advantages"]
    assert (actual - expected).abs().max() < 1e-6


def test_options_are_checked_and_missing_context_is_an_error():
    rewards, group_ids, mask, entropy = random_batch()
    data = verl_batch(rewards, group_ids, mask)
    with pytest.raises(ValueError, match="unknown option.*canon_alfa"):
        run_verl("canon", data, {"canon_alfa": 1.2}, token_entropy=entropy)
    with pytest.raises(ValueError, match="algorithm.adv_estimator"):
        run_verl("canon", data, {"estimator": "grpo"}, token_entropy=entropy)
    config = OmegaConf.create({"adv_estimator": "dr_entropy_token_budget"})
    with pytest.raises(ValueError, match="trainer_mode=fused_canon_sync"):
        compute_advantage(data, adv_estimator="dr_entropy_token_budget", config=config)
    with pytest.raises(ValueError, match="token entropy"):
        run_verl("dr_entropy_token_budget", data, token_entropy=None)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_dp_size_factor_is_the_ddp_average(mode):
    """verl's agg_loss(dp_size=2) with global counts is 2x fused-canon's loss with the same counts:
    fused-canon's losses add up over ranks, verl pre-multiplies by dp_size for DDP's gradient average."""
    from fused_canon.losses import Normalizers

    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, 4, generator=g)
    mask = (torch.arange(4) < torch.tensor([4, 1, 3])[:, None]).float()
    ours = fc.agg_loss(values, mask, mode, Normalizers(17.0, 7.0, 4.0))
    theirs = core_algos.agg_loss(values, mask, mode, dp_size=2, batch_num_tokens=17, global_batch_size=7,
                                 loss_scale_factor=4)
    torch.testing.assert_close(theirs, 2 * ours)


def test_fc_gdpo_takes_verls_reward_keys_and_weights():
    rewards, group_ids, mask, _ = random_batch(seed=4)
    scores = torch.stack([rewards, torch.rand(len(rewards), generator=torch.Generator().manual_seed(5))], 1)
    algorithm = OmegaConf.create({"adv_estimator": "fc_gdpo", "gdpo_reward_keys": ["acc", "format"],
                                  "gdpo_reward_weights": [1.0, 0.25], "fused_canon": {}})
    with fc_verl.rollout_context(step=0, inputs={"rewards": scores}):
        ours = compute_advantage(verl_batch(rewards, group_ids, mask), adv_estimator="fc_gdpo", config=algorithm)
    expected = fc.compute_advantages(scores, group_ids, fc.AdvantageConfig(estimator="gdpo", reward_weights=[1.0, 0.25]),
                                     mask=mask.bool())
    torch.testing.assert_close(ours.batch["advantages"], expected[:, None] * mask)
    assert fc_verl.advantage_config("fc_gdpo", algorithm).reward_weights == [1.0, 0.25]


def test_fc_gdpo_errors_name_what_is_missing():
    rewards, group_ids, mask, _ = random_batch(seed=4)
    algorithm = OmegaConf.create({"adv_estimator": "fc_gdpo", "gdpo_reward_keys": ["acc", "format"],
                                  "fused_canon": {}})
    with pytest.raises(ValueError, match=r"fc_gdpo normalises each of algorithm.gdpo_reward_keys=\['acc', 'format'\] "
                                         r"on its own, and verl passes their scores only to its own gdpo"):
        compute_advantage(verl_batch(rewards, group_ids, mask), adv_estimator="fc_gdpo", config=algorithm)
    with fc_verl.rollout_context(step=0, inputs={"rewards": rewards[:, None]}):
        with pytest.raises(ValueError, match=r"rollout_context's rewards must be \[B=12, K=2\] \(one column per key "
                                             r"of \['acc', 'format'\]\), got \(12, 1\)"):
            compute_advantage(verl_batch(rewards, group_ids, mask), adv_estimator="fc_gdpo", config=algorithm)
    both = OmegaConf.create({"gdpo_reward_weights": [1.0], "fused_canon": {"reward_weights": [2.0]}})
    with pytest.raises(ValueError, match="algorithm.gdpo_reward_weights and algorithm.fused_canon.reward_weights "
                                         "are both set"):
        fc_verl.advantage_config("fc_gdpo", both)
