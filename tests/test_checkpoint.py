"""demucs.checkpoint on its own: atomic checkpoint writes (mode, durability, all or nothing),
cleanup of unfinished writes, checkpoint content and validation, random generator states and the
XP lock file. Training-level faults (kills, full disk, concurrent runs) are in
test_reliability_training.py."""
import errno
import json
import os
import random
import socket
import stat

import numpy as np
from omegaconf import OmegaConf
import pytest
import torch

from demucs import checkpoint, svd
from demucs.checkpoint import (CheckpointError, CheckpointWriteError, XPLock, XPLockedError,
                               checkpoint_package, get_rng_state, load_checkpoint,
                               remove_unfinished_writes, restore_checkpoint, save_atomic,
                               set_rng_state)
from demucs.ema import ModelEMA
from demucs.files import partial_path


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_save_atomic_gives_the_mode_of_a_plain_open(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_atomic({"value": torch.ones(2)}, tmp_path / "checkpoint.th")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "checkpoint.th").stat().st_mode) == mode


def test_save_atomic_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_atomic({"value": torch.ones(2)}, tmp_path / "checkpoint.th")
    assert len(synced) == 2
    assert os.path.basename(synced[0]).startswith(".checkpoint.th.")  # before the rename
    assert synced[1] == str(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("crash while writing"), KeyboardInterrupt()])
def test_save_atomic_is_all_or_nothing(tmp_path, monkeypatch, error):
    target = tmp_path / "checkpoint.th"
    save_atomic({"value": torch.ones(3)}, target)
    old = target.read_bytes()

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"half written")
        raise error
    monkeypatch.setattr(torch, "save", failing_save)
    expected = CheckpointWriteError if isinstance(error, RuntimeError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_atomic({"value": torch.zeros(3)}, target)
    assert target.read_bytes() == old
    assert list(tmp_path.iterdir()) == [target]


def test_write_error_names_the_file_and_keeps_the_errno(tmp_path, monkeypatch):
    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as error:
        save_atomic({}, tmp_path / "best.th")
    assert error.value.errno == errno.ENOSPC
    assert str(tmp_path / "best.th") in str(error.value) and "MiB free" in str(error.value)


def test_remove_unfinished_writes_only_touches_checkpoints(tmp_path, caplog):
    torn = [partial_path(tmp_path / "checkpoint.th"), partial_path(tmp_path / "checkpoint_4.th")]
    kept = [partial_path(tmp_path / "history.json"), tmp_path / "checkpoint.th",
            tmp_path / ".hidden.th"]
    for path in torn + kept:
        path.write_bytes(b"x")
    assert remove_unfinished_writes(tmp_path) == sorted(torn)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert "checkpoint write that did not finish" in caplog.text
    assert remove_unfinished_writes(tmp_path / "missing") == []


def _valid_package() -> dict:
    return {"state": {"w": torch.ones(2)}, "optimizer": {}, "history": [], "best_state": None}


def test_load_checkpoint_reports_truncation_and_foreign_files(tmp_path):
    path = tmp_path / "checkpoint.th"
    torch.save(_valid_package(), path)
    assert torch.equal(load_checkpoint(path)["state"]["w"], torch.ones(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupted or truncated") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "delete it" in str(error.value)
    torch.save({"state": {}}, path)
    with pytest.raises(CheckpointError, match="lacks the entries"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not written by the Demucs solver"):
        load_checkpoint(path)


def _draws() -> tuple:
    return (torch.rand(4), random.random(), np.random.rand(3), np.random.randn(),
            svd.penalty_rng.random())


def _same_draws(first: tuple, second: tuple) -> bool:
    return (torch.equal(first[0], second[0]) and first[1] == second[1]
            and np.array_equal(first[2], second[2]) and first[3] == second[3]
            and first[4] == second[4])


def test_rng_state_round_trip_through_a_checkpoint_file(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    save_atomic({"rng": get_rng_state()}, tmp_path / "rng.th")
    expected = _draws()
    for generator in [torch, random, np.random, svd.penalty_rng]:
        generator.seed()  # somewhere else
    set_rng_state(torch.load(tmp_path / "rng.th", weights_only=True)["rng"])
    assert _same_draws(_draws(), expected)


def _tiny_training():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    emas = {"batch": [ModelEMA(model, 0.9)], "epoch": []}
    emas["batch"][0].update()
    return model, optimizer, emas


def test_checkpoint_package_restores_model_optimizer_emas_and_generators(tmp_path):
    torch.manual_seed(0)
    model, optimizer, emas = _tiny_training()
    args = {"epochs": 2}
    package = checkpoint_package(model, optimizer, [{"train": {}}], None,
                                 OmegaConf.create(args), emas)
    assert set(package) == {"state", "optimizer", "history", "best_state", "args", "rng",
                            "ema_batch_0"}
    assert package["args"] == args
    save_atomic(package, tmp_path / "checkpoint.th")
    expected = _draws()
    torch.manual_seed(1)
    other_model, other_optimizer, other_emas = _tiny_training()
    restore_checkpoint(load_checkpoint(tmp_path / "checkpoint.th"), other_model,
                       other_optimizer, other_emas, tmp_path / "checkpoint.th")
    assert _same_draws(_draws(), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[key], value)
    assert other_emas["batch"][0].count == emas["batch"][0].count
    assert other_optimizer.state_dict()["state"][0]["step"] == 1


def test_restore_refuses_a_checkpoint_of_another_ema_configuration(tmp_path):
    model, optimizer, emas = _tiny_training()
    package = _valid_package()
    package["state"], package["optimizer"] = model.state_dict(), optimizer.state_dict()
    with pytest.raises(CheckpointError, match="has no ema_batch_0: .*another ema"):
        restore_checkpoint(package, model, optimizer, emas, tmp_path / "checkpoint.th")


def test_lock_file_names_the_holder_while_held(tmp_path):
    lock = XPLock(tmp_path / "xp")  # the XP folder is created when missing
    with lock:
        owner = json.loads((tmp_path / "xp" / checkpoint.LOCK_NAME).read_text())
        assert owner == {"pid": os.getpid(), "host": socket.gethostname()}
    assert (tmp_path / "xp" / checkpoint.LOCK_NAME).read_text() == ""
    lock.release()  # releasing twice is harmless


def test_unreadable_lock_without_flock_is_refused(tmp_path, monkeypatch):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_flock)
    (tmp_path / checkpoint.LOCK_NAME).write_text("garbage")
    with pytest.raises(XPLockedError, match="unreadable lock content 'garbage'.*delete the lock"):
        XPLock(tmp_path).acquire()
