"""The dispatch table (fused_canon/backends.py): what runs, why, and errors instead of silent fallbacks.

backend="triton" runs every stage in Triton or raises naming why; backend="auto" picks Triton on CUDA
and falls back where it cannot run, saying so in LossOutput.backends. On this CPU machine auto's
fallbacks are reached by letting auto use Triton on CPU tensors too (the interpreter), through
``backends.AUTO_TRITON_DEVICES``.
"""

import ast
from pathlib import Path

import pytest
import torch

import fused_canon as fc
from fused_canon import backends
from fused_canon.backends import ADVANTAGES, OBJECTIVE, select, triton_names
from fused_canon.kernels.advantages import MAX_GROUP_SIZE
from helpers import make_batch

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


@pytest.fixture
def auto_uses_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))


def loss_call(batch, config=None, backend="auto", **kwargs):
    return fc.policy_loss(batch["logits"], batch["targets"], batch["mask"], rewards=batch["rewards"],
                          group_ids=batch["group_ids"], config=config, backend=backend, **kwargs)


def test_kernels_are_a_leaf():
    """kernels/ imports torch, triton and itself only (no fused_canon module)."""
    imported = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported.append((path.name, "." * node.level + (node.module or "")))
    assert imported, "no imports found: the scan is broken"
    roots = {name.split(".")[0] or "." for _, name in imported if not name.startswith(".")}
    assert roots <= {"torch", "triton", "math", "os", "dataclasses", "typing", "__future__"}, imported
    assert all(not name.startswith("fused_canon") for _, name in imported)


def test_the_table_lists_the_built_in_names_with_kernels():
    assert triton_names(ADVANTAGES) == ["canon", "dr_grpo", "grpo", "rloo"]
    assert triton_names(OBJECTIVE) == ["cispo", "clip_cov", "gspo", "kl_cov", "sapo", "vanilla"]
    assert set(triton_names(ADVANTAGES)) <= set(fc.ESTIMATORS) and set(triton_names(OBJECTIVE)) <= set(fc.POLICY_LOSSES)


def test_auto_on_cpu_tensors_is_torch_and_says_so():
    out = loss_call(make_batch())
    assert out.backends == {name: "torch (auto: cpu tensors)" for name in ("token_stats", "advantages", "objective")}
    batch = make_batch()
    out = fc.policy_loss(batch["logits"], batch["targets"], batch["mask"], advantages=torch.ones(4), backend="torch")
    assert out.backends == {"token_stats": "torch (requested)", "objective": "torch (requested)"}  # no estimator


def test_auto_uses_triton_where_it_can(auto_uses_the_interpreter):
    out = loss_call(make_batch())
    assert out.backends == {**{name: "triton (auto: cpu tensors)" for name in ("token_stats", "advantages", "objective")},
                            "logits_pass": "two passes: no gradient is asked for: the statistics pass alone, no dlogits"}


def test_explicit_triton_refuses_fp64_and_auto_falls_back(auto_uses_the_interpreter):
    batch = make_batch(dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot run token_stats: fp64 logits: the Triton kernel "
                                         "takes fp32, fp16, bf16"):
        loss_call(batch, backend="triton")
    with pytest.raises(ValueError, match="cannot run token_stats: fp64 logits"):
        fc.token_stats(batch["logits"], batch["targets"], backend="triton")
    hidden, weight = torch.randn(4, 4, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot run linear_token_stats: fp64 hidden states"):
        fc.linear_policy_loss(hidden, weight, batch["targets"], batch["mask"], advantages=torch.ones(4),
                              backend="triton")
    # The estimator kernel computes in fp64 (as the reference does for every rewards dtype): fp64 rewards run.
    assert torch.allclose(fc.compute_advantages(batch["rewards"], batch["group_ids"], backend="triton"),
                          fc.compute_advantages(batch["rewards"], batch["group_ids"], backend="torch"),
                          rtol=1e-12, atol=1e-12)

    out = loss_call(batch)
    reference = loss_call(batch, backend="torch")
    assert out.backends == {"token_stats": "torch (auto: fp64 logits: the Triton kernel takes fp32, fp16, bf16)",
                            "advantages": "triton (auto: cpu tensors)",
                            "objective": "torch (auto: fp64 log-probs: the Triton kernel takes fp32)"}
    assert torch.allclose(out.loss, reference.loss, rtol=1e-12, atol=0)


def test_user_registered_names_run_in_torch_and_triton_refuses_them(monkeypatch, auto_uses_the_interpreter):
    monkeypatch.setitem(fc.ESTIMATORS, "sign", lambda rewards, groups, config, **kwargs: torch.sign(rewards - 0.5))
    monkeypatch.setitem(fc.POLICY_LOSSES, "reinforce", lambda logp, old, adv, mask, config, **kwargs:
                        fc.TokenLoss(-adv * logp))
    batch = make_batch()
    estimator = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="sign"))
    with pytest.raises(ValueError, match=r"cannot run advantages: estimator 'sign' has no Triton kernel \(Triton "
                                         r"estimators: \['canon', 'dr_grpo', 'grpo', 'rloo'\]\)"):
        loss_call(batch, estimator, backend="triton")
    loss = fc.LossConfig(loss_mode="reinforce")
    with pytest.raises(ValueError, match="cannot run objective: loss_mode 'reinforce' has no Triton kernel"):
        loss_call(batch, loss, backend="triton")

    out = loss_call(batch, estimator)
    assert out.backends["token_stats"] == "triton (auto: cpu tensors)"
    assert out.backends["advantages"].startswith("torch (auto: estimator 'sign' has no Triton kernel")
    assert out.backends["objective"] == "triton (auto: cpu tensors)"
    torch.testing.assert_close(out.advantages, torch.sign(batch["rewards"] - 0.5))
    out = loss_call(batch, loss)
    assert out.backends["objective"].startswith("torch (auto: loss_mode 'reinforce' has no Triton kernel")
    assert out.backends["advantages"] == "triton (auto: cpu tensors)"


def test_a_re_registered_built_in_is_no_longer_the_kernel(monkeypatch, auto_uses_the_interpreter):
    monkeypatch.setitem(fc.ESTIMATORS, "grpo", fc.ESTIMATORS["grpo"])  # restored after the test

    @fc.register_estimator("grpo", overwrite=True)
    def doubled(rewards, groups, config, *, metric=None, step=0):
        return 2 * rewards

    batch = make_batch()
    with pytest.raises(ValueError, match="estimator 'grpo' is registered to .*doubled, and its Triton kernel "
                                         "computes the built-in grpo"):
        fc.compute_advantages(batch["rewards"], batch["group_ids"], backend="triton")
    out = loss_call(batch)
    assert out.backends["advantages"].startswith("torch (auto: estimator 'grpo' is registered to")
    torch.testing.assert_close(out.advantages, 2 * batch["rewards"])


def test_a_group_larger_than_the_kernel_falls_back_under_auto(auto_uses_the_interpreter):
    rewards = torch.rand(MAX_GROUP_SIZE + 1, generator=torch.Generator().manual_seed(0))
    group_ids = torch.zeros(MAX_GROUP_SIZE + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"a prompt group has {MAX_GROUP_SIZE + 1} responses; the Triton estimator "
                                         f"kernel holds at most MAX_GROUP_SIZE={MAX_GROUP_SIZE}"):
        fc.compute_advantages(rewards, group_ids, backend="triton")
    advantages = fc.compute_advantages(rewards, group_ids, backend="auto")
    assert torch.equal(advantages, fc.compute_advantages(rewards, group_ids, backend="torch"))
    choice = select(ADVANTAGES, "auto", rewards, name="grpo", groups=fc.estimators.Groups.from_ids(group_ids),
                    config=fc.AdvantageConfig())
    assert choice.backend == "torch" and "MAX_GROUP_SIZE" in choice.reason


def test_bad_backend_names_and_op_names():
    batch = make_batch()
    with pytest.raises(ValueError, match=r"backend='gpu' is not valid; choose one of \['auto', 'triton', 'torch'\]"):
        fc.compute_advantages(batch["rewards"], batch["group_ids"], backend="gpu")
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        select("softmax", "torch", batch["logits"])


def test_triton_without_the_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    import fused_canon.kernels as kernels

    monkeypatch.setattr(kernels, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
        loss_call(make_batch(), backend="triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        loss_call(make_batch(), backend="triton")
