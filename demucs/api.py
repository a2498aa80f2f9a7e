"""Python API for music source separation.

    from demucs.api import Separator
    separator = Separator(model="htdemucs")
    origin, stems = separator.separate_audio_file("song.mp3")   # stems: {"drums": tensor, ...}

`Separator.separate_audio_file_in_blocks` does the same with memory bounded independently of the
track's duration: the decoded track is kept in a temporary file (`demucs.audio.DecodedAudio`)
and separated block by block. `python -m demucs.api` is the `demucs` command.
"""
from concurrent.futures import ThreadPoolExecutor
import logging
from pathlib import Path
import runpy
import typing as tp

import torch
from torch import nn

from .allocator import tune_malloc
from .apply import ApplyOptions, BagOfModels, apply_model, apply_model_streaming, \
    leaf_max_segment
from .audio import AudioFile, AudioReadError, DecodedAudio, check_finite, convert_audio, \
    convert_audio_channels, save_audio
from .files import describe_spool_error, describe_write_error
from .htdemucs import HTDemucs  # noqa: F401  (importable from here, as in Demucs 4.1)
from .pretrained import DEFAULT_MODEL, REMOTE_ROOT, _parse_remote_files, get_model
from .repo import BagOnlyRepo, LocalRepo, ModelLoadingError, ModelOnlyRepo, RemoteRepo
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
    """`demucs.pretrained.get_model`, with its errors as `LoadModelError`."""
    try:
        return get_model(name=name, repo=repo)
    except (ModelLoadingError, ModelPackageError) as error:
        raise LoadModelError(str(error)) from error


def find_or_export_onnx(name: str, repo: tp.Optional[Path] = None,
                        onnx_dir: tp.Optional[Path] = None
                        ) -> tp.Tuple[Path, tp.Optional[nn.Module]]:
    """The ONNX export of model `name` (from `repo`) for the onnxruntime backend, and the
    PyTorch model behind it (see `demucs.onnx_runtime.OnnxRuntimeModel`'s `fallback`).

    `onnx_dir` holding an export of this model is used as it is (its PyTorch model is None when
    it cannot be loaded, with a warning); otherwise the PyTorch model is exported now, into
    `onnx_dir`, or, when None, into the cache of `demucs.onnx_export.cached_export`. Raises
    `LoadModelError` for a model that cannot be loaded or exported, or an export of another
    model."""
    from . import onnx_export
    if onnx_dir is not None and (Path(onnx_dir) / onnx_export.MANIFEST).exists():
        _check_export_is_of_model(Path(onnx_dir), name)
        try:
            return Path(onnx_dir), load_model(name, repo)
        except LoadModelError as error:
            logger.warning("%s: %s. Segments shorter than the exported ones will be zero "
                           "padded, which slightly changes their estimate.", onnx_dir, error)
            return Path(onnx_dir), None
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


def _check_export_is_of_model(folder: Path, name: str) -> None:
    from .onnx_export import file_stem
    from .onnx_runtime import OnnxManifestError, read_manifest
    try:
        exported = read_manifest(folder).get("name")
    except OnnxManifestError as error:
        raise LoadModelError(str(error)) from error
    if exported is not None and exported != file_stem(name):
        raise LoadModelError(
            f"{folder} holds an ONNX export of {exported!r}, not of {name!r}: ask for model "
            f"{exported!r}, or give another onnx_dir (--onnx-dir)")


def load_onnx_model(folder: Path, device: tp.Any = "cpu",
                    pytorch_model: tp.Optional[nn.Module] = None) -> BagOfModels:
    """The export in `folder` as a bag of ONNX Runtime models running on `device` (cpu or
    cuda), `pytorch_model` serving the input lengths without a graph. `LoadModelError` for an
    unreadable export."""
    from .onnx_runtime import OnnxManifestError, load_onnx_bag, providers_for_device
    try:
        return load_onnx_bag(folder, providers=providers_for_device(device),
                             pytorch_model=pytorch_model)
    except (OnnxManifestError, KeyError) as error:
        raise LoadModelError(f"could not load the ONNX export {folder}: {error}") from error


def max_allowed_segment(model) -> float:
    """Longest segment in seconds a model (or bag) can be applied with."""
    if isinstance(model, BagOfModels):
        return model.max_allowed_segment
    return leaf_max_segment(model)


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


# Separator parameters that are `ApplyOptions` fields.
_APPLY_SETTINGS = ("shifts", "overlap", "split", "segment", "amp", "segment_batch")


class Separator:
    """Separate audio with a pre-trained model (or bag of models).

    Args:
        model: model or bag name, or XP signature (default `htdemucs`).
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
            under `torch.hub.get_dir()` and reuses it.
        segment_batch: segments of a track run in one forward (opt-in, for GPUs: see
            `demucs.apply.apply_model`); the output is the same up to float rounding.
    """

    def __init__(self, model: str = DEFAULT_MODEL, repo: tp.Optional[Path] = None,
                 device: str = _default_device(), shifts: int = 1, overlap: float = 0.25,
                 split: bool = True, segment: tp.Optional[float] = None, jobs: int = 0,
                 progress: bool = False, callback: tp.Optional[tp.Callable[[dict], None]] = None,
                 callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                 compile_model: bool = False, backend: str = "torch",
                 onnx_dir: tp.Optional[Path] = None, segment_batch: int = 1):
        tune_malloc()
        check_device(device)  # before the model is loaded (maybe downloaded)
        check_backend(backend, device, amp, compile_model)
        self._name = model
        self._repo = repo
        self._backend = backend
        self._onnx_dir = None if onnx_dir is None else Path(onnx_dir)
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
        if "segment" in given and given["segment"] is not None:
            limit = max_allowed_segment(self._model)
            if given["segment"] > limit:
                raise ValueError(f"segment {given['segment']} s is longer than model "
                                 f"{self._name} allows: at most {limit} s.")
        # the settings apply_model takes are refused by its own checks, before any change
        ApplyOptions(**{key: value for key, value in given.items() if key in _APPLY_SETTINGS})
        if "jobs" in given and given["jobs"] < 0:
            raise ValueError(f"jobs must be 0 or more, got {given['jobs']}")
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
            self._onnx_folder, self._pytorch_model = find_or_export_onnx(
                self._name, self._repo, self._onnx_dir)
            self._model = load_onnx_model(self._onnx_folder, self._device, self._pytorch_model)
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

    def separate_tensor(self, wav: torch.Tensor, sr: tp.Optional[int] = None
                        ) -> tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]:
        """Separate `wav` `[C, T]` (at `sr`, default the model's rate); `wav` is not modified.

        Any channel count is accepted (converted like `convert_audio_channels`). Returns the
        (resampled, channel-converted) input and `{source: [C, T]}`. Raises `ValueError` for
        NaN or infinite samples, and for audio with no sample left at the model's rate.
        """
        if wav.dim() != 2:
            raise ValueError(f"separate_tensor expects [channels, time] audio, got shape "
                             f"{tuple(wav.shape)}")
        check_finite(wav, "the audio to separate", sr or self._samplerate)
        length = wav.shape[-1]
        wav = convert_audio_channels(wav, self._audio_channels)
        if sr is not None and sr != self.samplerate:
            wav = convert_audio(wav, sr, self._samplerate, self._audio_channels)
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
        return self.separate_tensor(self._load_audio(Path(file)), self.samplerate)

    def separate_audio_file_in_blocks(
            self, file: Path, block_seconds: float = 30.
    ) -> tp.Iterator[tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]]:
        """Like `separate_audio_file`, but yield consecutive `(origin, {source: stem})` blocks.

        Memory stays bounded whatever the duration: the decoded track lives in a temporary
        file. Needs `split=True`. Gives the same result as `separate_audio_file`.
        """
        if not self._split:
            raise ValueError("separating in blocks needs split=True")
        with self._decode_to_spool(Path(file)) as audio:
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


def list_models(repo: tp.Optional[Path] = None) -> tp.Dict[str, tp.Dict[str, tp.Union[str, Path]]]:
    """Available models: `{"single": {sig: location}, "bag": {name: yaml}}`."""
    model_repo: ModelOnlyRepo
    if repo is None:
        model_repo = RemoteRepo(_parse_remote_files(REMOTE_ROOT / "files.txt"))
        bag_repo = BagOnlyRepo(REMOTE_ROOT, model_repo)
    else:
        if not Path(repo).is_dir():
            raise LoadModelError(f"model repository {repo} must exist and be a directory.")
        model_repo = LocalRepo(Path(repo))
        bag_repo = BagOnlyRepo(Path(repo), model_repo)
    return {"single": model_repo.list_model(), "bag": bag_repo.list_model()}


if __name__ == "__main__":
    # `python -m demucs.api` (upstream's demonstration of this API) is the `demucs` command: it
    # takes the same flags and separates through `Separator`. It is run as a module so that
    # importing demucs.api never imports demucs.separate (which imports this module).
    runpy.run_module("demucs", run_name="__main__")
