"""fc.token_signals and the signals the fused pass emits for the estimators (docs/algorithms.md §5.1, §1.3):
both backends, both statistics paths, the token_stats_ucas golden cases on Triton, and one read of the
logits when UCAS or the optimal token baseline runs inside policy_loss."""

import math

import pytest
import torch

import fused_canon as fc
from fused_canon import backends
from fused_canon.kernels import linear_token_stats, logits_token_stats
from fused_canon.statistics import torch_linear_token_stats
from golden import load_cases, run_case
from helpers import assert_elementwise_close, relative_error

F64 = torch.float64


@pytest.fixture
def auto_uses_the_interpreter(monkeypatch):
    """backend="auto" picks Triton on CPU tensors too (the kernels run in Triton's interpreter)."""
    monkeypatch.setattr(backends, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))


def reference_signals(logits, targets, temperature):
    """Every signal written out in float64 from its definition."""
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    return {"logprobs": log_p.gather(-1, targets[..., None]).squeeze(-1),
            "entropy": -(p * torch.where(p > 0, log_p, 0.0)).sum(-1),
            "self_certainty": torch.logsumexp(z, -1) - z.mean(-1),
            "target_logits": logits.double().gather(-1, targets[..., None]).squeeze(-1),
            "sum_pi_squared": (p * p).sum(-1)}


def random_batch(seed=0, batch=3, length=4, vocab=37, dtype=torch.float32, masked_vocab=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=g) * 3 + 2).to(dtype)
    if masked_vocab:
        logits[0, 0, -3:] = -math.inf  # a masked vocabulary: certainty +inf, p = 0 there
    targets = torch.randint(0, vocab - 3, (batch, length), generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor([length, 2, 3][:batch])[:, None]
    return logits, targets, mask


# token_signals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, dtype, tol", [("torch", F64, 1e-12), ("triton", torch.float32, 1e-4)])
def test_token_signals_match_their_definitions(backend, dtype, tol):
    logits, targets, mask = random_batch(dtype=dtype)
    signals = fc.token_signals(logits, targets, fc.SIGNALS, temperature=0.7, backend=backend, mask=mask)
    expected = reference_signals(logits, targets, 0.7)
    for name in fc.SIGNALS:
        value = signals[name]
        assert value.shape == targets.shape and not value.requires_grad
        assert value.dtype == (F64 if dtype == F64 else torch.float32)
        assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), name  # not read: 0
        assert_elementwise_close(value[mask], expected[name][mask], tol, name)
    assert signals["self_certainty"][0, 0] == math.inf


def test_token_signals_without_mask_and_any_leading_shape():
    logits, targets, _ = random_batch(dtype=F64, masked_vocab=False)
    flat = fc.token_signals(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), "sum_pi_squared",
                            backend="torch")
    assert set(flat) == {"sum_pi_squared"}
    torch.testing.assert_close(flat["sum_pi_squared"].reshape(targets.shape),
                               reference_signals(logits, targets, 1.0)["sum_pi_squared"], rtol=1e-12, atol=0)


def test_worked_example_of_the_other_row_reductions():
    """docs/algorithms.md §8.4: z = [2, 1, 0.5, -1, 3] gives sum p^2 = 0.451366 and self-certainty 2.372261."""
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]], dtype=F64)
    for backend, logits in (("torch", z), ("triton", z.float())):
        signals = fc.token_signals(logits, torch.tensor([1]), ["sum_pi_squared", "self_certainty"], backend=backend)
        assert math.isclose(signals["sum_pi_squared"].item(), 0.451366, abs_tol=1e-6), backend
        assert math.isclose(signals["self_certainty"].item(), 2.372261, abs_tol=1e-6), backend


def test_token_signals_rejects_unknown_names():
    logits, targets, _ = random_batch()
    with pytest.raises(ValueError, match="'certainty'.*self_certainty"):
        fc.token_signals(logits, targets, ["certainty"], backend="torch")


TOKEN_STATS_UCAS = [(i, c) for i, c in enumerate(load_cases("upstream_cases_wave2")) if c["kind"] == "token_stats_ucas"]


@pytest.mark.parametrize("index_case", TOKEN_STATS_UCAS, ids=lambda ic: str(ic[0]))
def test_token_stats_ucas_golden_triton_fp32(index_case):
    _, case = index_case
    for name, (actual, expected) in run_case(case, backend="triton", dtype=torch.float32).items():
        error = relative_error(actual, expected)
        assert error <= 1e-4, f"{name}: relative error {error:.3e} ({case['source']})"


def test_linear_kernel_extra_stats_match_the_reference():
    g = torch.Generator().manual_seed(3)
    hidden, weight, bias = torch.randn(7, 16, generator=g), torch.randn(45, 16, generator=g), torch.randn(45, generator=g)
    targets = torch.randint(0, 45, (7,), generator=g)
    row_index = torch.tensor([0, 2, 3, 6])
    triton_out = linear_token_stats.triton_linear_token_stats(hidden, weight, targets, row_index, bias=bias,
                                                              temperature=0.8, extra_stats=True)
    torch_out = torch_linear_token_stats(hidden.double(), weight.double(), targets, row_index, bias=bias.double(),
                                         temperature=0.8, extra_stats=True)
    assert len(triton_out) == len(torch_out) == 5
    for name, a, e in zip(fc.SIGNALS, triton_out, torch_out):
        assert_elementwise_close(a, e, 1e-4, name)
    assert not any(x.requires_grad for x in triton_out[2:])


# the fused pass ---------------------------------------------------------------------------------

class LaunchCounter:
    """Wraps a @triton.jit kernel and counts its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def grouped_rewards(batch):
    return torch.tensor([1.0, 0.0, 1.0][:batch]), torch.tensor([5, 5, 5][:batch])


@pytest.mark.parametrize("estimator", ["ucas", "optimal_token_baseline"])
def test_policy_loss_reads_the_logits_once(estimator, monkeypatch, auto_uses_the_interpreter):
    """UCAS / the optimal token baseline inside policy_loss: one launch of the statistics forward kernel
    (which reads each valid row once), exactly as for GRPO, and the advantages those signals give."""
    logits, targets, mask = random_batch(masked_vocab=False)
    rewards, group_ids = grouped_rewards(3)
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator=estimator), temperature=0.9)
    forward = LaunchCounter(logits_token_stats._token_stats_fwd_kernel)
    monkeypatch.setattr(logits_token_stats, "_token_stats_fwd_kernel", forward)
    x = logits.clone().requires_grad_()
    out = fc.policy_loss(x, targets, mask, rewards=rewards, group_ids=group_ids, config=config, backend="auto")
    out.loss.backward()
    assert forward.launches == 1
    assert out.backends["token_stats"].startswith("triton")
    assert out.advantages.shape == mask.shape

    signals = fc.token_signals(logits, targets, fc.SIGNALS, temperature=0.9, backend="torch", mask=mask)
    inputs = {name: signals[name] for name in ("self_certainty", "target_logits", "sum_pi_squared")}
    expected = fc.compute_advantages(rewards, group_ids, config.advantage, mask=mask,
                                     old_logprobs=signals["logprobs"], **inputs)
    assert_elementwise_close(out.advantages, expected, 1e-4, estimator)


def test_grpo_needs_no_extra_signals(monkeypatch, auto_uses_the_interpreter):
    """Only an estimator that declares a signal makes the pass compute it."""
    calls = []
    original = logits_token_stats.token_stats_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("extra_stats", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(logits_token_stats, "token_stats_forward", spy)
    logits, targets, mask = random_batch(masked_vocab=False)
    rewards, group_ids = grouped_rewards(3)
    for estimator in ("grpo", "ucas"):
        fc.policy_loss(logits, targets, mask, rewards=rewards, group_ids=group_ids, backend="auto",
                       config=fc.LossConfig(advantage=fc.AdvantageConfig(estimator=estimator)))
    assert calls == [False, True]


def test_linear_policy_loss_reads_once_with_ucas(monkeypatch, auto_uses_the_interpreter):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(3, 4, 16, generator=g), torch.randn(29, 16, generator=g)
    targets = torch.randint(0, 29, (3, 4), generator=g)
    mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 3])[:, None]
    rewards, group_ids = grouped_rewards(3)
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="ucas"))
    forward = LaunchCounter(linear_token_stats._linear_token_stats_fwd_kernel)
    monkeypatch.setattr(linear_token_stats, "_linear_token_stats_fwd_kernel", forward)
    out = fc.linear_policy_loss(hidden, weight, targets, mask, rewards=rewards, group_ids=group_ids, config=config,
                                backend="auto")
    reference = fc.linear_policy_loss(hidden.double(), weight.double(), targets, mask, rewards=rewards.double(),
                                      group_ids=group_ids, config=config, backend="torch")
    assert forward.launches == 1
    assert_elementwise_close(out.advantages, reference.advantages, 1e-4, "ucas advantages")


def test_ktae_takes_the_targets_as_token_ids():
    logits, targets, mask = random_batch(dtype=F64, masked_vocab=False)
    rewards, group_ids = grouped_rewards(3)
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="ktae"))
    out = fc.policy_loss(logits, targets, mask, rewards=rewards.double(), group_ids=group_ids, config=config,
                         backend="torch")
    expected = fc.compute_advantages(rewards.double(), group_ids, config.advantage, mask=mask, token_ids=targets)
    assert torch.equal(out.advantages, expected)


def test_advantage_inputs_supply_and_override():
    logits, targets, mask = random_batch(dtype=F64, masked_vocab=False)
    rewards, group_ids = grouped_rewards(3)
    values = torch.rand(mask.shape, dtype=F64)
    gae = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="gae"))
    with pytest.raises(ValueError, match="gae needs values.*advantage_inputs"):
        fc.policy_loss(logits, targets, mask, rewards=rewards.double(), group_ids=group_ids, config=gae,
                       backend="torch")
    out = fc.policy_loss(logits, targets, mask, rewards=rewards.double(), group_ids=group_ids, config=gae,
                         backend="torch", advantage_inputs={"values": values})
    assert torch.equal(out.advantages, fc.compute_advantages(rewards.double(), group_ids, gae.advantage, mask=mask,
                                                             values=values))
    # The rollout policy's own certainty replaces the pass's.
    ucas = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="ucas"))
    certainty = torch.rand(mask.shape, dtype=F64) * 5
    out = fc.policy_loss(logits, targets, mask, rewards=rewards.double(), group_ids=group_ids, config=ucas,
                         backend="torch", advantage_inputs={"self_certainty": certainty})
    raw = fc.token_signals(logits, targets, ["target_logits"], backend="torch", mask=mask)["target_logits"]
    assert torch.equal(out.advantages, fc.compute_advantages(rewards.double(), group_ids, ucas.advantage, mask=mask,
                                                             self_certainty=certainty, target_logits=raw))


def test_advantage_inputs_errors():
    logits, targets, mask = random_batch(dtype=F64, masked_vocab=False)
    rewards, group_ids = grouped_rewards(3)
    call = dict(rewards=rewards.double(), group_ids=group_ids, backend="torch")
    with pytest.raises(ValueError, match="'values'.*not read by estimator 'grpo'"):
        fc.policy_loss(logits, targets, mask, advantage_inputs={"values": torch.zeros(mask.shape)}, **call)
    with pytest.raises(ValueError, match="'critic'.*not an estimator input"):
        fc.policy_loss(logits, targets, mask, advantage_inputs={"critic": torch.zeros(mask.shape)}, **call)
    with pytest.raises(ValueError, match="advantage_inputs are inputs of the estimator"):
        fc.policy_loss(logits, targets, mask, advantages=torch.ones(3, dtype=F64), backend="torch",
                       advantage_inputs={"values": torch.zeros(mask.shape)})


def test_policy_loss_from_logprobs_asks_for_the_signals():
    logits, targets, mask = random_batch(dtype=F64, masked_vocab=False)
    rewards, group_ids = grouped_rewards(3)
    logp = fc.token_signals(logits, targets, ["logprobs"], backend="torch")["logprobs"]
    config = fc.LossConfig(advantage=fc.AdvantageConfig(estimator="ucas"))
    with pytest.raises(ValueError, match="^ucas needs self_certainty and target_logits: pass them"):
        fc.policy_loss_from_logprobs(logp, mask, rewards=rewards.double(), group_ids=group_ids, config=config,
                                     backend="torch")
    signals = fc.token_signals(logits, targets, ["self_certainty", "target_logits"], backend="torch", mask=mask)
    out = fc.policy_loss_from_logprobs(logp, mask, rewards=rewards.double(), group_ids=group_ids, config=config,
                                       backend="torch", advantage_inputs=signals)
    direct = fc.policy_loss(logits, targets, mask, rewards=rewards.double(), group_ids=group_ids, config=config,
                            backend="torch")
    torch.testing.assert_close(out.advantages, direct.advantages, rtol=1e-12, atol=1e-12)
