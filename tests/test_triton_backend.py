"""backend="triton" through the public API equals the torch reference (fp32: relative error <= 1e-4).

Runs the Triton kernels in the interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py), and
compiled on a GPU when one is present. Shapes are small: each interpreted program costs ~3 ms.
"""

import itertools

import pytest
import torch

import fused_canon as fc
from fused_canon.config import LOSS_AGG_MODES
from golden import load_cases, run_case
from helpers import AllocationRecorder, make_batch, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSS_MODES = ["vanilla", "clip_cov", "kl_cov", "gspo", "cispo"]
ADVANTAGE_CONFIGS = {
    "grpo": fc.AdvantageConfig(estimator="grpo"),
    "dr_grpo": fc.AdvantageConfig(estimator="dr_grpo", token_budget=8.0),
    "rloo": fc.AdvantageConfig(estimator="rloo"),
    "qae": fc.AdvantageConfig(estimator="grpo", baseline="quantile", quantile_k=0.4),
    "canon_entropy": fc.AdvantageConfig(estimator="canon", canon_alpha=1.2, canon_lambda=0.8),
    "canon_length": fc.AdvantageConfig(estimator="canon", canon_metric="length", canon_schedule="cosine_restart"),
}


def batch_on_device(**kwargs):
    """helpers.make_batch with logits of std 2 (peakier rows), on DEVICE."""
    kwargs.setdefault("rewards", (1.0, 0.0, 0.0, 1.0))
    return make_batch(logit_scale=2.0, device=DEVICE, **kwargs)


def both_backends(batch, config, step=3, **extra):
    """Loss, dlogits and outputs of the torch reference and the Triton backend on the same input."""
    results = {}
    for backend in ("torch", "triton"):
        logits = batch["logits"].clone().requires_grad_()
        kwargs = {k: v for k, v in batch.items() if k not in ("logits", "targets", "mask")}
        kwargs.update(extra)
        out = fc.policy_loss(logits, batch["targets"], batch["mask"], config=config, step=step, backend=backend,
                             **kwargs)
        out.loss.backward()
        results[backend] = (out, logits.grad)
    return results


def scalar_error(actual: float, expected: float) -> float:
    """Relative error of a scalar that is a sum of O(1) terms: near 0 (cancellation) an absolute
    error of 1e-6 is fp32 rounding, so the scale is floored at 1e-2."""
    return relative_error(actual, expected, scale_floor=1e-2)


def assert_backends_agree(results, tolerance=1e-4):
    (ref, ref_grad), (tri, tri_grad) = results["torch"], results["triton"]
    assert scalar_error(tri.loss.item(), ref.loss.item()) <= tolerance
    assert relative_error(tri_grad.float(), ref_grad.float()) <= tolerance
    assert relative_error(tri.logprobs, ref.logprobs) <= tolerance
    assert relative_error(tri.entropy, ref.entropy) <= tolerance
    assert relative_error(tri.advantages, ref.advantages) <= tolerance
    assert tri.metrics.keys() == ref.metrics.keys()
    for name in ref.metrics:
        assert scalar_error(tri.metrics[name], ref.metrics[name]) <= tolerance, name


@pytest.mark.parametrize("loss_mode, agg_mode, estimator",
                         list(itertools.product(LOSS_MODES, LOSS_AGG_MODES, ADVANTAGE_CONFIGS)))
def test_every_loss_aggregation_and_estimator(loss_mode, agg_mode, estimator):
    config = fc.LossConfig(advantage=ADVANTAGE_CONFIGS[estimator], loss_mode=loss_mode, loss_agg_mode=agg_mode,
                           clip_ratio_high=0.28, entropy_coeff=0.01, kl_coef=0.05, clip_cov_ratio=0.2,
                           clip_cov_lb=-1.0, kl_cov_ratio=0.2)
    assert_backends_agree(both_backends(batch_on_device(), config))


@pytest.mark.parametrize("vocab", [1000, 4099])
def test_vocab_not_a_multiple_of_the_block(vocab):
    batch = batch_on_device(batch_size=2, length=2, vocab=vocab)
    assert_backends_agree(both_backends(batch, fc.LossConfig(entropy_coeff=0.1)))


def test_masked_vocabulary_rows():
    batch = batch_on_device()
    logits = batch["logits"]
    logits[0, 0, :] = float("-inf")
    logits[0, 0, batch["targets"][0, 0]] = 1.5  # -inf everywhere but the target
    logits[1, 0, :17] = float("-inf")
    logits[1, 0, batch["targets"][1, 0]] = 0.0
    results = both_backends(batch, fc.LossConfig(entropy_coeff=0.1))
    assert_backends_agree(results)
    out, grad = results["triton"]
    assert out.logprobs[0, 0].item() == 0.0 and out.entropy[0, 0].item() == 0.0
    assert torch.isfinite(grad).all() and not grad[0, 0].any()


def test_masked_rows_get_zero_gradient_and_are_not_read():
    batch = batch_on_device()
    batch["logits"][~batch["mask"]] = float("nan")  # a masked row is never read
    results = both_backends(batch, fc.LossConfig(entropy_coeff=0.1))
    _, grad = results["triton"]
    assert torch.isfinite(grad).all() and not grad[~batch["mask"]].any()
    ref_grad = results["torch"][1]
    assert relative_error(grad, ref_grad) <= 1e-4


@pytest.mark.parametrize("rewards", [(1.0, 0.0, 1.0, 0.0), (1.0, 1.0, 1.0, 1.0)], ids=["singletons", "all-equal"])
def test_groups_of_one_and_all_equal_rewards(rewards):
    batch = batch_on_device(rewards=rewards)
    if rewards[0] != rewards[1]:
        batch["group_ids"] = torch.arange(4, device=DEVICE)  # every group is a singleton
    for estimator in ("grpo", "rloo", "canon_entropy"):
        assert_backends_agree(both_backends(batch, fc.LossConfig(advantage=ADVANTAGE_CONFIGS[estimator])))


def test_temperature():
    assert_backends_agree(both_backends(batch_on_device(), fc.LossConfig(temperature=0.7, entropy_coeff=0.05)))


def test_fp16_inputs():
    batch = batch_on_device(dtype=torch.float16)
    results = both_backends(batch, fc.LossConfig(entropy_coeff=0.05))
    # Both backends read the same fp16 logits and accumulate in fp32; dlogits are rounded to fp16.
    assert_backends_agree(results, tolerance=2e-3)


def test_token_stats_backend():
    batch = batch_on_device(vocab=300)
    stats = {}
    for backend in ("torch", "triton"):
        logits = batch["logits"].clone().requires_grad_()
        logp, entropy = fc.token_stats(logits, batch["targets"], temperature=0.8, backend=backend)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        stats[backend] = (logp.detach(), entropy.detach(), logits.grad)
    for ref, tri in zip(stats["torch"], stats["triton"]):
        assert relative_error(tri, ref) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_backward_writes_dlogits_into_the_logits_buffer(backend):
    batch = batch_on_device()
    kwargs = dict(advantages=torch.tensor([1.0, -1.0, 0.5, 0.0], device=DEVICE), old_logprobs=batch["old_logprobs"])
    logits = batch["logits"].clone().requires_grad_()
    fc.policy_loss(logits, batch["targets"], batch["mask"], backend="torch", **kwargs).loss.backward()

    leaf = batch["logits"].clone().requires_grad_()
    buffer = leaf * 1.0  # an activation whose memory the caller lets the kernel overwrite
    out = fc.policy_loss(buffer, batch["targets"], batch["mask"], backend=backend, inplace_backward=True, **kwargs)
    out.loss.backward()
    assert relative_error(buffer.detach(), logits.grad) <= 1e-4  # the buffer now holds dlogits
    assert relative_error(leaf.grad, logits.grad) <= 1e-4


@pytest.mark.parametrize("overlapping", [
    lambda base: base[:1].expand(4, 4, 64),  # every row is the first row's memory
    lambda base: base.reshape(-1).as_strided((4, 4, 64), (64, 32, 1)),  # rows interleave
], ids=["expand", "as_strided"])
@pytest.mark.parametrize("inplace_backend", ["torch", "triton"])
def test_inplace_backward_refuses_logits_whose_elements_overlap(overlapping, inplace_backend):
    """Writing dlogits in place over memory that several logits share would sum their gradients into one
    slot (a wrong gradient, silently): refused. Without inplace_backward the gradient is right."""
    batch = batch_on_device()
    kwargs = dict(advantages=torch.tensor([1.0, -1.0, 0.5, 0.0], device=DEVICE))
    base = batch["logits"].clone().requires_grad_()
    with pytest.raises(ValueError, match=r"inplace_backward=True writes dlogits over the logits, but these logits .*"
                                         r"share memory between elements"):
        fc.policy_loss(overlapping(base * 1.0), batch["targets"], batch["mask"], backend=inplace_backend,
                       inplace_backward=True, **kwargs)
    grads = []
    for backend in ("torch", "triton"):
        base.grad = None
        fc.policy_loss(overlapping(base), batch["targets"], batch["mask"], backend=backend, **kwargs).loss.backward()
        grads.append(base.grad)
    assert relative_error(grads[1], grads[0]) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("leaf", [False, True], ids=["activation", "leaf"])
def test_inplace_backward_memory(leaf, backend):
    """inplace_backward allocates no [B, T, V] gradient, on either statistics backend: for logits computed
    in the graph (an LM head's output) the backward consumes the buffer; for leaf logits the gradient comes
    back as a fresh alias of the buffer, which AccumulateGrad takes as .grad without a copy."""
    batch = batch_on_device(vocab=64)
    B, T, V = batch["logits"].shape
    kwargs = dict(advantages=torch.tensor([1.0, -1.0, 0.5, 0.0], device=DEVICE))
    big = {}
    for inplace in (False, True):
        hidden = torch.randn(B, T, 8, device=DEVICE, requires_grad=True)
        head = torch.randn(V, 8, device=DEVICE, requires_grad=True)
        logits = batch["logits"].clone().requires_grad_() if leaf else hidden @ head.T
        recorder = AllocationRecorder()
        with recorder:  # forward and backward: the fused path writes dlogits in the forward
            fc.policy_loss(logits, batch["targets"], batch["mask"], backend=backend, inplace_backward=inplace,
                           **kwargs).loss.backward()
        big[inplace] = [op for op, numel in recorder.numels if numel == B * T * V]
        if leaf and inplace:
            assert logits.grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert len(big[False]) == 1  # dlogits
    assert big[True] == [], big[True]


GOLDEN = [(i, c) for i, c in enumerate(load_cases()) if c["kind"] in ("token_stats", "policy_loss")]


@pytest.mark.parametrize("index_case", GOLDEN, ids=lambda ic: f"{ic[0]}-{ic[1]['kind']}")
def test_golden_case_triton_fp32(index_case):
    _, case = index_case
    for name, (actual, expected) in run_case(case, backend="triton", dtype=torch.float32).items():
        error = scalar_error(actual.item(), expected.item()) if actual.dim() == 0 else relative_error(actual, expected)
        assert error <= 1e-4, f"{name}: relative error {error:.3e} ({case['source']})"


def test_policy_loss_allocates_no_row_by_vocab_tensor_besides_dlogits():
    batch = batch_on_device(vocab=1000, dtype=torch.float16)  # an fp32 upcast of the logits would show up
    logits = batch["logits"].clone().requires_grad_()
    config = fc.LossConfig(entropy_coeff=0.01, kl_coef=0.1, advantage=fc.AdvantageConfig(estimator="canon"))
    recorder = AllocationRecorder()
    with recorder:
        out = fc.policy_loss(logits, batch["targets"], batch["mask"], rewards=batch["rewards"],
                             group_ids=batch["group_ids"], old_logprobs=batch["old_logprobs"],
                             ref_logprobs=batch["ref_logprobs"], config=config, backend="triton")
        out.loss.backward()
    vocabulary_sized = [(op, n) for op, n in recorder.numels if n >= 1000]
    assert vocabulary_sized and all(n == logits.numel() for _, n in vocabulary_sized), vocabulary_sized
    assert len(vocabulary_sized) == 1, vocabulary_sized  # dlogits, once


def test_triton_backend_runs_every_stage_in_triton(monkeypatch):
    """Every kernel of the logits path launches (their module globals are spied on), and LossOutput says so."""
    import fused_canon.kernels.advantages as advantages_module
    import fused_canon.kernels.logits_token_stats as token_stats_module
    import fused_canon.kernels.objective as objective_module

    launched = []

    class LaunchSpy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for module, name in ((token_stats_module, "_token_stats_fwd_kernel"),
                         (token_stats_module, "_token_stats_bwd_kernel"),
                         (objective_module, "_policy_objective_fwd_kernel"),
                         (advantages_module, "_group_advantages_kernel")):
        monkeypatch.setattr(module, name, LaunchSpy(getattr(module, name), name))
    batch = batch_on_device()
    config = fc.LossConfig(advantage=ADVANTAGE_CONFIGS["canon_entropy"], entropy_coeff=0.01)
    out = fc.policy_loss(batch["logits"].requires_grad_(), batch["targets"], batch["mask"], rewards=batch["rewards"],
                         group_ids=batch["group_ids"], config=config, backend="triton")
    out.loss.backward()
    assert sorted(launched) == ["_group_advantages_kernel", "_policy_objective_fwd_kernel", "_token_stats_bwd_kernel",
                                "_token_stats_fwd_kernel"]
    assert out.backends == {"token_stats": "triton (requested)", "advantages": "triton (requested)",
                            "objective": "triton (requested)",
                            "logits_pass": "two passes: CANON's entropy regrouping reads this pass's entropy (pass "
                                           "metric= to fuse)"}
