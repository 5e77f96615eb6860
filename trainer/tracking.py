"""Metrics: console lines, JSONL, TensorBoard, a progress bar, step timers and the final plots."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

# The curves plotted at the end of a run (and by `fused-canon compare`).
PLOTTED = (("critic/score/mean", "mean reward"), ("actor/entropy", "entropy"),
           ("response_length/mean", "response length"))


class Tracker:
    """``log(metrics, step)`` fans out to the configured backends, verl-style:
    console ``step:N - key:value - ...``, JSONL ``{"step": N, "data": {...}}``, TensorBoard scalars."""

    def __init__(self, out_dir: str, loggers: List[str], total_steps: int, start_step: int, progress_bar: bool):
        os.makedirs(out_dir, exist_ok=True)
        self.loggers = loggers
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        # Appending keeps a resumed run's earlier steps; rows of steps past the resume point are dropped.
        self._truncate_jsonl_after(start_step)
        self.jsonl = open(self.jsonl_path, "a") if "jsonl" in loggers else None
        self.tensorboard = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    def _truncate_jsonl_after(self, step: int) -> None:
        if not os.path.exists(self.jsonl_path):
            return
        kept = [row for row in read_metrics(self.jsonl_path) if row["step"] <= step]
        with open(self.jsonl_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if "console" in self.loggers:
            line = f"step:{step} - " + " - ".join(f"{k}:{_fmt(v)}" for k, v in sorted(metrics.items()))
            if self.bar is not None:
                self.bar.write(line)  # printed above the bar instead of breaking it
            else:
                print(line, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "data": metrics}) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(1)
            if "critic/score/mean" in metrics:
                self.bar.set_postfix(reward=f"{metrics['critic/score/mean']:.3f}")

    def close(self) -> None:
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


def read_metrics(jsonl_path: str) -> List[dict]:
    with open(jsonl_path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
