"""Metrics: console lines, JSONL, TensorBoard, a progress bar, step timers and the final plots."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

# The curves plotted at the end of a run (and by `fused-canon compare`).
PLOTTED = (("critic/score/mean", "mean reward"), ("actor/entropy", "entropy"),
           ("response_length/mean", "response length"))


class Tracker:
    """``log(metrics, step)`` fans out to the configured backends, verl-style:
    console ``step:N - key:value - ...``, JSONL ``{"step": N, "data": {...}}``, TensorBoard scalars.

    A resumed run continues the same files: the JSONL keeps exactly one row per step up to
    ``start_step`` (``resumed_row``, stored in the checkpoint, fills in that step's row if a kill
    took it) and TensorBoard hides the events of later steps, which the resumed run logs again.
    """

    def __init__(self, out_dir: str, loggers: List[str], total_steps: int, start_step: int, progress_bar: bool,
                 resumed_row: Optional[Dict[str, float]] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.loggers = loggers
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.jsonl = None
        if "jsonl" in loggers:
            restore_jsonl(self.jsonl_path, start_step, resumed_row)
            self.jsonl = open(self.jsonl_path, "a")
        self.tensorboard = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of steps > start_step that an interrupted
            # attempt wrote (this run logs them again), so no step appears twice.
            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if "console" in self.loggers:
            line = f"step:{step} - " + " - ".join(f"{k}:{_fmt(v)}" for k, v in sorted(metrics.items()))
            if self.bar is not None:
                self.bar.write(line)  # printed above the bar instead of breaking it
            else:
                print(line, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(_jsonl_line(step, metrics))  # one write: a kill leaves the row whole or absent
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(1)
            if "critic/score/mean" in metrics:
                self.bar.set_postfix(reward=f"{metrics['critic/score/mean']:.3f}")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.bar is not None:
            self.bar.close()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextmanager
def timer(name: str, metrics: Dict[str, float]):
    """Adds ``timing_s/<name>``: the wall time of the block."""
    start = time.perf_counter()
    yield
    metrics[f"timing_s/{name}"] = time.perf_counter() - start


def _jsonl_line(step: int, metrics: Dict[str, float]) -> str:
    return json.dumps({"step": step, "data": metrics}) + "\n"


def _parse_jsonl(jsonl_path: str) -> Tuple[List[dict], List[int]]:
    """(the rows, the numbers of the lines that are not a whole row: torn by a kill or a full disk)."""
    rows, torn = [], []
    with open(jsonl_path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"step": int(row["step"]), "data": dict(row["data"])})
            except (ValueError, KeyError, TypeError):
                torn.append(number)
    return rows, torn


def read_metrics(jsonl_path: str) -> List[dict]:
    rows, torn = _parse_jsonl(jsonl_path)
    if torn:
        print(f"{jsonl_path}: skipped torn line(s) {torn}", file=sys.stderr)
    return rows


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def restore_jsonl(jsonl_path: str, step: int, row: Optional[Dict[str, float]]) -> None:
    """Make the log hold exactly one row for each step up to ``step`` (the first one written; ``row``
    for ``step`` itself when the log lacks it) and nothing after. The new file replaces the old one
    by an atomic rename, so a kill during the rewrite loses nothing."""
    rows, torn = _parse_jsonl(jsonl_path) if os.path.exists(jsonl_path) else ([], [])
    kept: Dict[int, dict] = {}
    for r in rows:
        if r["step"] <= step:
            kept.setdefault(r["step"], r)
    if step and step not in kept and row is not None:
        kept[step] = {"step": step, "data": row}
    text = "".join(_jsonl_line(r["step"], r["data"]) for r in sorted(kept.values(), key=lambda r: r["step"]))
    if _read_text(jsonl_path) == text:
        return
    if torn:
        print(f"{jsonl_path}: dropped torn line(s) {torn}", flush=True)
    missing = sorted(set(range(1, step + 1)) - set(kept))
    if missing:
        print(f"{jsonl_path}: no row for step(s) {missing}", flush=True)
    tmp = jsonl_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, jsonl_path)


def _curve(rows: List[dict], key: str):
    points = [(row["step"], row["data"][key]) for row in rows if key in row["data"]]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: Dict[str, str], png_path: str, title: Optional[str] = None) -> None:
    """One panel per PLOTTED metric, one line per run ({label: metrics.jsonl})."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8))
    for label, jsonl_path in runs.items():
        rows = read_metrics(jsonl_path)
        for ax, (key, name) in zip(axes, PLOTTED):
            steps, values = _curve(rows, key)
            ax.plot(steps, values, label=label, linewidth=1.2)
    for ax, (key, name) in zip(axes, PLOTTED):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def learning_summary(jsonl_path: str, key: str = "critic/score/mean") -> Dict[str, float]:
    """Mean of ``key`` over the first and the last tenth of the steps (at least one step each)."""
    values = [row["data"][key] for row in read_metrics(jsonl_path) if key in row["data"]]
    tenth = max(1, len(values) // 10)
    first, last = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
    return {"first_tenth": first, "last_tenth": last, "improvement": last - first, "steps": len(values)}
