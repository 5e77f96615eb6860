"""The benchmark harness end to end on the CPU: ``fused-canon bench --smoke`` and its outputs.

One test runs the CLI once and applies every check: CI runs pytest with xdist, where a
module-scoped fixture would run the smoke once per worker.
"""

import copy
import json
import os
import subprocess
import sys

import pytest

from fused_canon.bench.candidates import COMPILED, EAGER, OURS
from fused_canon.bench.schema import validate
from fused_canon.bench.workloads import (
    LINEAR_POLICY_LOSS_FWD_BWD,
    PATHS,
    POLICY_LOSS_FWD_BWD,
    TOKEN_STATS_FWD,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_smoke(out):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI must set it itself
    proc = subprocess.run([sys.executable, "-m", "fused_canon.bench.cli", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    results = sorted(out.glob("*.json"))
    doc = json.loads(results[0].read_text()) if len(results) == 1 else None
    return proc, out, results, doc


def test_smoke_run(tmp_path):
    smoke_run = run_smoke(tmp_path)
    check_exits_cleanly_and_writes_one_results_file(smoke_run)
    check_results_match_the_schema(smoke_run)
    check_every_path_has_ours_and_both_references(smoke_run)
    check_implementations_agree_on_the_same_inputs(smoke_run)
    check_peers_are_listed_with_their_status(smoke_run)
    check_rows_carry_floors_and_the_targets_are_recorded(smoke_run)
    check_plot_is_a_png_or_its_absence_is_explained(smoke_run)
    check_validator_rejects_broken_documents(smoke_run)


def check_exits_cleanly_and_writes_one_results_file(smoke_run):
    proc, _, results, _ = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(results) == 1
    assert results[0].name.startswith("cpu-")
    assert "% floor" in proc.stdout and "target" in proc.stdout  # the console table was printed


def check_results_match_the_schema(smoke_run):
    doc = smoke_run[3]
    assert validate(doc) == []
    assert doc["mode"] == "smoke" and doc["complete"] is True
    assert doc["settings"]["triton_interpret"] is True
    assert doc["settings"]["dtype"] == "float32"


def check_every_path_has_ours_and_both_references(smoke_run):
    rows = smoke_run[3]["rows"]
    for path in PATHS:
        impls = {r["impl"] for r in rows if r["path"] == path}
        assert {OURS, EAGER, COMPILED} <= impls, path
    # The torch reference always runs on the CPU; ours either ran or says why it could not.
    assert all(r["status"] == "ok" for r in rows if r["impl"] == EAGER)
    compiled = [r for r in rows if r["impl"] == COMPILED and r["status"] == "ok"]
    assert {r["path"] for r in compiled} == {TOKEN_STATS_FWD, POLICY_LOSS_FWD_BWD, LINEAR_POLICY_LOSS_FWD_BWD}
    assert all(r["compiled_frames"] > 0 for r in compiled)  # dynamo did compile the reference
    assert all(r["compiled_frames"] == 0 for r in rows if r["impl"] == EAGER)
    for row in rows:
        if row["impl"] == OURS:
            assert row["status"] in ("ok", "unavailable"), row["detail"]
            assert row["status"] == "ok" or row["detail"]


def check_implementations_agree_on_the_same_inputs(smoke_run):
    """The cross-check is not vacuous (nonzero losses) and ours matches the reference in fp32."""
    ok = [r for r in smoke_run[3]["rows"] if r["status"] == "ok"]
    assert all(abs(r["value"]) > 1e-6 for r in ok)
    checked = [r for r in ok if r["rel_diff"] is not None]
    assert {r["path"] for r in checked if r["impl"] == OURS} == set(PATHS)
    for row in checked:
        assert row["rel_diff_vs"] == EAGER
        assert row["rel_diff"] < 1e-4, (row["path"], row["impl"], row["label"], row["rel_diff"])


def check_peers_are_listed_with_their_status(smoke_run):
    doc = smoke_run[3]
    assert set(doc["peers"]) == {"liger-kernel", "verl", "cut-cross-entropy"}
    for name, peer in doc["peers"].items():
        peer_rows = [r for r in doc["rows"] if r["peer"] == name]
        assert peer_rows, name
        if peer["status"] == "not installed":
            assert all(r["status"] == "not installed" and r["time_ms"] is None for r in peer_rows)


def check_rows_carry_floors_and_the_targets_are_recorded(smoke_run):
    doc = smoke_run[3]
    for row in doc["rows"]:
        assert row["floor"]["floor_ms"] > 0
        if row["status"] == "ok":
            assert row["fraction_of_floor"] == pytest.approx(row["floor"]["floor_ms"] / row["time_ms"])
            assert row["peak_extra_bytes"] is None and "CPU" in row["memory_note"]
    targets = {(t["path"], t["time_ms_max"]) for t in doc["targets"]}
    assert targets == {(TOKEN_STATS_FWD, 1.8), (POLICY_LOSS_FWD_BWD, 4.5), (LINEAR_POLICY_LOSS_FWD_BWD, 130.0)}
    assert doc["ceilings"]["bandwidth_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"] > 0


def check_plot_is_a_png_or_its_absence_is_explained(smoke_run):
    _, out, _, doc = smoke_run
    pngs = list(out.glob("*.png"))
    try:
        import matplotlib.image
    except ImportError:
        assert doc["plot"]["status"].startswith("skipped: matplotlib is not installed") and not pngs
        return
    assert doc["plot"]["status"] == "written" and [p.name for p in pngs] == [doc["plot"]["path"]]
    assert pngs[0].read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(pngs[0]).shape[:2]
    assert height > 200 and width > 400


def check_validator_rejects_broken_documents(smoke_run):
    doc = smoke_run[3]
    ok_row = next(i for i, r in enumerate(doc["rows"]) if r["status"] == "ok")
    broken = copy.deepcopy(doc)
    broken["rows"][ok_row]["time_ms"] = None
    assert any("time_ms" in p for p in validate(broken))
    broken = copy.deepcopy(doc)
    broken["rows"][ok_row]["status"] = "error"
    broken["rows"][ok_row]["detail"] = None
    assert any("without a detail" in p for p in validate(broken))
    broken = copy.deepcopy(doc)
    del broken["peers"]["verl"]
    assert any(p.startswith("peers:") for p in validate(broken))
