"""Python API for music source separation.

    from demucs.api import Separator
    separator = Separator(model="htdemucs")
    origin, stems = separator.separate_audio_file("song.mp3")   # stems: {"drums": tensor, ...}

`Separator.separate_audio_file_in_blocks` does the same with memory bounded independently of the
track's duration: the decoded track is kept in a temporary file (`demucs.audio.DecodedAudio`)
and separated block by block. `python -m demucs.api` is the `demucs` command.
"""
from concurrent.futures import ThreadPoolExecutor
import dataclasses
import os
from pathlib import Path
import runpy
import typing as tp

import numpy as np
import torch

from .allocator import tune_malloc
from .apply import ApplyOptions, apply_with_options
from .plan import is_real, is_whole, stem_indices
from .audio import AudioFile, AudioReadError, DecodedAudio, check_finite, convert_audio, \
    convert_audio_channels, save_audio
from .backends import LoadModelError, check_backend, check_device, compile_leaves, \
    default_device, list_models, load_model, load_onnx_backend, load_onnx_model, \
    onnx_dir_manifest, onnx_dir_path
from .bag import max_segment
from .files import describe_spool_error
from .pretrained import DEFAULT_MODEL
from .streaming import stream_with_options
from .utils import DummyPoolExecutor
# Names Demucs 4.1's api module makes importable from it.
from .apply import apply_model  # noqa: F401
from .htdemucs import HTDemucs  # noqa: F401
from .pretrained import REMOTE_ROOT, get_model  # noqa: F401
from .repo import BagOnlyRepo, LocalRepo, ModelOnlyRepo, RemoteRepo  # noqa: F401
from .utils import fatal  # noqa: F401

__all__ = ["Separator", "list_models", "save_audio", "LoadAudioError", "LoadModelError"]


class LoadAudioError(Exception):
    """The input audio could not be read."""


class _NotProvidedType:
    pass


NotProvided = _NotProvidedType()


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


def check_jobs(jobs: tp.Any) -> None:
    """`TypeError`/`ValueError` unless `jobs` (threads processing segments) is a whole number
    >= 0."""
    if not is_whole(jobs):
        raise TypeError(f"jobs must be a whole number, got {jobs!r}")
    if jobs < 0:
        raise ValueError(f"jobs must be 0 or more, got {jobs}")


class SegmentTooLongError(ValueError):
    """A segment longer than the model accepts; `limit` is the longest it accepts, in seconds."""

    def __init__(self, message: str, limit: float):
        super().__init__(message)
        self.limit = limit


def check_segment_fits(model: tp.Any, name: str, segment: tp.Optional[float]) -> None:
    """`SegmentTooLongError` when `segment` seconds is longer than `model` (named `name`)
    accepts: see `demucs.bag.max_segment`."""
    limit = max_segment(model)
    if segment is not None and segment > limit:
        raise SegmentTooLongError(f"segment {segment} s is longer than model {name} allows: at "
                                  f"most {limit} s.", limit)


def check_samplerate(sr: tp.Any) -> None:
    """`TypeError`/`ValueError` unless `sr` is None or a positive whole number of Hz."""
    if sr is None:
        return
    if not is_real(sr) or int(sr) != sr:
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
        stems: the stems to compute and return (e.g. `["vocals"]`), None for all: the models
            of a bag whose weights are zero for all of them are not run, and the stems come out
            bit for bit as in a full separation.
    """

    def __init__(self, model: tp.Optional[str] = None, repo: tp.Optional[Path] = None,
                 device: str = default_device(), shifts: int = 1, overlap: float = 0.25,
                 split: bool = True, segment: tp.Optional[float] = None, jobs: int = 0,
                 progress: bool = False, callback: tp.Optional[tp.Callable[[dict], None]] = None,
                 callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                 compile_model: bool = False, backend: str = "torch",
                 onnx_dir: tp.Optional[Path] = None, segment_batch: int = 1,
                 stems: tp.Optional[tp.Sequence[str]] = None):
        tune_malloc()
        # Everything is checked before the model is loaded (maybe downloaded).
        self._options = ApplyOptions(shifts=shifts, split=split, overlap=overlap,
                                     segment=segment, amp=amp, segment_batch=segment_batch,
                                     stems=stems)
        check_jobs(jobs)
        check_device(device)
        check_backend(backend, device, amp, compile_model)
        if onnx_dir is not None and backend != "onnxruntime":
            raise ValueError(f"onnx_dir is used by the onnxruntime backend only: add "
                             f"backend='onnxruntime' (or leave onnx_dir={str(onnx_dir)!r} out)")
        self._name = model_name(model, onnx_dir if backend == "onnxruntime" else None)
        self._repo = repo
        self._backend = backend
        self._onnx_dir = None if onnx_dir is None else onnx_dir_path(onnx_dir)
        self._device = device
        self._load_model()
        check_segment_fits(self._model, self._name, segment)
        stem_indices(self._model.sources, self._options.stems)
        if compile_model:
            compile_leaves(self._model)
        self._jobs = jobs
        self._pool = _segment_pool(jobs)
        self._progress = progress
        self._callback = callback
        self._callback_arg = callback_arg

    def update_parameter(self, device: tp.Any = NotProvided, shifts: tp.Any = NotProvided,
                         overlap: tp.Any = NotProvided, split: tp.Any = NotProvided,
                         segment: tp.Any = NotProvided, jobs: tp.Any = NotProvided,
                         progress: tp.Any = NotProvided, callback: tp.Any = NotProvided,
                         callback_arg: tp.Any = NotProvided, amp: tp.Any = NotProvided,
                         segment_batch: tp.Any = NotProvided, stems: tp.Any = NotProvided) -> None:
        """Change some separation parameters; those not given keep their value. An invalid
        value raises before anything changes."""
        changes = {name: value for name, value in dict(
            shifts=shifts, overlap=overlap, split=split, segment=segment, amp=amp,
            segment_batch=segment_batch, stems=stems).items() if value is not NotProvided}
        options = dataclasses.replace(self._options, **changes)
        if "segment" in changes:
            check_segment_fits(self._model, self._name, options.segment)
        stem_indices(self._model.sources, options.stems)
        if jobs is not NotProvided:
            check_jobs(jobs)
        new_device = self._device if device is NotProvided else device
        if device is not NotProvided:
            check_device(device)
        if self._backend == "onnxruntime" and (device is not NotProvided or "amp" in changes):
            check_backend(self._backend, new_device, options.amp)
        moves_sessions = (self._backend == "onnxruntime"
                          and torch.device(new_device) != torch.device(self._device))
        self._options = options
        self._device = new_device
        if moves_sessions:
            self._model = load_onnx_model(self._onnx_folder, self._device, self._pytorch_model)
        if jobs is not NotProvided:
            self._jobs = jobs
            self._pool = _segment_pool(jobs)
        if progress is not NotProvided:
            self._progress = progress
        if callback is not NotProvided:
            self._callback = callback
        if callback_arg is not NotProvided:
            self._callback_arg = callback_arg

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

    def _run_kwargs(self) -> dict:
        """How the separation runs, besides `self._options`."""
        # ONNX Runtime sessions take CPU arrays and move them to their own device themselves.
        device = "cpu" if self._backend == "onnxruntime" else self._device
        return dict(device=device, progress=self._progress, num_workers=self._jobs,
                    callback=self._callback)

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
        out = apply_with_options(self._model, norm.apply(wav)[None], self._options,
                                 pool=self._pool, callback_arg=self._callback_arg_for(wav.shape[1]),
                                 **self._run_kwargs())
        out = norm.revert(out)
        return wav, dict(zip(self.stems, out[0]))

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
        if not self._options.split:
            raise ValueError("separating in blocks needs split=True")
        with self._decode_to_spool(audio_path(file)) as audio:
            norm = Normalisation(audio.mono_mean, audio.mono_std)
            blocks = stream_with_options(self._model, NormalisedTrack(audio, norm),
                                         self._options, block_seconds=block_seconds,
                                         callback_arg=self._callback_arg_for(audio.length),
                                         **self._run_kwargs())
            for start, out in blocks:
                out = norm.revert(out)
                origin = audio.read(start, start + out.shape[-1])
                yield origin, dict(zip(self.stems, out[0]))

    @property
    def stems(self) -> tp.List[str]:
        """The stems a separation returns: those asked for with `stems`, else every source."""
        return list(self._options.stems or self._model.sources)

    @property
    def samplerate(self) -> int:
        return self._samplerate

    @property
    def audio_channels(self) -> int:
        return self._audio_channels

    @property
    def model(self):
        return self._model


def _segment_pool(jobs: int) -> tp.Any:
    """The threads a `Separator` evaluates segments in: `jobs` of them, none for 0."""
    return ThreadPoolExecutor(jobs) if jobs > 0 else DummyPoolExecutor()


if __name__ == "__main__":
    # `python -m demucs.api` (upstream's demonstration of this API) is the `demucs` command: it
    # takes the same flags and separates through `Separator`. It is run as a module so that
    # importing demucs.api never imports demucs.separate (which imports this module).
    runpy.run_module("demucs", run_name="__main__")
