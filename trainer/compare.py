"""``fused-canon compare``: train several methods on the same config, seeds and budget, then summarise.

A *method* is a name and the overrides that make it: ``grpo`` (an estimator: algorithm.advantage.
estimator=grpo) or ``grpo+clip_cov`` (an estimator and a policy loss: algorithm.loss_mode=clip_cov);
``experiments.py`` adds methods with more overrides (CANON on length). Every method runs with every
seed; each run writes ``<out>/<method>/seed<s>/`` as ``fused-canon train`` would. The runs share
the base model of their seed (``trainer.base_model_cache=<out>/base_models``), trained once.

Then, from the runs' metrics.jsonl: ``summary.json`` (per run and per method: mean, min, max over the
seeds), ``summary.md`` (the table), ``curves.png`` (reward, entropy, Cov(log pi, A), greedy validation
score: the mean over seeds and the min-max band), ``gate.png`` (non-zero advantages against the
group's success rate) and ``halves.png`` (CANON's low-minus-high half reward gap over training).
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence, Tuple

from .config import ConfigError, TrainConfig, load_config
from .tracking import read_metrics


@dataclass
class Method:
    name: str
    overrides: List[str] = field(default_factory=list)


def parse_methods(text: str) -> List[Method]:
    """'grpo,qae,grpo+clip_cov' -> methods (each name is checked when its config loads)."""
    methods = []
    for spec in (part.strip() for part in text.split(",")):
        if not spec:
            continue
        estimator, _, loss = spec.partition("+")
        overrides = [f"algorithm.advantage.estimator={estimator}"] + ([f"algorithm.loss_mode={loss}"] if loss else [])
        methods.append(Method(spec, overrides))
    if not methods:
        raise ConfigError(f"--methods names none: {text!r}")
    return methods


def run_configs(methods: Sequence[Method], seeds: Sequence[int], out_dir: str, config_path: Optional[str],
                overrides: Sequence[str]) -> Dict[Tuple[str, int], TrainConfig]:
    """Every (method, seed) run's config, checked before any run starts."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods names a method twice: {names}")
    configs = {}
    for method in methods:
        for seed in seeds:
            cfg = load_config(config_path, list(overrides) + method.overrides + [
                f"trainer.seed={seed}", f"trainer.out_dir={os.path.join(out_dir, method.name, f'seed{seed}')}"])
            # The comparison reads the JSONL; parallel runs would interleave console lines and bars.
            cfg.trainer.logger = sorted((set(cfg.trainer.logger) - {"console"}) | {"jsonl"})
            cfg.trainer.progress_bar, cfg.trainer.plot = False, False
            if cfg.model.sft_steps and not cfg.trainer.base_model_cache:
                cfg.trainer.base_model_cache = os.path.join(out_dir, "base_models")
            configs[(method.name, seed)] = cfg
    return configs


# ----------------------------------------------------------------------------- running

def _train(cfg: TrainConfig) -> float:
    """One run (in this process or a pool worker); returns its wall time."""
    from .trainer import train

    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def _base_model(cfg: TrainConfig) -> None:
    """Train and cache the base model of cfg (what every run with its seed reads)."""
    from .model import build_model, build_tokenizer, resolve_device
    from .tasks import build_prompts
    from .warmup import warm_start
    from .workers import setup_process

    setup_process(cfg.trainer)
    tokenizer = build_tokenizer(cfg.model, build_prompts(cfg.data, cfg.trainer.seed).alphabet)
    device = resolve_device(cfg.trainer.device)
    warm_start(build_model(cfg.model, tokenizer, cfg.trainer.seed).to(device), tokenizer, cfg, device)


def _map(fn, items: List, jobs: int) -> List:
    if jobs <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    # spawn: a fresh interpreter per worker (torch's thread pools do not survive fork).
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, items))


def run_all(configs: Dict[Tuple[str, int], TrainConfig], jobs: int) -> Dict[Tuple[str, int], float]:
    """The base models first (one per seed, in parallel), then every run, ``jobs`` at a time."""
    from .warmup import cache_key

    bases = {}
    for cfg in configs.values():
        if cfg.model.sft_steps:
            bases.setdefault(cache_key(cfg), cfg)
    _map(_base_model, list(bases.values()), jobs)
    keys = list(configs)
    walls = _map(_train, [configs[key] for key in keys], jobs)
    return dict(zip(keys, walls))


# ----------------------------------------------------------------------------- summarising

SCORE, ENTROPY, COV = "critic/score/mean", "actor/entropy", "actor/cov_logprob_advantage"
NONZERO, VAL, HALVES = "critic/advantages/nonzero_frac", "val/score/mean", "canon/low_minus_high_score"
GATE = re.compile(r"gate/nonzero_frac/(\d+)of(\d+)$")


def _series(rows: List[dict], key: str) -> List[float]:
    return [row["data"][key] for row in rows if key in row["data"]]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _tenth(values: List[float], last: bool) -> Optional[float]:
    n = max(1, len(values) // 10)
    return _mean(values[-n:] if last else values[:n])


def _half(values: List[float], last: bool) -> Optional[float]:
    n = max(1, len(values) // 2)
    return _mean(values[-n:] if last else values[:n])


def _correlation(xs: List[float], ys: List[float]) -> Optional[float]:
    if len(xs) < 3:
        return None
    mx, my = _mean(xs), _mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def run_summary(rows: List[dict]) -> Dict[str, Optional[float]]:
    """The numbers the table shows for one run."""
    score, entropy, cov = _series(rows, SCORE), _series(rows, ENTROPY), _series(rows, COV)
    # The paper's mechanism, step by step: does a larger Cov(log pi, A) come with a larger entropy drop?
    paired = [(row["data"][COV], nxt["data"][ENTROPY] - row["data"][ENTROPY]) for row, nxt in zip(rows, rows[1:])
              if COV in row["data"] and ENTROPY in row["data"] and ENTROPY in nxt["data"]]
    halves = _series(rows, HALVES)
    val = _series(rows, VAL)
    return {
        "steps": len(rows),
        "score_first": _tenth(score, last=False), "score_last": _tenth(score, last=True),
        "val_last": val[-1] if val else None,
        "entropy_first": _tenth(entropy, last=False), "entropy_last": _tenth(entropy, last=True),
        "cov_mean": _mean(cov),
        "cov_entropy_change_corr": _correlation([p[0] for p in paired], [p[1] for p in paired]),
        "nonzero_frac": _mean(_series(rows, NONZERO)),
        "low_minus_high_first_half": _half(halves, last=False), "low_minus_high_second_half": _half(halves, last=True),
    }


def gate_points(rows: List[dict]) -> Dict[Tuple[int, int], Tuple[float, float]]:
    """{(c, n): (mean non-zero fraction, number of groups)} over every step of a run."""
    sums: Dict[Tuple[int, int], List[float]] = {}
    for row in rows:
        for key, value in row["data"].items():
            match = GATE.match(key)
            if match:
                c, n = int(match.group(1)), int(match.group(2))
                groups = row["data"][f"gate/groups/{c}of{n}"]
                acc = sums.setdefault((c, n), [0.0, 0.0])
                acc[0] += value * groups
                acc[1] += groups
    return {key: (total / count, count) for key, (total, count) in sums.items() if count}


def spread(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    """mean, min, max over seeds (None when a run lacks the value)."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarise(methods: Sequence[Method], seeds: Sequence[int], out_dir: str,
              walls: Optional[Dict[Tuple[str, int], float]] = None) -> dict:
    """summary.json's content: per run and per method, from the runs' metrics.jsonl."""
    runs, gates = {}, {}
    for method in methods:
        runs[method.name], gate = {}, {}
        for seed in seeds:
            rows = read_metrics(os.path.join(out_dir, method.name, f"seed{seed}", "metrics.jsonl"))
            numbers = run_summary(rows)
            if walls:
                numbers["wall_s"] = walls[(method.name, seed)]
            runs[method.name][seed] = numbers
            for key, (frac, count) in gate_points(rows).items():
                acc = gate.setdefault(key, [0.0, 0.0])
                acc[0] += frac * count
                acc[1] += count
        gates[method.name] = {f"{c}of{n}": {"nonzero_frac": total / count, "groups": count}
                              for (c, n), (total, count) in sorted(gate.items())}
    keys = list(next(iter(next(iter(runs.values())).values())))
    methods_summary = {name: {key: spread([per_seed[s][key] for s in seeds]) for key in keys}
                       for name, per_seed in runs.items()}
    return {"seeds": list(seeds), "methods": [m.name for m in methods],
            "overrides": {m.name: m.overrides for m in methods}, "runs": runs, "summary": methods_summary,
            "gate": gates}


def fmt(stat: Optional[Dict[str, float]], digits: int = 3) -> str:
    if stat is None:
        return "–"
    if stat["min"] == stat["max"]:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


TABLE_COLUMNS = (("score_first", "reward, first tenth"), ("score_last", "reward, last tenth"),
                 ("val_last", "greedy val, end"), ("entropy_first", "entropy, first tenth"),
                 ("entropy_last", "entropy, last tenth"), ("cov_mean", "Cov(log π, A)"),
                 ("nonzero_frac", "non-zero adv."), ("low_minus_high_second_half", "low − high half, 2nd half"),
                 ("wall_s", "wall s / run"))


def table(summary: dict) -> str:
    """The markdown table: mean [min, max] over the seeds."""
    columns = [(key, title) for key, title in TABLE_COLUMNS
               if any(summary["summary"][m].get(key) for m in summary["methods"])]
    lines = ["| method | " + " | ".join(title for _, title in columns) + " |",
             "| --- | " + " | ".join("---" for _ in columns) + " |"]
    for name in summary["methods"]:
        stats = summary["summary"][name]
        lines.append(f"| {name} | " + " | ".join(fmt(stats.get(key), 1 if key == "wall_s" else 3)
                                                 for key, _ in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _smooth(values: List[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


CURVES = ((SCORE, "mean reward (sampled)"), (ENTROPY, "entropy"), (COV, "Cov(log π, A)"),
          (VAL, "greedy validation score"))


def plot_curves(summary: dict, out_dir: str, png_path: str, window: int = 10) -> None:
    """Per method: the mean over seeds (smoothed over ``window`` steps) and the min-max band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.6 * len(CURVES), 3.8))
    for name in summary["methods"]:
        per_seed = [read_metrics(os.path.join(out_dir, name, f"seed{s}", "metrics.jsonl")) for s in summary["seeds"]]
        for ax, (key, _) in zip(axes, CURVES):
            curves = [[(r["step"], r["data"][key]) for r in rows if key in r["data"]] for rows in per_seed]
            length = min(len(c) for c in curves)
            if not length:
                continue
            steps = [p[0] for p in curves[0][:length]]
            smoothed = [_smooth([p[1] for p in c[:length]], window if key != VAL else 1) for c in curves]
            mean = [sum(col) / len(col) for col in zip(*smoothed)]
            line, = ax.plot(steps, mean, label=name, linewidth=1.3)
            if len(smoothed) > 1:
                ax.fill_between(steps, [min(col) for col in zip(*smoothed)], [max(col) for col in zip(*smoothed)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
    for ax, (_, title) in zip(axes, CURVES):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean over seeds {summary['seeds']} (band: min-max), smoothed over {window} steps")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_gate(summary: dict, png_path: str) -> None:
    """Non-zero advantages against the group's success rate c/n, and how often each c occurred."""
    plt = _pyplot()
    fig, (frac_ax, count_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in summary["methods"]:
        points = sorted((int(k.split("of")[0]) / int(k.split("of")[1]), v["nonzero_frac"], v["groups"])
                        for k, v in summary["gate"][name].items())
        if not points:
            continue
        frac_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name, linewidth=1.2)
        total = sum(p[2] for p in points)
        count_ax.plot([p[0] for p in points], [p[2] / total for p in points], marker=".", label=name, linewidth=1)
    frac_ax.set_title("responses with a non-zero advantage, per group")
    frac_ax.set_xlabel("group success rate c/n")
    count_ax.set_title("share of groups")
    count_ax.set_xlabel("group success rate c/n")
    for ax in (frac_ax, count_ax):
        ax.grid(alpha=0.3)
    if frac_ax.lines:
        frac_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_halves(summary: dict, out_dir: str, png_path: str, window: int = 20) -> None:
    """CANON's halves: mean reward of the low-metric half minus the high half's, over training."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in summary["methods"]:
        curves = []
        for seed in summary["seeds"]:
            rows = read_metrics(os.path.join(out_dir, name, f"seed{seed}", "metrics.jsonl"))
            curves.append([(r["step"], r["data"][HALVES]) for r in rows if HALVES in r["data"]])
        length = min(len(c) for c in curves)
        if not length:
            continue
        smoothed = [_smooth([p[1] for p in c[:length]], window) for c in curves]
        ax.plot([p[0] for p in curves[0][:length]], [sum(col) / len(col) for col in zip(*smoothed)], label=name,
                linewidth=1.2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(f"low-metric half minus high half, mean reward (smoothed {window})")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def write_outputs(summary: dict, out_dir: str) -> Dict[str, str]:
    """summary.json, summary.md and the three figures in out_dir; returns their paths."""
    paths = {name: os.path.join(out_dir, name) for name in
             ("summary.json", "summary.md", "curves.png", "gate.png", "halves.png")}
    with open(paths["summary.json"], "w") as f:
        json.dump(summary, f, indent=1)
    with open(paths["summary.md"], "w") as f:
        f.write(table(summary) + "\n")
    plot_curves(summary, out_dir, paths["curves.png"])
    plot_gate(summary, paths["gate.png"])
    plot_halves(summary, out_dir, paths["halves.png"])
    return paths


def compare(methods: Sequence[Method], seeds: Sequence[int], out_dir: str, config_path: Optional[str] = None,
            overrides: Sequence[str] = (), jobs: int = 1) -> dict:
    """Check every run's config, refuse used output directories, run, summarise, write the outputs."""
    from .trainer import check_out_dir

    configs = run_configs(methods, seeds, out_dir, config_path, overrides)
    for cfg in configs.values():  # refuse a used directory before the first run, not after it
        check_out_dir(cfg.trainer)
    walls = run_all(configs, jobs)
    summary = summarise(methods, seeds, out_dir, walls)
    write_outputs(summary, out_dir)
    return summary
