"""Which model a `Separator` runs and where: devices, backends, loading a model by name, and the
ONNX Runtime backend's export (found, checked against its model, or made once).

The `demucs` command checks its flags with the same functions before it loads anything, so
that a bad device or backend is refused in one line whichever front end is used.
"""
import difflib
import logging
from pathlib import Path
import typing as tp

import torch
from torch import nn

from .bag import BagOfModels
from .catalogue import ModelCatalogue, ModelListing
from .files import describe_write_error
from .pretrained import get_model
from .repo import ModelLoadingError
from .states import ModelPackageError

logger = logging.getLogger(__name__)


class LoadModelError(Exception):
    """The requested model could not be loaded."""


def default_device() -> str:
    """cuda when available, else mps, else cpu: where separation runs unless told."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: tp.Any) -> torch.device:
    """`device` as a `torch.device` this torch build can run on, else `ValueError` saying why
    (an unknown name, no CUDA or MPS in this build or machine, an index past the last GPU)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no usable GPU"
            raise ValueError(f"device {device!r} was asked for but CUDA is not available "
                             f"(torch {torch.__version__}: {build}); use -d cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} GPU(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}.")
    elif parsed.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} was asked for but MPS is not available on "
                             "this machine; use -d cpu.")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps.")
    return parsed


BACKENDS = ("torch", "onnxruntime")


def check_backend(backend: str, device: tp.Any, amp: tp.Optional[str] = None,
                  compile_model: bool = False,
                  option_names: tp.Tuple[str, str] = ("amp", "compile_model")) -> None:
    """Raises `ValueError` when `backend` is unknown or cannot run with these options, and
    `ImportError` (saying what to install) when onnxruntime is asked for but missing. The
    messages call `amp` and `compile_model` by `option_names` (the command's flags)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return
    for option, value in zip(option_names, [amp, compile_model]):
        if value:
            raise ValueError(f"{option} is an option of the torch backend; the onnxruntime "
                             f"backend runs the exported float32 (or int8) graphs as they "
                             f"are: leave {option} out")
    from .onnx_runtime import providers_for_device
    providers_for_device(device)


def load_model(name: str, repo: tp.Optional[Path] = None) -> nn.Module:
    """`demucs.pretrained.get_model`, with its errors as `LoadModelError` (which name the
    closest known model when `name` looks like a typo of one)."""
    try:
        return get_model(name=name, repo=repo)
    except (ModelLoadingError, ModelPackageError) as error:
        raise LoadModelError(_with_close_name(str(error), name, repo)) from error


def _with_close_name(message: str, name: str, repo: tp.Optional[Path]) -> str:
    """`message` with "(did you mean 'X'?)" on its first line when a known model name is close
    to `name`."""
    try:
        models = list_models(repo)
    except (LoadModelError, ModelLoadingError, OSError):
        return message
    known = [str(model) for kind in models.values() for model in kind]
    close = [match for match in difflib.get_close_matches(name, known, n=1, cutoff=0.75)
             if match != name]
    if not close:
        return message
    first, *rest = message.split("\n")
    hint = f"did you mean {close[0]!r}?"
    lead = f"could not load model {name!r}."
    first = first.replace(lead, f"{lead[:-1]} ({hint}).") if lead in first \
        else f"{first.rstrip('.')}. {hint[0].upper()}{hint[1:]}"
    return "\n".join([first, *rest])


def onnx_dir_path(onnx_dir: tp.Union[str, Path]) -> Path:
    """`onnx_dir` as a `Path`; `LoadModelError` for an empty one (`Path("")` is the current
    folder, where nothing should be exported unasked)."""
    if not str(onnx_dir).strip():
        raise LoadModelError("onnx_dir (--onnx-dir) is an empty path: give the folder of an "
                             "export made with python3 -m tools.export_onnx, or a new folder "
                             "to export the model into")
    return Path(onnx_dir)


def onnx_dir_manifest(onnx_dir: tp.Union[str, Path]) -> tp.Optional[dict]:
    """The manifest of the export in `onnx_dir`, or None when the folder holds no export yet
    (it does not exist, or holds no `.onnx` file): the model is then exported there.
    `LoadModelError` (one line saying what to do) for a file, a folder of `.onnx` files without
    `manifest.json`, or an unreadable manifest."""
    from .onnx_runtime import MANIFEST, OnnxManifestError, missing_manifest_message, \
        read_manifest
    folder = onnx_dir_path(onnx_dir)
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise LoadModelError(f"{folder} is a file, not a folder: give the folder of an export "
                             f"made with python3 -m tools.export_onnx, or a new folder to "
                             f"export the model into")
    if not (folder / MANIFEST).exists():
        if any(folder.glob("*.onnx")):
            raise LoadModelError(missing_manifest_message(folder))
        return None
    try:
        return read_manifest(folder)
    except OnnxManifestError as error:
        raise LoadModelError(str(error)) from error


def reexport_command(name: str, repo: tp.Optional[Path], folder: Path,
                     manifest: tp.Optional[dict] = None) -> str:
    """The `tools.export_onnx` command that makes the export in `folder` again (with the
    `--segment` and `--quantize` options recorded in its manifest)."""
    words = ["python3 -m tools.export_onnx", name]
    words += ["--repo", str(repo)] if repo is not None else ["[--repo FOLDER]"]
    manifest = manifest or {}
    if manifest.get("export_segment") is not None:
        words += ["--segment", str(manifest["export_segment"])]
    quantize = {entry.get("quantize") for entry in manifest.get("models", [])} - {None}
    words += [f"--quantize {mode}" for mode in sorted(quantize)]
    return " ".join(words + ["-o", str(folder)])


def find_or_export_onnx(name: str, repo: tp.Optional[Path] = None,
                        onnx_dir: tp.Optional[Path] = None
                        ) -> tp.Tuple[Path, tp.Optional[nn.Module]]:
    """The ONNX export of model `name` (from `repo`) for the onnxruntime backend, and the
    PyTorch model behind it (see `demucs.onnx_runtime.OnnxRuntimeModel`'s `fallback`).

    Without `onnx_dir`, the PyTorch model is loaded and its export in the cache of
    `demucs.onnx_export.cached_export` is used, made (or made again, when it is of other
    weights or damaged) first. An `onnx_dir` without an export gets one. An `onnx_dir` export
    is checked (manifest, size and sha256 of each graph) and used as it is; the PyTorch model is
    loaded only where it is needed or asked for: with `repo`, or for the Demucs/HDemucs graphs,
    which process full segments only (it is then looked up with a one-line note, and a warning
    says what changes when it is not found). When loaded, its weights must be those the export
    was made from (the manifest's `weights_digest`).

    Raises `LoadModelError` (one line saying what to do) for a model that cannot be loaded or
    exported, a folder that is not an export, a damaged export, or an export of another model
    or of other weights."""
    from . import onnx_export
    if onnx_dir is not None:
        manifest = onnx_dir_manifest(onnx_dir)
        if manifest is not None:
            return Path(onnx_dir), _model_behind_export(Path(onnx_dir), manifest, name, repo)
        logger.info("%s holds no ONNX export yet: exporting model %s there.", onnx_dir, name)
    model = load_model(name, repo)
    target = onnx_export.default_cache_root() if onnx_dir is None else Path(onnx_dir)
    try:
        if onnx_dir is None:
            return onnx_export.cached_export(model, name), model
        onnx_export.export_bag(model, onnx_dir, name=onnx_export.file_stem(name))
    except onnx_export.OnnxExportError as error:
        raise LoadModelError(f"{name} cannot run with the onnxruntime backend: {error}") \
            from error
    except OSError as error:
        raise LoadModelError(f"could not write the ONNX export of {name}: "
                             f"{describe_write_error(error, target)}; give a writable folder "
                             f"with onnx_dir (--onnx-dir)") from error
    return Path(onnx_dir), model


def _model_behind_export(folder: Path, manifest: dict, name: str,
                         repo: tp.Optional[Path]) -> tp.Optional[nn.Module]:
    """The PyTorch model of the export in `folder` (see `find_or_export_onnx`), or None."""
    from .onnx_export import weights_digest
    from .onnx_runtime import OnnxExportCorruptError, check_graph_files
    _check_export_is_of_model(folder, name, manifest)
    command = reexport_command(name, repo, folder, manifest)
    try:
        check_graph_files(folder, manifest)
    except OnnxExportCorruptError as error:
        raise LoadModelError(f"{error.path} {error.problem}: export it again with "
                             f"{command}") from error
    padded = sorted({entry["class"].rsplit(".", 1)[-1] for entry in manifest["models"]
                     if entry["pad"] != "end"})
    if repo is None and not padded:
        return None  # transformer graphs process every input: nothing to load or compare
    if repo is None:
        logger.info("%s: looking up model %s for the last, shorter segment of each track (its "
                    "%s graphs process full segments only; --repo FOLDER says where it is).",
                    folder, name, "/".join(padded))
    try:
        model = load_model(name, repo)
    except LoadModelError:
        if repo is not None:
            raise
        logger.warning("%s: model %s was not found, so the last, shorter segment of each track "
                       "is zero padded to a full one and its stems there differ from PyTorch's "
                       "(%s normalises its input by its spread); add --repo FOLDER holding %s "
                       "to avoid it.", folder, name, "/".join(padded), name)
        return None
    exported = manifest.get("weights_digest")
    if exported is None:
        logger.warning("%s was made by an older demucs and does not record the weights it was "
                       "exported from, so it cannot be checked against model %s; %s adds the "
                       "check.", folder / "manifest.json", name, command)
    else:
        digest = weights_digest(model)
        if digest != exported:
            origin = f"model {name} of {repo}" if repo is not None else f"model {name}"
            raise LoadModelError(
                f"{folder} was exported from other weights than {origin} (export digest "
                f"{exported[:16]}, model digest {digest[:16]}): export it again with "
                f"{command}, or give the repo of the model it was exported from")
    return model


def _check_export_is_of_model(folder: Path, name: str, manifest: dict) -> None:
    from .onnx_export import file_stem
    exported = manifest.get("name")
    if exported is not None and exported != file_stem(name):
        raise LoadModelError(
            f"{folder} holds an ONNX export of {exported!r}, not of {name!r}: ask for model "
            f"{exported!r} (or leave the model out), or give another onnx_dir (--onnx-dir)")


def load_onnx_model(folder: Path, device: tp.Any = "cpu",
                    pytorch_model: tp.Optional[nn.Module] = None,
                    advice: tp.Optional[str] = None) -> BagOfModels:
    """The export in `folder` as a bag of ONNX Runtime models running on `device` (cpu or
    cuda), `pytorch_model` serving the input lengths without a graph. `LoadModelError` for an
    unreadable export; a damaged graph file is named, followed by `advice` (what to do)."""
    from .onnx_runtime import OnnxExportCorruptError, OnnxManifestError, load_onnx_bag, \
        providers_for_device
    try:
        return load_onnx_bag(folder, providers=providers_for_device(device),
                             pytorch_model=pytorch_model)
    except OnnxExportCorruptError as error:
        if advice is None:
            raise LoadModelError(str(error)) from error
        raise LoadModelError(f"{error.path} {error.problem}: {advice}") from error
    except (OnnxManifestError, KeyError) as error:
        raise LoadModelError(f"could not load the ONNX export {folder}: {error}") from error


def load_onnx_backend(name: str, repo: tp.Optional[Path], onnx_dir: tp.Optional[Path],
                      device: tp.Any) -> tp.Tuple[Path, tp.Optional[nn.Module], BagOfModels]:
    """`find_or_export_onnx` then `load_onnx_model`: the export folder, the PyTorch model and
    the bag of ONNX Runtime models. A cached export that ONNX Runtime cannot read (one made by
    an older demucs, whose manifest records no file sizes) is exported again, once."""
    from .onnx_export import cached_export
    folder, pytorch_model = find_or_export_onnx(name, repo, onnx_dir)
    if onnx_dir is not None:
        manifest = onnx_dir_manifest(folder)
        advice = f"export it again with {reexport_command(name, repo, folder, manifest)}"
        return folder, pytorch_model, load_onnx_model(folder, device, pytorch_model, advice)
    try:
        return folder, pytorch_model, load_onnx_model(folder, device, pytorch_model)
    except LoadModelError as error:
        from .onnx_runtime import OnnxExportCorruptError
        if pytorch_model is None or not isinstance(error.__cause__, OnnxExportCorruptError):
            raise
        logger.warning("The cached ONNX export %s: %s; exporting %s again.", folder,
                       f"{error.__cause__.path.name} {error.__cause__.problem}", name)
    folder = cached_export(pytorch_model, name, rebuild=True)
    return folder, pytorch_model, load_onnx_model(folder, device, pytorch_model)


def compile_leaves(model: nn.Module) -> None:
    """Compile every model of `model` (a model or a bag, nested or not) in place with
    `torch.compile`: the objects keep their class and attributes."""
    if isinstance(model, BagOfModels):
        for member in model.models:
            compile_leaves(member)
    else:
        model.compile()


def list_models(repo: tp.Optional[Path] = None) -> ModelListing:
    """Available models: `{"single": {sig: location}, "bag": {name: yaml}}`, of the release, or
    of the folder `repo`; `LoadModelError` when `repo` is not a folder or cannot be listed."""
    try:
        return ModelCatalogue(repo).list_models()
    except ModelLoadingError as error:
        raise LoadModelError(str(error)) from None
