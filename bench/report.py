"""Console table, results file and plot of a run."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from typing import Dict, List, Optional

from fused_canon.bench.schema import validate
from fused_canon.bench.workloads import PATHS


def results_stem(doc: Dict, tag: Optional[str] = None) -> str:
    """``<device>-<date>[-<tag>]``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-23``."""
    device = re.sub(r"[^a-z0-9]+", "-", str(doc["device"]["name"]).lower()).strip("-")
    stem = f"{device}-{doc['created_utc'][:10]}"
    return f"{stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', tag)}" if tag else stem


def unused_path(directory: str, stem: str, suffix: str) -> str:
    """``directory/stem.suffix``, or with the time appended when that file exists (runs of the same day)."""
    path = os.path.join(directory, stem + suffix)
    if os.path.exists(path):
        path = os.path.join(directory, f"{stem}-{time.strftime('%H%M%S')}{suffix}")
    return path


def write_json(doc: Dict, path: str) -> None:
    problems = validate(doc)
    if problems:
        raise ValueError("results document does not match its schema: " + "; ".join(problems[:10]))
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)  # a reader (or a killed run) never sees half a file


def _gib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f}"


def _target_cell(row: Dict) -> str:
    target = row.get("target")
    if not target:
        return ""
    limit = f"<={target['time_ms_max']:g} ms" + (
        f", <={target['extra_gib_max']:g} GiB" if target.get("extra_gib_max") is not None else "")
    if row["status"] != "ok":
        return limit + ": not run"
    if not target.get("applies"):
        return limit + f": n/a (target is for {target['device']})"
    return limit + (": PASS" if target["met"] else ": FAIL")


FOLDABLE = ("not installed", "import failed", "skipped")


def format_table(doc: Dict) -> str:
    """One line per row; rows that did not run for the same reason (a peer not installed, the compiled
    reference away from the target shape) are folded into one line each under the table."""
    header = ("path", "impl", "shape", "time ms", "floor ms", "% floor", "bound", "extra GiB", "rel diff", "target",
              "status")
    repeats = Counter((r["impl"], r["status"], r["detail"]) for r in doc["rows"] if r["status"] in FOLDABLE)
    folded = {key: n for key, n in repeats.items() if n > 1}
    lines: List[tuple] = []
    for row in doc["rows"]:
        if (row["impl"], row["status"], row["detail"]) in folded:
            continue
        ok = row["status"] == "ok"
        status = "ok" if ok else f"{row['status']}: {row['detail']}"
        lines.append((
            row["path"], row["impl"], row["label"],
            f"{row['time_ms']:.3f}" if ok else "-",
            f"{row['floor']['floor_ms']:.3f}",
            f"{100 * row['fraction_of_floor']:.1f}" if ok else "-",
            row["floor"]["bound"],
            _gib(row.get("peak_extra_bytes")) if ok else "-",
            f"{row['rel_diff']:.1e}" if row.get("rel_diff") is not None else "-",
            _target_cell(row),
            status if len(status) <= 110 else status[:107] + "...",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    previous_path = None
    for line in lines:
        if previous_path is not None and line[0] != previous_path:
            out.append("")
        previous_path = line[0]
        out.append(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    for (impl, status, detail), n in folded.items():  # peer rows' detail already names the peer
        out.append(f"({n} rows of {impl}, {status}: {detail})")
    out.append("rel diff: |value - value of the eager reference| / |reference| on the same inputs (the loss; "
               "the mean valid-token log-prob for token_stats); against ours where the reference did not run")
    ceilings = doc["ceilings"]
    out.append(f"floors: bytes / {ceilings['bandwidth_GBps']:.1f} GB/s (copy) and FLOPs / "
               f"{ceilings['matmul_TFLOPs']:.2f} TFLOP/s ({ceilings['matmul_dtype']} matmul), measured in this run")
    memory_notes = {row.get("memory_note") for row in doc["rows"] if row["status"] == "ok"}
    if any(row.get("peak_extra_bytes") is None for row in doc["rows"] if row["status"] == "ok"):
        out.append("extra GiB: " + "; ".join(sorted(n for n in memory_notes if n)))
    return "\n".join(out)


def write_plot(doc: Dict, path: str) -> Dict[str, Optional[str]]:
    """Time vs valid tokens, one panel per path, one line per implementation, the floor dashed.

    Each panel shows the largest vocabulary (and hidden size) of the run; the padded batch is an
    open marker at its valid-token count. Without matplotlib only the plot is skipped.
    """
    try:
        import matplotlib
    except ImportError:
        return {"path": None, "status": "skipped: matplotlib is not installed (pip install matplotlib)"}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [p for p in PATHS if any(r["path"] == p for r in doc["rows"])] or [None]
    columns = min(3, len(paths))
    rows_of_panels = -(-len(paths) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.5 * columns, 4.5 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(paths):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, paths):
        if p is None:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center")
            continue
        rows = [r for r in doc["rows"] if r["path"] == p]
        vocab = max(r["shape"]["vocab"] for r in rows)
        hidden = max((r["shape"]["hidden"] or 0) for r in rows) or None
        rows = [r for r in rows if r["shape"]["vocab"] == vocab and r["shape"]["hidden"] == hidden]
        floor = sorted({(r["shape"]["n_valid"], r["floor"]["floor_ms"]) for r in rows if not r["shape"]["padded"]})
        if floor:
            ax.plot(*zip(*floor), "k--", linewidth=1, label="floor")
        for impl in dict.fromkeys(r["impl"] for r in rows):
            ran = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
            dense = sorted((r["shape"]["n_valid"], r["time_ms"]) for r in ran if not r["shape"]["padded"])
            padded = [(r["shape"]["n_valid"], r["time_ms"]) for r in ran if r["shape"]["padded"]]
            if not dense and not padded:
                continue
            line = ax.plot(*zip(*dense), "o-", label=impl)[0] if dense else None
            if padded:
                ax.plot(*zip(*padded), "o", markerfacecolor="none",
                        color=line.get_color() if line else None, label=None if line else impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("valid tokens N (open marker: padded batch)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{p}\nV={vocab}" + (f" H={hidden}" if hidden else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['device']['name']}, {doc['settings']['dtype']}, {doc['mode']} run, {doc['created_utc']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"path": os.path.basename(path), "status": "written"}
