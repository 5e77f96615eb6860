"""Token-statistics kernels from logits (kernels/logits_token_stats.py) against a float64 torch reference.

By default the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is
set here unless the environment sets it); with ``TRITON_INTERPRET=0`` on a CUDA machine the
same tests run the compiled kernels on the GPU. The reference always runs on CPU in float64.
Tolerances: fp32 and fp16/bf16 *inputs* are exact in float64, so every forward statistic is
checked at 1e-4 relative; dlogits is checked at 1e-4 relative in fp32, and at the output
dtype's rounding in fp16 (2**-10) and bf16 (2**-7: the interpreter truncates fp32 -> bf16
instead of rounding, so one full ulp).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import AllocationRecorder, assert_elementwise_close  # noqa: E402

from fused_canon.kernels.logits_token_stats import (  # noqa: E402
    _token_stats_fwd_kernel,
    token_stats_backward,
    token_stats_forward,
    triton_token_stats,
)

NEG_INF = float("-inf")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if _INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(not _INTERPRET and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels")


def D(*tensors):
    """The tensors on the device the kernels run on."""
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def fwd(logits, targets, row_index, *args, **kw):
    """token_stats_forward on DEVICE; outputs back on CPU."""
    return [o.cpu() for o in token_stats_forward(*D(logits, targets, row_index), *args, **kw)]


# ----------------------------------------------------------------------------- reference


def reference(logits, targets, row_index, temperature=1.0, c_logp=None, c_ent=None):
    """float64 torch: logp, entropy, lse, certainty, raw target logit, sum p^2 of the valid rows, and
    d(sum c_logp*logp + c_ent*H)/dlogits (zeros in masked rows)."""
    B, T, V = logits.shape
    x = logits.detach().to(torch.float64).requires_grad_(True)
    z = (x / temperature).reshape(B * T, V)[row_index]
    y = targets.reshape(-1)[row_index].long()
    ls = torch.log_softmax(z, dim=-1)
    p = ls.exp()
    logp = ls.gather(1, y[:, None])[:, 0]
    ent = -(p * torch.where(p > 0, ls, 0.0)).sum(-1)  # 0 * log 0 = 0
    lse = torch.logsumexp(z, dim=-1)
    certainty = lse - z.mean(-1)
    target_logit = logits.detach().reshape(B * T, V)[row_index].gather(1, y[:, None])[:, 0].double()
    sum_pi_squared = (p * p).sum(-1)
    grad = None
    if c_logp is not None or c_ent is not None:
        loss = 0.0
        if c_logp is not None:
            loss = loss + (c_logp.double() * logp).sum()
        if c_ent is not None:
            loss = loss + (c_ent.double() * ent).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return dict(logp=logp.detach(), entropy=ent.detach(), lse=lse.detach(), certainty=certainty.detach(),
                target_logit=target_logit, sum_pi_squared=sum_pi_squared.detach(), grad=grad)


def make_case(B, T, V, dtype=torch.float32, seed=0, scale=3.0, offset=4.0, neg_inf_row=True):
    """Random logits with a masked pattern; row 0 has ~40% -inf vocabulary entries. The
    offset keeps mean_v(z) away from 0 (so a wrong divisor in the certainty shows)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale + offset
    if neg_inf_row:
        drop = torch.rand(V, generator=g) < 0.4
        logits[0, 0, drop] = NEG_INF
    targets = torch.randint(0, V, (B, T), generator=g)
    if neg_inf_row:  # a finite target in the -inf row
        targets[0, 0] = int((~drop).nonzero()[0])
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1, -1] = False
    row_index = mask.reshape(-1).nonzero().squeeze(1)
    N = row_index.numel()
    c_logp = torch.randn(N, generator=g)
    c_ent = torch.randn(N, generator=g)
    return logits.to(dtype), targets, mask, row_index, c_logp, c_ent


def run_autograd(logits, targets, row_index, temperature, c_logp, c_ent, **kw):
    x = logits.detach().clone().to(DEVICE).requires_grad_(True)
    out = triton_token_stats(x, *D(targets, row_index), temperature, **kw)
    loss = (c_logp.to(DEVICE) * out[0]).sum() + (c_ent.to(DEVICE) * out[1]).sum()
    loss.backward()
    return [o.detach().cpu() for o in out], x.grad.cpu()


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "V,block_v,temperature",
    [(1000, 256, 1.0), (4099, 1024, 0.7), (32003, 4096, 1.0), (65537, None, 0.7), (151936, None, 1.0)],
)
def test_matches_float64_reference(V, block_v, temperature):
    B, T = (2, 3) if V < 100_000 else (1, 2)  # Qwen's V = 151,936: 38 tiles of 4096, last partial
    logits, targets, mask, row_index, c_logp, c_ent = make_case(B, T, V)
    if block_v is not None:
        assert V % block_v != 0  # a masked tail tile
    ref = reference(logits, targets, row_index, temperature, c_logp, c_ent)

    logp, ent, lse, zbar, cert, tlogit, spp = fwd(
        logits, targets, row_index, temperature, block_v=block_v, extra_stats=True)
    for name, val in [("logp", logp), ("entropy", ent), ("lse", lse), ("certainty", cert),
                      ("target_logit", tlogit), ("sum_pi_squared", spp)]:
        assert val.dtype == torch.float32 and val.shape == (row_index.numel(),)
        assert_elementwise_close(val, ref[name], 1e-4, name)
    # row 0 has -inf entries: its certainty is +inf like torch's lse - mean
    assert cert[0] == math.inf
    assert_elementwise_close(zbar, ref["lse"] - ref["entropy"], 1e-4, "zbar")

    (lp2, ent2), grad = run_autograd(logits, targets, row_index, temperature, c_logp, c_ent, block_v=block_v)
    assert torch.equal(lp2, logp) and torch.equal(ent2, ent)
    assert grad.dtype == logits.dtype
    assert_elementwise_close(grad, ref["grad"], 1e-4, "dlogits")
    assert (grad[~mask] == 0).all()


def test_spec_worked_examples():
    """docs/algorithms.md §8.1 / §8.3 numbers (verified there with finite differences)."""
    z = torch.tensor([[[2.0, 1.0, 0.5, -1.0, 3.0]]])
    y = torch.tensor([[1]])
    ri = torch.tensor([0])
    c_logp, c_ent = torch.tensor([0.7]), torch.tensor([-0.3])
    for temperature, expected in [
        (1.0, [-0.190051, 0.604766, -0.065440, -0.019741, -0.329534]),
        (0.7, [-0.254424, 0.912559, -0.049285, -0.008062, -0.600788]),
    ]:
        (lp, ent), grad = run_autograd(z, y, ri, temperature, c_logp, c_ent, block_v=16)
        if temperature == 1.0:
            assert abs(lp.item() - -2.472261) < 1e-5 and abs(ent.item() - 1.044109) < 1e-5
        assert torch.allclose(grad[0, 0], torch.tensor(expected), atol=2e-6), grad
    # large logits: no overflow, H = 0.582203
    _, ent, lse, *_ = fwd(torch.tensor([[[1000.0, 999.0, 0.0]]]), torch.tensor([[0]]), ri,
                                          block_v=16)
    assert abs(ent.item() - 0.582203) < 1e-5 and abs(lse.item() - 1000.313262) < 1e-3


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)])
def test_half_precision_inputs(dtype, grad_tol):
    logits, targets, mask, row_index, c_logp, c_ent = make_case(2, 3, 4099, dtype=dtype, seed=1)
    ref = reference(logits, targets, row_index, 0.7, c_logp, c_ent)
    (logp, ent), grad = run_autograd(logits, targets, row_index, 0.7, c_logp, c_ent, block_v=1024)
    # the half inputs are exact in fp32: the statistics keep fp32 accuracy
    assert_elementwise_close(logp, ref["logp"], 1e-4, "logp")
    assert_elementwise_close(ent, ref["entropy"], 1e-4, "entropy")
    assert grad.dtype == dtype
    assert_elementwise_close(grad, ref["grad"], grad_tol, "dlogits")
    assert (grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- -inf rows


def test_row_neg_inf_except_target_is_exact():
    V = 1000
    logits = torch.randn(1, 4, V)
    targets = torch.tensor([[900, 3, 0, 999]])
    logits[0, 0] = NEG_INF
    logits[0, 0, 900] = 5.0  # 3 all -inf tiles (block 256) before the target's tile
    logits[0, 1] = NEG_INF
    logits[0, 1, 3] = -2.5  # first tile finite, then all -inf tiles
    logits[0, 3] = NEG_INF
    logits[0, 3, 999] = 0.0  # the target is in the masked tail tile
    logits[0, 2, 500:] = NEG_INF  # an ordinary row with trailing -inf tiles
    row_index = torch.arange(4)
    c_logp, c_ent = torch.tensor([0.5, -1.5, 2.0, 1.0]), torch.tensor([0.3, 0.7, -0.4, -2.0])
    ref = reference(logits, targets, row_index, 0.7, c_logp, c_ent)
    logp, ent, lse, zbar, *_ = fwd(logits, targets, row_index, 0.7, block_v=256)
    single = [0, 1, 3]
    assert (logp[single] == 0).all() and (ent[single] == 0).all()
    assert torch.equal(zbar[single], lse[single])
    assert_elementwise_close(logp, ref["logp"], 1e-4, "logp")
    assert_elementwise_close(ent, ref["entropy"], 1e-4, "entropy")
    (_, _), grad = run_autograd(logits, targets, row_index, 0.7, c_logp, c_ent, block_v=256)
    assert torch.isfinite(grad).all()
    assert (grad[0, single] == 0).all()  # p = 0 off target, and c_logp*(1 - 1) on it
    assert (grad[0, 2, 500:] == 0).all()  # p = 0 exactly where z = -inf
    assert_elementwise_close(grad, ref["grad"], 1e-4, "dlogits")


# ----------------------------------------------------------------------------- masking


def test_masked_rows_are_never_read_and_get_zero_gradient():
    logits, targets, mask, row_index, c_logp, c_ent = make_case(3, 4, 1000, seed=2)
    ref = reference(logits, targets, row_index, 1.0, c_logp, c_ent)
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    targets_poisoned = targets.clone()
    targets_poisoned[~mask] = 10**12  # would be an out-of-bounds read if it were used
    (logp, ent), grad = run_autograd(poisoned, targets_poisoned, row_index, 1.0, c_logp, c_ent, block_v=256)
    assert_elementwise_close(logp, ref["logp"], 1e-4, "logp")
    assert_elementwise_close(ent, ref["entropy"], 1e-4, "entropy")
    assert (grad[~mask] == 0).all() and not torch.isnan(grad).any()
    assert_elementwise_close(grad, ref["grad"], 1e-4, "dlogits")


@pytest.mark.parametrize("inplace", [False, True], ids=["new dlogits", "inplace"])
def test_row_valid_skips_rows_as_the_list_of_valid_rows_does(inplace):
    """Every position listed, the mask as row_valid: the padded rows (NaN logits, wild targets) are not read,
    their outputs and gradient are exact zeros, and the valid rows match the listed form and the reference;
    the torch implementation takes the same argument."""
    from fused_canon.statistics import torch_token_stats

    logits, targets, mask, row_index, c_logp, c_ent = make_case(3, 4, 1000, seed=2)
    ref = reference(logits, targets, row_index, 0.7, c_logp, c_ent)
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    targets_poisoned = targets.clone()
    targets_poisoned[~mask] = 10**12
    positions, valid = torch.arange(mask.numel()), mask.reshape(-1)
    scale_logp, scale_ent = (torch.zeros(mask.numel()).index_put((row_index,), c) for c in (c_logp, c_ent))
    for name, stats in (("triton", lambda x, **kw: triton_token_stats(x, *D(targets_poisoned, positions), 0.7,
                                                                      block_v=256, extra_stats=True, **kw)),
                        ("torch", lambda x, **kw: torch_token_stats(x, targets_poisoned, positions, 0.7,
                                                                    extra_stats=True, **kw))):
        x = poisoned.clone().to(DEVICE).requires_grad_(True)
        leaf = x
        if inplace:
            x = x * 1.0  # a non-leaf buffer that inplace_backward may overwrite
        out = stats(x, row_valid=valid.to(DEVICE), inplace_backward=inplace)
        ((scale_logp.to(DEVICE) * out[0]).sum() + (scale_ent.to(DEVICE) * out[1]).sum()).backward()
        outputs = [o.detach().cpu() for o in out]
        assert all(o.shape == (mask.numel(),) and torch.equal(o[~valid], torch.zeros_like(o[~valid]))
                   for o in outputs), name
        assert_elementwise_close(outputs[0][valid], ref["logp"], 1e-4, f"{name} logp")
        assert_elementwise_close(outputs[1][valid], ref["entropy"], 1e-4, f"{name} entropy")
        assert_elementwise_close(outputs[2][valid], ref["certainty"], 1e-4, f"{name} certainty")
        grad = leaf.grad.cpu()
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), name
        assert_elementwise_close(grad, ref["grad"], 1e-4, f"{name} dlogits")


def test_single_output_gradients_and_empty_selection():
    logits, targets, mask, row_index, c_logp, c_ent = make_case(2, 3, 1000, seed=3)
    for use_logp, use_ent in [(True, False), (False, True)]:
        x = logits.clone().to(DEVICE).requires_grad_(True)
        logp, ent = triton_token_stats(x, *D(targets, row_index), block_v=512)
        ((c_logp.to(DEVICE) * logp).sum() if use_logp else (c_ent.to(DEVICE) * ent).sum()).backward()
        ref = reference(logits, targets, row_index, 1.0, c_logp if use_logp else None, c_ent if use_ent else None)
        assert_elementwise_close(x.grad, ref["grad"], 1e-4, f"dlogits logp={use_logp}")
    # no valid token: empty outputs, zero gradient everywhere
    x = logits.clone().to(DEVICE).requires_grad_(True)
    logp, ent = triton_token_stats(x, *D(targets, torch.empty(0, dtype=torch.int64)), block_v=512)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(x.grad.cpu(), torch.zeros_like(logits))


def test_out_of_range_target_gives_nan_not_a_crash():
    logits = torch.randn(1, 2, 100)
    targets = torch.tensor([[100, 5]])
    logp, ent = triton_token_stats(*D(logits, targets, torch.tensor([0, 1])), block_v=64)
    assert torch.isnan(logp[0]) and torch.isfinite(logp[1]) and torch.isfinite(ent).all()


def test_extra_stats_flag():
    logits, targets, mask, row_index, c_logp, c_ent = make_case(2, 2, 1000, seed=4, neg_inf_row=False)
    x = logits.clone().to(DEVICE).requires_grad_(True)
    assert len(triton_token_stats(x, *D(targets, row_index), block_v=256)) == 2
    logp, ent, cert, tlogit, spp = triton_token_stats(x, *D(targets, row_index), 0.7, block_v=256, extra_stats=True)
    ref = reference(logits, targets, row_index, 0.7)
    assert_elementwise_close(cert, ref["certainty"], 1e-4, "certainty")
    assert_elementwise_close(tlogit, ref["target_logit"], 1e-6, "target_logit")  # raw, untempered
    assert_elementwise_close(spp, ref["sum_pi_squared"], 1e-4, "sum_pi_squared")
    assert logp.requires_grad and ent.requires_grad
    assert not cert.requires_grad and not tlogit.requires_grad and not spp.requires_grad


# ----------------------------------------------------------------------------- layout / memory


def test_non_contiguous_slice_is_read_in_place():
    B, T, V = 2, 4, 1000
    full = torch.randn(B, T + 1, V) * 2
    targets = torch.randint(0, V, (B, T))
    logits = full[:, :-1, :]  # shift-by-one slice: not contiguous
    assert not logits.is_contiguous() and logits.stride(-1) == 1
    row_index = torch.tensor([0, 2, 3, 5, 6])
    c_logp, c_ent = torch.randn(5), torch.randn(5)
    ref = reference(logits, targets, row_index, 0.7, c_logp, c_ent)
    x = full.clone().to(DEVICE).requires_grad_(True)
    logp, ent = triton_token_stats(x[:, :-1, :], *D(targets, row_index), 0.7, block_v=256)
    ((c_logp.to(DEVICE) * logp).sum() + (c_ent.to(DEVICE) * ent).sum()).backward()
    assert_elementwise_close(logp, ref["logp"], 1e-4, "logp")
    assert_elementwise_close(ent, ref["entropy"], 1e-4, "entropy")
    assert_elementwise_close(x.grad[:, :-1], ref["grad"], 1e-4, "dlogits")
    assert (x.grad[:, -1] == 0).all()


def test_inplace_backward_writes_gradient_into_logits_buffer():
    logits, targets, mask, row_index, c_logp, c_ent = make_case(2, 3, 1000, seed=5)
    _, grad_new = run_autograd(logits, targets, row_index, 0.7, c_logp, c_ent, block_v=256)

    leaf = logits.clone().to(DEVICE).requires_grad_(True)
    buf = leaf * 1.0  # the "logits" activation produced by the model
    buf_ptr = buf.data_ptr()
    logp, ent = triton_token_stats(buf, *D(targets, row_index), 0.7, inplace_backward=True, block_v=256)
    ((c_logp.to(DEVICE) * logp).sum() + (c_ent.to(DEVICE) * ent).sum()).backward()
    assert torch.equal(buf.detach().cpu(), grad_new)  # same kernel, same values, in the logits buffer
    assert buf.data_ptr() == buf_ptr
    assert torch.equal(leaf.grad.cpu(), grad_new)
    assert (buf.detach().cpu()[~mask] == 0).all()

    # Default: the caller's logits are untouched.
    x = logits.clone().to(DEVICE).requires_grad_(True)
    logp, ent = triton_token_stats(x, *D(targets, row_index), 0.7, block_v=256)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(x.detach().cpu(), logits)


def test_inplace_backward_hazard_is_loud():
    """unsloth#5002: logits that feed another loss must not be overwritten silently."""
    logits, targets, mask, row_index, c_logp, c_ent = make_case(1, 3, 1000, seed=6, neg_inf_row=False)
    leaf = logits.clone().to(DEVICE).requires_grad_(True)
    buf = leaf * 1.0
    other = (buf ** 2).sum()  # saves buf; created first, so its backward runs after ours
    logp, _ = triton_token_stats(buf, *D(targets, row_index), inplace_backward=True, block_v=256)
    with pytest.raises(RuntimeError, match="inplace"):
        (logp.sum() + other).backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_no_row_by_vocab_tensor_besides_dlogits(inplace):
    B, T, V = 2, 3, 1000
    full = torch.randn(B, T + 1, V).half()  # an fp32 upcast of the logits would be a new tensor
    full, targets, row_index = D(full, torch.randint(0, V, (B, T)), torch.tensor([0, 1, 3, 4]))
    leaf = full.clone().requires_grad_(True)
    with torch.no_grad():
        act = leaf * 1.0
    act.requires_grad_(True)
    logits = act[:, :-1, :]
    rec = AllocationRecorder()
    with rec:
        logp, ent = triton_token_stats(logits, targets, row_index, 0.7, inplace_backward=inplace, block_v=256)
        forward_allocs = list(rec.numels)
        (logp.sum() + ent.sum()).backward(inputs=[act])
    big_fwd = [c for c in forward_allocs if c[1] >= V]
    assert big_fwd == [], f"forward allocated vocabulary-sized tensors: {big_fwd}"
    big = [c for c in rec.numels if c[1] >= V]
    # backward: dlogits [B, T, V] (unless in place), then autograd's own slice backward
    # materialises the gradient of `act` [B, T+1, V] (outside our Function).
    expected = ([] if inplace else [B * T * V]) + [B * (T + 1) * V]
    assert sorted(n for _, n in big) == sorted(expected), big
    assert max(n for _, n in rec.numels if n < V) <= B * T  # everything else is per-row


def _int64_offsets_case():
    """Rows whose element offset b * stride_b exceeds 2**31 while every stride fits in int32.
    The backing buffer is ~4.3 GB of *virtual* memory (torch.empty does not touch it; only
    the 6 rows used are written), so the kernels must form offsets in int64: with int32
    arithmetic the pointer wraps ~4 GB below the buffer (a crash, hence the subprocess)."""
    V, T = 1000, 2
    stride_b = 2**30 + 2**20  # fits int32; 2 * stride_b does not
    assert 2 * stride_b > 2**31 - 1 and stride_b < 2**31 - 1
    base = torch.empty(2 * stride_b + T * V, dtype=torch.float16, device=DEVICE)
    logits = base.as_strided((3, T, V), (stride_b, V, 1))
    g = torch.Generator().manual_seed(7)
    vals = (torch.randn(3, T, V, generator=g) * 2).half()
    logits.copy_(vals)
    targets = torch.randint(0, V, (3, T), generator=g)
    row_index = torch.tensor([0, 3, 4, 5])  # rows with b = 0, 1 and 2
    c_logp, c_ent = torch.randn(4, generator=g), torch.randn(4, generator=g)
    ref = reference(vals, targets, row_index, 1.0, c_logp, c_ent)
    targets, row_index, c_logp, c_ent = D(targets, row_index, c_logp, c_ent)
    logp, ent, lse, zbar, *_ = token_stats_forward(logits, targets, row_index, block_v=256)
    assert_elementwise_close(logp, ref["logp"], 1e-4, "logp")
    assert_elementwise_close(ent, ref["entropy"], 1e-4, "entropy")
    grad = token_stats_backward(logits, targets, row_index, logp, ent, lse, zbar, c_logp, c_ent, block_v=256,
                                inplace=True)
    assert grad.data_ptr() == logits.data_ptr()
    assert_elementwise_close(logits, ref["grad"], 2.0**-10, "dlogits written at offsets > 2**31")
    print("INT64_OK")


def test_int64_offsets_beyond_2_31_elements():
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_kernel_logits_token_stats as t; "
            "t._int64_offsets_case()")
    env = dict(os.environ, TRITON_INTERPRET="1" if _INTERPRET else "0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "INT64_OK" in proc.stdout, (
        f"rc={proc.returncode} (-11/139: segfault from a wrapped int32 offset)\n{proc.stdout}\n{proc.stderr[-3000:]}")


def test_kernels_cast_row_ids_to_int64_before_multiplying():
    """Static companion of the test above: in both kernels the program id / row index is
    cast to int64 before it multiplies a stride."""
    import inspect

    from fused_canon.kernels.logits_token_stats import _token_stats_bwd_kernel

    fwd = inspect.getsource(_token_stats_fwd_kernel.fn)
    assert "tl.program_id(0).to(tl.int64)" in fwd and "tl.load(row_index_ptr + pid).to(tl.int64)" in fwd
    assert "tl.program_id(0).to(tl.int64)" in inspect.getsource(_token_stats_bwd_kernel.fn)


# ----------------------------------------------------------------------------- validation


def test_input_validation():
    logits, targets, ri = D(torch.randn(2, 3, 64), torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 1]))
    f = triton_token_stats
    with pytest.raises(ValueError, match="3-D"):
        f(logits[0], targets, ri)
    with pytest.raises(ValueError, match="targets must have shape"):
        f(logits, targets[:, :2], ri)
    with pytest.raises(TypeError, match="logits dtype"):
        f(logits.double(), targets, ri)
    with pytest.raises(TypeError, match="targets must be int64"):
        f(logits, targets.float(), ri)
    with pytest.raises(TypeError, match="row_index must be int64"):
        f(logits, targets, ri.int())
    with pytest.raises(ValueError, match="row_index must be a 1-D"):
        f(logits, targets, ri[None])
    with pytest.raises(ValueError, match="stride"):
        f(torch.randn(2, 64, 3, device=DEVICE).transpose(1, 2), targets, ri)
    with pytest.raises(ValueError, match="is on meta"):
        f(logits, targets.to("meta"), ri)
    with pytest.raises(ValueError, match="is on meta"):
        f(logits, targets, ri.to("meta"))
    for bad_t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            f(logits, targets, ri, bad_t)
    with pytest.raises(TypeError, match="temperature"):
        f(logits, targets, ri, torch.tensor(1.0))
    with pytest.raises(ValueError, match="distinct"):
        f(logits, targets, *D(torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="distinct"):
        f(logits, targets, *D(torch.tensor([0, 6])))
    with pytest.raises(ValueError, match="distinct"):
        f(logits, targets, *D(torch.tensor([-1])))
    with pytest.raises(ValueError, match="block_v"):
        f(logits, targets, ri, block_v=100)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_cpu_tensors_without_interpreter_get_a_clear_error(monkeypatch):
    import fused_canon.kernels.logits_token_stats as ts

    monkeypatch.setattr(ts, "triton_interpreter_enabled", lambda: False)  # as if TRITON_INTERPRET were unset
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_token_stats(torch.randn(1, 1, 16), torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0]))
