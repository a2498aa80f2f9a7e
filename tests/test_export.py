"""tools.export: release packages from a solver's best state (fp16 or quantized, segment, metrics)."""
from fractions import Fraction
from pathlib import Path
import types

from omegaconf import OmegaConf
import pytest
import torch

from demucs.augment import Shift
from demucs.htdemucs import HTDemucs
from demucs.pretrained import SOURCES
from demucs.repo import LocalRepo
from demucs.states import load_model
from tools.export import ExportError, build_package, main, write_package

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def _solver(quantizer_bits: int = 0, epochs_done: int = 2):
    args = OmegaConf.load(ROOT / "conf" / "config.yaml")
    args.dset.segment = 10
    args.epochs = 2
    torch.manual_seed(0)
    model = HTDemucs(SOURCES, channels=4, depth=2, t_layers=1, t_heads=1, segment=10,
                     dconv_mode=0)
    best_state = {key: value.clone() + 0.01 for key, value in model.state_dict().items()}
    quantizer = None
    if quantizer_bits:
        diffq = pytest.importorskip("diffq")
        quantizer = diffq.UniformQuantizer(model, bits=quantizer_bits, min_size=0)
    history = [{"valid": {"loss": 0.3}}, {"valid": {"loss": 0.2}, "test": {"nsdr": 1.5}}]
    return types.SimpleNamespace(
        args=args, model=model, best_state=best_state, quantizer=quantizer,
        history=history[:epochs_done],
        augment=torch.nn.Sequential(Shift(int(args.dset.shift * args.dset.samplerate))))


def test_package_holds_best_state_in_half_with_training_segment(tmp_path: Path):
    solver = _solver()
    package = build_package(solver, "abcd1234")
    # 10 s examples, cropped by the 12% tempo margin, minus the 1 s random shift: 7.8 s.
    assert package["kwargs"]["segment"] == Fraction(39, 5)
    assert package["metrics"] == ({"loss": 0.2}, {"nsdr": 1.5})
    assert all(value.dtype == torch.half for value in package["state"].values())
    path = write_package(package, "abcd1234", tmp_path, sign=False)
    assert path.name == "abcd1234.th"
    model = load_model(path)
    assert model.segment == Fraction(39, 5)
    for key, value in solver.best_state.items():
        assert torch.allclose(model.state_dict()[key], value.half().float())


def test_signed_package_loads_from_a_local_repo(tmp_path: Path):
    path = write_package(build_package(_solver(), "abcd1234"), "abcd1234", tmp_path, sign=True)
    assert path.name.startswith("abcd1234-") and len(path.stem) == len("abcd1234-") + 8
    assert isinstance(LocalRepo(tmp_path).get_model("abcd1234"), HTDemucs)


def test_quantized_export(tmp_path: Path):
    solver = _solver(quantizer_bits=8)
    package = build_package(solver, "q1")
    assert package["state"]["__quantized"]
    model = load_model(write_package(package, "q1", tmp_path, sign=False))
    for key, value in solver.best_state.items():
        assert torch.allclose(model.state_dict()[key], value, atol=0.05)


def test_unfinished_and_untrained_xps(caplog):
    build_package(_solver(epochs_done=1), "half")
    assert "not finished (1/2 epochs)" in caplog.text
    solver = _solver()
    solver.best_state = None
    with pytest.raises(ExportError, match="XP nobest has no best state"):
        build_package(solver, "nobest")


def test_unknown_signature_fails_cleanly(tmp_path: Path, monkeypatch, caplog):
    def missing(sig, model_only=False):
        raise RuntimeError(f"Could not find experiment with signature {sig}")

    monkeypatch.setattr("demucs.train.get_solver_from_sig", missing)
    with pytest.raises(SystemExit) as exit_info:
        main(["ffffffff", "-o", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "Cannot export ffffffff" in caplog.text
