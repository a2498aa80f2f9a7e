"""tools.export: release packages from a solver's best state (fp16 or quantized, segment,
metrics)."""
import copy
from fractions import Fraction
import os
from pathlib import Path
import stat
import subprocess
import sys
import types

import numpy as np
from omegaconf import OmegaConf
import pytest
import soundfile
import torch

from demucs.apply import BagOfModels, apply_model
from demucs.augment import Shift
from demucs.demucs import Demucs
from demucs.htdemucs import HTDemucs
from demucs.lora import add_adapters, merge_adapters
from demucs.pretrained import SOURCES, get_model
from demucs.repo import LocalRepo
from demucs.states import load_model
from tools.export import ExportError, build_package, main, specialist_bag, write_package

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


@pytest.mark.parametrize("sign", [False, True])
def test_exported_files_get_a_plain_file_mode(tmp_path: Path, sign: bool):
    previous = os.umask(0o022)
    try:
        path = write_package(build_package(_solver(), "abcd1234"), "abcd1234", tmp_path, sign)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_signed_package_loads_from_a_local_repo(tmp_path: Path):
    path = write_package(build_package(_solver(), "abcd1234"), "abcd1234", tmp_path, sign=True)
    assert path.name.startswith("abcd1234-") and len(path.stem) == len("abcd1234-") + 8
    assert isinstance(LocalRepo(tmp_path).get_model("abcd1234"), HTDemucs)


def test_export_replaces_earlier_exports_of_the_same_xp(tmp_path: Path):
    package = build_package(_solver(), "abcd1234")
    (tmp_path / "abcd12345.th").write_bytes(b"another XP, kept")
    plain = write_package(package, "abcd1234", tmp_path, sign=False)
    signed = write_package(package, "abcd1234", tmp_path, sign=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["abcd12345.th", signed.name])
    assert sorted(LocalRepo(tmp_path).list_model()) == ["abcd1234", "abcd12345"]
    assert write_package(package, "abcd1234", tmp_path, sign=False) == plain
    assert sorted(path.name for path in tmp_path.iterdir()) == ["abcd1234.th", "abcd12345.th"]


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


def _write_song(folder: Path, rate: int, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    stems = [(0.2 * rng.standard_normal((int(seconds * rate), 2))).astype(np.float32)
             for _ in SOURCES]
    for name, stem in zip(SOURCES, stems):
        soundfile.write(str(folder / f"{name}.wav"), stem, rate, subtype="FLOAT")
    soundfile.write(str(folder / "mixture.wav"), sum(stems), rate, subtype="FLOAT")


@pytest.mark.slow
def test_trained_xp_exports_and_separates(tmp_path: Path, monkeypatch):
    """dora run of a tiny HTDemucs XP, tools.export, then the `demucs` command on the package."""
    from demucs.separate import main as separate
    from demucs.train import main as train_main
    from demucs.wav import _get_musdb_valid
    rate = 8000
    musdb = tmp_path / "musdb"
    for index, name in enumerate(["Toy - One", "Toy - Two"] + _get_musdb_valid()[:2]):
        _write_song(musdb / "train" / name, rate, 3, index)
    _write_song(musdb / "test" / "Toy - Test", rate, 2, 9)
    argv = [f"dset.musdb={musdb}", f"dset.musdb_samplerate={rate}", f"dset.samplerate={rate}",
            f"dset.metadata={tmp_path / 'metadata'}", "dset.segment=1", "dset.shift=0.5",
            "epochs=1", "batch_size=2", "max_batches=1", "misc.num_workers=0", "test.workers=0",
            "test.sdr=false", "augment.repitch.proba=0", "augment.remix.group_size=2",
            "model=htdemucs", "htdemucs.channels=8", "htdemucs.depth=2", "htdemucs.nfft=64",
            "htdemucs.t_layers=1", "htdemucs.t_heads=1"]
    outputs = tmp_path / "outputs"
    env = dict(os.environ, _DORA_TEST_PATH=str(outputs), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "dora", "run", *argv], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    monkeypatch.setattr(train_main.dora, "dir", outputs)
    sig = train_main.get_xp(argv).sig
    main([sig, "-o", str(tmp_path / "release_models"), "--sign"])
    model = LocalRepo(tmp_path / "release_models").get_model(sig)
    assert model.segment == Fraction(1, 2)  # 1 s examples minus the 0.5 s random shift
    track = tmp_path / "song.wav"
    soundfile.write(str(track), np.zeros((rate * 2, 2), np.float32) + 0.1, rate)
    separate(["-n", sig, "--repo", str(tmp_path / "release_models"), "-o", str(tmp_path / "sep"),
              "-d", "cpu", "--shifts", "0", str(track)])
    info = soundfile.info(str(tmp_path / "sep" / sig / "song" / "vocals.wav"))
    assert (info.frames, info.channels, info.samplerate) == (2 * rate, 2, rate)


def test_out_naming_a_file_is_refused_in_one_line(tmp_path: Path, capsys):
    existing = tmp_path / "SIG.th"
    existing.write_bytes(b"not a folder")
    with pytest.raises(SystemExit) as stop:
        main(["-o", str(existing), "abcd1234"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"-o {existing} is a file, not a folder" in error
    assert existing.read_bytes() == b"not a folder"


def test_adapters_are_merged_into_an_ordinary_package(tmp_path: Path):
    solver = _solver()
    torch.manual_seed(4)
    add_adapters(solver.model, rank=2, targets=["linear", "attention", "conv"])
    solver.best_state = {key: value + 0.01 if "lora_" in key else value
                         for key, value in solver.model.state_dict().items()}
    adapted = copy.deepcopy(solver.model)
    adapted.load_state_dict(solver.best_state)
    expected = merge_adapters(adapted).state_dict()
    package = build_package(solver, "lora1")
    assert package["klass"] is HTDemucs and "rank" not in package["kwargs"]
    assert package["state"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(package["state"][key], value.half()), key
    model = load_model(write_package(package, "lora1", tmp_path, sign=False))  # strict load
    assert model.state_dict().keys() == HTDemucs(SOURCES, channels=4, depth=2, t_layers=1,
                                                 t_heads=1, dconv_mode=0).state_dict().keys()


def _specialist_solver(seed: int, weights: list):
    """An XP of a tiny Demucs trained with the loss `weights`."""
    solver = _solver()
    solver.args.weights = weights
    torch.manual_seed(seed)
    solver.model = Demucs(SOURCES, channels=4, depth=2)
    solver.best_state = solver.model.state_dict()
    return solver


SPECIALISTS = {"spec_d": [1, 0, 0, 0], "spec_o": [0.1, 0.1, 1, 0.1], "spec_b": [0, 1, 0, 0],
               "spec_v": [0, 0, 0, 1]}


def test_specialists_are_bagged_one_source_each(tmp_path: Path, monkeypatch):
    solvers = {sig: _specialist_solver(index, weights)
               for index, (sig, weights) in enumerate(SPECIALISTS.items())}
    monkeypatch.setattr("demucs.train.get_solver_from_sig",
                        lambda sig, model_only=False: solvers[sig])
    main([*SPECIALISTS, "--specialists", "ft", "-o", str(tmp_path)])
    bag = get_model("ft", repo=tmp_path)
    assert isinstance(bag, BagOfModels)
    assert bag.weights == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    torch.manual_seed(5)
    mix = torch.randn(1, 2, 4000)
    stems = apply_model(bag, mix, shifts=0, split=False)
    owners = {"drums": "spec_d", "bass": "spec_b", "other": "spec_o", "vocals": "spec_v"}
    for index, source in enumerate(SOURCES):
        member = load_model(tmp_path / f"{owners[source]}.th")
        alone = apply_model(member, mix, shifts=0, split=False)
        assert torch.allclose(stems[:, index], alone[:, index], atol=1e-6), source


def test_specialists_must_cover_each_source_once():
    four = list(SOURCES)
    with pytest.raises(ExportError, match="XP b was trained with weights=.1, 1, 0, 0."):
        specialist_bag([("a", four, [1, 0, 0, 0]), ("b", four, [1, 1, 0, 0])])
    with pytest.raises(ExportError, match="XPs a and b are both specialists of drums"):
        specialist_bag([("a", four, [1, 0, 0, 0]), ("b", four, [2, 0, 0, 0])])
    with pytest.raises(ExportError, match="no specialist for other, vocals"):
        specialist_bag([("a", four, [1, 0, 0, 0]), ("b", four, [0, 1, 0, 0])])
    with pytest.raises(ExportError, match="the specialists of a bag share their sources"):
        specialist_bag([("a", four, [1, 0, 0, 0]), ("b", four[::-1], [0, 0, 0, 1])])


def test_a_bag_name_that_is_a_member_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["abcd1234", "--specialists", "abcd1234"])
    assert stop.value.code == 2
    assert "--specialists 'abcd1234' must name the bag" in capsys.readouterr().err
