"""What several test modules share: error measures, a float64 reference for peaked rows, an allocation
recorder and a batch builder. Tests import it as ``helpers`` (pytest puts tests/ on sys.path)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------------------------------------
# Error measures
# ---------------------------------------------------------------------------------------------


def relative_error(actual, expected, scale_floor: float = 0.0) -> float:
    """max |a - e| / max(max |e|, scale_floor), in float64; 0 when both are exactly zero.

    ``scale_floor`` keeps quantities that are legitimately near 0 (a metric, a loss that is a sum of
    O(1) terms that cancel) from turning fp32 rounding into a large relative error."""
    actual = torch.as_tensor(actual).detach().cpu().to(torch.float64)
    expected = torch.as_tensor(expected).detach().cpu().to(torch.float64)
    scale = max(expected.abs().max().item(), scale_floor)
    diff = (actual - expected).abs().max().item()
    return 0.0 if scale == 0 and diff == 0 else diff / scale


def assert_elementwise_close(actual, expected, tol: float, name: str = "") -> None:
    """|a - e| <= tol * (|e| + max|e| / 100) elementwise, in float64. Infinities of ``expected`` must be
    matched exactly; ``actual`` must hold no NaN (nor an infinity where ``expected`` is finite)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert not torch.isnan(a).any(), f"{name}: NaN in {a}"
    inf = torch.isinf(e)
    assert torch.equal(a[inf], e[inf]), f"{name}: infinities differ"
    a, e = a[~inf], e[~inf]
    if e.numel() == 0:
        return
    bound = tol * (e.abs() + e.abs().max() / 100)
    err = (a - e).abs()
    worst = (err / bound).argmax()
    assert (err <= bound).all(), f"{name}: error {err[worst]:.3g} at value {e[worst]:.6g} (bound {bound[worst]:.3g})"


# ---------------------------------------------------------------------------------------------
# Float64 reference of very peaked rows
# ---------------------------------------------------------------------------------------------


def peaked_row_reference(logits: torch.Tensor, targets: torch.Tensor, c_logp: torch.Tensor, c_ent: torch.Tensor):
    """logp, entropy and dL/dlogits of L = sum c_logp logp + c_ent entropy for rows of ``logits [N, V]``
    (already tempered), in float64, keeping full *relative* precision where p_max ~ 1 - 1e-20. Entries
    equal to -inf contribute exactly nothing.

    log_softmax in float64 rounds log p_max ~ -1e-20 to 0 and 1 - p_max to 0, so it is written out
    (docs/algorithms.md §8) relative to the row maximum: with t = z - max z and r = the sum of exp(t) over all
    entries but one maximal one, lse = max + log1p(r), entropy = log1p(r) - sum(exp(t) t) / (1 + r); for
    the gradient, gap_k = z_y - z_k, q_k = exp(-gap_k) (q_y = 0), R = sum q:
    p_k = q_k / (1 + R), 1 - p_y = R / (1 + R), z_y - zbar = sum_k p_k gap_k."""
    z = logits.double()
    t = z - z.max(dim=-1, keepdim=True).values
    e = t.exp()
    first_max = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, t.argmax(-1, keepdim=True), True)
    r = torch.where(first_max, 0.0, e).sum(-1)  # the exact 1 of one maximal entry left out
    log_s = torch.log1p(r)
    entropy = log_s - torch.where(e > 0, e * t, 0.0).sum(-1) / (1.0 + r)
    logp = t.gather(-1, targets[:, None])[:, 0] - log_s

    gap = z.gather(-1, targets[:, None]) - z
    q = torch.exp(-gap).scatter(-1, targets[:, None], 0.0)
    big_r = q.sum(-1, keepdim=True)
    p = q / (1.0 + big_r)
    target_minus_zbar = torch.where(p > 0, p * gap, 0.0).sum(-1, keepdim=True)
    c_l, c_e = c_logp.double()[:, None], c_ent.double()[:, None]
    grad = torch.where(p > 0, -p * (c_l + c_e * (target_minus_zbar - gap)), 0.0)
    grad_target = c_l * big_r / (1.0 + big_r) - c_e * target_minus_zbar / (1.0 + big_r)
    grad = grad.scatter(-1, targets[:, None], grad_target)
    return logp, entropy, grad


# ---------------------------------------------------------------------------------------------
# Allocations
# ---------------------------------------------------------------------------------------------


class AllocationRecorder(TorchDispatchMode):
    """Records ``(op, shape)`` of every tensor an aten op returns that does not alias one of its inputs
    (views and the interpreter's byte views of argument storages are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    @property
    def numels(self):
        """``(op, numel)`` of every recorded tensor."""
        return [(op, torch.Size(shape).numel()) for op, shape in self.shapes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        input_storages = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


# ---------------------------------------------------------------------------------------------
# A policy-loss batch
# ---------------------------------------------------------------------------------------------


def make_batch(batch_size=4, length=4, vocab=64, *, dtype=torch.float32, seed=0, logit_scale=1.0, ragged=True,
               rewards=None, device="cpu"):
    """Inputs of ``fc.policy_loss`` drawn from one seeded generator, as a dict:

    logits [B, T, V] (standard normal times ``logit_scale``, drawn in float32 unless ``dtype`` is float64),
    targets [B, T], mask [B, T] (each row valid up to a random length if ``ragged``, else all valid),
    old_logprobs / ref_logprobs [B, T] (the logits' own log-probs plus noise of std 0.3 / 0.2: some
    tokens clip), rewards [B] (``rewards`` or random 0/1) and group_ids [B] (two interleaved groups,
    ids 10 and 11: groups need not be contiguous). Statistics-like tensors are float32 (float64 for
    float64 logits)."""
    g = torch.Generator().manual_seed(seed)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (logit_scale * torch.randn(batch_size, length, vocab, generator=g, dtype=stats_dtype)).to(dtype)
    targets = torch.randint(0, vocab, (batch_size, length), generator=g)
    if ragged:
        lengths = torch.randint(1, length + 1, (batch_size,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]
    else:
        mask = torch.ones(batch_size, length, dtype=torch.bool)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(batch_size, length, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(batch_size, length, generator=g, dtype=torch.float64)
    if rewards is None:
        rewards = torch.randint(0, 2, (batch_size,), generator=g).to(stats_dtype)
    else:
        rewards = torch.tensor(rewards[:batch_size], dtype=stats_dtype)
    batch = dict(logits=logits, targets=targets, mask=mask, old_logprobs=old.to(stats_dtype),
                 ref_logprobs=ref.to(stats_dtype), rewards=rewards, group_ids=torch.arange(batch_size) % 2 + 10)
    return {name: value.to(device) for name, value in batch.items()}


# ---------------------------------------------------------------------------------------------
# Trainer runs
# ---------------------------------------------------------------------------------------------

# Small and fast: a run of a few steps takes about a second on 2 CPU cores.
TINY_TRAINER = ["trainer.progress_bar=false", "trainer.logger=[jsonl]", "trainer.plot=false", "trainer.test_freq=0",
                "trainer.save_freq=0", "data.train_batch_size=4", "rollout.n=4", "model.hidden_size=32",
                "model.num_layers=1", "model.intermediate_size=64", "trainer.num_threads=2"]


def tiny_trainer_config(out_dir, *overrides):
    """A tiny trainer config writing into ``out_dir`` (needs the trainer's dependencies)."""
    from fused_canon.trainer.config import load_config

    return load_config(overrides=TINY_TRAINER + [f"trainer.out_dir={out_dir}"] + list(overrides))


def logged_steps(out_dir) -> dict:
    """{step: [metrics without the timings], ...}: every row of <out_dir>/metrics.jsonl, repeats kept."""
    from fused_canon.trainer.tracking import read_metrics

    rows = {}
    for row in read_metrics(f"{out_dir}/metrics.jsonl"):
        rows.setdefault(row["step"], []).append({k: v for k, v in row["data"].items() if not k.startswith("timing_s/")})
    return rows
