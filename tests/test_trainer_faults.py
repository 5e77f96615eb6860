"""The trainer under faults (CPU): a kill at every step of a checkpoint write, of a metrics append and
of the resume-time log repair; a full disk; torn, missing and corrupted files; checkpoints carrying
pickled code; an output directory that holds an earlier run. After each, ``--resume`` must succeed
and the log must hold every step up to the checkpoint exactly once, equal to an uninterrupted run."""

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("omegaconf")

from fused_canon.trainer import checkpoint  # noqa: E402
from fused_canon.trainer.cli import train_main  # noqa: E402
from fused_canon.trainer.trainer import train  # noqa: E402
from helpers import TINY_TRAINER, logged_steps, tiny_trainer_config  # noqa: E402

# Smaller still than helpers.TINY_TRAINER: a step takes about 0.1 s, so every fault can be tried.
SMALL = ["data.train_batch_size=2", "rollout.n=2", "model.hidden_size=16", "model.intermediate_size=32",
         "trainer.num_threads=1"]
STEPS = 4
# A checkpoint at every step; each save also removes the previous checkpoint.
RUN = [f"trainer.total_steps={STEPS}", "trainer.save_freq=1", "trainer.max_ckpt_to_keep=1"]


def config(out, *overrides):
    return tiny_trainer_config(out, *SMALL, *RUN, *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: {step: [metrics]}."""
    out = tmp_path_factory.mktemp("reference")
    train(config(out))
    return logged_steps(out)


def upto(reference, step):
    return {s: rows for s, rows in reference.items() if s <= step}


def resume(out, *overrides):
    return train(config(out, "trainer.resume=true", *overrides))


# ----------------------------------------------------------------------------- kills at every step

# The calls that change a file or a directory (or open one); a kill lands just before one of them.
FILE_OPERATIONS = {"open", "write", "flush", "fsync", "replace", "rename", "mkdir", "rmdir", "unlink"}
KILLED_RUN = ["trainer.total_steps=2"]  # the second step's save also removes the first checkpoint


def _run_child(out: str, overrides: list, kill_at: int, trace_path: str) -> None:
    """In a forked child: train while tracing the file operations made inside the checkpoint write,
    the metrics append and the log repair (each call of those is traced as "enter <name>", each
    operation as "<caller's caller>/<caller>:<call>"), and SIGKILL itself just before operation
    number ``kill_at`` (0: never)."""
    from fused_canon.trainer import checkpoint as ckpt
    from fused_canon.trainer import tracking

    trace = open(trace_path, "a", buffering=1)
    count = [0]

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") in FILE_OPERATIONS:
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            trace.write(f"{frame.f_back.f_code.co_name}/{frame.f_code.co_name}:{arg.__name__}\n")

    def watched(fn):
        def wrapper(*args, **kwargs):
            trace.write(f"enter {fn.__name__}\n")
            sys.setprofile(profile)
            try:
                return fn(*args, **kwargs)
            finally:
                sys.setprofile(None)
        return wrapper

    ckpt.save_checkpoint = watched(ckpt.save_checkpoint)
    tracking.restore_jsonl = watched(tracking.restore_jsonl)
    tracking.Tracker.log = watched(tracking.Tracker.log)
    train(config(out, *overrides))


def _child(out, overrides, kill_at=0, trace_path=os.devnull) -> int:
    """The exit code of a forked training child (-SIGKILL when the kill landed)."""
    process = _context().Process(target=_run_child, args=(str(out), list(overrides), kill_at, str(trace_path)))
    process.start()
    process.join(timeout=300)
    return process.exitcode


def _context():
    """Children forked from a server process that imported the trainer and the model code but ran
    no torch op (so no thread pool crosses a fork): each child starts in well under a second."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fused_canon.trainer.trainer", "transformers.models.qwen2.modeling_qwen2",
                                    "test_trainer_faults"])
    return context


def _kill_points(trace_path, calls):
    """The first operation of each kind made inside the given calls (("save_checkpoint", 2): its
    second call), as (number of the operation in the whole trace, kind)."""
    number, current, points = 0, None, {}
    occurrences = {}
    for line in open(trace_path).read().splitlines():
        if line.startswith("enter "):
            name = line.split()[1]
            occurrences[name] = occurrences.get(name, 0) + 1
            current = (name, occurrences[name])
            continue
        number += 1
        if current in calls:
            points.setdefault(line, number)
    return sorted((number, kind) for kind, number in points.items())


def test_a_kill_at_any_step_of_a_checkpoint_write_or_log_append_then_resume(tmp_path, reference):
    """A kill before each kind of file operation of the second step's checkpoint write (which ends
    by removing the first checkpoint) and of its log append; then --resume: the pointer names an
    intact checkpoint and the log equals the uninterrupted run's, every step exactly once."""
    assert _child(tmp_path / "dry", KILLED_RUN, trace_path=tmp_path / "trace.txt") == 0
    kills = _kill_points(tmp_path / "trace.txt", {("save_checkpoint", 2), ("log", 2)})
    kinds = {kind.split("/")[-1] for _, kind in kills}
    assert {"save_checkpoint:replace", "_write_pointer:replace", "_write:fsync", "log:write"} <= kinds, kills
    for kill_at, kind in kills:
        out = tmp_path / f"kill_{kill_at}"
        assert _child(out, KILLED_RUN, kill_at) == -signal.SIGKILL, kind
        resume(out, *KILLED_RUN)
        assert logged_steps(out) == upto(reference, 2), kind
        root = str(out / "checkpoints")
        assert checkpoint.pointed_step(root) == 2 and checkpoint.damage(checkpoint.checkpoint_path(root, 2)) is None


def test_a_kill_during_the_log_repair_loses_no_row(tmp_path, reference):
    """Killed just before step 2's log line (its checkpoint written): the resumed run repairs the log,
    adding that row from the checkpoint. A kill at each kind of operation of the repair, then --resume."""
    assert _child(tmp_path / "dry", KILLED_RUN, trace_path=tmp_path / "trace.txt") == 0
    before_log_2 = _kill_points(tmp_path / "trace.txt", {("log", 2)})[0][0]
    broken = tmp_path / "broken"
    assert _child(broken, KILLED_RUN, before_log_2) == -signal.SIGKILL
    assert sorted(logged_steps(broken)) == [1] and checkpoint.pointed_step(str(broken / "checkpoints")) == 2

    resumed = KILLED_RUN + ["trainer.resume=true"]
    shutil.copytree(broken, tmp_path / "dry_resume")
    assert _child(tmp_path / "dry_resume", resumed, trace_path=tmp_path / "resume.txt") == 0
    kills = _kill_points(tmp_path / "resume.txt", {("restore_jsonl", 1)})
    assert "restore_jsonl:replace" in {kind.split("/")[-1] for _, kind in kills}, kills
    for kill_at, kind in kills:
        out = tmp_path / f"kill_{kill_at}"
        shutil.copytree(broken, out)
        assert _child(out, resumed, kill_at) == -signal.SIGKILL, kind
        resume(out, *KILLED_RUN)
        assert logged_steps(out) == upto(reference, 2), kind


# ----------------------------------------------------------------------------- the metrics log

def test_resume_after_a_torn_last_log_line(tmp_path, reference):
    """A full disk cut the last append short: --resume drops the torn line and continues."""
    out = tmp_path / "run"
    train(config(out, "trainer.total_steps=2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "data": {"critic/score/mean": 0.2')
    resume(out)
    assert logged_steps(out) == reference


# ----------------------------------------------------------------------------- the checkpoint directory

def test_resume_without_the_pointer_takes_the_newest_intact_checkpoint(tmp_path, reference, capsys):
    out = tmp_path / "run"
    train(config(out, "trainer.total_steps=2"))
    os.remove(out / "checkpoints" / checkpoint.POINTER)
    resume(out)
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints' / 'global_step_2'}: the pointer" in printed and "is missing" in printed
    assert "at step 2" in printed and logged_steps(out) == reference


def test_a_corrupted_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, reference, capsys):
    out = tmp_path / "run"
    train(config(out, "trainer.total_steps=3", "trainer.max_ckpt_to_keep=2"))
    model = out / "checkpoints" / "global_step_3" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])  # torn by a copy, a bad disk ...
    resume(out)
    printed = capsys.readouterr().out
    assert "skipping" in printed and "global_step_3: model.pt does not match its manifest" in printed
    assert "resumed from" in printed and "at step 2" in printed
    assert logged_steps(out) == reference


def test_resuming_an_older_checkpoint_drops_the_later_ones(tmp_path, reference):
    """Stale later checkpoints never outrank the resumed run's own (which max_ckpt_to_keep once deleted)."""
    out = tmp_path / "run"
    train(config(out, "trainer.total_steps=4", "trainer.max_ckpt_to_keep=0"))  # keeps 1, 2, 3, 4
    train(config(out, "trainer.total_steps=3", f"trainer.resume_from={out / 'checkpoints' / 'global_step_2'}"))
    root = str(out / "checkpoints")
    assert checkpoint.checkpoint_steps(root) == [3] and checkpoint.pointed_step(root) == 3
    assert checkpoint.damage(checkpoint.checkpoint_path(root, 3)) is None
    assert logged_steps(out) == upto(reference, 3)


def test_a_new_run_in_a_used_directory_is_refused_unless_overwritten(tmp_path, reference, capsys):
    out = tmp_path / "run"
    cli = [*TINY_TRAINER, *SMALL, *RUN, "trainer.total_steps=1", f"trainer.out_dir={out}"]
    assert train_main(cli) == 0
    (out / "notes.txt").write_text("the user's own file")
    assert train_main(cli) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert train_main(cli + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "the user's own file"  # only a run's own outputs are replaced
    assert logged_steps(out) == upto(reference, 1)


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    logged = "trainer.logger=[jsonl,tensorboard]"
    train(config(out, logged, "trainer.total_steps=3", "trainer.max_ckpt_to_keep=0"))
    # As after a kill between step 3's log line and its checkpoint: steps 2 and 3 run again.
    train(config(out, logged, "trainer.total_steps=3", f"trainer.resume_from={out / 'checkpoints' / 'global_step_1'}"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("critic/score/mean")] == [1, 2, 3]


# ----------------------------------------------------------------------------- hostile checkpoints

class _Payload:
    """Unpickling it runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_carrying_pickled_code_is_refused(tmp_path, capsys):
    """Each file of a checkpoint, in turn, replaced by a pickle that runs code when loaded (the
    manifest rewritten to match, as a forger would): --resume refuses it and the code never runs."""
    base = tmp_path / "base"
    train(config(base, "trainer.total_steps=1"))
    files = sorted(name for name in os.listdir(base / "checkpoints" / "global_step_1") if name != checkpoint.MANIFEST)
    assert {"model.pt", "optimizer.pt", checkpoint.TRAINER_STATE} <= set(files)
    for name in files:
        out, marker = tmp_path / name, tmp_path / f"ran_{name}"
        shutil.copytree(base, out)
        directory = out / "checkpoints" / "global_step_1"
        torch.save({"state": _Payload(str(marker))}, directory / name)
        checkpoint.write_manifest(str(directory))
        cli = [*TINY_TRAINER, *SMALL, *RUN, "trainer.total_steps=2", f"trainer.out_dir={out}", "--resume"]
        assert train_main(cli) == 1, name
        err = capsys.readouterr().err
        assert "checkpoint error" in err and name in err, (name, err)
        assert not marker.exists(), name


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: room for one checkpoint of the SMALL model, not for the next one beside it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_reported_and_resume_then_succeeds(small_disk, reference, capsys):
    out = small_disk / "run"
    cli = [*TINY_TRAINER, *SMALL, *RUN, f"trainer.out_dir={out}"]
    assert train_main(cli) == 1
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "--resume" in err, err
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed
    assert train_main(cli + ["--resume"]) == 0
    assert logged_steps(out) == reference
