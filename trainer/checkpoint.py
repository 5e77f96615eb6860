"""Checkpoints: ``<root>/global_step_N/`` plus a ``latest_checkpointed_iteration.txt`` pointer.

A checkpoint is written into ``global_step_N.tmp/``, renamed into place when complete, and only
then is the pointer replaced (also by an atomic rename). A crash at any moment therefore leaves
the pointer naming a complete checkpoint.

Contents: the learner's ``model.pt`` and ``optimizer.pt``; ``trainer_state.json`` (step, data
position); ``rng.pt`` (torch, python ``random`` and numpy generator states of the driver).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

POINTER = "latest_checkpointed_iteration.txt"


def save_checkpoint(root: str, step: int, save_learner: Callable[[str], None], trainer_state: dict,
                    max_to_keep: int) -> str:
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"global_step_{step}")
    staging = final + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    save_learner(staging)
    with open(os.path.join(staging, "trainer_state.json"), "w") as f:
        json.dump({"step": step, **trainer_state}, f, indent=1)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               os.path.join(staging, "rng.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _write_pointer(root, step)  # last: the pointer only ever names a complete checkpoint
    _remove_old(root, keep=max_to_keep)
    return final


def _write_pointer(root: str, step: int) -> None:
    tmp = os.path.join(root, POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(step))
    os.replace(tmp, os.path.join(root, POINTER))


def _remove_old(root: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(int(d.split("_")[-1]) for d in os.listdir(root)
                   if d.startswith("global_step_") and not d.endswith(".tmp"))
    for step in steps[:-keep]:
        shutil.rmtree(os.path.join(root, f"global_step_{step}"), ignore_errors=True)


def latest_checkpoint(root: str) -> Optional[str]:
    pointer = os.path.join(root, POINTER)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(root, f"global_step_{int(f.read().strip())}")


def load_trainer_state(path: str) -> dict:
    """Reads trainer_state.json and restores the driver's random generators."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return state
