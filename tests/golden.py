"""The upstream golden cases (tests/data/) and how to run one through the public API; shared by the
torch and Triton tests.

``tests/data/upstream_cases.json`` (wave 1: verl 0.9.1, the CANON code, QAE) and
``tests/data/upstream_cases_wave2.json`` (wave 2: more verl 0.9.1 estimators and losses, UCAS, KTAE,
ADORA) hold seeded random inputs and the outputs the upstream implementations returned for them in
float64. They are data: the numbers are never edited by hand.
"""

import json
from pathlib import Path

import torch

import fused_canon as fc


DATA_DIR = Path(__file__).resolve().parent / "data"


def load_cases(name: str = "upstream_cases") -> list:
    """The cases of ``tests/data/<name>.json``."""
    return json.loads((DATA_DIR / f"{name}.json").read_text())["cases"]


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# Upstream aggregates these losses seq-mean-token-mean whatever loss_agg_mode says (the cases' `note`):
# sapo honours loss_agg_mode here and geo_mean refuses the other modes, so their cases run in the mode
# upstream actually used (tests/test_golden_wave2.py checks the stated modes separately).
FORCED_AGG_MODE = {"sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"}

# Advantage-case inputs that are not compute_advantages keywords of every estimator.
_COMMON_ADVANTAGE_INPUTS = ("rewards", "group_ids", "mask", "token_entropy")


def upstream_loss_config(case) -> dict:
    """The case's LossConfig fields, with loss_agg_mode set to the mode upstream really aggregated with."""
    config = dict(case["config"])
    if config["loss_mode"] in FORCED_AGG_MODE:
        config["loss_agg_mode"] = FORCED_AGG_MODE[config["loss_mode"]]
    return config


def run_case(case, backend="torch", dtype=torch.float64):
    """Returns {name: (actual, expected)} for every quantity the case pins.

    KTAE cases with ``expected_token_exact_p`` are compared with it: the Fisher p-value is exact here
    (fused_canon/ktae.py), and upstream's float ``p != 1.0`` test is the rounding accident the note
    describes.
    """
    inputs, expected, config = case["inputs"], case.get("expected", {}), case["config"]
    kind = case["kind"]
    if kind == "advantage":
        mask = _t(inputs["mask"])
        entropy = _t(inputs["token_entropy"]) if "token_entropy" in inputs else None
        extra = {name: _t(value, torch.long if name == "token_ids" else dtype)
                 for name, value in inputs.items() if name not in _COMMON_ADVANTAGE_INPUTS}
        advantages, returns = fc.compute_advantages(
            _t(inputs["rewards"], dtype), _t(inputs["group_ids"], torch.long), fc.AdvantageConfig(**config),
            mask=mask, token_entropy=entropy, step=case.get("step", 0), with_returns=True, **extra)
        token = advantages if advantages.dim() == 2 else advantages[:, None] * mask
        pairs = {"expected_token": (token, _t(case.get("expected_token_exact_p", case["expected_token"])))}
        if "advantages" in expected:
            pairs["advantages"] = (advantages if advantages.dim() == 1 else advantages.sum(-1) / mask.sum(-1),
                                   _t(expected["advantages"]))
        if "returns" in expected:
            pairs["returns"] = (returns if returns.dim() == 2 else returns[:, None] * mask, _t(expected["returns"]))
        return pairs
    if kind == "kl":
        logprobs = _t(inputs["logprobs"], dtype).requires_grad_()
        mask = _t(inputs["mask"], dtype)
        kl = fc.kl_penalty(logprobs, _t(inputs["ref_logprobs"], dtype), config["kl_type"])
        (kl * mask).sum().backward()
        return {"kl": (kl.detach() * mask, _t(expected["kl"]) * mask),
                "grad_logprobs": (logprobs.grad, _t(expected["grad_logprobs"]))}
    logits = _t(inputs["logits"], dtype).requires_grad_()
    targets = _t(inputs["targets"], torch.long)
    if kind == "token_stats_ucas":
        signals = fc.token_signals(logits, targets, ["self_certainty", "target_logits"],
                                   temperature=config["temperature"], backend=backend)
        return {name: (signals[name], _t(expected[name])) for name in ("self_certainty", "target_logits")}
    if kind == "token_stats":
        logprobs, entropy = fc.token_stats(logits, targets, temperature=config["temperature"], backend=backend)
        (logprobs.sum() + 0.5 * entropy.sum()).backward()
        return {"logprobs": (logprobs.detach(), _t(expected["logprobs"])),
                "entropy": (entropy.detach(), _t(expected["entropy"])),
                "grad_logits": (logits.grad, _t(expected["grad_logits_of_sum_logprobs_plus_half_entropy"]))}
    assert kind == "policy_loss", kind
    config = upstream_loss_config(case)
    out = fc.policy_loss(logits, targets, _t(inputs["mask"]), advantages=_t(inputs["advantages"]),
                         old_logprobs=_t(inputs["old_logprobs"]), config=fc.LossConfig(**config), backend=backend)
    out.loss.backward()
    pairs = {"loss": (out.loss.detach(), torch.tensor(expected["loss"], dtype=torch.float64)),
             "grad_logits": (logits.grad, _t(expected["grad_logits"]))}
    for name, value in expected["metrics"].items():
        pairs[name] = (torch.tensor(out.metrics[name], dtype=torch.float64), torch.tensor(value, dtype=torch.float64))
    return pairs
