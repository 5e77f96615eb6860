"""Pieces of the benchmark harness that decide what a GPU run measures, checked without a GPU."""

import pytest

from fused_canon.bench.candidates import COMPILED, EAGER, OURS, Settings, candidates_for, pg_surrogate
from fused_canon.bench.floors import TARGETS, Ceilings, evaluate_target, target_for, work_for
from fused_canon.bench.peers import CCE, LIGER, VERL, Peer
from fused_canon.bench.suite import compile_skip_reason
from fused_canon.bench.workloads import (
    FULL_GRID,
    LINEAR_POLICY_LOSS_FWD_BWD,
    PATHS,
    POLICY_LOSS_FWD_BWD,
    TOKEN_STATS_FWD,
    Shape,
    filter_grid,
    is_linear,
)

H100 = Ceilings(3.0e12, 0, 0.0, 800e12, 0, "bfloat16", 0.0)
NO_PEERS = {name: Peer(name, "not installed") for name in (LIGER, VERL, CCE)}


def test_full_grid_is_the_issue_grid():
    logits_shapes = FULL_GRID.shapes(TOKEN_STATS_FWD)
    linear_shapes = FULL_GRID.shapes(LINEAR_POLICY_LOSS_FWD_BWD)
    assert len(logits_shapes) == 3 * 4 and len(linear_shapes) == 3 * 2 * 4
    assert {s.n_valid for s in logits_shapes if not s.padded} == {4096, 16384, 65536}
    padded = [s for s in logits_shapes if s.padded]
    assert all(s.n_rows == 16384 and s.n_valid == 8192 for s in padded)
    assert {s.vocab for s in linear_shapes} == {32000, 128256, 151936}
    assert {s.hidden for s in linear_shapes} == {2048, 4096}


def test_filter_grid_keeps_what_is_asked():
    grid = filter_grid(FULL_GRID, token_counts=[16384], vocabs=[151936], hiddens=[4096], padded=False)
    assert FULL_GRID.shapes(TOKEN_STATS_FWD) != grid.shapes(TOKEN_STATS_FWD)
    for path in PATHS:
        assert grid.shapes(path) == [Shape(16, 1024, 16384, 151936, 4096 if is_linear(path) else None)]


@pytest.mark.parametrize("path", PATHS)
def test_compiled_reference_runs_once_per_path_at_the_target_shape_by_default(path):
    compiled_at = [s for i, s in enumerate(FULL_GRID.shapes(path)) if compile_skip_reason("target", path, i, s) is None]
    assert compiled_at == [Shape(16, 1024, 16384, 151936, 4096 if is_linear(path) else None)]
    assert all(compile_skip_reason("all", path, i, s) is None for i, s in enumerate(FULL_GRID.shapes(path)))


def test_each_target_matches_exactly_one_row_of_the_full_grid():
    for target in TARGETS:
        matched = [s for s in FULL_GRID.shapes(target.path) if target_for(OURS, target.path, s) is target]
        assert len(matched) == 1
        assert target_for(EAGER, target.path, matched[0]) is None  # targets are ours only


def test_targets_pass_and_fail_on_their_device_only():
    lm_head = next(t for t in TARGETS if t.path == LINEAR_POLICY_LOSS_FWD_BWD)
    gib = 2 ** 30
    assert evaluate_target(lm_head, "NVIDIA H100 80GB HBM3", 120.0, int(1.2 * gib))["met"] is True
    assert evaluate_target(lm_head, "NVIDIA H100 80GB HBM3", 120.0, int(1.6 * gib))["met"] is False
    assert evaluate_target(lm_head, "NVIDIA H100 80GB HBM3", 131.0, int(1.2 * gib))["met"] is False
    other = evaluate_target(lm_head, "NVIDIA H200", 120.0, int(1.2 * gib))
    assert other["applies"] is False and other["met"] is None and other["time_met"] is True


def test_every_path_has_ours_both_references_and_its_peers():
    settings = Settings(compile_backend="inductor")
    peers_by_path = {p: {c.peer for c in candidates_for(p, NO_PEERS, settings)} - {None} for p in PATHS}
    assert peers_by_path[TOKEN_STATS_FWD] == {LIGER}
    assert peers_by_path[POLICY_LOSS_FWD_BWD] == {LIGER}
    assert peers_by_path[LINEAR_POLICY_LOSS_FWD_BWD] == {LIGER, VERL, CCE}
    for path in PATHS:
        impls = [c.impl for c in candidates_for(path, NO_PEERS, settings)]
        assert impls[:3] == [OURS, EAGER, COMPILED] and len(set(impls)) == len(impls)


def test_pg_surrogate_is_the_token_mean_clipped_objective():
    import torch

    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-1.5, -2.0, -2.0]])  # ratios e^0.5 (clipped to 1.2 for A > 0), 1, e^-1
    mask = torch.tensor([[True, True, False]])
    loss = pg_surrogate(logp, old, torch.tensor([2.0]), mask, clip_low=0.2, clip_high=0.2)
    # A > 0: -min(A r, A clip(r)) -> -2 * 1.2 and -2 * 1; the masked third token is left out
    assert loss.item() == pytest.approx((-2.4 - 2.0) / 2)


def test_floors_reproduce_the_h100_table_of_peers_md():
    """At 3.0 TB/s and 800 TFLOP/s the floors are docs/design.md §7.1's: 1.66 ms, 4.98 ms, 102 ms at N = 16k."""
    n, v, h = 16384, 151936, 4096
    logits = Shape(16, 1024, n, v)
    assert H100.floor_ms(work_for(TOKEN_STATS_FWD, logits, 2))["floor_ms"] == pytest.approx(1.66, abs=0.01)
    assert H100.floor_ms(work_for(POLICY_LOSS_FWD_BWD, logits, 2))["floor_ms"] == pytest.approx(4.98, abs=0.01)
    linear = H100.floor_ms(work_for(LINEAR_POLICY_LOSS_FWD_BWD, Shape(16, 1024, n, v, h), 2))
    assert linear["bound"] == "compute" and linear["floor_ms"] == pytest.approx(102.0, abs=0.1)


def test_padded_rows_count_only_valid_tokens_in_the_reads():
    dense, padded = Shape(16, 1024, 16384, 1000), Shape(16, 1024, 8192, 1000)
    reads = work_for(POLICY_LOSS_FWD_BWD, padded, 2).bytes
    # 2 reads of the 8,192 valid rows, a dlogits write of all 16,384 rows
    assert reads == (2 * 8192 + 16384) * 1000 * 2 + 16384 * 21
    assert work_for(POLICY_LOSS_FWD_BWD, dense, 2).bytes > reads


def _run_fake(prepare, workspace=lambda shape, elt: 0):
    import torch

    from fused_canon.bench.candidates import Candidate
    from fused_canon.bench.suite import RunConfig, run_case
    from fused_canon.bench.timing import WallClockTimer
    from fused_canon.bench.workloads import SMOKE_GRID

    cfg = RunConfig(mode="smoke", grid=SMOKE_GRID, paths=[TOKEN_STATS_FWD], dtype=torch.float32,
                    device=torch.device("cpu"), seed=0, compile_backend="eager", timer=WallClockTimer(runs=1),
                    copy_bytes=2 ** 20, matmul_size=64)
    candidate = Candidate("stand-in", "ours", "log-prob + entropy", prepare, workspace)
    ceilings = Ceilings(1e10, 0, 0.0, 1e10, 0, "float32", 0.0)
    return run_case(cfg, TOKEN_STATS_FWD, SMOKE_GRID.shapes(TOKEN_STATS_FWD)[0], candidate, NO_PEERS, ceilings, "cpu")


def test_a_backend_that_has_not_landed_is_reported_with_its_error_text():
    def prepare(inputs):
        raise ModuleNotFoundError("No module named 'fused_canon.kernels.token_stats'")

    row = _run_fake(prepare)
    assert row["status"] == "unavailable" and "fused_canon.kernels.token_stats" in row["detail"]
    assert row["time_ms"] is None and row["value"] is None


def test_failures_non_finite_outputs_and_memory_skips_get_their_own_status():
    import torch

    from fused_canon.bench.candidates import Prepared

    def broken(inputs):
        raise RuntimeError("kernel exploded")

    def nan_loss(inputs):
        return Prepared(lambda: torch.tensor(float("nan")))

    assert _run_fake(broken)["status"] == "error"
    row = _run_fake(nan_loss)
    assert row["status"] == "error" and "non-finite" in row["detail"]
    row = _run_fake(nan_loss, workspace=lambda shape, elt: 2 ** 60)
    assert row["status"] == "skipped" and "GiB free" in row["detail"]


def test_a_working_candidate_is_timed_and_checked():
    import torch

    from fused_canon.bench.candidates import Prepared

    from fused_canon.bench.workloads import SMOKE_GRID, make_inputs

    row = _run_fake(lambda inputs: Prepared(lambda: inputs["logits"].logsumexp(-1).mean()))
    assert row["status"] == "ok" and row["time_ms"] > 0 and row["runs"] == 1
    # the same seed draws the same inputs, so the value is reproducible outside the harness
    shape = SMOKE_GRID.shapes(TOKEN_STATS_FWD)[0]
    logits = make_inputs(TOKEN_STATS_FWD, shape, torch.float32, torch.device("cpu"), seed=0)["logits"]
    assert row["value"] == pytest.approx(float(logits.logsumexp(-1).mean()), rel=1e-6)
