"""Fused LM-head token statistics (kernels/linear_token_stats.py) against a float64 torch reference.

By default the Triton kernels run under the interpreter on CPU tensors (TRITON_INTERPRET=1 is
set here unless the environment sets it); with ``TRITON_INTERPRET=0`` on a CUDA machine the same
tests run the compiled kernels on the GPU (sm_80 / sm_90 compilation on the CPU is covered by
test_aot_compile.py). References are computed on the CPU in float64. Block sizes are small and
chosen so that N, H and V are never multiples of them, and the backward's vocabulary chunk is small
so that several chunks (and grad_hidden's sum across chunks) are exercised.

Tolerances, with |a - e| <= tol * (|e| + max|e| / 100) elementwise (see ``assert_close``):
* fp32: 1e-4 for logp, entropy and all three gradients.
* fp16 inputs are exact in float64 and the forward accumulates in fp32: 1e-4 for logp and
  entropy. The backward GEMMs take dlogits as scaled fp16 tiles (tensor cores), one rounding of
  each operand element (2**-11 relative), so grad_hidden and grad_weight may also be off by
  2**-11 times the sum of the magnitudes of their products (``rounding_scale``): the terms
  cancel (dlogits sums to 0 over V), which that bound states exactly; then the gradients are
  rounded once to fp16 (2**-11) after fp32 accumulation: 2e-3.
* bf16 (interpreter: tiles cast to fp32 before tl.dot): 1e-4 forward; the backward's bf16
  dlogits workspace and bf16 gradients are *truncated* by the interpreter (up to 1 ulp = 2**-7,
  biased towards zero), and grad_hidden sums dlogits that cancel (they sum to 0 over V), so the
  gradients are compared norm-wise: ||a - e|| <= 1e-2 ||e|| (measured: 4e-3 to 6e-3).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import AllocationRecorder, assert_elementwise_close, peaked_row_reference  # noqa: E402

from fused_canon.kernels.linear_token_stats import (  # noqa: E402
    AOT_NO_SPILL,
    AOT_SIGNATURES,
    LinearTokenStatsBlocks,
    triton_linear_token_stats,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if _INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(not _INTERPRET and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels")


def dev(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def call_kernel(hidden, weight, targets, row_index, bias=None, temperature=1.0, block_sizes=None):
    """triton_linear_token_stats with targets and row_index moved to DEVICE (the differentiable
    inputs are passed as they are: callers put them on DEVICE themselves, as leaves)."""
    return triton_linear_token_stats(hidden, weight, dev(targets), dev(row_index), bias, temperature,
                                     block_sizes=block_sizes)


# Small tiles (>= 16, as tl.dot needs on a GPU); the GPU defaults run in test_default_blocks.
# dweight_block_h 64 != gemm_block_out 32: grad_weight's tiles are not square for bf16, as on a GPU.
SMALL_BLOCKS = dict(block_n=16, block_v=64, block_h=32, dlogits_block_n=16, gemm_block_out=32, gemm_block_k=32,
                    dweight_block_h=64)
FORWARD_TOL = 1e-4
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-3}
FP16_OPERAND_ROUNDING = 2.0**-11  # half an ulp of fp16 relative to the value (normal numbers)
BF16_GRAD_NORM_TOL = 1e-2


# ----------------------------------------------------------------------------- reference


def reference(hidden, weight, bias, targets, row_index, temperature, c_logp, c_ent):
    """float64: logp, entropy of the valid rows and the gradients of
    sum(c_logp * logp + c_ent * entropy) w.r.t. hidden (all rows), weight and bias."""
    h = hidden.detach().double().nan_to_num(0.0).requires_grad_(True)  # NaN rows are not selected
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True) if bias is not None else None
    logits = h[row_index] @ w.T
    if b is not None:
        logits = logits + b
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_p.gather(1, targets[row_index][:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = (c_logp.double() * logp).sum() + (c_ent.double() * entropy).sum()
    grads = torch.autograd.grad(loss, [logits, h, w] + ([b] if b is not None else []))
    dlogits, x = grads[0].abs(), h.detach()[row_index].abs()
    # sum_k |dlogits_k| |W_k| per grad_hidden entry, sum_rows |dlogits| |x| per grad_weight entry.
    rounding_scale = dict(grad_hidden=torch.zeros_like(h).index_copy(0, row_index, dlogits @ w.detach().abs()),
                          grad_weight=dlogits.T @ x)
    return dict(logp=logp.detach(), entropy=entropy.detach(), grad_hidden=grads[1], grad_weight=grads[2],
                grad_bias=grads[3] if b is not None else None, rounding_scale=rounding_scale)


def make_case(num_rows, hidden_size, vocab_size, dtype, *, with_bias=True, seed=0):
    """Inputs with every 4th row (and the last) invalid and filled with NaN: never read.
    Logits have a standard deviation of about 3."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=g)
    weight = torch.randn(vocab_size, hidden_size, generator=g) * (3.0 / hidden_size**0.5)
    bias = torch.randn(vocab_size, generator=g) if with_bias else None
    targets = torch.randint(0, vocab_size, (num_rows,), generator=g)
    valid = torch.ones(num_rows, dtype=torch.bool)
    valid[::4] = False
    valid[-1] = False
    hidden[~valid] = float("nan")
    targets[~valid] = -7  # out of range on purpose: invalid rows' targets are never used
    row_index = valid.nonzero().squeeze(1)
    c_logp = torch.randn(row_index.numel(), generator=g)
    c_ent = torch.randn(row_index.numel(), generator=g)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets, row_index, c_logp, c_ent


def run_kernel(hidden, weight, bias, targets, row_index, temperature, c_logp, c_ent, blocks):
    """Forward, then backward of sum(c_logp * logp + c_ent * entropy); results on the CPU.
    ``detach()`` keeps the inputs' strides (``clone()`` would make a strided view contiguous)."""
    leaves = [dev(t).detach().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    logp, entropy = call_kernel(leaves[0], leaves[1], targets, row_index, leaves[2], temperature, blocks)
    saved = logp.grad_fn.saved_tensors if logp.grad_fn is not None else (None, None)  # before backward frees them
    (dev(c_logp) * logp + dev(c_ent) * entropy).sum().backward()
    out = dict(logp=logp, entropy=entropy, grad_hidden=leaves[0].grad, grad_weight=leaves[1].grad,
               grad_bias=leaves[2].grad if leaves[2] is not None else None)
    out = {name: value.cpu() if value is not None else None for name, value in out.items()}
    out["saved_hidden"], out["saved_weight"] = saved[:2]  # what the kernels read (for the in-place tests)
    return out


def check_against_reference(out, ref, dtype, row_index, num_rows):
    assert out["logp"].dtype == torch.float32 and out["entropy"].dtype == torch.float32
    assert_elementwise_close(out["logp"], ref["logp"], FORWARD_TOL, "logp")
    assert_elementwise_close(out["entropy"], ref["entropy"], FORWARD_TOL, "entropy")
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        if ref[name] is None:
            assert out[name] is None
            continue
        assert out[name].dtype == dtype, name
        if dtype == torch.bfloat16:
            error = (out[name].double() - ref[name]).norm() / ref[name].norm()
            assert error <= BF16_GRAD_NORM_TOL, f"{name}: norm-wise relative error {error:.3g}"
        elif dtype == torch.float16 and name in ref["rounding_scale"]:
            operand_error = FP16_OPERAND_ROUNDING * ref["rounding_scale"][name]
            error = (out[name].double() - ref[name]).abs() - operand_error
            assert_elementwise_close(ref[name] + error.clamp(min=0.0), ref[name], GRAD_TOL[dtype], name)
        else:
            assert_elementwise_close(out[name], ref[name], GRAD_TOL[dtype], name)
    invalid = torch.ones(num_rows, dtype=torch.bool)
    invalid[row_index] = False
    assert (out["grad_hidden"][invalid] == 0).all(), "rows outside row_index must get an exactly zero gradient"


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "dtype, hidden_size, vocab_size, temperature, with_bias, chunk_vocab",
    [
        (torch.float32, 32, 100, 1.0, True, 64),  # two chunks, the second ragged
        (torch.float32, 48, 257, 0.7, True, 64),  # five chunks, the last of one column
        (torch.float32, 80, 1000, 0.7, False, 128),
        (torch.float32, 48, 257, 1.3, True, None),  # one chunk: no grad_hidden partial sum
        (torch.float16, 48, 257, 0.7, True, 64),  # several chunks: the fp32 grad_hidden partial sum
        (torch.float16, 80, 100, 1.0, False, None),  # one chunk: grad_hidden written in fp16 directly
        (torch.bfloat16, 48, 257, 0.7, True, 64),
    ],
)
def test_matches_float64_reference(dtype, hidden_size, vocab_size, temperature, with_bias, chunk_vocab):
    num_rows = 50  # 37 valid rows: not a multiple of block_n = 16 nor of the chunk
    hidden, weight, bias, targets, row_index, c_logp, c_ent = make_case(num_rows, hidden_size, vocab_size, dtype,
                                                                        with_bias=with_bias)
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, backward_chunk_vocab=chunk_vocab)
    out = run_kernel(hidden, weight, bias, targets, row_index, temperature, c_logp, c_ent, blocks)
    ref = reference(hidden, weight, bias, targets, row_index, temperature, c_logp, c_ent)
    check_against_reference(out, ref, dtype, row_index, num_rows)


def test_fp16_gradients_of_tiny_coefficients_keep_their_digits():
    """fp16's backward GEMMs read dlogits as fp16 tiles scaled by a power of two (docs/design.md §4.2).
    With coefficients ~1e-3 (a token-mean over a batch) most dlogits entries lie below fp16's normal
    range (6e-5), many below its smallest subnormal (6e-8): unscaled, they lose their digits or round
    to 0 and grad_weight misses the bound (measured: error 2.7e-7 at 6.0e-6, bound 1.8e-7). Rows with
    zero coefficients (no bound) are part of grad_weight's reduction and must not set its scale."""
    num_rows, hidden_size, vocab_size = 50, 48, 257
    hidden, weight, bias, targets, row_index, c_logp, c_ent = make_case(num_rows, hidden_size, vocab_size,
                                                                        torch.float16, seed=4)
    c_logp, c_ent = c_logp * 1e-3, c_ent * 1e-3
    c_logp[:3] = 0.0
    c_ent[:3] = 0.0
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, backward_chunk_vocab=64)
    out = run_kernel(hidden, weight, bias, targets, row_index, 0.7, c_logp, c_ent, blocks)
    ref = reference(hidden, weight, bias, targets, row_index, 0.7, c_logp, c_ent)
    check_against_reference(out, ref, torch.float16, row_index, num_rows)


@pytest.mark.parametrize("vocab_splits, vocab_size", [(2, 1000), (3, 1000), (5, 1000), (16, 1000), (7, 300)])
def test_vocabulary_split_equals_the_unsplit_pass(vocab_splits, vocab_size):
    """docs/algorithms.md §8.5: the forward split into vocabulary ranges (whole 64-column tiles; 16 tiles at
    V = 1,000 give splits of 8+8, 6+6+4, 4x4 (5 asked, none left empty), 16x1; V = 300 gives 5 tiles, the
    last one ragged) and merged equals the one-range pass: statistics, the extra signals and the gradients
    built from them. A -inf bias over a whole range (the first 128 columns) is an empty split summary."""
    num_rows, hidden_size = 40, 48
    hidden, weight, bias, targets, row_index, c_logp, c_ent = make_case(num_rows, hidden_size, vocab_size,
                                                                        torch.float32, seed=5)
    bias[:128] = float("-inf")
    targets = targets.clamp(min=128)
    results = {}
    for splits in (1, vocab_splits):
        blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, vocab_splits=splits)
        h, w, b = (dev(t).detach().requires_grad_(True) for t in (hidden, weight, bias))
        stats = triton_linear_token_stats(h, w, dev(targets), dev(row_index), b, 0.7, block_sizes=blocks,
                                          extra_stats=True)
        (dev(c_logp) * stats[0] + dev(c_ent) * stats[1]).sum().backward()
        results[splits] = [t.detach().cpu() for t in stats] + [h.grad.cpu(), w.grad.cpu(), b.grad.cpu()]
    names = ("logp", "entropy", "certainty", "target_logit", "sum_pi_squared", "grad_hidden", "grad_weight",
             "grad_bias")
    for name, split, whole in zip(names, results[vocab_splits], results[1]):
        if name == "certainty":  # +inf: the row has -inf entries
            assert torch.equal(split, whole), name
            continue
        # The gradients amplify an ulp of lse (every p_k moves with it, and dlogits cancels over V).
        assert_elementwise_close(split, whole, 1e-4 if name.startswith("grad") else 1e-5, name)


def test_vocabulary_splits_fill_the_sms():
    """The split count at H100/H200 scale (132 SMs, one forward program per SM, BLOCK_N = 64, V = 151,936):
    N = 4,096 has 64 row blocks, 2 splits make 128 programs; N = 16,384 fills two waves unsplit; one row
    block is split across 126 SMs; an explicit count is kept to whole tiles, none empty."""
    from fused_canon.kernels.linear_token_stats import _splits_filling, _vocab_split

    tiles = 151936 // 128 + 1
    assert _splits_filling(64, 132, tiles) == 2
    assert _splits_filling(256, 132, tiles) == 1
    assert _splits_filling(1, 132, tiles) == 126
    assert _splits_filling(64, 1, tiles) == 1  # the interpreter: no split unless asked for
    blocks = LinearTokenStatsBlocks(block_v=64, vocab_splits=5)
    assert _vocab_split(1, 1000, blocks, torch.device("cpu")) == (4, 256)
    assert _vocab_split(1, 1000, LinearTokenStatsBlocks(block_v=64, vocab_splits=40), torch.device("cpu")) == (16, 64)


def test_default_blocks():
    """The GPU default tiles (64 x 128 x 32) and the default workspace sizing also run."""
    hidden, weight, bias, targets, row_index, c_logp, c_ent = make_case(30, 40, 300, torch.float32)
    out = run_kernel(hidden, weight, bias, targets, row_index, 0.7, c_logp, c_ent, None)
    ref = reference(hidden, weight, bias, targets, row_index, 0.7, c_logp, c_ent)
    check_against_reference(out, ref, torch.float32, row_index, 30)


def test_peaked_and_uniform_rows_keep_relative_precision():
    """A row whose target logit leads by ~50 (entropy ~1e-20, logp ~ -1e-22), a row whose
    target trails the leader by ~50 (logp ~ -50), and an all-zero row without bias (every logit
    ties: entropy = log V exactly). Entropy and logp of the peaked row are checked elementwise
    at 1e-4 *relative*: lse - zbar or z_y - lse in fp32 would lose them entirely."""
    hidden_size, vocab_size, temperature = 48, 257, 0.7
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(vocab_size, hidden_size, generator=g, dtype=torch.float64) / hidden_size**0.5
    targets = torch.randint(0, vocab_size, (6,), generator=g)
    hidden = torch.randn(6, hidden_size, generator=g, dtype=torch.float64)
    targets[0], targets[1] = 5, 6
    hidden[0] = weight[5] * (80.0 / weight[5].norm() ** 2)  # z_5 = 80 / 0.7 = 114, the next largest ~ 64
    hidden[1] = hidden[0]  # same logits, target 6 trails by ~50
    hidden[2] = 0.0
    row_index = torch.arange(6)
    c_logp = torch.tensor([0.7, -1.1, 0.4, 0.3, -0.2, 0.9])
    c_ent = torch.tensor([-0.3, 0.5, 0.8, 0.1, 0.6, -0.4])
    hidden, weight = hidden.float(), weight.float()
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS)
    out = run_kernel(hidden, weight, None, targets, row_index, temperature, c_logp, c_ent, blocks)
    ref = reference(hidden, weight, None, targets, row_index, temperature, c_logp, c_ent)

    logits = hidden.double() @ weight.double().T / temperature
    logp, entropy, grad_logits = peaked_row_reference(logits, targets, c_logp, c_ent)
    # The stable reference agrees with log_softmax where log_softmax is accurate (rows 1-5).
    assert torch.allclose(logp[1:], ref["logp"][1:], rtol=1e-12) and torch.allclose(entropy, ref["entropy"],
                                                                                    rtol=0.05)
    assert 0 < entropy[0] < 1e-15 and -1e-15 < logp[0] < 0 and logp[1] < -40
    rel = lambda a, e: ((a.double() - e).abs() / e.abs()).max().item()  # noqa: E731
    assert rel(out["entropy"], entropy) < 1e-4
    assert rel(out["logp"], logp) < 1e-4
    assert out["entropy"][2].item() == pytest.approx(torch.log(torch.tensor(257.0)).item(), rel=1e-6)
    assert_elementwise_close(out["grad_hidden"], ref["grad_hidden"], 1e-4, "grad_hidden")
    assert_elementwise_close(out["grad_weight"], ref["grad_weight"], 1e-4, "grad_weight")
    # The peaked row's gradient (~1e-22) keeps its relative accuracy too (1 - p_y via expm1): float64
    # autograd through log_softmax rounds 1 - p_y to 0 there, so it comes from peaked_row_reference.
    assert_elementwise_close(out["grad_hidden"][0], (grad_logits[0] / temperature) @ weight.double(), 1e-3,
                             "grad_hidden, peaked row")


def test_spec_worked_example_through_identity_head():
    """docs/algorithms.md §8.3: z = [2, 1, 0.5, -1, 3], y = 1, c_logp = 0.7, c_ent = -0.3, as
    hidden = z, W = I (so dL/dhidden = dL/dlogits), and §8.1's large-logit row."""
    weight = torch.eye(5)
    hidden = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0], [1000.0, 999.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([1, 0])
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS)
    for temperature, expected in [(1.0, [-0.190051, 0.604766, -0.065440, -0.019741, -0.329534]),
                                  (0.7, [-0.254424, 0.912559, -0.049285, -0.008062, -0.600788])]:
        h = dev(hidden).clone().requires_grad_(True)
        logp, entropy = call_kernel(h, dev(weight), targets, torch.tensor([0, 1]), None, temperature, blocks)
        (0.7 * logp[0] - 0.3 * entropy[0]).backward()
        assert torch.allclose(h.grad[0].cpu(), torch.tensor(expected), atol=2e-6)
        assert (h.grad[1] == 0).all()
        if temperature == 1.0:
            assert logp[0].item() == pytest.approx(-2.472261, abs=2e-6)
            assert entropy[0].item() == pytest.approx(1.044109, abs=2e-6)
            # z = [1000, 999, 0, 0, 0]: the three zeros add ~3e-434, nothing in fp32.
            assert entropy[1].item() == pytest.approx(0.582203, abs=2e-6)


# ----------------------------------------------------------------------------- gradient plumbing


def test_single_output_and_partial_input_gradients():
    hidden, weight, bias, targets, row_index, c_logp, _ = make_case(20, 32, 100, torch.float32)
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, backward_chunk_vocab=32)
    ref = reference(hidden, weight, bias, targets, row_index, 0.7, c_logp, torch.zeros_like(c_logp))

    hidden, weight, bias, c_logp = dev(hidden), dev(weight), dev(bias), dev(c_logp)

    # Only logp is used (the entropy gradient arrives as None); only weight requires grad.
    w = weight.clone().requires_grad_(True)
    logp, _ = call_kernel(hidden, w, targets, row_index, bias, 0.7, blocks)
    (c_logp * logp).sum().backward()
    assert_elementwise_close(w.grad.cpu(), ref["grad_weight"], 1e-4, "grad_weight")

    # Only hidden requires grad.
    h = hidden.clone().requires_grad_(True)
    logp, _ = call_kernel(h, weight, targets, row_index, bias, 0.7, blocks)
    (c_logp * logp).sum().backward()
    assert_elementwise_close(h.grad.cpu(), ref["grad_hidden"], 1e-4, "grad_hidden")

    # Only bias requires grad.
    b = bias.clone().requires_grad_(True)
    logp, _ = call_kernel(hidden, weight, targets, row_index, b, 0.7, blocks)
    (c_logp * logp).sum().backward()
    assert_elementwise_close(b.grad.cpu(), ref["grad_bias"], 1e-4, "grad_bias")


def test_strided_inputs_and_deterministic_backward():
    hidden, weight, bias, targets, row_index, c_logp, c_ent = make_case(24, 48, 257, torch.float32)
    storage = torch.full((24, 48 + 13), 123.0, device=DEVICE)
    storage[:, 5:53] = dev(hidden)
    strided = storage[:, 5:53]  # row stride 61, last stride 1
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, backward_chunk_vocab=32)
    first = run_kernel(strided, weight, bias, targets, row_index, 0.7, c_logp, c_ent, blocks)
    second = run_kernel(strided, weight, bias, targets, row_index, 0.7, c_logp, c_ent, blocks)
    contiguous = run_kernel(hidden, weight, bias, targets, row_index, 0.7, c_logp, c_ent, blocks)
    saved_hidden = first.pop("saved_hidden")
    assert saved_hidden.data_ptr() == strided.data_ptr() and saved_hidden.stride() == (61, 1), "hidden was copied"
    # Strided targets and row_index (views with stride 2) are read correctly too.
    strided_targets = torch.stack([targets, torch.full_like(targets, -5)], dim=1)[:, 0]
    strided_rows = torch.stack([row_index, row_index], dim=1)[:, 0]
    assert strided_targets.stride() == (2,) and strided_rows.stride() == (2,)
    from_strided_ints = run_kernel(hidden, weight, bias, strided_targets, strided_rows, 0.7, c_logp, c_ent, blocks)
    for out in (first, second, contiguous, from_strided_ints):
        out.pop("saved_hidden", None), out.pop("saved_weight")
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"{name} differs between runs (no atomics: must be bitwise equal)"
        assert torch.equal(value, contiguous[name]), f"{name}: strided and contiguous hidden disagree"
        assert torch.equal(value, from_strided_ints[name]), f"{name}: strided targets / row_index disagree"


def test_empty_selection():
    hidden, weight, bias, targets, _, _, _ = make_case(8, 32, 100, torch.float32)
    h = dev(hidden.nan_to_num(0.0)).requires_grad_(True)
    w = dev(weight).requires_grad_(True)
    logp, entropy = call_kernel(h, w, targets, torch.zeros(0, dtype=torch.int64), dev(bias), 1.0)
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def _int64_offsets_case():
    """hidden rows and weight rows whose element offsets (row * stride) exceed 2**31 while every
    stride fits in int32, read in place (nothing is copied). Each backing buffer is ~4.3 GB of
    *virtual* memory on the CPU (torch.empty does not touch it; only the rows used are written),
    so the kernels must form offsets in int64: int32 arithmetic would wrap ~4 GB below the
    buffer (a crash, hence the subprocess)."""
    hidden_size, vocab_size, stride = 40, 3, 2**30 + 2**20  # 2 * stride > 2**31 - 1
    g = torch.Generator().manual_seed(11)
    hidden_values = torch.randn(3, hidden_size, generator=g).half()
    weight_values = torch.randn(vocab_size, hidden_size, generator=g).half()
    hidden_base = torch.empty(2 * stride + hidden_size, dtype=torch.float16, device=DEVICE)
    weight_base = torch.empty(2 * stride + hidden_size, dtype=torch.float16, device=DEVICE)
    hidden = hidden_base.as_strided((3, hidden_size), (stride, 1))
    weight = weight_base.as_strided((vocab_size, hidden_size), (stride, 1))
    hidden.copy_(dev(hidden_values))
    weight.copy_(dev(weight_values))
    targets, row_index = torch.tensor([2, 0, 1]), torch.tensor([2, 0])
    c_logp, c_ent = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.75])
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, backward_chunk_vocab=64)
    out = run_kernel(hidden, weight, None, targets, row_index, 1.0, c_logp, c_ent, blocks)
    saved_hidden, saved_weight = out.pop("saved_hidden"), out.pop("saved_weight")
    assert saved_hidden.data_ptr() == hidden.data_ptr() and saved_hidden.stride() == (stride, 1), "hidden copied"
    assert saved_weight.data_ptr() == weight.data_ptr() and saved_weight.stride() == (stride, 1), "weight copied"
    ref = reference(hidden_values, weight_values, None, targets, row_index, 1.0, c_logp, c_ent)
    check_against_reference(out, ref, torch.float16, row_index, 3)
    print("INT64_OK")


def test_int64_offsets_beyond_2_31_elements():
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_kernel_linear_token_stats as t; "
            "t._int64_offsets_case()")
    env = dict(os.environ, TRITON_INTERPRET="1" if _INTERPRET else "0")
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "INT64_OK" in proc.stdout, (
        f"rc={proc.returncode} (-11/139: segfault from a wrapped int32 offset)\n{proc.stdout}\n{proc.stderr[-3000:]}")


def test_kernels_form_offsets_in_int64():
    """Static companion of the test above. The interpreter runs loop counters as Python ints
    (int64), so an int32 vocabulary offset that would wrap on a GPU does not wrap there: check in
    the source that every multiplication by a row stride or by V has an int64 left operand
    (``rows`` is loaded from the int64 row_index and cast with ``.to(tl.int64)``)."""
    import inspect
    import re

    import fused_canon.kernels.linear_token_stats as module

    kernels = [module._linear_token_stats_fwd_kernel, module._linear_token_stats_dlogits_kernel,
               module._linear_token_stats_dhidden_kernel, module._linear_token_stats_dweight_kernel,
               module._logits_tile]
    products = []
    for kernel in kernels:
        source = inspect.getsource(kernel.fn)
        for load in re.findall(r"rows = tl\.load\(row_index_ptr.*", source):
            assert load.endswith(".to(tl.int64)"), load
        products += re.findall(r"([\w.()]+(?:\[:, None\]|\[None, :\])?) \* (stride_\w+|vocab_size)\b", source)
    assert len(products) >= 10, products
    for left, right in products:
        assert left.startswith("rows") or ".to(tl.int64)" in left, f"{left} * {right} may be int32"


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_tensor_of_n_times_v_elements(dtype):
    """Forward + backward allocate nothing with N*V or more elements. The only tensors with a dimension
    of N valid rows and a second one are the documented dlogits workspace [N, CHUNK_V] and, over several
    chunks, grad_hidden's fp32 partial sum [N, H] (H < V here, so N*H < N*V)."""
    num_rows, hidden_size, vocab_size, chunk = 48, 32, 257, 64
    hidden, weight, bias, targets, row_index, c_logp, c_ent = make_case(num_rows, hidden_size, vocab_size, dtype)
    n_valid = row_index.numel()
    blocks = LinearTokenStatsBlocks(**SMALL_BLOCKS, backward_chunk_vocab=chunk)
    with AllocationRecorder() as recorder:
        out = run_kernel(hidden, weight, bias, targets, row_index, 0.7, c_logp, c_ent, blocks)
    assert out["grad_weight"] is not None and len(recorder.shapes) > 10
    numels = [(torch.Size(s).numel(), op, s) for op, s in recorder.shapes]
    largest = max(numels)
    assert largest[0] < n_valid * vocab_size, f"allocated {largest} >= N*V = {n_valid * vocab_size}"
    by_valid_rows = {s for _, op, s in numels if len(s) == 2 and s[0] == n_valid}
    assert by_valid_rows == {(n_valid, chunk), (n_valid, hidden_size)}, by_valid_rows


# ----------------------------------------------------------------------------- validation and registry


def test_input_validation():
    hidden, weight, bias, targets, row_index = map(dev, make_case(12, 32, 100, torch.float32)[:5])
    call = lambda **kw: triton_linear_token_stats(  # noqa: E731
        **{**dict(hidden=hidden, weight=weight, targets=targets, row_index=row_index, bias=bias), **kw})
    with pytest.raises(ValueError, match="2-D"):
        call(hidden=hidden[None])
    with pytest.raises(ValueError, match="H ="):
        call(weight=weight[:, :16])
    with pytest.raises(TypeError, match="must equal hidden dtype"):
        call(weight=weight.half())
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        call(hidden=hidden.double(), weight=weight.double(), bias=bias.double())
    with pytest.raises(ValueError, match=r"bias must be \[V\]"):
        call(bias=bias[:50])
    with pytest.raises(TypeError, match="int64 or int32"):
        call(targets=targets.short())
    assert torch.equal(call(targets=targets.int())[0], call()[0])  # int32 token ids, as on the logits path
    with pytest.raises(ValueError, match="one device"):
        call(weight=weight.to("meta"))
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"\[0, V\)"):
        bad = targets.clone()
        bad[row_index[3]] = 100
        call(targets=bad)
    with pytest.raises(ValueError, match="outside"):
        call(row_index=dev(torch.tensor([0, 12])))
    with pytest.raises(ValueError, match="duplicate"):
        call(row_index=dev(torch.tensor([1, 2, 1])))
    with pytest.raises(ValueError, match="power of two"):
        call(block_sizes=dict(block_n=24))
    with pytest.raises(ValueError, match="vocab_splits must be None or an int >= 1, got 0"):
        call(block_sizes=dict(vocab_splits=0))
    # Out-of-range targets of rows outside row_index are fine (they are never read).
    assert (targets.cpu()[~torch.isin(torch.arange(12), row_index.cpu())] == -7).all()
    logp, _ = call(hidden=hidden)
    assert torch.isfinite(logp).all()


def test_aot_registry_covers_every_kernel_with_gpu_sized_blocks():
    import fused_canon.kernels.linear_token_stats as module

    kernels = {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}
    assert {entry[0].__name__ for entry in AOT_SIGNATURES} == kernels == AOT_NO_SPILL
    for kernel, signature, constexprs, options in AOT_SIGNATURES:
        assert list(signature) == list(kernel.arg_names)
        assert all(signature[name] == "constexpr" for name in constexprs)
        assert min(v for k, v in constexprs.items() if k.startswith("BLOCK_")) >= 16  # tl.dot on a GPU
        assert options["num_warps"] in (4, 8)


def test_minus_inf_bias_blocks_are_a_masked_vocabulary():
    """-inf logits from the bias, including whole vocabulary tiles (the first one too), contribute nothing:
    statistics, the extra signals and all three gradients equal the torch reference's, all finite but the
    self-certainty (+inf on a row with -inf entries, as torch computes it)."""
    from fused_canon.statistics import torch_linear_token_stats

    g = torch.Generator().manual_seed(7)
    rows, hidden_size, vocab = 5, 16, 300
    hidden, weight = torch.randn(rows, hidden_size, generator=g), torch.randn(vocab, hidden_size, generator=g)
    bias = torch.randn(vocab, generator=g)
    bias[:40] = float("-inf")  # the whole first tile at block_v = 32, part of the second
    bias[200:264] = float("-inf")  # two whole tiles in the middle
    targets = torch.randint(40, 200, (rows,), generator=g)
    row_index = torch.tensor([0, 2, 3, 4])
    blocks = LinearTokenStatsBlocks(block_n=16, block_v=32, block_h=16, dlogits_block_n=16, gemm_block_out=16,
                                    gemm_block_k=16)
    outputs = {}
    for name, fn in (("triton", lambda *a: triton_linear_token_stats(*a[:4], bias=a[4], block_sizes=blocks,
                                                                     extra_stats=True)),
                     ("torch", lambda *a: torch_linear_token_stats(*a[:4], bias=a[4], extra_stats=True))):
        h, w, b = (x.clone().to(DEVICE).requires_grad_() for x in (hidden, weight, bias))
        logp, entropy, certainty, target_logit, sum_pi_squared = fn(h, w, dev(targets), dev(row_index), b)
        (logp.sum() + 0.3 * entropy.sum()).backward()
        outputs[name] = dict(logp=logp, entropy=entropy, target_logit=target_logit, sum_pi_squared=sum_pi_squared,
                             grad_hidden=h.grad, grad_weight=w.grad, grad_bias=b.grad)
        assert torch.isinf(certainty).all()
    for key, expected in outputs["torch"].items():
        actual = outputs["triton"][key]
        assert torch.isfinite(actual).all(), key
        assert_elementwise_close(actual.detach().cpu(), expected.detach().cpu(), 1e-4, key)
