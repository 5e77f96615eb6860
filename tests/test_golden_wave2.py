"""Every wave-2 upstream golden case (verl 0.9.1's other estimators and losses, UCAS, KTAE, ADORA) through
the public API in fp64: relative error <= 1e-9 (the token_stats_ucas cases also on Triton in fp32, in
test_token_signals.py).

Three kinds of case rest on an upstream quirk (their `note`), handled as follows, never skipped:
  * KTAE: compared with ``expected_token_exact_p`` (exact Fisher p-values, our decision); the float
    ``expected_token`` differs exactly where upstream's ``p != 1.0`` test misfires.
  * sapo with loss_agg_mode != seq-mean-token-mean: upstream ignored the mode, so the case runs in
    seq-mean-token-mean; in the stated mode sapo honours it (test below).
  * geo_mean: upstream ignored loss_agg_mode (plain mean over sequences); the case runs in
    seq-mean-token-mean, and every other stated mode is refused with a clear error (test below).
"""

import pytest
import torch

import fused_canon as fc
from golden import FORCED_AGG_MODE, load_cases, run_case
from helpers import relative_error

CASES = load_cases("upstream_cases_wave2")


def _name(case):
    return case["config"].get("estimator") or case["config"].get("loss_mode") or case["kind"]


def _case_id(index_case):
    index, case = index_case
    return f"{index}-{case['kind']}-{_name(case)}"


def test_wave2_file_has_every_method():
    assert len(CASES) == 180
    names = {(case["kind"], _name(case)) for case in CASES}
    assert {name for kind, name in names if kind == "advantage"} == {
        "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "opo", "gpg", "grpo_passk", "gae",
        "optimal_token_baseline", "ucas", "ktae", "adora"}
    assert {name for kind, name in names if kind == "policy_loss"} == {"sapo", "gpg", "geo_mean"}
    assert sum(case["kind"] == "token_stats_ucas" for case in CASES) == 12


@pytest.mark.parametrize("index_case", list(enumerate(CASES)), ids=_case_id)
def test_wave2_case_torch_fp64(index_case):
    _, case = index_case
    for name, (actual, expected) in run_case(case, backend="torch").items():
        error = relative_error(actual, expected)
        assert error <= 1e-9, f"{name}: relative error {error:.3e} ({case['source']})"


KTAE_NOTED = [(i, c) for i, c in enumerate(CASES) if "expected_token_exact_p" in c]


def test_ktae_float_p_differs_from_exact_p_only_where_noted():
    """The exact-p decision is visible: at least one noted case differs from upstream's float result."""
    assert KTAE_NOTED
    differing = 0
    for _, case in KTAE_NOTED:
        exact = torch.tensor(case["expected_token_exact_p"], dtype=torch.float64)
        floating = torch.tensor(case["expected_token"], dtype=torch.float64)
        differing += int(relative_error(exact, floating) > 1e-9)
        (actual, _), = [pair for name, pair in run_case(case).items() if name == "expected_token"]
        assert relative_error(actual, exact) <= 1e-9
    assert differing > 0


def _loss_inputs(case):
    inputs = case["inputs"]
    t = lambda v, d=torch.float64: torch.tensor(v, dtype=d)  # noqa: E731
    return (t(inputs["logits"]), t(inputs["targets"], torch.long), t(inputs["mask"])), dict(
        advantages=t(inputs["advantages"]), old_logprobs=t(inputs["old_logprobs"]))


NOTED_LOSS_CASES = [(i, c) for i, c in enumerate(CASES) if c["kind"] == "policy_loss" and "note" in c]


@pytest.mark.parametrize("index_case", NOTED_LOSS_CASES, ids=_case_id)
def test_wave2_noted_loss_in_its_stated_mode(index_case):
    """sapo honours the stated loss_agg_mode: its loss is agg_loss of the same token losses in that mode;
    geo_mean refuses any mode but seq-mean-token-mean."""
    _, case = index_case
    config = dict(case["config"])
    (logits, targets, mask), kwargs = _loss_inputs(case)
    if config["loss_mode"] == "geo_mean":
        if config["loss_agg_mode"] == FORCED_AGG_MODE["geo_mean"]:
            return  # stated and forced mode agree: covered by test_wave2_case_torch_fp64
        with pytest.raises(ValueError, match="geo_mean.*sequence-level.*seq-mean-token-mean"):
            fc.policy_loss(logits, targets, mask, config=fc.LossConfig(**config), backend="torch", **kwargs)
        return
    stated = fc.LossConfig(**config)
    out = fc.policy_loss(logits, targets, mask, config=stated, backend="torch", **kwargs)
    logp, _ = fc.token_stats(logits, targets, temperature=stated.temperature, backend="torch")
    token_loss = fc.POLICY_LOSSES["sapo"](logp, kwargs["old_logprobs"], kwargs["advantages"][:, None] * mask, mask,
                                          stated).values
    expected = fc.agg_loss(token_loss, mask, stated.loss_agg_mode)
    assert relative_error(out.loss.detach(), expected) <= 1e-12
    forced = fc.policy_loss(logits, targets, mask, backend="torch", **kwargs,
                            config=fc.LossConfig(**{**config, "loss_agg_mode": FORCED_AGG_MODE["sapo"]}))
    assert relative_error(forced.loss.detach(), torch.tensor(case["expected"]["loss"], dtype=torch.float64)) <= 1e-9
