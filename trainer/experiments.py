"""The experiments of docs/experiments.md: do the seed papers' effects show on the embedded trainer?

    python -m fused_canon.trainer.experiments              # the full run: rewrites docs/experiments.md and its figures
    python -m fused_canon.trainer.experiments --smoke --out-dir /tmp/smoke --docs-dir /tmp/smoke/docs   # CI's few steps

Every method trains on ``sort_exact`` (sort 5-12 digits, reward 1 for the exact answer, else 0) from
the same base model per seed (200 supervised steps on the task's answers, model.sft_steps), with the
same seeds, steps, batch and optimizer; only the estimator or the loss differs. Each claim below is
checked per seed (the method minus its baseline, same seed), and its verdict says in how many seeds
the claimed direction held.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch

import fused_canon as fc

from .compare import SCORE, Method, compare, fmt, spread, table, write_outputs
from .tracking import read_metrics

METHODS = [
    Method("grpo", ["algorithm.advantage.estimator=grpo"]),
    Method("grpo+clip_cov", ["algorithm.advantage.estimator=grpo", "algorithm.loss_mode=clip_cov"]),
    # k = 0.2 % of the tokens: the authors' 7B setting (their k_percent=0.2); it selects 1 token per
    # mini-batch here, as clip_cov_ratio=2e-4 (the authors' value) does for Clip-Cov.
    Method("grpo+kl_cov", ["algorithm.advantage.estimator=grpo", "algorithm.loss_mode=kl_cov",
                           "algorithm.kl_cov_ratio=0.002"]),
    Method("qae", ["algorithm.advantage.estimator=qae"]),  # quantile_k = 0.4, the paper's value
    Method("dr_grpo", ["algorithm.advantage.estimator=dr_grpo"]),
    Method("canon", ["algorithm.advantage.estimator=canon"]),  # entropy halves, alpha = lambda = 1 (upstream)
]
SEEDS = (0, 1, 2)

# The budget every method gets. Two mini-batches per step, so that the second update is off-policy:
# KL-Cov's penalty has no gradient on-policy (docs/algorithms.md §4.3) and PPO's clip never acts there.
STEPS = 100  # RL steps per run: 6 methods x 3 seeds fit in about 15 min on 2 cores (docs/experiments.md)
SETTINGS = ["data.task=sort_exact", "data.max_response_length=13", "model.sft_steps=200", "actor.lr=3e-4",
            "data.train_batch_size=16", "rollout.n=8", "actor.ppo_mini_batch_size=8", f"trainer.total_steps={STEPS}",
            "trainer.test_freq=20", "trainer.save_freq=0", "trainer.num_threads=1"]
# CI: the same pipeline on a smaller model, a few steps per method, one seed.
SMOKE = ["trainer.total_steps=3", "model.sft_steps=3", "data.train_batch_size=4", "rollout.n=4",
         "actor.ppo_mini_batch_size=2", "model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
         "trainer.test_freq=3", "data.val_batch_size=8"]


# ----------------------------------------------------------------------------- the claims

def _paired(summary: dict, method: str, baseline: Optional[str], key: str) -> Optional[List[float]]:
    """Per seed: method's value minus the baseline's (same seed), or the method's value alone."""
    runs = summary["runs"]
    if method not in runs or (baseline and baseline not in runs):
        return None
    values = []
    for seed in summary["seeds"]:
        value = runs[method][seed][key]
        base = runs[baseline][seed][key] if baseline else 0.0
        if value is None or base is None:
            return None
        values.append(value - base)
    return values


def _change(summary: dict, method: str, first: str, last: str) -> Optional[List[float]]:
    runs = summary["runs"].get(method)
    if runs is None:
        return None
    return [runs[s][last] - runs[s][first] for s in summary["seeds"]]


def verdict(values: Optional[List[float]], direction: int) -> str:
    """How many seeds show the claimed direction (+1: positive, -1: negative; 0: no direction claimed)."""
    if values is None:
        return "not measured"
    if direction == 0:
        return "measured (no direction claimed)"
    held = sum(1 for v in values if v * direction > 0)
    if held == len(values):
        return f"reproduced ({held}/{len(values)} seeds)"
    if held == 0:
        return f"not reproduced (0/{len(values)} seeds)"
    return f"mixed ({held}/{len(values)} seeds)"


def theoretical_gate(estimator: str, n: int) -> Dict[int, float]:
    """The fraction of a group's n responses with a non-zero advantage when c of them are correct,
    from fused_canon itself: what the measured gate must show."""
    gate = {}
    for c in range(n + 1):
        rewards = torch.tensor([1.0] * c + [0.0] * (n - c))
        advantages = fc.compute_advantages(rewards, torch.zeros(n, dtype=torch.long),
                                           config=fc.AdvantageConfig(estimator=estimator))
        gate[c] = float((advantages != 0).float().mean())
    return gate


def gate_error(summary: dict, estimator: str) -> Optional[float]:
    """Largest |measured - theoretical| non-zero fraction over the success counts seen in training."""
    measured = summary["gate"].get(estimator)
    if not measured:
        return None
    errors = []
    for key, point in measured.items():
        c, n = (int(x) for x in key.split("of"))
        errors.append(abs(point["nonzero_frac"] - theoretical_gate(estimator, n)[c]))
    return max(errors)


def claims(summary: dict) -> List[dict]:
    """Each claim: what the paper says, what is measured (per seed), its spread and verdict."""
    rows = []

    def add(paper: str, claim: str, measure: str, values: Optional[List[float]], direction: int) -> None:
        rows.append({"paper": paper, "claim": claim, "measure": measure, "values": values,
                     "spread": spread(values) if values else None, "verdict": verdict(values, direction)})

    em = "Entropy Mechanism"
    add(em, "the entropy of GRPO's policy falls as it learns", "GRPO entropy, last tenth − first tenth",
        _change(summary, "grpo", "entropy_first", "entropy_last"), -1)
    add(em, "Cov(log π, A) is positive under GRPO", "GRPO mean Cov(log π, A) over the run",
        _paired(summary, "grpo", None, "cov_mean"), +1)
    add(em, "a larger covariance comes with a larger entropy drop",
        "GRPO, over steps: correlation of Cov(log π, A) with the next step's entropy change",
        _paired(summary, "grpo", None, "cov_entropy_change_corr"), -1)
    for loss in ("clip_cov", "kl_cov"):
        method = f"grpo+{loss}"
        add(em, f"{loss} keeps the entropy above GRPO's", f"{method} − grpo, entropy in the last tenth",
            _paired(summary, method, "grpo", "entropy_last"), +1)
        add(em, f"{loss} ends with a higher reward than GRPO", f"{method} − grpo, mean reward in the last tenth",
            _paired(summary, method, "grpo", "score_last"), +1)
        add(em, f"{loss} ends with a higher greedy score than GRPO", f"{method} − grpo, greedy validation at the end",
            _paired(summary, method, "grpo", "val_last"), +1)
    error = gate_error(summary, "qae")
    rows.append({"paper": "QAE", "claim": "two regimes: below success rate 1 − K only correct responses get a "
                 "non-zero advantage, above it only wrong ones", "measure": "largest |measured − predicted| "
                 "non-zero fraction over the success counts seen", "values": None,
                 "spread": None if error is None else {"mean": error, "min": error, "max": error},
                 "verdict": "not measured" if error is None else
                 ("reproduced (exactly)" if error == 0 else f"off by {error:.3g}")})
    add("QAE", "most responses get a zero advantage (sparser updates than GRPO)",
        "qae − grpo, fraction of responses with a non-zero advantage", _paired(summary, "qae", "grpo", "nonzero_frac"),
        -1)
    add("QAE", "the entropy stays above GRPO's (no collapse)", "qae − grpo, entropy in the last tenth",
        _paired(summary, "qae", "grpo", "entropy_last"), +1)
    add("QAE", "a higher reward than GRPO", "qae − grpo, mean reward in the last tenth",
        _paired(summary, "qae", "grpo", "score_last"), +1)
    add("CANON", "a higher reward than Dr.GRPO", "canon − dr_grpo, mean reward in the last tenth",
        _paired(summary, "canon", "dr_grpo", "score_last"), +1)
    add("CANON", "a higher greedy score than Dr.GRPO", "canon − dr_grpo, greedy validation at the end",
        _paired(summary, "canon", "dr_grpo", "val_last"), +1)
    add("CANON", "its entropy trajectory differs from Dr.GRPO's", "canon − dr_grpo, entropy in the last tenth",
        _paired(summary, "canon", "dr_grpo", "entropy_last"), 0)
    for part, key in (("first", "low_minus_high_first_half"), ("second", "low_minus_high_second_half")):
        add("CANON", f"which half scored higher in the {part} half of training (positive: the low-entropy half, "
            "which α would favour)", f"canon, low − high half mean reward, {part} half of the steps",
            _paired(summary, "canon", None, key), 0)
    return rows


def claims_table(rows: List[dict]) -> str:
    lines = ["| paper | claim | measured | per seed | mean [min, max] | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        per_seed = ", ".join(f"{v:+.3f}" for v in row["values"]) if row["values"] else "–"
        lines.append(f"| {row['paper']} | {row['claim']} | {row['measure']} | {per_seed} | {fmt(row['spread'])} "
                     f"| {row['verdict']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the machine and its load

class LoadSampler:
    """The 1-minute load average every ``period_s`` while the experiments run (the machine is shared)."""

    def __init__(self, period_s: float = 10.0):
        self.period_s, self.samples = period_s, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} logical CPUs ({cpu}), {platform.system()} {platform.release()}, torch {torch.__version__}"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ----------------------------------------------------------------------------- the document

FIGURES = ("curves.png", "gate.png", "halves.png")


def verdict_summary(rows: List[dict]) -> str:
    """The claims grouped by verdict, one line each: what reproduces at this scale and what does not."""
    groups = (("reproduced", "Reproduced"), ("mixed", "Mixed (the seeds disagree)"), ("not reproduced", "Not reproduced"))
    lines = []
    for prefix, title in groups:  # no verdict starts with another's prefix
        found = [f"{row['paper']}: {row['claim']} ({fmt(row['spread'])})" for row in rows
                 if row["verdict"].startswith(prefix)]
        lines.append(f"- **{title}**: " + ("; ".join(found) if found else "none") + ".")
    return "\n".join(lines)


def early_dip(summary: dict, out_dir: str, window: int = 10) -> Dict[str, float]:
    """Over all runs: the mean sampled reward at step 1 (the base model), the lowest point of the
    ``window``-step running mean and the step where it lies, and the mean over the last ``window`` steps."""
    first, low, low_step, last = [], [], [], []
    for method in summary["methods"]:
        for seed in summary["seeds"]:
            score = [row["data"][SCORE] for row in read_metrics(os.path.join(out_dir, method, f"seed{seed}",
                                                                             "metrics.jsonl")) if SCORE in row["data"]]
            width = min(window, len(score))  # the CI variant's runs are shorter than the window
            means = [sum(score[i - width:i]) / width for i in range(width, len(score) + 1)]
            first.append(score[0])
            low.append(min(means))
            low_step.append(means.index(min(means)) + width)
            last.append(means[-1])
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"first": mean(first), "low": mean(low), "low_step": mean(low_step), "last": mean(last)}


def render(summary: dict, rows: List[dict], meta: dict, dip: Dict[str, float]) -> str:
    methods = "; ".join(f"`{m}`: " + " ".join(f"`{o}`" for o in summary["overrides"][m]) for m in summary["methods"])
    gate = next(row for row in rows if row["paper"] == "QAE" and row["claim"].startswith("two regimes"))
    return f"""# Experiments: the seed papers' effects on the embedded trainer

Generated by `{meta['command']}` (this file and `docs/experiments/*.png`; do not edit by hand).
Machine: {meta['machine']}. Wall time of the whole run: {meta['wall_s'] / 60:.1f} min with {meta['jobs']} runs at a
time; CPU time {meta['cpu_s'] / 60:.1f} min; load average (1 min) during the run: mean {meta['load_mean']:.1f},
max {meta['load_max']:.1f} (the machine is shared: a load above its {os.cpu_count()} CPUs means the runs waited
for the CPU, and their wall time says more about the neighbours than about the trainer).

## The task and the budget

`sort_exact`: the prompt `S<digits>=` holds 5-12 random digits, the answer is them sorted (6-13
response tokens with `<eos>`), the reward is 1 for exactly that answer and 0 otherwise. A randomly
initialised model never sorts 5 digits, so every group would score 0 and no advantage would be
non-zero; each seed's base model is therefore the tiny char-level Qwen2 (2 layers, width 64) after
200 supervised steps on the task's answers (`model.sft_steps=200`, trainer/warmup.py). It solves short
strings often and long ones rarely, so the groups' success rates spread over (0, 1) and RL has
something to learn for hundreds of steps.

Every method runs from that base model with the same settings: `{' '.join(SETTINGS)}` (so 16
prompts x 8 samples per step, two optimizer steps per step, the second one off-policy), seeds
{summary['seeds']}. The methods: {methods}.

## Results

Mean over the seeds, [min, max] in brackets. "reward" is the sampled responses' mean reward in the
first or last tenth of the steps; "greedy val" is the greedy score on 64 held-out prompts at the end;
"Cov(log π, A)" is the mean over the run of the covariance of the tokens' log-probs and advantages
(docs/algorithms.md §4.1); "non-zero adv." is the fraction of responses whose advantage is not 0;
"low − high half" is, within each group split into CANON's entropy halves (§2.3), the low-entropy
half's mean reward minus the high half's, over the second half of the steps; "wall s / run" is each
run's wall time, which on a shared machine measures the neighbours' load as much as the method.

{table(summary)}

Over all runs, the sampled reward is {dip['first']:.3f} at step 1 (the base model), falls to
{dip['low']:.3f} (the lowest 10-step mean, around step {dip['low_step']:.0f}) and ends at {dip['last']:.3f}
(the last 10 steps): RL first loses part of what the supervised warm-up taught, then regains some;
within this budget it ends {'above' if dip['last'] > dip['first'] else 'below'} the base model's level. "reward, first tenth" already
includes part of that fall.

![reward, entropy, covariance and greedy score per method](experiments/curves.png)

![non-zero advantages against the group's success rate, and how often each rate occurred](experiments/gate.png)

![CANON's halves: low-entropy minus high-entropy mean reward over training](experiments/halves.png)

## The claims, seed by seed

Each row is one claim of a seed paper as this toy can test it: the method minus its baseline with
the same seed (or the method's own value), per seed, and how many seeds show the claimed direction.
A claim that does not reproduce here is a result about this scale (a 0.1M-parameter model, {STEPS}
steps, 128 responses per step), not about the papers' models.

{claims_table(rows)}

In short, with the mean over the seeds [min, max]:

{verdict_summary(rows)}

How to read the covariance row: the paper's mechanism is that an update with a larger Cov(log π, A)
lowers the entropy more. The measure here correlates each step's covariance with the change of the
logged entropy to the next step; the entropy is measured on each step's own (new) batch, so the
change mixes the update's effect with the batch-to-batch difference of the prompts (long strings
have more uncertain tokens). It is a weak test of the mechanism either way, and reported as measured;
a clean one would measure the entropy on the same batch before and after each update.

What the toy cannot show: the papers' effects on long reasoning chains (responses here are at most 13
tokens), on pretrained models (here: 200 supervised steps), over thousands of steps, or with their
batch sizes (Clip-Cov's 2e-4 and KL-Cov's 2e-3 of the tokens select one token per mini-batch here).
The QAE gate is a property of the estimator: the measured fractions are compared with the prediction
from `fc.compute_advantages` for every success count seen (verdict: {gate['verdict']}), and what
training adds is how often each regime occurs (the right panel of the gate figure).
"""


def run(out_dir: str, docs_dir: str, smoke: bool, jobs: int, overwrite: bool, command: str) -> dict:
    overrides = SETTINGS + (SMOKE if smoke else []) + (["trainer.overwrite=true"] if overwrite else [])
    seeds = SEEDS[:1] if smoke else SEEDS
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with LoadSampler() as load:
        summary = compare(METHODS, seeds, out_dir, overrides=overrides, jobs=jobs)
    meta = {"command": command, "machine": machine(), "jobs": jobs, "wall_s": time.perf_counter() - start,
            "cpu_s": cpu_seconds() - cpu_start, "load_mean": sum(load.samples) / len(load.samples),
            "load_max": max(load.samples)}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return write_docs(out_dir, docs_dir, summary, meta)


def write_docs(out_dir: str, docs_dir: str, summary: dict, meta: dict) -> dict:
    """docs_dir/experiments.md and docs_dir/experiments/*.png from a finished run in out_dir."""
    rows = claims(summary)
    os.makedirs(os.path.join(docs_dir, "experiments"), exist_ok=True)
    for name in FIGURES:
        shutil.copyfile(os.path.join(out_dir, name), os.path.join(docs_dir, "experiments", name))
    with open(os.path.join(docs_dir, "experiments.md"), "w") as f:
        f.write(render(summary, rows, meta, early_dip(summary, out_dir)))
    return {"summary": summary, "claims": rows, "meta": meta}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_canon.trainer.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/experiments", help="the runs, their table and figures")
    parser.add_argument("--docs-dir", default="docs", help="where experiments.md and experiments/*.png go")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per method, one seed (CI)")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier call in --out-dir")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the document from the finished run in --out-dir (summary.json, meta.json) only")
    args = parser.parse_args(argv)
    if args.render:
        summary = _read_json(os.path.join(args.out_dir, "summary.json"))
        summary["runs"] = {m: {int(s): v for s, v in per_seed.items()} for m, per_seed in summary["runs"].items()}
        write_outputs(summary, args.out_dir)  # the table and figures, redrawn from the runs' metrics.jsonl
        result = write_docs(args.out_dir, args.docs_dir, summary, _read_json(os.path.join(args.out_dir, "meta.json")))
    else:
        command = "python -m fused_canon.trainer.experiments" + (" --smoke" if args.smoke else "")
        result = run(args.out_dir, args.docs_dir, args.smoke, args.jobs, args.overwrite, command)
    print(claims_table(result["claims"]))
    print(f"wrote {os.path.join(args.docs_dir, 'experiments.md')} ({result['meta']['wall_s']:.0f} s)")
    return 0


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
