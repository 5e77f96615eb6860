"""The counting harness (bench/counting.py, bench/count.py) and the budgets it holds the fused paths to.

The harness is checked on kernels whose traffic is known by construction (a copy, a double read, a dot,
an atomic), then the fused paths are counted at a small shape and held to budgets: bytes of the logits
read and written, launches, host syncs, torch ops on [N, V] tensors and peak extra memory. A change that
adds a pass over the logits, a launch, a sync or an [N, V] temporary fails here. The sm_90 builds
(registers, spills, tensor cores) are checked by tests/test_aot_compile.py.
"""

import pytest
import torch
import triton
import triton.language as tl

from fused_canon.bench import count, counting
from fused_canon.bench.count import cases, count_case, default_shape, format_count_table, run_count
from fused_canon.bench.counting import InterpreterTraffic, TorchOps, check_interpreter_hooks, peak_extra_memory
from fused_canon.bench.peers import CCE, LIGER, VERL, Peer
from fused_canon.bench.schema import validate
from fused_canon.bench.workloads import (LINEAR_POLICY_LOSS_FWD_BWD, POLICY_LOSS_FWD, POLICY_LOSS_FWD_BWD,
                                         TOKEN_STATS_FWD)

NO_PEERS = {name: Peer(name, "not installed") for name in (LIGER, VERL, CCE)}
SHAPE = default_shape(rows=32, vocab=1000, hidden=32)  # V = 1,000: the last vocabulary tile is masked


@triton.jit
def _copy_twice_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live)
    x = x + tl.load(x_ptr + offs, mask=live)  # a re-read in the same program
    tl.store(y_ptr + offs, x, mask=live)


@triton.jit
def _read_neighbour_kernel(y_ptr, z_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    other = (offs + BLOCK) % n  # the next program's block: written by another program of an earlier launch
    tl.store(z_ptr + offs, tl.load(y_ptr + other, mask=live), mask=live)


@triton.jit
def _dot_atomic_kernel(a_ptr, b_ptr, total_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.atomic_add(total_ptr + tl.zeros([1], dtype=tl.int32), tl.sum(tl.sum(tl.dot(a, b), axis=1), axis=0)[None])


def test_traffic_of_known_kernels():
    x = torch.randn(1000)
    y, z = torch.empty_like(x), torch.empty_like(x)
    a, b, total = torch.randn(16, 32), torch.randn(32, 16), torch.zeros(1)
    with InterpreterTraffic({"x": x, "y": y, "z": z}) as traffic:
        _copy_twice_kernel[(8,)](x, y, 1000, BLOCK=128)
        _read_neighbour_kernel[(8,)](y, z, 1000, BLOCK=128)
        _dot_atomic_kernel[(1,)](a, b, total, M=16, N=16, K=32)
    tensors = traffic.per_tensor()
    nbytes = 1000 * 4
    assert tensors["x"]["read"] == {"first": nbytes, "same_program": nbytes, "same_launch": 0, "later_launch": 0}
    assert tensors["y"]["written"] == nbytes and tensors["y"]["read"]["later_launch"] == nbytes
    assert tensors["z"]["written"] == nbytes and sum(tensors["z"]["read"].values()) == 0
    assert [launch.kernel for launch in traffic.launches] == ["_copy_twice_kernel", "_read_neighbour_kernel",
                                                              "_dot_atomic_kernel"]
    dot = traffic.launches[2]
    assert dot.flops == 2 * 16 * 16 * 32 and dot.atomics == 1
    assert torch.allclose(total, (a @ b).sum().reshape(1), rtol=1e-4)


def test_reads_by_another_program_of_the_same_launch():
    y = torch.randn(256)
    z = torch.empty_like(y)
    with InterpreterTraffic({"y": y, "z": z}) as traffic:
        _copy_twice_kernel[(2,)](y, z, 256, BLOCK=128)  # every program reads its own block twice
        _read_neighbour_kernel[(2,)](z, y, 256, BLOCK=128)
    launch = traffic.launches[1]
    z_reads = launch.traffic[z.untyped_storage().data_ptr()].read
    assert z_reads["later_launch"] == 256 * 4  # z was written by the first launch
    with InterpreterTraffic({"y": y}) as traffic:
        _read_neighbour_kernel[(2,)](y, y, 256, BLOCK=128)  # program 1 reads what program 0 wrote, or the other way
    reads = traffic.per_tensor()["y"]["read"]
    assert reads["first"] + reads["same_launch"] == 256 * 4 and reads["same_launch"] > 0


def test_unsupported_triton_fails_clearly(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.5.0")
    with pytest.raises(RuntimeError, match="triton 3.6-3.9"):
        check_interpreter_hooks()


def test_missing_interpreter_hook_fails_clearly(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_dot")
    with pytest.raises(RuntimeError, match="create_dot is missing"):
        InterpreterTraffic()


def test_host_syncs_are_counted_with_their_call_site():
    def reads_a_scalar(t):
        return t.sum().item() + len(t[t > 0]) + len(t.tolist())

    with TorchOps(vocab=7) as ops:
        reads_a_scalar(torch.randn(10))
    ops_seen = sorted(op for op, _ in ops.syncs)
    assert ops_seen == ["Tensor.tolist", "aten._local_scalar_dense", "aten.index"] or \
        ops_seen == ["Tensor.tolist", "aten._local_scalar_dense", "aten.nonzero"]
    assert all("reads_a_scalar" in site for _, site in ops.syncs)


def test_vocab_wide_ops_and_peak_memory():
    logits = torch.randn(16, 100)
    with TorchOps(vocab=100) as ops:
        torch.log_softmax(logits, dim=-1).exp().sum()
    assert sum(ops.vocab_ops.values()) == 3  # log_softmax, exp and the sum read an [N, V] tensor
    assert ops.vocab_read == 3 * logits.nbytes and ops.vocab_written == 2 * logits.nbytes  # the sum writes a scalar
    memory = peak_extra_memory(lambda: torch.log_softmax(logits, dim=-1).exp().sum())
    assert 2 * logits.nbytes <= memory["peak_bytes"] <= 3 * logits.nbytes and memory["retained_bytes"] == 0


# The budgets, at SHAPE in fp32: (path, impl prefix, config) -> maxima. R: bytes of the logits read per
# byte of logits (requested, re-reads included); R_mem: of those, what memory serves (all but the same
# program's re-reads); later: re-reads in a later launch; W: of dlogits written; peak: allocator peak per
# byte of logits. Host syncs: the one batched read of the metrics and every value check (none with
# tensor_metrics: the caller reads them), plus mask.nonzero() where a statistics pass runs over a list of
# the valid rows (the LM head, the torch backend); the Triton logits paths walk every position and skip
# the padded ones, and the groups are numbered without torch.unique (estimators.Groups). token_stats: the
# batched read only. Where
# the coefficients are known before the pass (docs/design.md §4.3) the fused kernel reads each row twice in
# one program: 1 R from memory + 1 W, no later launch; it and the grad_output scale (which moves nothing at
# grad_output 1) are the launches, plus the estimator's.
_FUSED = dict(R=2.01, R_mem=1.01, later=0.0, W=1.0, vocab_torch_ops=1, peak=1.05)
_TWO_PASS = dict(R=2.01, R_mem=2.01, later=1.0, W=1.0, vocab_torch_ops=1, peak=1.05)
BUDGETS = {
    (TOKEN_STATS_FWD, "fused_canon", "-"): dict(R=1.01, W=0.0, launches=1, host_syncs=1, vocab_torch_ops=0, peak=0.05),
    (POLICY_LOSS_FWD, "fused_canon", "grpo"): dict(R=1.01, W=0.0, launches=3, host_syncs=1, vocab_torch_ops=0,
                                                   peak=0.05),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "advantages given"): dict(_FUSED, launches=2, host_syncs=1),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "advantages given, tensor_metrics"): dict(_FUSED, launches=2, host_syncs=0),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo"): dict(_FUSED, launches=3, host_syncs=1),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo, tensor_metrics"): dict(_FUSED, launches=3, host_syncs=0),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "dr_grpo"): dict(_FUSED, launches=3, host_syncs=1),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "rloo"): dict(_FUSED, launches=3, host_syncs=1),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo, entropy_coeff=0.01"): dict(_FUSED, launches=3, host_syncs=1),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo, inplace_backward"): dict(_FUSED, launches=3, host_syncs=1,
                                                                         vocab_torch_ops=0),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "canon (entropy, on-policy)"): dict(_TWO_PASS, launches=4, host_syncs=1),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo, gspo"): dict(_TWO_PASS, launches=4, host_syncs=1),
    # the covariance selections add theirs: clip_cov the eligible tokens (nonzero) and the count of valid ones (int),
    # kl_cov the valid tokens (nonzero)
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo, clip_cov"): dict(_TWO_PASS, launches=4, host_syncs=3),
    (POLICY_LOSS_FWD_BWD, "fused_canon", "grpo, kl_cov"): dict(_TWO_PASS, launches=4, host_syncs=2),
    (LINEAR_POLICY_LOSS_FWD_BWD, "fused_canon", "grpo"): dict(launches=6, host_syncs=2, vocab_torch_ops=2,
                                                              peak=2.1),
    (TOKEN_STATS_FWD, "torch eager", "-"): dict(host_syncs=1, peak=0.2),
    (POLICY_LOSS_FWD_BWD, "torch eager", "grpo"): dict(host_syncs=2, peak=1.2),
    (POLICY_LOSS_FWD_BWD, "torch eager", "advantages given"): dict(host_syncs=2, peak=1.2),
    (POLICY_LOSS_FWD_BWD, "torch eager", "grpo, inplace_backward"): dict(host_syncs=2, peak=0.2),
}

def _case(path, impl, config):
    return next(c for c in cases(NO_PEERS) if c.path == path and c.impl.startswith(impl) and c.config == config)


@pytest.mark.parametrize("key", list(BUDGETS), ids=lambda k: f"{k[0]}-{k[2]}")
def test_fused_paths_within_budget(key):
    budget = BUDGETS[key]
    counts = count_case(_case(*key), SHAPE, torch.float32)
    if "R" in budget:
        assert counts["read_R"] <= budget["R"], counts["logits_reads"]
        assert counts["written_W"] <= budget["W"]
        assert counts["logits_reads"]["first"] == pytest.approx(1.0)  # every logit is read
    if "R_mem" in budget:
        assert counts["fetched_R"] <= budget["R_mem"], counts["logits_reads"]
        assert counts["logits_reads"]["later_launch"] <= budget["later"], counts["logits_reads"]
    if "launches" in budget:  # the torch backend launches no kernel, and its [N, V] ops are per chunk
        assert counts["launches"] <= budget["launches"], [k["kernel"] for k in counts["kernels"]]
        assert counts["vocab_torch_ops"] <= budget["vocab_torch_ops"], counts["vocab_torch_op_sites"]
    assert counts["host_syncs"] <= budget["host_syncs"], counts["sync_sites"]
    assert counts["peak_extra_logits"] <= budget["peak"], counts["peak_extra_logits"]


def test_lm_head_path_flops_are_its_gemms():
    """At a shape that fills every tile: the forward's logits tiles (2NHV), the backward's recomputed
    logits tiles (2NHV), dhidden and dW (2NHV each): 8 NHV, each GEMM kernel 2 NHV."""
    shape = default_shape(rows=128, vocab=256, hidden=128)
    counts = count_case(_case(LINEAR_POLICY_LOSS_FWD_BWD, "fused_canon", "grpo"), shape, torch.float32)
    assert counts["flops_per_NHV"] == pytest.approx(8.0)
    gemms = {k["kernel"]: k["flops"] / (128 * 256 * 128) for k in counts["kernels"] if k["flops"]}
    assert len(gemms) == 4 and all(v == pytest.approx(2.0) for v in gemms.values()), gemms


def test_lm_head_tiles_per_requested_byte():
    """fp16 at a shape that fills every tile (H = 256): every GEMM on fp16 operands, the dlogits kernel on
    128 x 128 tiles (41.6 FLOP per requested byte with its fp32 workspace write), the forward's 64 x 128 tiles
    42.4, grad_hidden's 128 x 128 tiles 39.2, grad_weight's 36.2."""
    shape = default_shape(rows=256, vocab=512, hidden=256)
    counts = count_case(_case(LINEAR_POLICY_LOSS_FWD_BWD, "fused_canon", "grpo"), shape, torch.float16)
    gemms = {k["kernel"]: k for k in counts["kernels"] if k["flops"]}
    assert all(key.endswith("fp16xfp16") for k in gemms.values() for key in k["dots"]), gemms
    assert list(gemms["_linear_token_stats_dlogits_kernel"]["dots"]) == ["[128x32]@[32x128] fp16xfp16"]
    minima = {"_linear_token_stats_fwd_kernel": 42.0, "_linear_token_stats_dlogits_kernel": 41.0,
              "_linear_token_stats_dhidden_kernel": 39.0, "_linear_token_stats_dweight_kernel": 36.0}
    assert {name: gemms[name]["flop_per_byte"] >= low for name, low in minima.items()} == dict.fromkeys(minima, True), \
        {name: k["flop_per_byte"] for name, k in gemms.items()}


def test_wide_grad_weight_tile_per_requested_byte():
    """grad_weight's 128 x 256 tile (what bf16 and fp16 run on sm_90, kernels/linear_token_stats.py; the
    interpreter keeps square tiles, so it is asked for, and computes bf16 dots in fp32, so fp16 operands are
    counted): 50.9 FLOP per requested byte against 36.2 for
    128 x 128 (each K step requests the fp32 workspace's 128 columns and 256 fp16 hidden columns; with bf16's
    bf16 workspace, 2 BV BH / ((BV + BH) 2 bytes) = 85 against 64), and the same gradient."""
    from fused_canon.kernels.linear_token_stats import LinearTokenStatsBlocks, triton_linear_token_stats

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(256, 256, generator=g).half().requires_grad_()
    weight = (torch.randn(512, 256, generator=g) / 16).half().requires_grad_()
    targets, rows = torch.randint(0, 512, (256,), generator=g), torch.arange(256)
    grads, per_byte = {}, {}
    for width in (128, 256):
        weight.grad = None
        with InterpreterTraffic({"hidden": hidden, "weight": weight}) as traffic:
            logp, entropy = triton_linear_token_stats(hidden, weight, targets, rows, block_sizes=LinearTokenStatsBlocks(
                dweight_block_h=width))
            (logp.sum() + entropy.sum()).backward()
        kernel = next(k for k in count._kernels(traffic) if k["kernel"] == "_linear_token_stats_dweight_kernel")
        assert list(kernel["dots"]) == [f"[128x64]@[64x{width}] fp16xfp16"]
        grads[width], per_byte[width] = weight.grad.clone(), kernel["flop_per_byte"]
    assert per_byte[128] == pytest.approx(36.2, abs=0.1) and per_byte[256] == pytest.approx(50.9, abs=0.1), per_byte
    torch.testing.assert_close(grads[256], grads[128], rtol=0, atol=0)


def test_count_document_matches_the_schema_and_prints():
    doc = run_count(SHAPE, paths=[TOKEN_STATS_FWD], builds=False, log=lambda line: None)
    assert not validate(doc), validate(doc)
    assert {row["impl"] for row in doc["rows"]} >= {"fused_canon[triton]", "torch eager (reference)"}
    assert all(row["status"] in ("ok", "not installed") for row in doc["rows"]), [r["detail"] for r in doc["rows"]]
    table = format_count_table(doc)
    assert "fused_canon[triton]" in table and "1st 1.00" in table
    broken = dict(doc, rows=[dict(doc["rows"][0], counts=None)])
    assert validate(broken)
