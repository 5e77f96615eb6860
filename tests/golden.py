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


def run_case(case, backend="torch", dtype=torch.float64):
    """Returns {name: (actual, expected)} for every quantity the case pins."""
    inputs, expected, config = case["inputs"], case.get("expected", {}), case["config"]
    kind = case["kind"]
    if kind == "advantage":
        mask = _t(inputs["mask"])
        entropy = _t(inputs["token_entropy"]) if "token_entropy" in inputs else None
        advantages = fc.compute_advantages(_t(inputs["rewards"], dtype), _t(inputs["group_ids"], torch.long),
                                           fc.AdvantageConfig(**config), mask=mask, token_entropy=entropy,
                                           step=case.get("step", 0))
        pairs = {"expected_token": (advantages[:, None] * mask, _t(case["expected_token"]))}
        if "advantages" in expected:
            pairs["advantages"] = (advantages, _t(expected["advantages"]))
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
    if kind == "token_stats":
        logprobs, entropy = fc.token_stats(logits, targets, temperature=config["temperature"], backend=backend)
        (logprobs.sum() + 0.5 * entropy.sum()).backward()
        return {"logprobs": (logprobs.detach(), _t(expected["logprobs"])),
                "entropy": (entropy.detach(), _t(expected["entropy"])),
                "grad_logits": (logits.grad, _t(expected["grad_logits_of_sum_logprobs_plus_half_entropy"]))}
    assert kind == "policy_loss", kind
    out = fc.policy_loss(logits, targets, _t(inputs["mask"]), advantages=_t(inputs["advantages"]),
                         old_logprobs=_t(inputs["old_logprobs"]), config=fc.LossConfig(**config), backend=backend)
    out.loss.backward()
    pairs = {"loss": (out.loss.detach(), torch.tensor(expected["loss"], dtype=torch.float64)),
             "grad_logits": (logits.grad, _t(expected["grad_logits"]))}
    for name, value in expected["metrics"].items():
        pairs[name] = (torch.tensor(out.metrics[name], dtype=torch.float64), torch.tensor(value, dtype=torch.float64))
    return pairs
