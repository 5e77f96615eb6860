"""Checkpoints: ``<root>/global_step_N/`` plus a ``latest_checkpointed_iteration.txt`` pointer.

Writing step N: every file goes into ``global_step_N.tmp/`` and is fsynced; ``manifest.json``
(each file's size and sha256) is written last; the directory is renamed to ``global_step_N``; only
then is the pointer replaced (an atomic rename too), and older checkpoints beyond ``max_to_keep``
removed. A kill at any moment therefore leaves the pointer naming a complete checkpoint, and a
full disk is reported as such (the staging directory is removed, the previous checkpoint stays).

Reading: a checkpoint is *intact* when its manifest matches its files. Resuming takes the newest
intact checkpoint, says so when that is not the one the pointer names (a missing pointer, a torn
or corrupted newer checkpoint), and removes the later ones, which the resumed run will rewrite.

Contents: the learner's ``model.pt`` and ``optimizer.pt``, and with a critic its ``critic_model.pt``
and ``critic_optimizer.pt`` (tensors, loaded with ``torch.load(weights_only=True)``: a file carrying
pickled code is refused, never run) and
``trainer_state.json`` (step, data position, the driver's random generators, the step's metrics).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

POINTER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
PREFIX = "global_step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (full disk) or read (corrupt, or not plain tensors)."""


# ----------------------------------------------------------------------------- files

def _write(path: str, write: Callable) -> None:
    """Write a file through ``write(file)`` and fsync it, so that a rename after it publishes whole data."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(obj, directory: str, name: str) -> None:
    # Through a file object, so that a full disk raises OSError(ENOSPC), not torch's zip-writer error.
    _write(os.path.join(directory, name), lambda f: torch.save(obj, f))


def load_tensors(directory: str, name: str, device) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):  # e.g. the critic's files in a checkpoint of a run without a critic
        raise CheckpointError(f"{path} is missing: the checkpoint was not written by a run of this configuration")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError for a pickled object, RuntimeError for a torn zip
        raise CheckpointError(f"{path} is not a plain tensor file; it was not loaded (torch.load with "
                              f"weights_only=True refused it: {str(error).splitlines()[0]})") from None


def _write_json(path: str, obj) -> None:
    _write(path, lambda f: f.write(json.dumps(obj).encode()))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str) -> None:
    """Record the size and sha256 of every file in ``directory`` (written last: its presence means complete)."""
    paths = {name: os.path.join(directory, name) for name in sorted(os.listdir(directory)) if name != MANIFEST}
    files = {name: {"bytes": os.path.getsize(path), "sha256": _sha256(path)} for name, path in paths.items()}
    _write_json(os.path.join(directory, MANIFEST), {"files": files})


def damage(path: str) -> Optional[str]:
    """Why the checkpoint directory ``path`` is not intact, or None when its manifest matches its files."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (an incomplete write)"
    for name, expected in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != expected["bytes"] or _sha256(file) != expected["sha256"]:
            return f"{name} does not match its manifest (torn or corrupted)"
    return None


# ----------------------------------------------------------------------------- the driver's random generators

def _rng_state() -> dict:
    """The driver's generators as JSON: nothing in a checkpoint needs pickle to be read back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state().numpy().tobytes().hex(), "python": [version, list(python_state), gauss_next],
            "numpy": [kind, keys.tolist(), position, has_gauss, cached]}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


# ----------------------------------------------------------------------------- the directory

def _step_of(name: str) -> Optional[int]:
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def checkpoint_steps(root: str) -> List[int]:
    """Steps of the (renamed, so possibly but not necessarily intact) checkpoints under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(step for step in map(_step_of, os.listdir(root)) if step is not None)


def checkpoint_path(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step}")


def pointed_step(root: str) -> Optional[int]:
    try:
        with open(os.path.join(root, POINTER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _write_pointer(root: str, step: int) -> None:
    tmp = os.path.join(root, POINTER + ".tmp")
    _write(tmp, lambda f: f.write(str(step).encode()))
    os.replace(tmp, os.path.join(root, POINTER))


def save_checkpoint(root: str, step: int, save_learner: Callable[[str], None], trainer_state: dict,
                    max_to_keep: int) -> str:
    """Write checkpoint ``step`` (see the module docstring for the order). ``trainer_state`` is
    stored in trainer_state.json beside the step and the driver's generators."""
    os.makedirs(root, exist_ok=True)
    final = checkpoint_path(root, step)
    staging = final + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a write that was killed
    try:
        os.makedirs(staging)
        save_learner(staging)
        _write_json(os.path.join(staging, TRAINER_STATE), {"step": step, **trainer_state, "rng": _rng_state()})
        write_manifest(staging)
        os.replace(staging, final)
        _write_pointer(root, step)  # after the rename: the pointer only ever names a complete checkpoint
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno != errno.ENOSPC:
            raise
        previous = pointed_step(root)
        raise CheckpointError(f"no space left on the device of {root} while writing the checkpoint of step {step}; "
                              + ("no earlier checkpoint exists" if previous is None else
                                 f"the checkpoint of step {previous} is intact")
                              + ": free some space and rerun with --resume") from None
    _remove_old(root, step, keep=max_to_keep)
    return final


def _remove_old(root: str, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (0: all); later steps are never counted."""
    if keep <= 0:
        return
    for old in [s for s in checkpoint_steps(root) if s <= step][:-keep]:
        shutil.rmtree(checkpoint_path(root, old), ignore_errors=True)


def find_resume_checkpoint(root: str) -> Tuple[Optional[str], List[str]]:
    """(the newest intact checkpoint or None, notes for the user: what was skipped and why)."""
    notes = []
    pointed = pointed_step(root)
    for step in reversed(checkpoint_steps(root)):
        path = checkpoint_path(root, step)
        reason = damage(path)
        if reason is None:
            if pointed != step:
                notes.append(f"resuming from {path}: the pointer {POINTER} " +
                             ("is missing" if pointed is None else f"names step {pointed}"))
            return path, notes
        notes.append(f"skipping {path}: {reason}")
    if pointed is not None:
        notes.append(f"the pointer names step {pointed}, but no intact checkpoint exists under {root}")
    return None, notes


def prepare_resume(root: str, path: str) -> dict:
    """Make ``path`` the run's newest checkpoint and return its trainer state, with the driver's
    generators restored. Checkpoints in ``root`` later than it (and staging ones) are removed:
    the resumed run rewrites those steps, and a stale one must never outrank its new checkpoints."""
    state = load_trainer_state(path)
    pointed = pointed_step(root)
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(root):
        if pointed != state["step"]:
            _write_pointer(root, state["step"])  # first: it must never name a checkpoint removed below
    elif pointed is not None and pointed > state["step"]:
        os.remove(os.path.join(root, POINTER))
    for name in os.listdir(root) if os.path.isdir(root) else []:
        step = _step_of(name.removesuffix(".tmp"))
        if step is not None and (name.endswith(".tmp") or step > state["step"]):
            print(f"removing {os.path.join(root, name)}: not before the resumed step {state['step']}", flush=True)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return state


def load_trainer_state(path: str) -> dict:
    """Reads trainer_state.json and restores the driver's random generators from it."""
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {os.path.join(path, TRAINER_STATE)}: {error}") from None
    _restore_rng(state.pop("rng"))
    return state
