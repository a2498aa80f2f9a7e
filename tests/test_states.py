"""Model packages: serialization round trips, safe loading and clear errors; state helpers."""
import argparse
from fractions import Fraction
import hashlib
from pathlib import Path
import types

import numpy as np
from omegaconf import OmegaConf
import pytest
import torch

from demucs.demucs import Demucs
from demucs.states import (ModelPackageError, UnsafeCheckpointError, copy_state, get_quantizer,
                           get_state, load_model, save_safetensors, save_with_checksum,
                           serialize_model, swap_state)

SOURCES = ["drums", "bass"]


def tiny_model(**kwargs) -> Demucs:
    torch.manual_seed(0)
    return Demucs(SOURCES, channels=4, depth=2, lstm_layers=1, segment=2, **kwargs)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(1, 2, 800))


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


class _CreatesFileWhenUnpickled:
    """Pickles as `open(path, "w")`: unpickling it unsafely creates `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_fp32_package_round_trip_through_file(tmp_path: Path):
    model = tiny_model()
    package = serialize_model(model, None, half=False)
    assert package["klass"] is Demucs and package["args"] == (SOURCES,)
    assert package["kwargs"] == dict(channels=4, depth=2, lstm_layers=1, segment=2)
    torch.save(package, tmp_path / "model.th")
    loaded = load_model(tmp_path / "model.th")
    assert_same_weights(loaded, model)
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_half_package_stores_fp16_and_loads_rounded_weights(tmp_path: Path):
    model = tiny_model()
    package = serialize_model(model, None, half=True)
    assert {value.dtype for value in package["state"].values()} == {torch.float16}
    loaded = load_model(package)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float(), rtol=0, atol=0)


def test_training_args_are_stored_as_plain_containers():
    config = OmegaConf.create({"lr": 3e-4, "doubled": "${lr}", "sources": ["a", "b"]})
    package = serialize_model(tiny_model(), config)
    assert package["training_args"] == {"lr": 3e-4, "doubled": 3e-4, "sources": ["a", "b"]}
    namespace = argparse.Namespace(epochs=3)
    assert serialize_model(tiny_model(), namespace)["training_args"] == {"epochs": 3}


def test_fraction_segment_and_numpy_metrics_load_safely(tmp_path: Path):
    package = serialize_model(tiny_model(), {"epochs": 1})
    package["kwargs"]["segment"] = Fraction(39, 5)
    package["metrics"] = ({"sdr": np.float64(6.5)}, {"nsdr": np.float32(7.25)})
    torch.save(package, tmp_path / "model.th")
    model = load_model(tmp_path / "model.th")
    assert model.segment == Fraction(39, 5)


def test_safetensors_round_trip(tmp_path: Path):
    model = tiny_model()
    package = serialize_model(model, {"epochs": 2, "sources": SOURCES}, half=False)
    package["kwargs"]["segment"] = Fraction(39, 5)
    path = save_safetensors(package, tmp_path / "model.safetensors")
    loaded = load_model(path)
    assert loaded.segment == Fraction(39, 5)
    assert loaded.sources == SOURCES and loaded.depth == 2
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_safetensors_metadata_uses_the_demucs_4_1_layout(tmp_path: Path):
    """klass/args/kwargs are JSON strings, fractions are `{"_type": "fraction", ...}` objects."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    model = tiny_model()
    package = serialize_model(model, None, half=False)
    package["kwargs"]["segment"] = Fraction(39, 5)
    path = save_safetensors(package, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["klass"] == "demucs.demucs.Demucs"
    assert json.loads(metadata["kwargs"])["segment"] == {
        "_type": "fraction", "numerator": 39, "denominator": 5}
    # A file laid out by hand the same way (as the 4.1 hub files are) loads.
    by_hand = tmp_path / "by_hand.safetensors"
    save_file(dict(model.state_dict()), str(by_hand), metadata={
        "klass": "demucs.demucs.Demucs", "args": metadata["args"],
        "kwargs": metadata["kwargs"]})
    assert load_model(by_hand).segment == Fraction(39, 5)


def test_safetensors_refuses_unknown_class(tmp_path: Path):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path),
              metadata={"klass": "os.system", "args": "[]", "kwargs": "{}"})
    with pytest.raises(ModelPackageError, match="unknown model class 'os.system'"):
        load_model(path)


def test_unknown_kwargs_are_dropped_with_a_warning():
    package = serialize_model(tiny_model(), None, half=False)
    package["kwargs"]["from_the_future"] = 1
    with pytest.warns(UserWarning, match="from_the_future"):
        model = load_model(package)
    assert isinstance(model, Demucs)
    with pytest.raises(TypeError, match="from_the_future"):
        load_model(package, strict=True)


@pytest.mark.parametrize("zip_format", [True, False])
def test_forbidden_global_is_refused_without_running_it(tmp_path: Path, zip_format: bool):
    canary = tmp_path / "pwned"
    package = serialize_model(tiny_model(), None, half=False)
    package["training_args"] = _CreatesFileWhenUnpickled(canary)
    path = tmp_path / "model.th"
    torch.save(package, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match="open" if zip_format else "legacy") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert not canary.exists()
    # The canary is live: an unsafe load does create the file.
    torch.load(path, weights_only=False)
    assert canary.exists()


def test_model_class_outside_the_allow_list_is_refused(tmp_path: Path):
    package = serialize_model(tiny_model(), None, half=False)
    package["klass"] = torch.nn.Linear
    torch.save(package, tmp_path / "model.th")
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load_model(tmp_path / "model.th")


def test_missing_key_is_named():
    package = serialize_model(tiny_model(), None, half=False)
    del package["state"]["encoder.1.0.weight"]
    with pytest.raises(ModelPackageError, match="encoder.1.0.weight") as error:
        load_model(package)
    assert "Missing key" in str(error.value)


def test_wrong_shape_is_named():
    package = serialize_model(tiny_model(), None, half=False)
    package["state"]["decoder.0.0.bias"] = torch.zeros(3)
    with pytest.raises(ModelPackageError, match="size mismatch for decoder.0.0.bias"):
        load_model(package)


def test_malformed_packages_are_explained(tmp_path: Path):
    with pytest.raises(ModelPackageError, match="not a model class"):
        load_model({"klass": int, "args": (), "kwargs": {}, "state": {}})
    with pytest.raises(ModelPackageError, match=r"missing \['state'\]"):
        load_model({"klass": Demucs, "args": (), "kwargs": {}})
    torch.save([1, 2], tmp_path / "list.th")
    with pytest.raises(ModelPackageError, match="not a model package"):
        load_model(tmp_path / "list.th")
    with pytest.raises(FileNotFoundError, match="absent.th"):
        load_model(tmp_path / "absent.th")


def test_save_with_checksum_names_the_file_after_its_hash(tmp_path: Path):
    package = serialize_model(tiny_model(), None)
    path = save_with_checksum(package, tmp_path / "abcd1234.th")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert path == tmp_path / f"abcd1234-{digest}.th"
    assert isinstance(load_model(path), Demucs)


def test_diffq_quantized_package_round_trip(tmp_path: Path):
    pytest.importorskip("diffq")
    torch.manual_seed(0)  # every parameter size is a multiple of the group size 8
    model = Demucs(["drums", "bass", "other", "vocals"], channels=8, depth=2, dconv_mode=0)
    quantizer = get_quantizer(model, types.SimpleNamespace(diffq=1e-4, qat=None, min_size=0,
                                                           group_size=8))
    state = get_state(model, quantizer)
    assert state["__quantized"] is True
    torch.save(serialize_model(model, None, quantizer), tmp_path / "q.th")
    loaded = load_model(tmp_path / "q.th")
    original = model.state_dict()  # also holds the quantizer's own `*_diffq` parameters
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0.05, atol=0.05, msg=key)


def test_get_quantizer_follows_the_quant_config():
    pytest.importorskip("diffq")
    from diffq import UniformQuantizer
    config = types.SimpleNamespace(diffq=None, qat=None, min_size=0.2, group_size=8)
    assert get_quantizer(tiny_model(), config) is None
    config.qat = 8
    assert isinstance(get_quantizer(tiny_model(), config), UniformQuantizer)


def test_copy_state_is_independent():
    model = tiny_model()
    copied = copy_state(model.state_dict())
    with torch.no_grad():
        model.encoder[0][0].weight.add_(1)
    assert not torch.equal(copied["encoder.0.0.weight"], model.encoder[0][0].weight)


def test_swap_state_restores_weights_even_on_error():
    model, other = tiny_model(), tiny_model(rescale=0)
    original = copy_state(model.state_dict())
    with swap_state(model, other.state_dict()):
        assert_same_weights(model, other)
    assert_same_weights(model, _with_state(original))
    with pytest.raises(RuntimeError, match="boom"):
        with swap_state(model, other.state_dict()):
            raise RuntimeError("boom")
    assert_same_weights(model, _with_state(original))


def _with_state(state: dict) -> Demucs:
    model = tiny_model()
    model.load_state_dict(state)
    return model


def _rename_pickled_class(source: Path, target: Path, old: bytes, new: bytes) -> None:
    """Copy a torch zip checkpoint, renaming a pickled `module\\nname` class reference."""
    import zipfile
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info, data)


def test_legacy_wdemucs_class_path_loads_as_hdemucs(tmp_path: Path):
    hdemucs = pytest.importorskip("demucs.hdemucs")
    pytest.importorskip("demucs.wdemucs")
    torch.manual_seed(0)
    model = hdemucs.HDemucs(SOURCES, channels=4, depth=2)
    torch.save(serialize_model(model, None, half=False), tmp_path / "h.th")
    _rename_pickled_class(tmp_path / "h.th", tmp_path / "w.th",
                          b"demucs.hdemucs\nHDemucs\n", b"demucs.wdemucs\nWDemucs\n")
    loaded = load_model(tmp_path / "w.th")
    assert type(loaded) is hdemucs.HDemucs
    assert_same_weights(loaded, model)


def test_torchaudio_wrapper_keeps_its_4_1_path_without_the_training_code():
    """Demucs 4.1 pickles the torchaudio wrapper as demucs.train.TorchHDemucsWrapper: packages
    name it so, and loading one resolves it in the models layer, without importing training."""
    import subprocess
    import sys
    code = ("import sys; from demucs import states; "
            "klass = states._resolve_global('demucs.train.TorchHDemucsWrapper'); "
            "print(klass.__module__, klass.__qualname__, 'demucs.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["demucs.train", "TorchHDemucsWrapper", "False"]
