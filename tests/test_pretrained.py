"""The public facade of model lookup: `get_model`, the command-line flags, locally trained XPs
(`--sig`) and the test model. The lookups themselves are tested in test_catalogue.py."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from demucs.evaluate import BASELINES
from demucs.hdemucs import HDemucs
from demucs.pretrained import (SOURCES, TrainingCodeMissingError, add_model_flags, get_model,
                               get_model_from_args, get_model_from_sig)
from demucs.repo import ModelLoadingError


def test_unittest_model():
    model = get_model("demucs_unittest")
    assert isinstance(model, HDemucs) and model.sources == SOURCES


def test_local_repo_and_flags(tmp_path: Path):
    package = {"klass": HDemucs, "args": (), "kwargs": {"sources": SOURCES, "channels": 4},
               "state": HDemucs(sources=SOURCES, channels=4).state_dict(), "training_args": {}}
    torch.save(package, tmp_path / "mymodel.th")
    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    args = parser.parse_args(["-n", "mymodel", "--repo", str(tmp_path)])
    model = get_model_from_args(args)
    assert isinstance(model, HDemucs) and not model.training
    with pytest.raises(ModelLoadingError, match="must exist and be a directory"):
        get_model("mymodel", repo=tmp_path / "missing")
    with pytest.raises(SystemExit):
        parser.parse_args(["-n", "a", "-s", "b"])


def test_hubconf_exposes_get_model():
    import hubconf
    assert hubconf.get_model is get_model
    assert "torch" in hubconf.dependencies
    torch.hub._check_dependencies(hubconf)  # names torch.hub can find (dora-search was not one)


@pytest.mark.slow
def test_test_pretrained_tool_scores_a_local_model(toy_musdb: Path, tmp_path: Path, capsys):
    from demucs.states import serialize_model
    from tools.test_pretrained import main
    torch.manual_seed(0)
    model = HDemucs(sources=SOURCES, channels=4)
    torch.save(serialize_model(model, {}), tmp_path / "tiny.th")
    main(["-n", "tiny", "--repo", str(tmp_path), "dset=toy", f"dset.musdb={toy_musdb}",
          "test.sdr=false", "test.workers=0", "test.shifts=0", f"dora.dir={tmp_path / 'dora'}"])
    out = capsys.readouterr().out
    scores = json.loads(out.strip().splitlines()[-1])
    assert set(scores) >= {f"nsdr_{name}" for name in SOURCES} | {"nsdr"}
    for row in ["model tiny", *BASELINES.values()]:
        assert re.search(rf"^{re.escape(row)}( +-?\d+\.\d\d){{5}}$", out, re.MULTILINE), out
    assert abs(scores["nsdr"] - sum(scores[f"nsdr_{name}"] for name in SOURCES) / 4) < 1e-6
    main(["-n", "tiny", "--repo", str(tmp_path), "--amp", "bf16", "--no-baselines", "dset=toy",
          f"dset.musdb={toy_musdb}", "test.sdr=false", "test.workers=0", "test.shifts=0",
          f"dora.dir={tmp_path / 'dora'}"])
    mixed_out = capsys.readouterr().out
    mixed = json.loads(mixed_out.strip().splitlines()[-1])
    assert 0 < abs(mixed["nsdr"] - scores["nsdr"]) < 0.5
    assert not any(label in mixed_out for label in BASELINES.values())


class _FakeSolver:
    """What `get_model_from_sig` reads from `train.get_solver_from_sig(sig, model_only=True)`."""

    def __init__(self, model: torch.nn.Module, best_state: dict):
        self.model = model
        self.best_state = best_state


def test_sig_flag_loads_the_local_xp(monkeypatch):
    """`args.sig` wins over the default name (it used to quietly load htdemucs)."""
    import demucs.train
    torch.manual_seed(0)
    model, best = HDemucs(sources=SOURCES, channels=4), HDemucs(sources=SOURCES, channels=4)
    asked = []

    def solver_from_sig(sig: str, model_only: bool = False) -> _FakeSolver:
        asked.append((sig, model_only))
        return _FakeSolver(model, best.state_dict())

    monkeypatch.setattr(demucs.train, "get_solver_from_sig", solver_from_sig)
    loaded = get_model_from_args(argparse.Namespace(sig="abc", name=None, repo=None))
    assert asked == [("abc", True)] and loaded is model and not loaded.training
    for key, value in best.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_sig_without_training_dependencies_says_what_to_install(monkeypatch):
    """A library function raises (the command turns it into a message); it never exits."""
    import sys
    monkeypatch.setitem(sys.modules, "demucs.train", None)  # import fails as without dora
    with pytest.raises(TrainingCodeMissingError, match=r"XP abc .*pip install demucs\[train\]"):
        get_model_from_sig("abc")


def test_args_without_sig_or_repo_attributes(monkeypatch):
    import demucs.pretrained
    asked = []
    monkeypatch.setattr(demucs.pretrained, "get_model",
                        lambda name, repo=None: asked.append((name, repo)))
    get_model_from_args(argparse.Namespace(name=None))
    assert asked == [("htdemucs", None)]


def test_fatal_prints_and_exits(capsys):
    from demucs.utils import fatal
    with pytest.raises(SystemExit) as info:
        fatal("no model", "here")
    assert info.value.code == 1 and capsys.readouterr().err == "no model here\n"
