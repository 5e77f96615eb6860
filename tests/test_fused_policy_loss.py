"""The fused logits path (kernels/logits_policy_loss.py, docs/design.md §4.3): loss and dlogits from one
read of each row when every per-token coefficient is known before the pass.

The fused call (``fc.policy_loss`` on Triton) is compared with the two-pass Triton path it replaces (the
statistics kernel, the objective kernel, the statistics backward: ``triton_token_stats`` then
``policy_loss_from_logprobs``) and with the torch reference: loss, metrics, log-probs, entropies and dlogits.
Then which configurations take which path, the persistent grid, grad_output, inplace_backward and the
error flags.
"""

import dataclasses

import pytest
import torch

import fused_canon as fc
from fused_canon.api import scatter_rows, valid_row_index
from fused_canon import backends
from fused_canon.backends import LOGITS_PASS
from fused_canon.bench.counting import InterpreterTraffic
from fused_canon.kernels import logits_policy_loss
from fused_canon.kernels.logits_token_stats import triton_token_stats

from helpers import assert_elementwise_close, make_batch

REL = 1e-4  # fp32 on Triton against the two-pass path and the reference


def _two_pass(logits, targets, mask, config, **kwargs):
    """The two-pass Triton path: statistics kernel, objective kernel, statistics backward."""
    row_index = valid_row_index(mask)
    logp, entropy = triton_token_stats(logits, targets, row_index, config.temperature, check_rows=False)
    return fc.policy_loss_from_logprobs(scatter_rows(logp, row_index, mask.shape), mask,
                                        entropy=scatter_rows(entropy, row_index, mask.shape), config=config,
                                        backend="triton", **kwargs)


def _loss_and_grad(call, logits, scale=1.0):
    x = logits.detach().clone().requires_grad_()
    out = call(x)
    (scale * out.loss).backward()
    return out, x.grad


def _assert_same(fused, fused_grad, other, other_grad, rel=REL):
    assert_elementwise_close(fused.loss.detach(), other.loss.detach(), rel, "loss")
    assert_elementwise_close(fused.logprobs, other.logprobs, rel, "logprobs")
    assert_elementwise_close(fused.entropy, other.entropy, rel, "entropy")
    assert_elementwise_close(fused_grad, other_grad, rel, "dlogits")
    assert set(fused.metrics) == set(other.metrics)
    for name, value in other.metrics.items():
        assert fused.metrics[name] == pytest.approx(value, rel=rel, abs=1e-6), name


@pytest.fixture
def auto_uses_the_interpreter(monkeypatch):
    """backend="auto" picks Triton on CPU tensors too, where it can (the kernels run in the interpreter)."""
    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))


CONFIGS = {
    "vanilla": dict(),
    "dual_clip": dict(clip_ratio_c=2.0),
    "two_sided": dict(clip_ratio_c=1.5, dual_clip="two_sided"),
    "entropy_bonus+k3": dict(entropy_coeff=0.01, kl_coef=0.1),
    "k2+ straight-through, seq-mean-token-mean": dict(kl_coef=0.2, kl_type="abs+", loss_agg_mode="seq-mean-token-mean"),
    "k1, seq-mean-token-sum": dict(kl_coef=0.05, kl_type="k1", loss_agg_mode="seq-mean-token-sum"),
    "seq-mean-token-sum-norm, temperature": dict(loss_agg_mode="seq-mean-token-sum-norm", temperature=0.7,
                                                 entropy_coeff=0.02),
    "token-sum, unclamped k3": dict(loss_agg_mode="token-sum", kl_coef=0.1, kl_k3_clamp=False),
    "cispo": dict(loss_mode="cispo", clip_ratio_high=0.2),
    "cispo absolute": dict(loss_mode="cispo", cispo_bound="absolute", clip_ratio_high=1.2, kl_coef=0.1),
    "sapo": dict(loss_mode="sapo", entropy_coeff=0.01, kl_coef=0.1),
    "sapo, own temperatures, bias-corrected k3": dict(loss_mode="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3,
                                                      kl_coef=0.1, kl_bias_correction=True),
    "bias-corrected k2+": dict(kl_coef=0.2, kl_type="k2+", kl_bias_correction=True, clip_ratio_c=2.0),
    "cispo, bias-corrected k1": dict(loss_mode="cispo", clip_ratio_high=0.2, kl_coef=0.1, kl_type="k1",
                                     kl_bias_correction=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_equals_two_pass_and_reference(name):
    batch = make_batch(batch_size=4, length=5, vocab=200, seed=3, logit_scale=3.0)
    config = fc.LossConfig(**CONFIGS[name])
    kwargs = dict(advantages=torch.randn(4, generator=torch.Generator().manual_seed(1)),
                  old_logprobs=batch["old_logprobs"],
                  ref_logprobs=batch["ref_logprobs"] if config.kl_coef else None)
    targets, mask = batch["targets"], batch["mask"]
    fused, fused_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="triton", **kwargs), batch["logits"])
    assert fused.backends[LOGITS_PASS].startswith("fused")
    two_pass, two_pass_grad = _loss_and_grad(lambda x: _two_pass(x, targets, mask, config, **kwargs), batch["logits"])
    _assert_same(fused, fused_grad, two_pass, two_pass_grad)
    reference, reference_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="torch", **kwargs), batch["logits"])
    _assert_same(fused, fused_grad, reference, reference_grad)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "qae", "reinforce_plus_plus_baseline"])
def test_estimators_from_rewards_fuse_on_policy(estimator, auto_uses_the_interpreter):
    """Advantages from rewards that read no statistic of the pass (in Triton where the estimator has a
    kernel, else torch): computed first, then the fused kernel; on-policy the ratio is the pass's own, 1."""
    batch = make_batch(batch_size=8, length=4, vocab=100, seed=5)
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator=estimator), entropy_coeff=0.01)
    kwargs = dict(rewards=batch["rewards"], group_ids=batch["group_ids"])
    targets, mask = batch["targets"], batch["mask"]
    fused, fused_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="auto", **kwargs), batch["logits"])
    assert fused.backends[LOGITS_PASS].startswith("fused"), fused.backends
    reference, reference_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="torch", **kwargs), batch["logits"])
    _assert_same(fused, fused_grad, reference, reference_grad)
    assert torch.equal(fused.advantages, reference.advantages)


def test_rollout_weights_known_before_the_pass_fuse():
    batch = make_batch(batch_size=4, length=5, vocab=120, seed=7)
    rollout = batch["old_logprobs"] + 0.1
    config = fc.LossConfig(rollout_is="token")
    kwargs = dict(advantages=torch.tensor([1.0, -0.5, 0.3, -2.0]), old_logprobs=batch["old_logprobs"],
                  rollout_logprobs=rollout)
    targets, mask = batch["targets"], batch["mask"]
    fused, fused_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="triton", **kwargs), batch["logits"])
    assert fused.backends[LOGITS_PASS].startswith("fused")
    reference, reference_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="torch", **kwargs), batch["logits"])
    _assert_same(fused, fused_grad, reference, reference_grad)


def test_fp16_logits_fused_equal_two_pass():
    batch = make_batch(batch_size=3, length=4, vocab=160, seed=11, dtype=torch.float16, logit_scale=2.0)
    config = fc.LossConfig(entropy_coeff=0.01)
    kwargs = dict(advantages=torch.tensor([0.5, -1.0, 2.0]), old_logprobs=batch["old_logprobs"])
    targets, mask = batch["targets"], batch["mask"]
    fused, fused_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, targets, mask, config=config, backend="triton", **kwargs), batch["logits"])
    two_pass, two_pass_grad = _loss_and_grad(lambda x: _two_pass(x, targets, mask, config, **kwargs), batch["logits"])
    # Same fp32 arithmetic, one rounding of dlogits to fp16 on both paths: equal.
    assert torch.equal(fused_grad, two_pass_grad)
    assert fused.loss.item() == pytest.approx(two_pass.loss.item(), rel=1e-6)


# Which path each configuration takes (docs/design.md §4.3): the configuration's changes, the call's
# inputs, and the start of backends["logits_pass"].
PATHS = [
    ("advantages given", {}, "advantages", "fused"),
    ("grpo on-policy", {}, "rewards", "fused"),
    ("canon entropy on-policy", dict(advantage=fc.AdvantageConfig(estimator="canon")), "rewards",
     "two passes: CANON's entropy regrouping"),
    ("canon with its metric given", dict(advantage=fc.AdvantageConfig(estimator="canon")), "rewards+metric", "fused"),
    ("sapo", dict(loss_mode="sapo"), "advantages", "fused"),
    ("kl_bias_correction", dict(kl_bias_correction=True), "advantages", "fused"),
    ("gspo", dict(loss_mode="gspo"), "advantages", "two passes: loss_mode 'gspo'"),
    ("gspo with kl_bias_correction (torch objective)", dict(loss_mode="gspo", kl_bias_correction=True), "advantages",
     "two passes: the statistics or the objective run in torch"),
    ("clip_cov", dict(loss_mode="clip_cov"), "advantages", "two passes: loss_mode 'clip_cov'"),
    ("kl_cov", dict(loss_mode="kl_cov"), "advantages", "two passes: loss_mode 'kl_cov'"),
    ("optimal_token_baseline on-policy", dict(advantage=fc.AdvantageConfig(estimator="optimal_token_baseline")),
     "rewards", "two passes: estimator 'optimal_token_baseline' reads old_logprobs, sum_pi_squared"),
    ("rollout IS on-policy", dict(rollout_is="token"), "advantages+rollout", "two passes: the rollout IS weights"),
    ("top_entropy_quantile (torch objective)", dict(top_entropy_quantile=0.5), "advantages",
     "two passes: the statistics or the objective run in torch"),
]


@pytest.mark.parametrize("label,changes,given,expected", PATHS, ids=[p[0] for p in PATHS])
def test_which_path_each_configuration_takes(label, changes, given, expected, auto_uses_the_interpreter):
    batch = make_batch(batch_size=4, length=3, vocab=50, seed=2)
    config = dataclasses.replace(fc.LossConfig(), **changes)
    kwargs = dict(advantages=torch.ones(4)) if given.startswith("advantages") else dict(
        rewards=batch["rewards"], group_ids=batch["group_ids"])
    if given.endswith("metric"):
        kwargs["metric"] = torch.arange(4.0)
    if given.endswith("rollout"):
        kwargs["rollout_logprobs"] = batch["old_logprobs"]
    out = fc.policy_loss(batch["logits"].clone().requires_grad_(), batch["targets"], batch["mask"], config=config,
                         backend="auto", **kwargs)
    assert out.backends[LOGITS_PASS].startswith(expected), out.backends


def test_no_gradient_asked_runs_the_statistics_pass_alone():
    batch = make_batch()
    out = fc.policy_loss(batch["logits"], batch["targets"], batch["mask"], advantages=torch.ones(4), backend="triton")
    assert out.backends[LOGITS_PASS] == "two passes: no gradient is asked for: the statistics pass alone, no dlogits"


@pytest.mark.parametrize("programs", [1, 2, 3, 7, 64])
def test_persistent_grid_walks_every_row(programs):
    """Each program walks rows pid, pid + P, ...: any number of programs (fewer, as many as or more than
    the rows) gives the same statistics, sums and dlogits."""
    batch = make_batch(batch_size=3, length=4, vocab=70, seed=4)
    config = fc.LossConfig(entropy_coeff=0.01, kl_coef=0.1)
    inputs = fc.losses._objective_inputs(batch["mask"], torch.tensor([1.0, -1.0, 0.5])[:, None].expand(3, 4),
                                         batch["old_logprobs"], batch["ref_logprobs"], config,
                                         fc.losses.Normalizers(), None, logits_policy_loss.VANILLA)
    results = []
    for p in (programs, None):
        x = batch["logits"].clone().requires_grad_()
        loss, sums, logp, entropy = logits_policy_loss.triton_policy_loss(x, batch["targets"], inputs, programs=p)
        loss.backward()
        results.append((loss.detach(), torch.stack(sums), logp, entropy, x.grad))
    for a, b in zip(*results):
        assert_elementwise_close(a, b, 1e-6)
    assert torch.equal(results[0][4][~batch["mask"]], torch.zeros_like(results[0][4][~batch["mask"]]))


def test_grad_output_scales_dlogits_and_a_grad_output_of_one_moves_nothing():
    batch = make_batch(batch_size=2, length=3, vocab=40, seed=8)
    kwargs = dict(advantages=torch.tensor([1.0, -2.0]), old_logprobs=batch["old_logprobs"], backend="triton")
    _, once = _loss_and_grad(lambda x: fc.policy_loss(x, batch["targets"], batch["mask"], **kwargs), batch["logits"])
    _, scaled = _loss_and_grad(lambda x: fc.policy_loss(x, batch["targets"], batch["mask"], **kwargs),
                               batch["logits"], scale=-3.0)
    assert_elementwise_close(scaled, -3.0 * once, 1e-6)
    x = batch["logits"].clone().requires_grad_()
    loss = fc.policy_loss(x, batch["targets"], batch["mask"], **kwargs).loss
    with InterpreterTraffic() as traffic:
        loss.backward()
    assert [launch.kernel for launch in traffic.launches] == ["_scale_gradient_kernel"]
    assert traffic.launches[0].written_bytes == 0 and traffic.launches[0].read_bytes == 4 * 2 * 3  # grad_output


def test_inplace_backward_writes_dlogits_over_the_logits_in_the_forward():
    batch = make_batch(batch_size=3, length=4, vocab=60, seed=9)
    kwargs = dict(advantages=torch.tensor([1.0, -1.0, 0.5]), old_logprobs=batch["old_logprobs"], backend="triton")
    _, expected = _loss_and_grad(lambda x: fc.policy_loss(x, batch["targets"], batch["mask"], **kwargs),
                                 batch["logits"])
    leaf = batch["logits"].clone().requires_grad_()
    logits = leaf * 1.0  # computed in the graph, as an LM head's output
    out = fc.policy_loss(logits, batch["targets"], batch["mask"], inplace_backward=True, **kwargs)
    assert torch.equal(logits.detach(), expected)  # the forward wrote the gradient into the logits' storage
    out.loss.backward()
    assert torch.equal(leaf.grad, expected)
    x = batch["logits"].clone().requires_grad_()
    squared = x * 1.0
    kept = squared.square()  # saves `squared` for its backward
    out = fc.policy_loss(squared, batch["targets"], batch["mask"], inplace_backward=True, **kwargs)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + kept.sum()).backward()


def test_nonfinite_logits_raise_on_the_fused_path():
    batch = make_batch(batch_size=2, length=3, vocab=30, seed=1, ragged=False)
    logits = batch["logits"].clone()
    logits[1, 2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits are not finite in a valid row .*\(batch, position\) = \(1, 2\)"):
        fc.policy_loss(logits.requires_grad_(), batch["targets"], batch["mask"], advantages=torch.ones(2),
                       backend="triton")


def test_masked_vocabulary_and_padded_rows():
    """-inf entries (a masked vocabulary, a row whose only finite entry is the target) and padded rows,
    whose gradient is zero without their logits being read (NaN there changes nothing)."""
    batch = make_batch(batch_size=3, length=4, vocab=50, seed=6)
    logits = batch["logits"].clone()
    logits[0, 0, 10:] = float("-inf")
    logits[0, 0, batch["targets"][0, 0]] = 1.0
    logits[1, 0, :] = float("-inf")
    logits[1, 0, batch["targets"][1, 0]] = 0.5  # only the target is finite: logp = 0, H = 0
    logits[~batch["mask"]] = float("nan")
    config = fc.LossConfig(entropy_coeff=0.05)
    kwargs = dict(advantages=torch.tensor([1.0, -1.0, 2.0]), old_logprobs=batch["old_logprobs"], config=config)
    fused, fused_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, batch["targets"], batch["mask"], backend="triton", **kwargs), logits)
    assert fused.logprobs[1, 0] == 0.0 and fused.entropy[1, 0] == 0.0
    assert torch.equal(fused_grad[~batch["mask"]], torch.zeros_like(fused_grad[~batch["mask"]]))
    clean = torch.where(batch["mask"][..., None], logits, torch.zeros_like(logits))
    reference, reference_grad = _loss_and_grad(
        lambda x: fc.policy_loss(x, batch["targets"], batch["mask"], backend="torch", **kwargs), clean)
    _assert_same(fused, fused_grad, reference, reference_grad)


def test_rows_in_flight_fit_the_l2_of_an_h100(monkeypatch):
    """The docs' arithmetic (docs/design.md §4.3): at V = 151,936 bf16 on 132 SMs with 50 MiB of L2."""

    class H100:
        L2_cache_size = 50 * 2**20
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)
    row_bytes = 151936 * 2
    cuda = torch.device("cuda")
    assert logits_policy_loss.rows_in_flight(cuda, row_bytes, 16384) == 129
    assert 129 * row_bytes <= 0.75 * H100.L2_cache_size < 130 * row_bytes
    assert logits_policy_loss.rows_in_flight(cuda, 32000 * 2, 16384) == 132 * 4  # small rows: 4 programs per SM
    assert logits_policy_loss.rows_in_flight(cuda, row_bytes, 5) == 5  # never more programs than rows
