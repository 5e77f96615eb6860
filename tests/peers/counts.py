"""Per peer, the counts of the differential tests of this run: configurations compared, matching,
unsupported (with the reasons), mismatches. A configuration is one test; its peer is what it recorded
with ``peers.compared`` / ``peers.unsupported``. The hooks are tests/conftest.py's (a conftest below
tests/ is not loaded on the xdist controller, which collects nothing)."""

from collections import defaultdict

from . import PEER_KEY, UNSUPPORTED_PREFIX

_outcomes = defaultdict(lambda: {"compared": 0, "matching": 0, "mismatches": [], "unsupported": defaultdict(int)})


def record(report):
    peer = dict(report.user_properties).get(PEER_KEY)
    if peer is None or (report.when != "call" and not (report.when == "setup" and report.skipped)):
        return
    counts = _outcomes[peer]
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.split(UNSUPPORTED_PREFIX, 1)[-1]
        counts["unsupported"][reason] += 1
        return
    counts["compared"] += 1
    if report.passed:
        counts["matching"] += 1
    else:
        counts["mismatches"].append(report.nodeid)


def summary(terminalreporter):
    if not _outcomes:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fused-canon against the peers")
    for peer in sorted(_outcomes):
        counts = _outcomes[peer]
        unsupported = sum(counts["unsupported"].values())
        write(f"{peer}: {counts['compared']} configurations compared, {counts['matching']} matching, "
              f"{len(counts['mismatches'])} mismatches, {unsupported} unsupported")
        for reason, n in sorted(counts["unsupported"].items()):
            write(f"    unsupported ({n}): {reason}")
        for nodeid in counts["mismatches"]:
            write(f"    mismatch: {nodeid}")
