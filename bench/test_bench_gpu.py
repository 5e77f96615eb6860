"""pytest-benchmark entry points on a CUDA machine: ``pytest bench --benchmark-only``.

One benchmark per (path, implementation) at the target shape (N = 16,384 valid tokens,
V = 151,936, H = 4,096, bf16), built from the same candidates as ``fused-canon bench``. Each
round is one call followed by ``torch.cuda.synchronize()``, timed on the host clock by
pytest-benchmark; ``fused-canon bench`` (CUDA events, L2 flushed, floors, peak memory) gives the
numbers to report. Skipped without CUDA; peers that are not installed are skipped with their status.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fused_canon.bench.candidates import Settings, candidates_for  # noqa: E402
from fused_canon.bench.floors import measure_ceilings, work_for  # noqa: E402
from fused_canon.bench.peers import probe_peers  # noqa: E402
from fused_canon.bench.suite import _element_size, memory_skip_reason  # noqa: E402
from fused_canon.bench.timing import CudaTimer, _reset_grads  # noqa: E402
from fused_canon.bench.workloads import PATHS, Shape, is_linear, make_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPE = torch.bfloat16
SETTINGS = Settings(compile_backend="inductor")
PEERS = probe_peers()


def target_shape(path: str) -> Shape:
    return Shape(batch=16, seq_len=1024, n_valid=16384, vocab=151936, hidden=4096 if is_linear(path) else None)


CASES = [(path, c.impl) for path in PATHS for c in candidates_for(path, PEERS, SETTINGS)]


@pytest.fixture(scope="module")
def ceilings():
    return measure_ceilings(torch.device("cuda"), DTYPE, CudaTimer(), copy_bytes=2 * 2 ** 30, matmul_size=8192)


@pytest.mark.parametrize("path,impl", CASES, ids=[f"{p}|{i}" for p, i in CASES])
def test_bench(benchmark, ceilings, path, impl):
    candidate = next(c for c in candidates_for(path, PEERS, SETTINGS) if c.impl == impl)
    if candidate.peer is not None and not PEERS[candidate.peer].available:
        pytest.skip(f"{candidate.peer}: {PEERS[candidate.peer].status}")
    device, shape, elt = torch.device("cuda"), target_shape(path), _element_size(DTYPE)
    reason = memory_skip_reason(path, shape, candidate, device, elt)
    if reason:
        pytest.skip(reason)
    prepared = candidate.prepare(make_inputs(path, shape, DTYPE, device, seed=0))
    prepared.fn()  # compile / autotune outside the timed rounds
    torch.cuda.synchronize()

    def one_call():
        _reset_grads(prepared.grad_to_none)
        prepared.fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(path=path, impl=impl, shape=shape.label(), computes=candidate.computes,
                                floor_ms=ceilings.floor_ms(work_for(path, shape, elt))["floor_ms"])
    benchmark.pedantic(one_call, rounds=20, warmup_rounds=3)
