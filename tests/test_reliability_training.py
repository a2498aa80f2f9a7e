"""Training under faults (docs/reliability.md): kills at chosen points, full disk, NaN/inf losses,
bad datasets and two runs on one XP.

Kills are injected from outside the library: `dora run` is started through a small Python program
(`FAULT_CHILD`) that wraps one solver method or `torch.save` so that the process SIGKILLs itself at
the N-th call; the same command, run again without the fault, must resume and end with the history
an uninterrupted run gives.
"""
import errno
import logging
import os
from pathlib import Path
import random
import signal
import socket
import subprocess
import sys
import typing as tp

import numpy as np
import pytest
import soundfile as sf
import torch

from demucs import checkpoint as checkpoint_module
from demucs.checkpoint import CheckpointWriteError, XPLock, XPLockedError, save_atomic
from demucs.files import partial_path
from demucs.solver import NonFiniteLossError
from demucs.wav import DatasetError, musdb_valid_tracks
from tests.training_helpers import (ROOT, base_argv, dora_env, dora_run, history,
                                    write_tiny_musdb, xp_folder)

# Runs `dora run ARGV...` and SIGKILLs itself at the N-th time the fault point is reached:
# train_batch / valid_batch (a batch of that kind starts) or write:<file> (half of the temporary
# file of <file> is written, then the process dies: a torn write).
FAULT_CHILD = r"""
import io, os, signal, sys
import torch
from demucs import files, solver

point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]


def reached():
    calls[0] += 1
    return calls[0] == nth


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point.endswith("_batch"):
    name = "_" + point.replace("_batch", "_step")
    step = getattr(solver.Solver, name)

    def faulty_step(self, batch, where):
        if reached():
            die()
        return step(self, batch, where)

    setattr(solver.Solver, name, faulty_step)
else:
    prefix = "." + point.split(":", 1)[1] + "."
    save = torch.save

    def is_target(handle):
        name = os.path.basename(getattr(handle, "name", ""))
        return name.startswith(prefix) and name.endswith(files.PARTIAL_SUFFIX)

    def torn_save(obj, handle, *args, **kwargs):
        if is_target(handle) and reached():
            buffer = io.BytesIO()
            save(obj, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            die()
        return save(obj, handle, *args, **kwargs)

    torch.save = torn_save
sys.argv = ["dora", "run", *argv]
from dora.__main__ import main
main()
"""


def run_until_fault(dora_dir: Path, argv: tp.List[str], point: str, nth: int) -> str:
    """Run the XP with the fault injected; check that it died of SIGKILL, return its log."""
    proc = subprocess.run([sys.executable, "-c", FAULT_CHILD, point, str(nth), *argv], cwd=ROOT,
                          env=dora_env(dora_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
    return proc.stdout


def assert_resumed_cleanly(folder: Path, rerun: subprocess.CompletedProcess,
                           expected: list) -> None:
    """The rerun resumed (or restarted) and ended with exactly the uninterrupted history; nothing
    of the killed run is left behind."""
    assert history(folder) == expected
    assert not list(folder.glob(".*.partial"))
    assert (folder / "train.lock").read_text() == ""
    package = torch.load(folder / "checkpoint.th", weights_only=True)
    assert len(package["history"]) == len(expected)
    assert "Taking over" in rerun.stdout  # the killed run's lock was reclaimed


def test_kill_during_checkpoint_write_then_rerun_gives_the_same_history(tiny_musdb, dora_dir):
    """Torn write of the last checkpoint: the previous one is used, the last epoch is replayed
    exactly (same random state), and the final history equals the one the killed run had."""
    argv = base_argv(tiny_musdb, epochs=2) + ["max_batches=1"]
    folder = xp_folder(dora_dir, argv)
    run_until_fault(dora_dir, argv, "write:checkpoint.th", nth=2)
    uninterrupted = history(folder)  # pushed just before the checkpoint write was killed
    assert len(uninterrupted) == 2
    assert list(folder.glob(".checkpoint.th.*.partial"))
    assert len(torch.load(folder / "checkpoint.th", weights_only=True)["history"]) == 1
    rerun = dora_run(dora_dir, argv)
    assert "Loading checkpoint" in rerun.stdout and "checkpoint write that did not" in rerun.stdout
    assert_resumed_cleanly(folder, rerun, uninterrupted)


@pytest.fixture(scope="module")
def reference_history(tiny_musdb, tmp_path_factory) -> tp.Tuple[tp.List[str], list]:
    """argv and history of an uninterrupted 2-epoch run, for the kill matrix."""
    outputs = tmp_path_factory.mktemp("reference") / "outputs"
    argv = base_argv(tiny_musdb, epochs=2)
    dora_run(outputs, argv)
    return argv, history(xp_folder(outputs, argv))


@pytest.mark.slow
@pytest.mark.parametrize("point, nth", [
    ("train_batch", 2),  # second batch of epoch 1: nothing saved yet, starts again
    ("train_batch", 4),  # second batch of epoch 2
    ("valid_batch", 3),  # first validation batch of epoch 2
    ("write:best.th", 2),  # torn best.th of epoch 2 (written before checkpoint.th)
    ("write:checkpoint.th", 1),  # torn first checkpoint: no good one exists yet
])
def test_kill_points_then_rerun_matches_an_uninterrupted_run(point, nth, reference_history,
                                                             dora_dir):
    argv, expected = reference_history
    folder = xp_folder(dora_dir, argv)
    run_until_fault(dora_dir, argv, point, nth)
    before = history(folder) if (folder / "history.json").exists() else []
    assert before == expected[:len(before)]  # what was recorded before the kill is kept as is
    rerun = dora_run(dora_dir, argv)
    assert_resumed_cleanly(folder, rerun, expected)
    assert (folder / "best.th").is_file()


# ------------------------------------------------------------------ in-process solver
@pytest.fixture
def make_solver(tiny_musdb, dora_dir):
    """Build the Solver of a tiny XP in this process, from base_argv plus overrides."""
    from demucs.train import get_solver, main

    def make(*overrides: str):
        xp = main.get_xp(base_argv(tiny_musdb, epochs=1) + list(overrides))
        Path(xp.folder).mkdir(parents=True, exist_ok=True)  # made by `dora run` otherwise
        with xp.enter():
            return get_solver(xp.cfg)
    return make


def _clone(state: tp.Dict[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state.items()}


def _state(solver) -> tp.Dict[str, torch.Tensor]:
    return _clone(solver.model.state_dict())


def _disk_full_by_torch_save(monkeypatch) -> None:
    def save(obj, handle, *args, **kwargs):
        handle.write(b"x" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)


def _disk_full_in_zip_writer(monkeypatch) -> None:
    def save(obj, handle, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # torch reports the failed write of its zip writer as a RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    monkeypatch.setattr(torch, "save", save)


def _disk_full_from_the_kernel(monkeypatch) -> None:
    """The temporary file is created, but its bytes go to /dev/full (real ENOSPC)."""
    def full_open(path, mode="r", *args, **kwargs):
        if mode == "wb":
            Path(path).touch()
            return open("/dev/full", "wb")
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(checkpoint_module, "open", full_open, raising=False)


@pytest.mark.parametrize("fill_disk", [_disk_full_by_torch_save, _disk_full_in_zip_writer,
                                       _disk_full_from_the_kernel])
def test_disk_full_keeps_the_previous_checkpoint(fill_disk, make_solver, monkeypatch):
    solver = make_solver()
    solver.best_state, solver.best_changed = _state(solver), True
    solver._serialize(0)
    folder = solver.folder
    saved = {name: (folder / name).read_bytes() for name in ["checkpoint.th", "best.th"]}
    solver.best_changed = True
    fill_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as error:
        solver._serialize(1)
    message = str(error.value)
    assert "best.th" in message and "left untouched" in message and "run the same" in message
    if fill_disk is not _disk_full_in_zip_writer:
        assert error.value.errno == errno.ENOSPC
    assert {name: (folder / name).read_bytes() for name in saved} == saved
    assert not list(folder.glob(".*.partial"))
    monkeypatch.undo()
    assert len(checkpoint_module.load_checkpoint(folder / "checkpoint.th")["state"]) > 0


def test_save_atomic_replaces_the_file_only_when_complete(tmp_path):
    target = tmp_path / "checkpoint.th"
    save_atomic({"value": torch.ones(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["value"], torch.ones(3))
    save_atomic({"value": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["value"], torch.zeros(3))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.th"]


def _inject(solver, monkeypatch, bad_batch: int, kind: str) -> tp.Dict[str, tp.Any]:
    """Make training batch `bad_batch` (1-based) give a NaN loss or an inf gradient; returns what
    the model, optimizer and EMAs were just before it."""
    calls, before = [0], {}
    loss = solver._loss

    def faulty_loss(estimate, sources, weights):
        value, reco = loss(estimate, sources, weights)
        if solver.model.training:
            calls[0] += 1
            if calls[0] == bad_batch:
                before["model"] = _state(solver)
                before["ema"] = [_clone(ema.state) for ema in solver.emas["batch"]]
                before["steps"] = _optimizer_steps(solver)
                if kind == "nan":
                    value = value * float("nan")
                else:
                    param = next(solver.model.parameters())
                    param.register_hook(lambda grad: torch.full_like(grad, np.inf))
        return value, reco
    monkeypatch.setattr(solver, "_loss", faulty_loss)
    return before


def _optimizer_steps(solver) -> int:
    return max((int(state["step"]) for state in solver.optimizer.state.values()), default=0)


@pytest.mark.parametrize("kind, what", [("nan", "the loss is nan"),
                                        ("inf_grad", "the gradient norm is inf")])
def test_non_finite_batch_stops_before_touching_the_weights(kind, what, make_solver,
                                                            monkeypatch):
    solver = make_solver("max_batches=3", "ema.batch=[0.9]")
    before = _inject(solver, monkeypatch, bad_batch=2, kind=kind)
    with pytest.raises(NonFiniteLossError, match=f"Epoch 1, batch 2: {what}") as error:
        solver.train()
    assert "optim.skip_nonfinite=true" in str(error.value)
    after = _state(solver)
    assert all(torch.equal(after[key], value) for key, value in before["model"].items())
    assert all(torch.isfinite(value).all() for value in after.values() if value.is_floating_point())
    assert _optimizer_steps(solver) == before["steps"] == 1
    ema = solver.emas["batch"][0].state
    assert all(torch.equal(ema[key], value) for key, value in before["ema"][0].items())
    assert not (solver.folder / "checkpoint.th").exists()  # no NaN weights written


def test_skip_nonfinite_skips_and_counts_bad_batches(make_solver, monkeypatch):
    solver = make_solver("max_batches=3", "optim.skip_nonfinite=true")
    _inject(solver, monkeypatch, bad_batch=2, kind="nan")
    solver.train()
    metrics = history(solver.folder)
    assert metrics[0]["train"]["skipped"] == 1
    assert np.isfinite(metrics[0]["train"]["loss"])
    assert _optimizer_steps(solver) == 2
    package = torch.load(solver.folder / "checkpoint.th", weights_only=True)
    assert all(torch.isfinite(value).all() for value in package["state"].values()
               if value.is_floating_point())


def test_skip_nonfinite_stops_when_every_batch_is_bad(make_solver, monkeypatch):
    solver = make_solver("max_batches=2", "optim.skip_nonfinite=true")
    monkeypatch.setattr(solver, "_loss", lambda estimate, sources, weights: (
        torch.tensor(float("nan"), requires_grad=True), torch.zeros(4)))
    with pytest.raises(NonFiniteLossError, match="Epoch 1: all 2 training batches"):
        solver.train()


def test_resume_restores_the_random_generators(make_solver):
    solver = make_solver()
    torch.rand(5), np.random.rand(5), random.random()  # move away from the seeded state
    solver._serialize(0)
    expected = (torch.rand(3), np.random.rand(), random.random())
    resumed = make_solver()  # same XP: loads the checkpoint, and the generators with it
    assert resumed.checkpoint_file == solver.checkpoint_file
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


# ------------------------------------------------------------------ data checked at start-up
def _break_dataset(root: Path, wav_root: Path) -> tp.Dict[str, str]:
    """Six different problems in the train, valid and test tracks of a tiny MusDB and a silent
    track in an extra `dset.wav` folder; returns {file that must be named: problem}."""
    train, test = root / "train", root / "test"
    valid = musdb_valid_tracks()[:2]
    (train / "Toy - One" / "bass.wav").unlink()
    drums = train / "Toy - Two" / "drums.wav"
    data, rate = sf.read(drums)
    sf.write(drums, data, rate * 2)
    vocals = train / valid[0] / "vocals.wav"
    sf.write(vocals, sf.read(vocals)[0][:1000], rate)
    (train / valid[1] / "other.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(test / "Toy - Test A" / "mixture.wav", np.zeros((0, 2)), rate)
    (test / "Toy - Test B" / "drums.wav").unlink()
    silent = wav_root / "train" / "Silent"
    silent.mkdir(parents=True)
    (wav_root / "valid").mkdir()
    for stem in ["mixture", "drums", "bass", "other", "vocals"]:
        sf.write(silent / f"{stem}.wav", np.zeros((rate, 2)), rate)
    return {
        str(train / "Toy - One"): "missing stem file(s) bass.wav",
        str(drums): "sample rate",
        str(vocals): "length 1000 frames",
        str(train / valid[1] / "other.wav"): "unreadable audio file",
        str(test / "Toy - Test A" / "mixture.wav"): "empty audio file",
        str(test / "Toy - Test B"): "missing stem file(s) drums.wav",
        str(silent / "mixture.wav"): "silent",
    }


def test_every_data_problem_is_reported_at_once_before_training(tmp_path, dora_dir):
    from demucs.train import get_solver, main
    root = write_tiny_musdb(tmp_path / "musdb")
    expected = _break_dataset(root, tmp_path / "extra")
    xp = main.get_xp(base_argv(root) + [f"dset.wav={tmp_path / 'extra'}"])
    with xp.enter(), pytest.raises(DatasetError) as error:
        get_solver(xp.cfg)
    assert len(error.value.problems) == len(expected)
    for path, problem in expected.items():
        assert any(path in line and problem in line for line in error.value.problems), path
    assert f"{len(expected)} problem(s) found" in str(error.value)
    assert not (Path(xp.folder) / "checkpoint.th").exists()


def test_shift_as_long_as_the_segment_is_refused_before_training(tmp_path, dora_dir, capsys):
    """Such examples are cropped to nothing: without the check, training runs on empty tensors.
    The config is refused when Dora makes the XP (status 2), before its folder exists."""
    from demucs.train import main
    with pytest.raises(SystemExit) as exit_:
        main.get_xp(base_argv(tmp_path / "musdb") + ["dset.shift=1"])
    assert exit_.value.code == 2
    assert "dset.shift=1 must be smaller than dset.segment=1" in capsys.readouterr().err
    assert not (dora_dir / "xps").exists()


# ------------------------------------------------------------------ one run per XP
def test_second_run_on_a_locked_xp_exits_naming_the_holder(tiny_musdb, dora_dir):
    argv = base_argv(tiny_musdb)
    folder = xp_folder(dora_dir, argv)
    folder.mkdir(parents=True)
    (folder / "checkpoint.th").write_bytes(b"checkpoint of the live run")
    with XPLock(folder):  # this test process plays the run in progress
        proc = dora_run(dora_dir, argv, check=False, timeout=120)
    assert proc.returncode != 0
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert (folder / "checkpoint.th").read_bytes() == b"checkpoint of the live run"
    assert not (folder / "history.json").exists()


@pytest.mark.slow
def test_locked_xp_stops_a_distributed_run(tiny_musdb, dora_dir):
    """Rank 0 checks the lock and shares the answer: every worker exits (Dora stops the others
    as soon as the first one has)."""
    argv = base_argv(tiny_musdb) + ["batch_size=4"]
    folder = xp_folder(dora_dir, argv)
    with XPLock(folder):
        proc = dora_run(dora_dir, argv, "-d", "--ddp_workers", "2", check=False, timeout=300)
    assert proc.returncode != 0
    assert f"PID {os.getpid()} on host" in proc.stdout, proc.stdout[-3000:]
    assert not (folder / "checkpoint.th").exists()


@pytest.mark.slow
def test_two_concurrent_dora_runs(tiny_musdb, dora_dir):
    """A real first run holds the XP; a second one started meanwhile is refused, the first one
    ends normally."""
    argv = base_argv(tiny_musdb, epochs=3) + ["max_batches=4"]
    folder = xp_folder(dora_dir, argv)
    first = subprocess.Popen([sys.executable, "-m", "dora", "run", *argv], cwd=ROOT,
                             env=dora_env(dora_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lock = folder / "train.lock"
    try:
        while not (lock.exists() and lock.read_text()) and first.poll() is None:
            pass
        second = dora_run(dora_dir, argv, check=False, timeout=120)
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode != 0 and f"PID {first.pid} on host" in second.stdout
    assert first.returncode == 0, output[-3000:]
    assert len(history(folder)) == 3


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / "train.lock").write_text(f'{{"pid": {dead}, "host": "{socket.gethostname()}"}}')
    with caplog.at_level(logging.WARNING), XPLock(tmp_path):
        assert f'"pid": {os.getpid()}' in (tmp_path / "train.lock").read_text()
    assert f"left by PID {dead}" in caplog.text and "no longer running" in caplog.text
    assert (tmp_path / "train.lock").read_text() == ""


def test_lock_is_exclusive_and_reusable(tmp_path):
    with XPLock(tmp_path):
        with pytest.raises(XPLockedError, match=f"PID {os.getpid()} on host"):
            XPLock(tmp_path).acquire()
    with XPLock(tmp_path):  # released: free again
        pass


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch, caplog):
    """File systems without flock: a live PID or another host is refused, a dead PID taken over."""
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(checkpoint_module.fcntl, "flock", no_flock)
    lock_file = tmp_path / "train.lock"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for pid, host in [(sleeper.pid, socket.gethostname()), (_dead_pid(), "other-host")]:
            lock_file.write_text(f'{{"pid": {pid}, "host": "{host}"}}')
            with pytest.raises(XPLockedError, match=f"PID {pid} on host {host}"):
                XPLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock_file.write_text(f'{{"pid": {sleeper.pid}, "host": "{socket.gethostname()}"}}')
    with caplog.at_level(logging.WARNING), XPLock(tmp_path):
        assert "Taking over" in caplog.text


def test_unfinished_writes_are_removed_on_start(tmp_path):
    leftovers = [partial_path(tmp_path / "checkpoint.th"), partial_path(tmp_path / "best.th")]
    for leftover in leftovers:
        leftover.write_bytes(b"torn")
    (tmp_path / "checkpoint.th").write_bytes(b"good")
    assert checkpoint_module.remove_unfinished_writes(tmp_path) == sorted(leftovers)
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.th"]
