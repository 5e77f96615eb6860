"""Verifiable tasks: synthetic prompt generators with their rewards, and GSM8K-style datasets.

A reward is a plain callable ``reward(response: str, answer: str) -> float``. Synthetic examples
are a pure function of (seed, index), so the data position alone restores a run's data stream.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

Reward = Callable[[str, str], float]


@dataclass
class Example:
    prompt: str
    answer: str


# ----------------------------------------------------------------------------- rewards

def exact_match_reward(response: str, answer: str) -> float:
    return 1.0 if response.strip() == answer else 0.0


def positional_reward(response: str, answer: str) -> float:
    """Fraction of answer positions the response gets right; extra characters count as wrong, so
    the best response is exactly the answer and every partly right one earns partial credit."""
    response = response.strip()
    correct = sum(a == b for a, b in zip(response, answer))
    return correct / max(len(answer), len(response), 1)


_GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def gsm8k_extract(text: str) -> Optional[str]:
    """verl's strict GSM8K rule: the last '#### <number>' (in the final 300 characters), with ','
    and '$' stripped."""
    matches = _GSM8K_ANSWER.findall(text[-300:])
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("$", "")


def gsm8k_reward(response: str, answer: str, format_score: float = 0.0) -> float:
    predicted = gsm8k_extract(response)
    if predicted is None:
        return 0.0
    return 1.0 if predicted == answer else format_score


# ----------------------------------------------------------------------------- synthetic tasks
# Each generator takes a random.Random and its own keyword options (data.task_options).

def arithmetic(rng: random.Random, max_operand: int = 9, operators: str = "+", width: int = 2) -> Example:
    """'7+5=' -> '12', '3+4=' -> '07': small-integer arithmetic, the answer zero-padded to ``width``
    digits so that every answer has the same length (width=0: no padding)."""
    a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operators)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Example(f"{a}{op}{b}=", f"{value:0{width}d}" if width else str(value))


def digit_sequence(rng: random.Random, shown: int = 3, predict: int = 2, max_stride: int = 3) -> Example:
    """'147:' -> '03': continue an arithmetic progression of digits modulo 10."""
    start, stride = rng.randint(0, 9), rng.randint(1, max_stride)
    digits = [str((start + i * stride) % 10) for i in range(shown + predict)]
    return Example("".join(digits[:shown]) + ":", "".join(digits[shown:]))


def reverse(rng: random.Random, min_length: int = 2, max_length: int = 4) -> Example:
    """'R3142=' -> '2413'."""
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_length, max_length)))
    return Example(f"R{digits}=", digits[::-1])


def sort(rng: random.Random, min_length: int = 2, max_length: int = 4) -> Example:
    """'S3142=' -> '1234'."""
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_length, max_length)))
    return Example(f"S{digits}=", "".join(sorted(digits)))


@dataclass
class SyntheticTask:
    generate: Callable[..., Example]
    reward: Reward
    alphabet: str  # every character a prompt or answer can contain
    options: Dict[str, object] = field(default_factory=dict)  # the task's own defaults; data.task_options override them


SYNTHETIC_TASKS: Dict[str, SyntheticTask] = {
    # Digit-wise partial credit: a random policy scores ~1/16 per digit, so learning starts at once.
    "arithmetic": SyntheticTask(arithmetic, positional_reward, "0123456789+-*="),
    "digit_sequence": SyntheticTask(digit_sequence, positional_reward, "0123456789:"),
    "reverse": SyntheticTask(reverse, positional_reward, "0123456789R="),
    "sort": SyntheticTask(sort, positional_reward, "0123456789S="),
    # The task with room to learn (docs/experiments.md): sort 5-12 digits, all or nothing. From a
    # base model (model.sft_steps) short strings are solved often and long ones rarely, so a group's
    # success rate spans (0, 1) for hundreds of steps, and a 0/1 reward is what QAE's gate assumes.
    "sort_exact": SyntheticTask(sort, exact_match_reward, "0123456789S=", {"min_length": 5, "max_length": 12}),
}


# ----------------------------------------------------------------------------- prompt streams

def synthetic_task(task: str, options: dict) -> SyntheticTask:
    """The named synthetic task, after checking that ``options`` are keywords of its generator."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"data.task={task!r} is not valid: choose one of {sorted(SYNTHETIC_TASKS) + ['gsm8k']}")
    valid = list(inspect.signature(SYNTHETIC_TASKS[task].generate).parameters)[1:]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"data.task_options {unknown} are not options of task {task!r}; valid: {valid}")
    return SYNTHETIC_TASKS[task]


class SyntheticPrompts:
    """Example i of a split is generate(Random(f"{seed}/{split}/{i}")): reproducible by index."""

    def __init__(self, task: str, options: dict, seed: int, split: str = "train"):
        self.task = synthetic_task(task, options)
        self.options, self.seed, self.split = {**self.task.options, **options}, seed, split
        self.position = 0  # examples handed out so far: the whole state of the stream
        self.alphabet = self.task.alphabet

    def example(self, index: int) -> Example:
        return self.task.generate(random.Random(f"{self.seed}/{self.split}/{index}"), **self.options)

    def next_batch(self, size: int) -> List[Example]:
        batch = [self.example(i) for i in range(self.position, self.position + size)]
        self.position += size
        return batch


class DatasetPrompts:
    """Records of a JSONL or parquet file, reshuffled every epoch by a seeded permutation."""

    def __init__(self, path: str, prompt_key: str, answer_key: str, seed: int):
        records = read_records(path)
        if not records:
            raise ValueError(f"dataset {path} is empty")
        missing = [k for k in (prompt_key, answer_key) if k not in records[0]]
        if missing:
            raise ValueError(f"dataset {path} has no field(s) {missing}; fields: {sorted(records[0])}")
        self.examples = [Example(str(r[prompt_key]), _reference_answer(str(r[answer_key]))) for r in records]
        self.seed, self.position = seed, 0
        self._cached_order: Optional[Tuple[int, List[int]]] = None
        self.alphabet = "".join(sorted({ch for e in self.examples for ch in e.prompt + e.answer} | set("#0123456789 ")))

    def _order(self, epoch: int) -> List[int]:
        """The epoch's permutation, built once per epoch (the last one is cached)."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def next_batch(self, size: int) -> List[Example]:
        batch = []
        for position in range(self.position, self.position + size):
            epoch, offset = divmod(position, len(self.examples))
            batch.append(self.examples[self._order(epoch)[offset]])
        self.position += size
        return batch


def _reference_answer(answer_field: str) -> str:
    """GSM8K stores a worked solution ending in '#### 42'; a bare answer is used as it is."""
    extracted = gsm8k_extract(answer_field)
    return extracted if extracted is not None else answer_field.strip().replace(",", "")


def read_records(path: str) -> List[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional: only needed for parquet datasets

        return pq.read_table(path).to_pylist()
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- plugins

def import_plugins(modules: List[str]) -> None:
    """Import modules named in the config so their registrations (estimators, rewards) exist in
    this process; each Ray actor calls this too, since registries do not cross processes."""
    for module in modules:
        importlib.import_module(module)


def resolve_callable(spec: str) -> Callable:
    """'pkg.module:function' -> the function."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'pkg.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def check_data_config(data_cfg) -> None:
    """A known task with valid options, an existing dataset file and a reward that resolves, else ValueError."""
    if data_cfg.task == "gsm8k":
        if not data_cfg.path:
            raise ValueError("data.task=gsm8k needs data.path (a JSONL or parquet file)")
        if not os.path.isfile(data_cfg.path):
            raise ValueError(f"data.path={data_cfg.path!r} is not valid: no such file")
        if data_cfg.task_options:
            raise ValueError(f"data.task_options={dict(data_cfg.task_options)} is not valid: task gsm8k takes none")
        if not data_cfg.prompt_key or not data_cfg.answer_key:
            raise ValueError("data.prompt_key and data.answer_key must name fields of the dataset")
    else:
        synthetic_task(data_cfg.task, data_cfg.task_options)
    if data_cfg.reward_fn:
        try:
            reward = resolve_callable(data_cfg.reward_fn)
        except (ValueError, ImportError, AttributeError) as error:
            raise ValueError(f"data.reward_fn={data_cfg.reward_fn!r} is not valid: {error}") from None
        if not callable(reward):
            raise ValueError(f"data.reward_fn={data_cfg.reward_fn!r} is not valid: not a function")


def build_prompts(data_cfg, seed: int, split: str = "train"):
    if data_cfg.task == "gsm8k":
        # A different shuffle seed keeps validation batches different from the training order.
        return DatasetPrompts(data_cfg.path, data_cfg.prompt_key, data_cfg.answer_key,
                              seed if split == "train" else seed + 1)
    return SyntheticPrompts(data_cfg.task, data_cfg.task_options, seed, split)


def build_reward(data_cfg) -> Reward:
    if data_cfg.reward_fn:
        return resolve_callable(data_cfg.reward_fn)
    if data_cfg.task == "gsm8k":
        return gsm8k_reward
    return SYNTHETIC_TASKS[data_cfg.task].reward
