"""ONNX export (`demucs.onnx_export`) and separation with ONNX Runtime (`demucs.onnx_runtime`).

Every reference case of ../shared/golden is exported; the graphs run by ONNX Runtime must give
the PyTorch forward's output, and `apply_model` on the ONNX Runtime bag the PyTorch
`apply_model`'s, within a relative L2 error of 1e-4. Exports are cached per test module.
"""
from copy import deepcopy
import json
import logging
import random
import shutil
import sys
import typing as tp
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install .[onnx])")
pytest.importorskip("onnx", reason="onnx is not installed (pip install .[onnx])")

from demucs.apply import BagOfModels, apply_model  # noqa: E402
from demucs.hdemucs import HDemucs  # noqa: E402
from demucs.htdemucs import HTDemucs  # noqa: E402
from demucs.onnx_export import (OnnxExportError, default_input_length, export_bag,  # noqa: E402
                                export_model)
from demucs.onnx_runtime import (OnnxExportCorruptError, OnnxManifestError,  # noqa: E402
                                 OnnxRuntimeModel, file_sha256, load_onnx_bag, make_session,
                                 read_manifest)
from demucs.states import load_model  # noqa: E402

TOLERANCE = 1e-4
EXPORTABLE = ["demucs_unittest", "demucs_v2", "demucs_v3", "hdemucs_cac", "htdemucs_small"]
WITH_APPLY = ["demucs_v3", "hdemucs_cac", "htdemucs_small"]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


class GoldenExports:
    """Golden models, their reference tensors and their ONNX exports, each made once."""

    def __init__(self, golden_dir: Path, out: Path):
        self.golden_dir = golden_dir
        self.out = out
        self._models: tp.Dict[str, torch.nn.Module] = {}
        self._graphs: tp.Dict[tp.Tuple[str, int], Path] = {}
        self._bags: tp.Dict[str, Path] = {}

    def model(self, case: str) -> torch.nn.Module:
        if case not in self._models:
            self._models[case] = load_model(self.golden_dir / case / "model.th").eval()
        return self._models[case]

    def io(self, case: str) -> dict:
        return torch.load(self.golden_dir / case / "io.pt", weights_only=False)

    def graph(self, case: str, length: int) -> Path:
        """The model exported alone for inputs of `length` samples."""
        if (case, length) not in self._graphs:
            path = self.out / f"{case}_{length}.onnx"
            export_model(self.model(case), path, length)
            self._graphs[case, length] = path
        return self._graphs[case, length]

    def bag(self, case: str, mix_length: int, apply_kwargs: dict) -> Path:
        """The model exported with `export_bag` for its golden `apply_model` call: graphs for
        the full segments and for the last, shorter one."""
        if case not in self._bags:
            model = self.model(case)
            segment = apply_kwargs.get("segment")
            segment_length = int(model.samplerate * (segment or model.segment))
            stride = int((1 - apply_kwargs["overlap"]) * segment_length)
            last = mix_length - (mix_length - 1) // stride * stride
            tail = model.valid_length(last) if hasattr(model, "valid_length") else last
            folder = self.out / f"{case}_bag"
            export_bag(model, folder, name=case, segment=segment, extra_lengths=[tail])
            self._bags[case] = folder
        return self._bags[case]


@pytest.fixture(scope="module")
def exports(golden_dir, tmp_path_factory) -> GoldenExports:
    torch.set_num_threads(2)
    return GoldenExports(golden_dir, tmp_path_factory.mktemp("onnx"))


def run_graph(path: Path, mix: torch.Tensor) -> torch.Tensor:
    session = make_session(path, threads=2, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"mix": mix.numpy()})[0])


@pytest.mark.parametrize("case", EXPORTABLE)
def test_exported_graph_matches_pytorch_forward(exports, case):
    io = exports.io(case)
    model = exports.model(case)
    mix = io["forward_mix"]
    length = mix.shape[-1]
    # HTDemucs processes its training segment: the forward pads the mix to it, so do we.
    traced = default_input_length(model) if isinstance(model, HTDemucs) else length
    padded = torch.nn.functional.pad(mix, (0, traced - length))
    out = run_graph(exports.graph(case, traced), padded)[..., :length]
    assert relative_error(out, io["forward_out"]) <= TOLERANCE


@pytest.mark.parametrize("case", WITH_APPLY)
def test_apply_model_through_onnxruntime_matches_pytorch(exports, case):
    io = exports.io(case)
    mix, kwargs = io["apply_mix"], io["apply_kwargs"]
    bag = load_onnx_bag(exports.bag(case, mix.shape[-1], kwargs), threads=2,
                        providers=["CPUExecutionProvider"])
    assert isinstance(bag, BagOfModels) and isinstance(bag.models[0], OnnxRuntimeModel)
    out = apply_model(bag, mix.clone(), **kwargs)
    assert relative_error(out, io["apply_out"]) <= TOLERANCE


def test_apply_with_shifts_and_bag_weights(exports):
    """A weighted bag with shifts: the ONNX Runtime bag follows the PyTorch bag, also on a
    second call (the leaf draws from Python's `random` as the transformer does)."""
    model = exports.model("htdemucs_small")
    folder = exports.bag("htdemucs_small", 3 * 44100, {"overlap": 0.25})
    leaf = load_onnx_bag(folder, threads=2, providers=["CPUExecutionProvider"]).models[0]
    weights = [[1., 0., 1., 2.], [0.5, 1., 1., 0.]]
    mix = exports.io("htdemucs_small")["apply_mix"][..., :44100]
    outs = []
    for members in ([model, model], [leaf, leaf]):
        random.seed(3)
        bag = BagOfModels(members, weights)
        outs.append([apply_model(bag, mix.clone(), shifts=2, overlap=0.25) for _ in range(2)])
    for out, expected in zip(outs[1], outs[0]):
        assert relative_error(out, expected) <= TOLERANCE


def test_export_bag_writes_every_member_and_the_weights(exports, tmp_path):
    model = exports.model("demucs_v2")
    weights = [[1., 0., 1., 2.], [0.5, 1., 1., 0.]]
    export_bag(BagOfModels([model, model], weights), tmp_path, name="bag")
    manifest = read_manifest(tmp_path)
    assert manifest["weights"] == weights
    files = [entry["graphs"][0]["file"] for entry in manifest["models"]]
    assert files == ["bag_0.onnx", "bag_1.onnx"]
    bag = load_onnx_bag(tmp_path, threads=2)
    assert bag.weights == weights and len(bag.models) == 2
    assert bag.models[0].segment == model.segment


def test_graph_metadata_holds_bag_weights_and_sources(exports):
    import onnx
    path = exports.graph("htdemucs_small", 44100)
    metadata = {entry.key: json.loads(entry.value)
                for entry in onnx.load(str(path)).metadata_props}
    assert metadata["demucs.sources"] == ["drums", "bass", "other", "vocals"]
    assert metadata["demucs.class"] == "demucs.htdemucs.HTDemucs"
    assert metadata["demucs.input_length"] == 44100


def test_int8_quantization_runs_close_to_float(exports, tmp_path):
    model = exports.model("htdemucs_small")
    export_model(model, tmp_path / "int8.onnx", 44100, quantize="int8")
    mix = exports.io("htdemucs_small")["forward_mix"]
    out = run_graph(tmp_path / "int8.onnx", mix)
    reference = run_graph(exports.graph("htdemucs_small", 44100), mix)
    assert relative_error(out, reference) < 0.1
    with pytest.raises(OnnxExportError, match="int4"):
        export_model(model, tmp_path / "x.onnx", 44100, quantize="int4")


def test_wiener_model_is_refused_and_nothing_written(exports, tmp_path):
    model = exports.model("hdemucs_wiener")
    with pytest.raises(OnnxExportError, match=r"cac=False, wiener_iters=1"):
        export_bag(BagOfModels([exports.model("hdemucs_cac"), model]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_refusals(tmp_path):
    with pytest.raises(OnnxExportError, match="only Demucs, HDemucs and HTDemucs"):
        export_model(torch.nn.Conv1d(2, 2, 1), tmp_path / "x.onnx", 100)
    shifted = HTDemucs(["a", "b"], channels=4, depth=2, t_layers=1, t_heads=2, nfft=512,
                       segment=0.1, t_sin_random_shift=3)
    with pytest.raises(OnnxExportError, match="t_sin_random_shift=3"):
        export_model(shifted, tmp_path / "x.onnx", 4410)
    model = HTDemucs(["a", "b"], channels=4, depth=2, t_layers=1, t_heads=2, nfft=512,
                     segment=0.1)
    with pytest.raises(OnnxExportError, match="training segment of 4410"):
        export_model(model, tmp_path / "x.onnx", 4000)


@pytest.mark.parametrize("iters", [-1, 0])
def test_mixture_phase_model_exports(tmp_path, iters):
    """Non-cac models without Wiener iterations (mixture phase) are exported exactly."""
    torch.manual_seed(0)
    model = HDemucs(["drums", "bass"], channels=4, cac=False, wiener_iters=iters,
                    end_iters=iters).eval()
    mix = torch.randn(1, 2, 22050)
    path = tmp_path / "phase.onnx"
    export_model(model, path, 22050)
    with torch.no_grad():
        expected = model(mix)
    assert relative_error(run_graph(path, mix), expected) <= TOLERANCE


def test_leaf_pads_shorter_inputs_and_refuses_longer(exports):
    folder = exports.bag("htdemucs_small", 3 * 44100, {"overlap": 0.25})
    leaf = load_onnx_bag(folder, threads=2).models[0]
    assert leaf.valid_length(1000) == 44100
    model = exports.model("htdemucs_small")
    mix = exports.io("htdemucs_small")["forward_mix"][..., :30000]
    with torch.no_grad():
        expected = model(mix)
    assert relative_error(leaf(mix), expected) <= TOLERANCE
    with pytest.raises(ValueError, match="at most 44100 samples"):
        leaf(torch.zeros(1, 2, 44101))


def test_manifest_errors(tmp_path):
    with pytest.raises(OnnxManifestError, match="tools.export_onnx"):
        load_onnx_bag(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(OnnxManifestError, match="format 'other'"):
        read_manifest(tmp_path)


def test_missing_onnxruntime_says_how_to_install(monkeypatch, tmp_path):
    from demucs import onnx_runtime
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'demucs\[onnx\]'"):
        onnx_runtime.make_session(tmp_path / "x.onnx")


def test_command_line_exports_and_refuses(golden_dir, tmp_path, capsys):
    from tools import export_onnx
    assert export_onnx.main(["demucs_unittest", "-o", str(tmp_path / "ok"),
                             "--segment", "0.5"]) == 0
    manifest = read_manifest(tmp_path / "ok")
    graphs = manifest["models"][0]["graphs"]
    assert [(graph["file"], graph["input_length"]) for graph in graphs] == [
        ("demucs_unittest_0.onnx", 22050)]
    assert graphs[0]["bytes"] == (tmp_path / "ok" / "demucs_unittest_0.onnx").stat().st_size
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "abcd1234.th").write_bytes((golden_dir / "hdemucs_wiener" / "model.th").read_bytes())
    assert export_onnx.main(["abcd1234", "--repo", str(repo), "-o", str(tmp_path / "no")]) == 1
    assert "wiener_iters=1" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert export_onnx.file_stem("hf://org/htdemucs") == "hf_org_htdemucs"


# ----------------------------------------------------------------------------------------------
# The onnxruntime backend of `Separator` and of the `demucs` command.

BACKEND_CASES = ["hdemucs_cac", "htdemucs_small"]


@pytest.fixture(scope="module")
def backend_repo(golden_dir, tmp_path_factory) -> Path:
    """A local model repository with two golden models, named after their case."""
    repo = tmp_path_factory.mktemp("backend_repo")
    for case in BACKEND_CASES:
        (repo / f"{case}.th").write_bytes((golden_dir / case / "model.th").read_bytes())
    return repo


@pytest.fixture
def onnx_cache(tmp_path, monkeypatch) -> Path:
    """Where on-demand exports go: torch's hub folder, moved into the test's folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "demucs_onnx"


def separate_with(backend: str, repo: Path, case: str, wav: torch.Tensor, **kwargs):
    from demucs.api import Separator
    separator = Separator(case, repo=repo, device="cpu", backend=backend, **kwargs)
    random.seed(1)  # the same shift offsets for both backends
    return separator.separate_tensor(wav)[1], separator


def noise(seconds: float) -> torch.Tensor:
    return 0.3 * torch.randn(2, int(44100 * seconds), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_separator_backends_agree(backend_repo, onnx_cache, case):
    """A 2.5 s track in 1 s segments: full segments run in ONNX Runtime, and for HDemucs the
    shorter last one in PyTorch, so the whole output is PyTorch's."""
    wav = noise(2.5)
    expected, _ = separate_with("torch", backend_repo, case, wav)
    ours, separator = separate_with("onnxruntime", backend_repo, case, wav)
    assert list(ours) == list(expected)
    for name in expected:
        assert relative_error(ours[name], expected[name]) <= TOLERANCE, name
    assert separator.samplerate == 44100
    assert (onnx_cache.glob(f"{case}-*/manifest.json")), "the export went into the cache"


def test_on_demand_export_is_made_once(backend_repo, onnx_cache, monkeypatch):
    from demucs import onnx_export
    separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5))
    folders = list(onnx_cache.iterdir())
    assert len(folders) == 1 and read_manifest(folders[0])["name"] == "htdemucs_small"

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again")
    monkeypatch.setattr(onnx_export, "export_bag", no_second_export)
    separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5))
    assert list(onnx_cache.iterdir()) == folders


def test_onnx_dir_is_written_then_reused_and_checked(backend_repo, onnx_cache, tmp_path):
    from demucs.api import LoadModelError
    folder = tmp_path / "exported"
    separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5), onnx_dir=folder)
    assert read_manifest(folder)["name"] == "htdemucs_small"
    assert not onnx_cache.exists()
    separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5), onnx_dir=folder)
    with pytest.raises(LoadModelError, match="holds an ONNX export of 'htdemucs_small', not "
                                             "of 'hdemucs_cac'"):
        separate_with("onnxruntime", backend_repo, "hdemucs_cac", noise(0.5), onnx_dir=folder)


def test_separator_refuses_torch_only_options(backend_repo):
    from demucs.api import Separator
    with pytest.raises(ValueError, match="amp is an option of the torch backend"):
        Separator("htdemucs_small", repo=backend_repo, device="cpu", backend="onnxruntime",
                  amp="bf16")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        Separator("htdemucs_small", repo=backend_repo, device="cpu", backend="tensorrt")


def test_onnx_leaves_keep_the_segment_rules(exports):
    """An exported transformer keeps its training segment in a bag and limits the segment."""
    from demucs.bag import max_segment
    folder = exports.bag("htdemucs_small", 3 * 44100, {"overlap": 0.25})
    bag = load_onnx_bag(folder, threads=2, segment=0.5)
    assert bag.models[0].segment == 1 and bag.max_allowed_segment == 1.0
    assert max_segment(bag.models[0]) == 1.0


def test_command_line_backend(backend_repo, onnx_cache, tmp_path):
    """`demucs --backend onnxruntime` writes the torch backend's stems; with --onnx-dir alone
    the model name comes from the export."""
    import soundfile
    from demucs.separate import main
    track = tmp_path / "song.wav"
    soundfile.write(str(track), noise(1.5).T.numpy(), 44100, subtype="FLOAT")
    common = ["--repo", str(backend_repo), "-d", "cpu", "--float32", str(track)]
    for backend in ["torch", "onnxruntime"]:
        random.seed(0)
        main(["-n", "htdemucs_small", "-o", str(tmp_path / backend), "--backend", backend,
              *common])
    random.seed(0)
    main(["-o", str(tmp_path / "dir"), "--backend", "onnxruntime", "--onnx-dir",
          str(next(onnx_cache.iterdir())), *common])
    for source in ["drums", "bass", "other", "vocals"]:
        stems = [soundfile.read(str(tmp_path / backend / "htdemucs_small" / "song" /
                                    f"{source}.wav"))[0]
                 for backend in ["torch", "onnxruntime", "dir"]]
        for other in stems[1:]:
            assert relative_error(torch.from_numpy(other), torch.from_numpy(stems[0])) \
                <= TOLERANCE, source


@pytest.mark.parametrize("flags, message", [
    (["--onnx-dir", "x"], "--onnx-dir is used by the ONNX Runtime backend: add --backend "
                          "onnxruntime"),
    (["--backend", "onnxruntime", "--amp", "bf16"], "--amp is an option of the torch backend"),
    (["--backend", "onnxruntime", "--compile"], "--compile is an option of the torch backend"),
])
def test_command_line_backend_usage_errors(backend_repo, tmp_path, caplog, flags, message):
    from demucs.separate import main
    track = tmp_path / "song.wav"
    track.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["-n", "hdemucs_cac", "--repo", str(backend_repo), "-d", "cpu",
              "-o", str(tmp_path / "out"), *flags, str(track)])
    assert exit_info.value.code == 1
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_devices_the_backend_cannot_use():
    from demucs.onnx_runtime import providers_for_device
    assert providers_for_device("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="runs on cpu or cuda, not mps"):
        providers_for_device("mps")
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="install onnxruntime-gpu"):
            providers_for_device("cuda:0")


def test_test_pretrained_scores_the_onnx_backend(backend_repo, onnx_cache, tiny_musdb):
    """tools.test_pretrained --backend onnxruntime gives the torch backend's nSDR."""
    from tools import test_pretrained
    overrides = ["dset=toy", f"dset.musdb={tiny_musdb}", "dset.musdb_samplerate=8000",
                 "test.sdr=false", "test.shifts=0"]
    scores = {backend: test_pretrained.run("htdemucs_small", backend_repo, overrides,
                                           backend=backend)
              for backend in ["torch", "onnxruntime"]}
    assert set(scores["torch"]) == set(scores["onnxruntime"])
    for key, value in scores["torch"].items():
        assert abs(scores["onnxruntime"][key] - value) < 1e-3, key


def test_an_unwritable_export_folder_is_named(backend_repo, tmp_path):
    from demucs.api import LoadModelError
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(LoadModelError, match=r"could not write the ONNX export of "
                                             r"htdemucs_small: .*file.*--onnx-dir"):
        separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5),
                      onnx_dir=not_a_folder / "sub")


# ----------------------------------------------------------------------------------------------
# Issue 30: an export records the weights it came from and each file it wrote; a stale,
# damaged or foreign export is rebuilt (cache) or refused in one line (--onnx-dir).

def _export_of(exports, case: str = "htdemucs_small") -> Path:
    """The module's export of `case` (read it, never change it)."""
    return exports.bag(case, 3 * 44100, {"overlap": 0.25})


def _copy_of_export(exports, tmp_path: Path, case: str = "htdemucs_small",
                    name: str = "copy") -> Path:
    folder = tmp_path / name
    shutil.copytree(_export_of(exports, case), folder)
    return folder


def _edit_manifest(folder: Path, edit: tp.Callable[[dict], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _forget_file_sums(manifest: dict) -> None:
    """What the manifest of an export made before the file sums looked like."""
    manifest.pop("weights_digest", None)
    for entry in manifest["models"]:
        for graph in entry["graphs"]:
            del graph["bytes"], graph["sha256"]


def _damage(folder: Path, damage: str) -> Path:
    graph = folder / f"{read_manifest(folder)['name']}_0.onnx"
    data = graph.read_bytes()
    if damage == "delete":
        graph.unlink()
    elif damage == "flip":  # same size, one byte changed
        graph.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        graph.write_bytes(data[:len(data) // 2])
    elif damage == "truncate_old_export":
        _edit_manifest(folder, _forget_file_sums)
        graph.write_bytes(data[:len(data) // 2])
    elif damage == "other_weights":
        _edit_manifest(folder, lambda manifest: manifest.update(weights_digest="0" * 64))
    return graph


def _retrained(model: torch.nn.Module) -> torch.nn.Module:
    """`model` after some more training: the same architecture, other weights."""
    model = deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    return model


def test_manifest_records_the_weights_and_each_file(exports, backend_repo):
    from demucs.api import load_model
    from demucs.onnx_export import weights_digest
    folder = _export_of(exports)
    manifest = read_manifest(folder)
    model = exports.model("htdemucs_small")
    assert manifest["weights_digest"] == weights_digest(model)
    assert manifest["weights_digest"] == weights_digest(load_model("htdemucs_small",
                                                                   backend_repo))
    assert weights_digest(_retrained(model)) != manifest["weights_digest"]
    graph = manifest["models"][0]["graphs"][0]
    assert graph["bytes"] == (folder / graph["file"]).stat().st_size
    assert graph["sha256"] == file_sha256(folder / graph["file"])
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("damage, problem", [
    ("truncate", r"has \d+ bytes, not the \d+ the export wrote \(incomplete or damaged\)"),
    ("flip", r"differs from the file the export wrote \(its sha256 is not the manifest's"),
    ("delete", "is missing"),
    ("truncate_old_export", r"cannot be read by ONNX Runtime \(InvalidProtobuf: Protobuf "
                            r"parsing failed; truncated or damaged\)"),
])
def test_a_damaged_graph_file_is_named(exports, tmp_path, damage, problem):
    folder = _copy_of_export(exports, tmp_path)
    graph = _damage(folder, damage)
    with pytest.raises(OnnxExportCorruptError, match=problem) as error:
        load_onnx_bag(folder, threads=1)
    assert error.value.path == graph
    assert str(error.value).startswith(str(graph)) and "\n" not in str(error.value)
    assert "python3 -m tools.export_onnx" in str(error.value)


def test_an_interrupted_export_keeps_the_previous_one(exports, tmp_path, monkeypatch):
    """The graphs are made in a hidden folder and moved in at the end: an export stopped
    half-way (here: Ctrl-C while tracing) leaves the earlier export of the folder usable."""
    from demucs import onnx_export
    folder = _copy_of_export(exports, tmp_path)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(onnx_export, "export_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_bag(exports.model("htdemucs_small"), folder, name="htdemucs_small")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    load_onnx_bag(folder, threads=1)


def test_abandoned_partial_exports_are_removed(tmp_path):
    import os
    import time
    from demucs.onnx_export import remove_abandoned_exports
    dead = tmp_path / "a.partial-999999999"
    alive = tmp_path / f"b.partial-{os.getpid()}"
    recent = tmp_path / "c.partial-999999998"
    for folder in (dead, alive, recent):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "x.onnx").write_bytes(b"x")
    old = time.time() - 7200
    for path in [dead, dead / "sub", dead / "sub" / "x.onnx", alive, alive / "sub",
                 alive / "sub" / "x.onnx"]:
        os.utime(path, (old, old))
    assert remove_abandoned_exports(tmp_path) == [dead]
    assert alive.is_dir() and recent.is_dir() and not dead.exists()


def _cache_folder(backend_repo: Path, onnx_cache: Path, case: str = "htdemucs_small") -> Path:
    from demucs.api import load_model
    from demucs.onnx_export import model_digest
    return onnx_cache / f"{case}-{model_digest(load_model(case, backend_repo))[:16]}"


@pytest.fixture
def counted_exports(exports, monkeypatch) -> tp.List[Path]:
    """`export_bag` made fast: it copies the module's export of htdemucs_small (the same
    weights) into the folder asked for, and records the folder."""
    from demucs import onnx_export
    calls: tp.List[Path] = []

    def copy_export(model, out, name="model", **kwargs):
        calls.append(Path(out))
        shutil.copytree(_export_of(exports), out, dirs_exist_ok=True)
        return Path(out) / "manifest.json"
    monkeypatch.setattr(onnx_export, "export_bag", copy_export)
    return calls


@pytest.mark.parametrize("damage, warning", [
    ("truncate", "holds htdemucs_small_0.onnx, which has"),
    ("flip", "its sha256 is not the manifest's"),
    ("delete", "holds htdemucs_small_0.onnx, which is missing"),
    ("other_weights", "was exported from other weights (digest 0000000000000000, the model's is "),
    ("truncate_old_export", "htdemucs_small_0.onnx cannot be read by ONNX Runtime"),
])
def test_a_damaged_or_stale_cache_is_exported_again(exports, backend_repo, onnx_cache,
                                                    counted_exports, caplog, damage, warning):
    folder = _cache_folder(backend_repo, onnx_cache)
    shutil.copytree(_export_of(exports), folder)
    _damage(folder, damage)
    caplog.set_level(logging.INFO)
    stems, separator = separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5))
    assert len(counted_exports) == 1  # exported again, once
    warnings = [record.getMessage() for record in caplog.records
                if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warning in warnings[0] and str(folder) in warnings[0]
    assert warnings[0].endswith("exporting htdemucs_small again.")
    assert sorted(path.name for path in onnx_cache.iterdir()) == [folder.name]
    assert read_manifest(folder) == read_manifest(_export_of(exports))
    assert all(torch.isfinite(stem).all() for stem in stems.values())


def test_a_sound_cache_is_reused_and_an_export_of_an_older_demucs_too(
        exports, backend_repo, onnx_cache, counted_exports, caplog):
    """The folder name holds the weights' digest: an old cache without file sums is used."""
    folder = _cache_folder(backend_repo, onnx_cache)
    shutil.copytree(_export_of(exports), folder)
    separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5))
    _edit_manifest(folder, _forget_file_sums)
    separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5))
    assert counted_exports == [] and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_an_interrupted_cache_export_leaves_no_cache(backend_repo, onnx_cache, monkeypatch):
    from demucs import onnx_export

    def interrupted(model, out, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "htdemucs_small_0.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt
    monkeypatch.setattr(onnx_export, "export_bag", interrupted)
    with pytest.raises(KeyboardInterrupt):
        separate_with("onnxruntime", backend_repo, "htdemucs_small", noise(0.5))
    assert list(onnx_cache.iterdir()) == []


def _demucs(*args: tp.Any) -> int:
    """The `demucs` command in this process; its exit status."""
    from demucs.separate import main
    try:
        main(["-d", "cpu", "--shifts", "0", *map(str, args)])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _messages(caplog, level: str) -> tp.List[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == level]


@pytest.fixture
def track(tmp_path) -> Path:
    import soundfile
    path = tmp_path / "song.wav"
    soundfile.write(str(path), noise(0.5).T.numpy(), 44100, subtype="FLOAT")
    return path


def test_onnx_dir_of_other_weights_is_refused(exports, backend_repo, tmp_path, track, caplog):
    """The issue's case: SIG retrained and exported to a new repo, run with the old export."""
    from demucs.states import serialize_model
    folder = _export_of(exports)
    repo2 = tmp_path / "repo2"
    repo2.mkdir()
    torch.save(serialize_model(_retrained(exports.model("htdemucs_small")), {}, half=False),
               repo2 / "htdemucs_small.th")
    out = tmp_path / "out"
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", folder, "--repo", repo2, "-n",
                   "htdemucs_small", "-o", out, track) == 1
    errors = _messages(caplog, "ERROR")
    assert len(errors) == 1 and "\n" not in errors[0]
    digest = read_manifest(folder)["weights_digest"][:16]
    assert errors[0].startswith(f"{folder} was exported from other weights than model "
                                f"htdemucs_small of {repo2} (export digest {digest}, model "
                                f"digest ")
    assert (f"export it again with python3 -m tools.export_onnx htdemucs_small --repo {repo2} "
            f"-o {folder}") in errors[0]
    assert not out.exists()
    caplog.clear()
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", folder, "--repo", backend_repo,
                   "-o", out, track) == 0
    assert not _messages(caplog, "WARNING") and len(list(out.rglob("*.wav"))) == 4


def test_onnx_dir_of_an_older_demucs_loads_with_a_warning(exports, backend_repo, tmp_path,
                                                          caplog):
    from demucs.api import Separator
    folder = _copy_of_export(exports, tmp_path)
    _edit_manifest(folder, _forget_file_sums)
    separator = Separator(repo=backend_repo, device="cpu", backend="onnxruntime",
                          onnx_dir=folder, shifts=0)
    warnings = _messages(caplog, "WARNING")
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{folder / 'manifest.json'} was made by an older demucs and "
                                  f"does not record the weights it was exported from, so it "
                                  f"cannot be checked against model htdemucs_small")
    assert separator.separate_tensor(noise(0.5))[1]["drums"].shape == (2, 22050)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_onnx_dir_is_refused_in_one_line(exports, tmp_path, track, caplog, damage):
    folder = _copy_of_export(exports, tmp_path)
    graph = _damage(folder, damage)
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", folder, "-o", tmp_path / "out",
                   track) == 1
    errors = _messages(caplog, "ERROR")
    assert len(errors) == 1 and errors[0].startswith(str(graph)) and "\n" not in errors[0]
    assert errors[0].endswith(f": export it again with python3 -m tools.export_onnx "
                              f"htdemucs_small [--repo FOLDER] -o {folder}")
    assert not (tmp_path / "out").exists()


def test_onnx_dir_without_manifest_is_refused_before_anything_is_loaded(
        exports, tmp_path, track, caplog, monkeypatch):
    from demucs import backends
    folder = _copy_of_export(exports, tmp_path)
    (folder / "manifest.json").unlink()
    monkeypatch.setattr(backends, "get_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", folder, "-o", tmp_path / "out",
                   track) == 1
    assert _messages(caplog, "ERROR") == [
        f"error: --onnx-dir: {folder} has no manifest.json (it holds htdemucs_small_0.onnx), "
        f"so it is not an output of python3 -m tools.export_onnx (or that export was "
        f"interrupted): export the model there with python3 -m tools.export_onnx NAME "
        f"[--repo FOLDER] -o {folder}"]


def test_onnx_dir_alone_needs_no_pytorch_model_for_a_transformer(
        exports, tmp_path, track, caplog, monkeypatch):
    """The manifest names the model; HTDemucs graphs process every input: nothing is looked
    up (no network), nothing said, and the Python API does the same."""
    from demucs import backends
    from demucs.api import Separator
    folder = _export_of(exports)
    monkeypatch.setattr(backends, "get_model", lambda *a, **k: pytest.fail("a model was loaded"))
    caplog.set_level(logging.INFO)
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", folder, "-o", tmp_path / "out",
                   track) == 0
    assert not _messages(caplog, "WARNING")
    assert len(list((tmp_path / "out" / "htdemucs_small").rglob("*.wav"))) == 4
    separator = Separator(backend="onnxruntime", onnx_dir=folder, device="cpu")
    assert separator.model.sources == ["drums", "bass", "other", "vocals"]


def test_onnx_dir_alone_says_once_why_a_hybrid_model_is_looked_up(
        exports, tmp_path, track, caplog, monkeypatch):
    from demucs import backends
    from demucs.pretrained import ModelLoadingError
    folder = _export_of(exports, "hdemucs_cac")
    looked_up = []

    def not_found(name, repo=None):
        looked_up.append((name, repo))
        raise ModelLoadingError(f"could not load model {name!r}. Looked in:\n- nowhere.")
    monkeypatch.setattr(backends, "get_model", not_found)
    caplog.set_level(logging.INFO)
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", folder, "-o", tmp_path / "out",
                   track) == 0
    assert looked_up == [("hdemucs_cac", None)]
    notes = [message for message in _messages(caplog, "INFO") if "looking up" in message]
    assert notes == [f"{folder}: looking up model hdemucs_cac for the last, shorter segment of "
                     f"each track (its HDemucs graphs process full segments only; --repo "
                     f"FOLDER says where it is)."]
    assert _messages(caplog, "WARNING") == [
        f"{folder}: model hdemucs_cac was not found, so the last, shorter segment of each track "
        f"is zero padded to a full one and its stems there differ from PyTorch's (HDemucs "
        f"normalises its input by its spread); add --repo FOLDER holding hdemucs_cac to avoid "
        f"it."]
    assert len(list(tmp_path.joinpath("out").rglob("*.wav"))) == 4


def test_export_tool_names_a_model_it_cannot_load_or_a_bad_out(backend_repo, tmp_path, capsys):
    from tools import export_onnx
    assert export_onnx.main(["nothere", "--repo", str(backend_repo), "-o",
                             str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tools.export_onnx: cannot load nothere: nothere is neither a single "
                   f"pre-trained model nor a bag of models (looked in {backend_repo})."]
    afile = tmp_path / "file"
    afile.write_text("")
    assert export_onnx.main(["htdemucs_small", "--repo", str(backend_repo), "-o",
                             str(afile)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tools.export_onnx: -o {afile}: {afile} is a file, not a folder; choose another -o."]
    assert not (tmp_path / "out").exists()


def test_an_empty_onnx_dir_is_refused(backend_repo, tmp_path, track, capsys, monkeypatch):
    """`Path("")` is the current folder: exporting into it was never meant."""
    from demucs.api import LoadModelError, Separator
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadModelError, match=r"onnx_dir \(--onnx-dir\) is an empty path"):
        Separator("htdemucs_small", repo=backend_repo, device="cpu", backend="onnxruntime",
                  onnx_dir="")
    assert _demucs("--backend", "onnxruntime", "--onnx-dir", "", track) == 2
    assert "argument --onnx-dir: give a folder, not an empty path" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["song.wav"]
