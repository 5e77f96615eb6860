"""The results file's schema, checked before every write and by the smoke test.

Plain code rather than a JSON-Schema document, so checking needs nothing beyond the standard
library. ``validate(doc)`` returns the list of problems (empty when the document is valid).
"""

from __future__ import annotations

from typing import Dict, List

from fused_canon.bench.peers import CCE, LIGER, VERL  # peers.py imports only the standard library

ROW_STATUSES = {"ok", "unavailable", "not installed", "import failed", "skipped", "oom", "error"}
PEER_NAMES = {LIGER, VERL, CCE}

_TOP = {"schema_version": int, "mode": str, "created_utc": str, "complete": bool, "device": dict,
        "versions": dict, "settings": dict, "ceilings": dict, "peers": dict, "targets": list, "rows": list}
_ROW = {"path": str, "impl": str, "kind": str, "computes": str, "shape": dict, "label": str, "status": str,
        "work": dict, "floor": dict}
_NUMBER = (int, float)
# ``fused-canon bench --count`` (bench/count.py): no timing, so no ceilings or floors; counts per row.
_COUNT_ROW = {"path": str, "impl": str, "kind": str, "config": str, "computes": str, "shape": dict, "label": str,
              "status": str, "work": dict}
_COUNTS = {"launches": int, "host_syncs": int, "sync_sites": list, "kernels": list, "tensors": dict,
           "peak_extra_bytes": int, "flops": int, "vocab_torch_ops": int}


def _check_types(obj: Dict, spec: Dict, where: str, problems: List[str]) -> None:
    for key, typ in spec.items():
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
        elif not isinstance(obj[key], typ):
            problems.append(f"{where}: {key!r} is {type(obj[key]).__name__}, expected {typ.__name__}")


def _positive(value, where: str, problems: List[str]) -> None:
    if not isinstance(value, _NUMBER) or isinstance(value, bool) or not value > 0:
        problems.append(f"{where}: expected a positive number, got {value!r}")


def validate(doc: Dict) -> List[str]:
    problems: List[str] = []
    _check_types(doc, _TOP, "document", problems)
    if problems:
        return problems
    for key in ("name", "type"):
        if not isinstance(doc["device"].get(key), str):
            problems.append(f"device: missing {key!r}")
    for key in ("torch", "triton", "python"):
        if key not in doc["versions"]:
            problems.append(f"versions: missing {key!r}")
    if set(doc["peers"]) != PEER_NAMES:
        problems.append(f"peers: expected {sorted(PEER_NAMES)}, got {sorted(doc['peers'])}")
    for name, peer in doc["peers"].items():
        status = peer.get("status") if isinstance(peer, dict) else None
        if not isinstance(status, str) or not status.split(":")[0] in {"installed", "not installed", "import failed"}:
            problems.append(f"peers.{name}: bad status {status!r}")
    if doc["mode"] == "count":
        _validate_count_rows(doc, problems)
        return problems
    for key in ("bandwidth_GBps", "matmul_TFLOPs"):
        _positive(doc["ceilings"].get(key), f"ceilings.{key}", problems)
    for i, target in enumerate(doc["targets"]):
        _positive(target.get("time_ms_max"), f"targets[{i}].time_ms_max", problems)
    for i, row in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        _check_types(row, _ROW, where, problems)
        if any(p.startswith(where + ":") for p in problems):
            continue
        if row["status"] not in ROW_STATUSES:
            problems.append(f"{where}: unknown status {row['status']!r}")
        _positive(row["floor"].get("floor_ms"), f"{where}.floor.floor_ms", problems)
        if row["status"] == "ok":
            _positive(row.get("time_ms"), f"{where}.time_ms", problems)
            _positive(row.get("fraction_of_floor"), f"{where}.fraction_of_floor", problems)
            value = row.get("value")
            if not isinstance(value, _NUMBER) or value != value or abs(value) == float("inf"):
                problems.append(f"{where}: an ok row needs the finite value it computed, got {value!r}")
            if row.get("peak_extra_bytes") is None and not row.get("memory_note"):
                problems.append(f"{where}: no peak memory and no note saying why")
        elif not row.get("detail"):
            problems.append(f"{where}: status {row['status']!r} without a detail saying why")
    return problems


def _validate_count_rows(doc: Dict, problems: List[str]) -> None:
    for i, row in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        _check_types(row, _COUNT_ROW, where, problems)
        if any(p.startswith(where + ":") for p in problems):
            continue
        if row["status"] not in ROW_STATUSES:
            problems.append(f"{where}: unknown status {row['status']!r}")
        elif row["status"] == "ok":
            if not isinstance(row.get("counts"), dict):
                problems.append(f"{where}: an ok row needs its counts")
            else:
                _check_types(row["counts"], _COUNTS, where + ".counts", problems)
        elif not row.get("detail"):
            problems.append(f"{where}: status {row['status']!r} without a detail saying why")
