"""Python API for music source separation.

    from demucs.api import Separator
    separator = Separator(model="htdemucs")
    origin, stems = separator.separate_audio_file("song.mp3")   # stems: {"drums": tensor, ...}

`Separator.separate_audio_file_in_blocks` does the same with memory bounded independently of the
track's duration: the decoded track is kept in a temporary file (`demucs.audio.DecodedAudio`)
and separated block by block. `python -m demucs.api` is the `demucs` command.
"""
from concurrent.futures import ThreadPoolExecutor
import difflib
import logging
import numbers
import os
from pathlib import Path
import runpy
import typing as tp

import numpy as np
import torch
from torch import nn

from .allocator import tune_malloc
from .apply import ApplyOptions, apply_model, apply_model_streaming
from .bag import BagOfModels, max_segment
from .audio import AudioFile, AudioReadError, DecodedAudio, check_finite, convert_audio, \
    convert_audio_channels, save_audio
from .files import describe_spool_error, describe_write_error
from .htdemucs import HTDemucs  # noqa: F401  (importable from here, as in Demucs 4.1)
from .catalogue import ModelCatalogue, ModelListing
from .pretrained import DEFAULT_MODEL, REMOTE_ROOT, get_model  # noqa: F401  (REMOTE_ROOT: 4.1)
# The repositories are importable from here, as in Demucs 4.1.
from .repo import BagOnlyRepo, LocalRepo, ModelLoadingError, ModelOnlyRepo, RemoteRepo  # noqa: F401
from .states import ModelPackageError
from .utils import DummyPoolExecutor, fatal  # noqa: F401  (fatal: as in Demucs 4.1)

__all__ = ["Separator", "list_models", "save_audio", "LoadAudioError", "LoadModelError"]

logger = logging.getLogger(__name__)


class LoadAudioError(Exception):
    """The input audio could not be read."""


class LoadModelError(Exception):
    """The requested model could not be loaded."""


class _NotProvidedType:
    pass


NotProvided = _NotProvidedType()


def _default_device() -> str:
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


class Normalisation(tp.NamedTuple):
    """Per-track normalisation: mean and standard deviation of the mono mix."""
    mean: float
    std: float

    @classmethod
    def of(cls, wav: torch.Tensor) -> "Normalisation":
        ref = wav.mean(0)
        std = float(ref.std()) if ref.numel() > 1 else 0.  # one sample has no spread, not NaN
        return cls(float(ref.mean()), std)

    def apply(self, wav: torch.Tensor) -> torch.Tensor:
        return (wav - self.mean) / (self.std + 1e-8)

    def revert(self, wav: torch.Tensor) -> torch.Tensor:
        return wav * (self.std + 1e-8) + self.mean


class NormalisedTrack:
    """A decoded track seen as its normalised mix `[1, C, T]`, read lazily by slicing the time:
    what `apply_model_streaming` takes."""

    def __init__(self, audio: DecodedAudio, normalisation: Normalisation):
        self.audio = audio
        self.normalisation = normalisation

    @property
    def shape(self) -> tp.Tuple[int, int, int]:
        return (1, self.audio.channels, self.audio.length)

    def __getitem__(self, index: tp.Any) -> torch.Tensor:
        time = index[-1] if isinstance(index, tuple) else index
        if not isinstance(time, slice) or time.step not in (None, 1):
            raise IndexError("a NormalisedTrack is indexed with a contiguous slice on time")
        start, end, _ = time.indices(self.audio.length)
        return self.normalisation.apply(self.audio.read(start, max(start, end)))[None]


def model_name(model: tp.Any, onnx_dir: tp.Optional[Path] = None) -> str:
    """The model `Separator(model=..., onnx_dir=...)` loads: `model`, else the model the
    export in `onnx_dir` was made from, else `DEFAULT_MODEL`. `TypeError` for a non-name."""
    if model is None:
        manifest = onnx_dir_manifest(onnx_dir) if onnx_dir is not None else None
        return (manifest or {}).get("name") or DEFAULT_MODEL
    if not isinstance(model, str) or not model:
        hint = ("; for a model file, pass its folder as repo and its name (without .th) as "
                "model" if isinstance(model, os.PathLike) else "")
        raise TypeError(f"model must be the name of a model or bag (e.g. {DEFAULT_MODEL!r}), "
                        f"got {model!r}{hint}")
    return model


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_settings(given: tp.Dict[str, tp.Any]) -> None:
    """Refuses bad separation settings in one line, before anything changes (and before a
    model is loaded): their types here, their values by `ApplyOptions`' own checks."""
    expected = {"shifts": "a whole number", "jobs": "a whole number",
                "overlap": "a number", "segment": "a number of seconds or None"}
    for key, kind in expected.items():
        if key not in given:
            continue
        value = given[key]
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        valid = whole if kind == "a whole number" else \
            _is_number(value) or (key == "segment" and value is None)
        if not valid:
            raise TypeError(f"{key} must be {kind}, got {value!r}")
    ApplyOptions(**{key: value for key, value in given.items() if key in _APPLY_SETTINGS})
    if "jobs" in given and given["jobs"] < 0:
        raise ValueError(f"jobs must be 0 or more, got {given['jobs']}")


def check_samplerate(sr: tp.Any) -> None:
    """`TypeError`/`ValueError` unless `sr` is None or a positive whole number of Hz."""
    if sr is None:
        return
    if not _is_number(sr) or int(sr) != sr:
        raise TypeError(f"sr must be the sample rate of the audio in Hz, a whole number, got "
                        f"{sr!r}")
    if sr <= 0:
        raise ValueError(f"sr must be a positive sample rate in Hz, got {sr}")


# Integer PCM: (offset, full scale), as decoders convert such samples to floats in [-1, 1).
_PCM_SCALES = {torch.int8: (0, 2 ** 7), torch.uint8: (2 ** 7, 2 ** 7),
               torch.int16: (0, 2 ** 15), torch.int32: (0, 2 ** 31)}
_ACCEPTED = ("float samples (float16/32/64, bfloat16) or integer PCM (int8, uint8, int16, "
             "int32)")
# More channels than this, and more than samples: the audio is [time, channels].
_MAX_CHANNELS = 64


def as_audio_tensor(wav: tp.Any, what: str = "the audio to separate") -> torch.Tensor:
    """`wav` (a torch tensor or NumPy array `[channels, time]`) as float32 audio, without
    gradient, its integer PCM scaled to [-1, 1) as ffmpeg and soundfile decode files (int16 /
    32768, uint8 (x - 128) / 128, ...). `TypeError`/`ValueError` naming the type, dtype or
    shape and what is accepted, for anything else."""
    if isinstance(wav, np.ndarray):
        if wav.dtype.kind not in "fiu" or wav.dtype.itemsize > 8:
            raise TypeError(f"{what} is a NumPy array of {wav.dtype}; give {_ACCEPTED}")
        try:
            wav = torch.from_numpy(np.ascontiguousarray(wav))
        except TypeError:  # e.g. uint16, which torch cannot hold
            raise TypeError(f"{what} is a NumPy array of {wav.dtype}; give {_ACCEPTED}") \
                from None
    elif not isinstance(wav, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or NumPy array [channels, time], got "
                        f"{type(wav).__name__}")
    if wav.dtype in _PCM_SCALES:
        offset, scale = _PCM_SCALES[wav.dtype]
        wav = ((wav.detach().double() - offset) / scale).float()
    elif wav.dtype.is_floating_point:
        wav = wav.detach().float()
    else:
        hint = (": divide it by your PCM format's full scale (e.g. 32768 for 16-bit audio) "
                "first" if wav.dtype == torch.int64 else "")
        raise TypeError(f"{what} has dtype {wav.dtype}; give {_ACCEPTED}{hint}")
    if wav.dim() != 2:
        hint = "; for mono audio [time], pass wav[None]" if wav.dim() == 1 else \
            "; for a batch, separate each item" if wav.dim() == 3 else ""
        raise ValueError(f"{what} must be [channels, time], got shape {tuple(wav.shape)}{hint}")
    channels, length = wav.shape
    if channels > _MAX_CHANNELS and channels > length:
        raise ValueError(f"{what} has shape {tuple(wav.shape)}, which looks like [time, "
                         f"channels] (as soundfile.read returns): pass it transposed, "
                         f"[channels, time] (wav.T)")
    if channels == 0 or length == 0:
        raise ValueError(f"{what} is empty (shape {tuple(wav.shape)}): give at least one "
                         f"channel and one sample")
    return wav


def audio_path(file: tp.Any) -> Path:
    """`file` as a `Path`; `TypeError` saying what to call for audio that is not a file."""
    if isinstance(file, (str, bytes, os.PathLike)):
        return Path(os.fsdecode(file))
    hint = (": for audio in memory, call separate_tensor(wav, sr)"
            if isinstance(file, (torch.Tensor, np.ndarray)) else
            ": write it to a file first" if hasattr(file, "read") else "")
    raise TypeError(f"the audio file must be a path (str or pathlib.Path), got "
                    f"{type(file).__name__}{hint}")


# Separator parameters that are `ApplyOptions` fields.
_APPLY_SETTINGS = ("shifts", "overlap", "split", "segment", "amp", "segment_batch")


class Separator:
    """Separate audio with a pre-trained model (or bag of models).

    Args:
        model: model or bag name, or XP signature (default: `htdemucs`, or with `onnx_dir`
            the model its export was made from).
        repo: folder of local models (`SIG[-HASH8].th`, `NAME.yaml`); None for the release.
        device: where to run the model (default: cuda, else mps, else cpu).
        shifts: random shifts averaged (shift trick); 0 disables it.
        overlap: overlap between segments.
        split: process the track in segments (needed for long tracks).
        segment: segment length in seconds (default: the model's); transformer models cannot
            use more than their training segment.
        jobs: threads processing segments in parallel.
        progress: show a progress bar.
        callback, callback_arg: see `demucs.apply.apply_model`.
        amp: mixed precision, "bf16" or "fp16" (opt-in, see `demucs.apply.apply_model`); None
            keeps float32.
        compile_model: compile the model(s) with `torch.compile` (opt-in): the first segments
            are slow while it compiles, the next ones faster; the numbers are float32's up to
            rounding.
        backend: "torch" (default), or "onnxruntime" to run each segment with ONNX Runtime
            (`pip install 'demucs[onnx]'`; docs/onnx.md). Splitting, shifts and bag weights
            stay the same; `amp` and `compile_model` are torch options.
        onnx_dir: with the onnxruntime backend, a folder written by `tools.export_onnx` (or
            where to export `model` the first time); None exports `model` once into a cache
            under `torch.hub.get_dir()` and reuses it. With `onnx_dir`, `model=None` is the
            model its manifest names.
        segment_batch: segments of a track run in one forward (opt-in, for GPUs: see
            `demucs.apply.apply_model`); the output is the same up to float rounding.
    """

    def __init__(self, model: tp.Optional[str] = None, repo: tp.Optional[Path] = None,
                 device: str = _default_device(), shifts: int = 1, overlap: float = 0.25,
                 split: bool = True, segment: tp.Optional[float] = None, jobs: int = 0,
                 progress: bool = False, callback: tp.Optional[tp.Callable[[dict], None]] = None,
                 callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                 compile_model: bool = False, backend: str = "torch",
                 onnx_dir: tp.Optional[Path] = None, segment_batch: int = 1):
        tune_malloc()
        check_device(device)  # before the model is loaded (maybe downloaded)
        check_backend(backend, device, amp, compile_model)
        if onnx_dir is not None and backend != "onnxruntime":
            raise ValueError(f"onnx_dir is used by the onnxruntime backend only: add "
                             f"backend='onnxruntime' (or leave onnx_dir={str(onnx_dir)!r} out)")
        _check_settings(dict(shifts=shifts, overlap=overlap, split=split, segment=segment,
                             amp=amp, segment_batch=segment_batch, jobs=jobs))
        self._name = model_name(model, onnx_dir if backend == "onnxruntime" else None)
        self._repo = repo
        self._backend = backend
        self._onnx_dir = None if onnx_dir is None else onnx_dir_path(onnx_dir)
        self._device = device
        self._load_model()
        if compile_model:
            compile_leaves(self._model)
        self._pool: tp.Any = DummyPoolExecutor()
        self._jobs = 0
        self.update_parameter(device=device, shifts=shifts, overlap=overlap, split=split,
                              segment=segment, jobs=jobs, progress=progress, callback=callback,
                              callback_arg=callback_arg, amp=amp, segment_batch=segment_batch)

    def update_parameter(self, device: tp.Any = NotProvided, shifts: tp.Any = NotProvided,
                         overlap: tp.Any = NotProvided, split: tp.Any = NotProvided,
                         segment: tp.Any = NotProvided, jobs: tp.Any = NotProvided,
                         progress: tp.Any = NotProvided, callback: tp.Any = NotProvided,
                         callback_arg: tp.Any = NotProvided, amp: tp.Any = NotProvided,
                         segment_batch: tp.Any = NotProvided) -> None:
        """Change some separation parameters; those not given keep their value."""
        given = {key: value for key, value in locals().items()
                 if key != "self" and value is not NotProvided}
        _check_settings(given)
        if "segment" in given and given["segment"] is not None:
            limit = max_segment(self._model)
            if given["segment"] > limit:
                raise ValueError(f"segment {given['segment']} s is longer than model "
                                 f"{self._name} allows: at most {limit} s.")
        if "device" in given:
            check_device(given["device"])
        if self._backend == "onnxruntime":
            check_backend(self._backend, given.get("device", self._device), given.get("amp"))
        moves_sessions = (self._backend == "onnxruntime" and "device" in given
                          and torch.device(given["device"]) != torch.device(self._device))
        for key, value in given.items():
            setattr(self, f"_{key}", value)
        if moves_sessions:
            self._model = load_onnx_model(self._onnx_folder, self._device, self._pytorch_model)
        if "jobs" in given:
            self._pool = ThreadPoolExecutor(self._jobs) if self._jobs > 0 else DummyPoolExecutor()

    def _load_model(self) -> None:
        if self._backend == "onnxruntime":
            self._onnx_folder, self._pytorch_model, self._model = load_onnx_backend(
                self._name, self._repo, self._onnx_dir, self._device)
        else:
            self._model = load_model(self._name, self._repo)
        self._audio_channels = self._model.audio_channels
        self._samplerate = self._model.samplerate

    def _load_audio(self, track: Path) -> torch.Tensor:
        try:
            return AudioFile(track).read(streams=0, samplerate=self._samplerate,
                                         channels=self._audio_channels)
        except (AudioReadError, OSError) as error:
            raise LoadAudioError(f"could not load {track}: {error}") from error

    def _decode_to_spool(self, track: Path) -> DecodedAudio:
        try:
            return AudioFile(track).decode_to_spool(self._samplerate, self._audio_channels)
        except AudioReadError as error:
            raise LoadAudioError(str(error)) from error
        except OSError as error:
            raise LoadAudioError(f"could not decode {track}: {describe_spool_error(error)}") \
                from error

    def _apply_kwargs(self) -> dict:
        # ONNX Runtime sessions take CPU arrays and move them to their own device themselves.
        device = "cpu" if self._backend == "onnxruntime" else self._device
        return dict(segment=self._segment, shifts=self._shifts, overlap=self._overlap,
                    device=device, progress=self._progress, amp=self._amp,
                    segment_batch=self._segment_batch)

    def _callback_arg_for(self, length: int) -> dict:
        """The dict each callback call starts from: the user's `callback_arg` and the length."""
        return {**(self._callback_arg or {}), "audio_length": length}

    def separate_tensor(self, wav: tp.Any, sr: tp.Optional[int] = None
                        ) -> tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]:
        """Separate `wav` `[C, T]` (at `sr`, default the model's rate); `wav` is not modified.

        `wav` is a torch tensor or a NumPy array of float samples (any float dtype, e.g. the
        float64 of `soundfile.read`) or of integer PCM (int8, uint8, int16, int32, scaled to
        [-1, 1) as audio files are decoded, e.g. int16 / 32768). Any channel count is accepted
        (converted like `convert_audio_channels`). Returns the (resampled, channel-converted)
        float32 input and `{source: [C, T]}`. Raises `TypeError` for another type or dtype, and
        `ValueError` for another shape, NaN or infinite samples, and audio with no sample (left
        at the model's rate).
        """
        check_samplerate(sr)
        wav = as_audio_tensor(wav)
        check_finite(wav, "the audio to separate", sr or self._samplerate)
        length = wav.shape[-1]
        wav = convert_audio_channels(wav, self._audio_channels)
        if sr is not None and sr != self.samplerate:
            wav = convert_audio(wav, int(sr), self._samplerate, self._audio_channels)
        if wav.shape[-1] == 0:
            raise ValueError(f"the audio to separate ({length} samples at {sr} Hz) holds no "
                             f"sample once resampled to {self._samplerate} Hz")
        norm = Normalisation.of(wav)
        out = apply_model(self._model, norm.apply(wav)[None], split=self._split,
                          num_workers=self._jobs, pool=self._pool, callback=self._callback,
                          callback_arg=self._callback_arg_for(wav.shape[1]),
                          **self._apply_kwargs())
        out = norm.revert(out)
        return wav, dict(zip(self._model.sources, out[0]))

    def separate_audio_file(self, file: Path) -> tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]:
        """Read `file` (any format ffmpeg knows) and separate it."""
        return self.separate_tensor(self._load_audio(audio_path(file)), self.samplerate)

    def separate_audio_file_in_blocks(
            self, file: Path, block_seconds: float = 30.
    ) -> tp.Iterator[tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]]:
        """Like `separate_audio_file`, but yield consecutive `(origin, {source: stem})` blocks.

        Memory stays bounded whatever the duration: the decoded track lives in a temporary
        file. Needs `split=True`. Gives the same result as `separate_audio_file`.
        """
        if not self._split:
            raise ValueError("separating in blocks needs split=True")
        with self._decode_to_spool(audio_path(file)) as audio:
            norm = Normalisation(audio.mono_mean, audio.mono_std)
            blocks = apply_model_streaming(self._model, NormalisedTrack(audio, norm),
                                           block_seconds=block_seconds, num_workers=self._jobs,
                                           callback=self._callback,
                                           callback_arg=self._callback_arg_for(audio.length),
                                           **self._apply_kwargs())
            for start, out in blocks:
                out = norm.revert(out)
                origin = audio.read(start, start + out.shape[-1])
                yield origin, dict(zip(self._model.sources, out[0]))

    @property
    def samplerate(self) -> int:
        return self._samplerate

    @property
    def audio_channels(self) -> int:
        return self._audio_channels

    @property
    def model(self):
        return self._model


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


if __name__ == "__main__":
    # `python -m demucs.api` (upstream's demonstration of this API) is the `demucs` command: it
    # takes the same flags and separates through `Separator`. It is run as a module so that
    # importing demucs.api never imports demucs.separate (which imports this module).
    runpy.run_module("demucs", run_name="__main__")
