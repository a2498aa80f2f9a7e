"""TensorBoard events of a training run (demucs/tracking.py), read back with TensorBoard's own
event reader."""
import json
from pathlib import Path
import sys

import pytest

from demucs.tracking import EVENTS_FOLDER, EpochTracker
from tests.training_helpers import base_argv

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def _scalars(folder: Path) -> dict:
    reader = event_accumulator.EventAccumulator(str(folder))
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)]
            for tag in reader.Tags()["scalars"]}


def test_tracker_writes_every_number_of_an_epoch(tmp_path):
    tracker = EpochTracker(tmp_path, enabled=True)
    tracker.log_epoch(0, {"train": {"loss": 0.5, "name": "text"}, "valid": {"nsdr": 3.25}},
                      lr=3e-4, seconds=12.5)
    tracker.log_epoch(1, {"train": {"loss": 0.25}, "valid": {"nsdr": 4.0}}, lr=1e-4, seconds=11)
    tracker.close()
    scalars = _scalars(tmp_path / EVENTS_FOLDER)
    assert scalars["train/loss"] == [(1, 0.5), (2, 0.25)]
    assert scalars["valid/nsdr"] == [(1, 3.25), (2, 4.0)]
    assert [step for step, _ in scalars["optim/lr"]] == [1, 2]
    assert scalars["optim/lr"][0][1] == pytest.approx(3e-4)
    assert scalars["time/epoch"] == [(1, 12.5), (2, 11.0)]
    assert "train/name" not in scalars


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = EpochTracker(tmp_path, enabled=False)
    tracker.log_epoch(0, {"train": {"loss": 0.5}}, lr=1., seconds=1.)
    tracker.close()
    assert not (tmp_path / EVENTS_FOLDER).exists()


def test_without_tensorboard_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    tracker = EpochTracker(tmp_path, enabled=True)
    tracker.log_epoch(0, {"train": {"loss": 0.5}}, lr=1., seconds=1.)
    assert "install tensorboard" in caplog.text
    assert not (tmp_path / EVENTS_FOLDER).exists()


def test_a_training_run_leaves_the_history_in_its_events(tiny_musdb, dora_dir):
    from demucs.train import get_solver, main
    xp = main.get_xp(base_argv(tiny_musdb, epochs=2) + ["test.every=1"])
    Path(xp.folder).mkdir(parents=True, exist_ok=True)
    with xp.enter():
        get_solver(xp.cfg).train()
    history = json.loads((Path(xp.folder) / "history.json").read_text())
    scalars = _scalars(Path(xp.folder) / EVENTS_FOLDER)
    for stage in ["train", "valid", "test"]:
        for name, value in history[-1][stage].items():
            if isinstance(value, (int, float)):
                assert scalars[f"{stage}/{name}"][-1] == (2, pytest.approx(value, rel=1e-6))
    assert {"valid/nsdr_vocals", "test/si_sdr", "optim/lr", "time/epoch"} <= set(scalars)
