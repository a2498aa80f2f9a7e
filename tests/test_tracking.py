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


def test_a_training_run_leaves_the_history_in_its_events(tiny_musdb, dora_dir, monkeypatch):
    from demucs.train import get_solver, main
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    xp = main.get_xp(base_argv(tiny_musdb, epochs=2) + ["test.every=1", "misc.wandb=true"])
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
    logged = [call for call in fake.calls if call[0] == "log"]
    assert [call[2] for call in logged] == [1, 2]
    assert logged[-1][1]["valid/loss"] == pytest.approx(history[-1]["valid"]["loss"])
    assert fake.calls[0][1]["name"] == xp.sig and fake.calls[-1] == ("finish",)


class _FakeWandb:
    """A stand-in for the `wandb` module that records what the tracker asks of it (the real
    package is not a dependency; its API used here is init / log / finish)."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_the_same_numbers(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    folder = tmp_path / "abcd1234"
    tracker = EpochTracker(folder, enabled=False, wandb_project="demucs", config={"epochs": 2})
    tracker.log_epoch(0, {"train": {"loss": 0.5}, "valid": {"nsdr": 3.0}}, lr=1e-3, seconds=2.)
    tracker.close()
    assert fake.calls[0] == ("init", {"project": "demucs", "name": "abcd1234", "id": "abcd1234",
                                      "resume": "allow", "dir": str(folder),
                                      "config": {"epochs": 2}})
    assert fake.calls[1] == ("log", {"train/loss": 0.5, "valid/nsdr": 3.0, "optim/lr": 1e-3,
                                     "time/epoch": 2.}, 1)
    assert fake.calls[2] == ("finish",)


def test_wandb_missing_is_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)
    tracker = EpochTracker(tmp_path, enabled=False, wandb_project="demucs")
    tracker.log_epoch(0, {"train": {"loss": 0.5}}, lr=1., seconds=1.)
    tracker.close()
    assert caplog.text.count("wandb is not installed") == 1
