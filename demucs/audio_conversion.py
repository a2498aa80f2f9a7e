"""Converting audio tensors: channel count, sample rate, clipping, PCM sample types, and the check
for NaN or infinite samples.

Pure tensor functions, used by the file reader (`demucs.audio_file`), the spool
(`demucs.audio_spool`) and the encoders (`demucs.audio_encoding`); `demucs.audio` re-exports the
public ones under their Demucs 4.1 names.
"""
from fractions import Fraction
import logging
import math
import typing as tp

import julius
import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

CLIP_MODES = ("rescale", "clamp", "tanh", "none")
_I16_SCALE = 2 ** 15 - 1
# julius resamples with a [new, 1, ~old] filter bank for the reduced ratio new/old: past this
# many coefficients (4 MB) the ratio is approximated, since an exact one can need gigabytes
# (44101 -> 44100 Hz: 2e9 coefficients).
_MAX_RESAMPLE_KERNEL = 2 ** 20
_JULIUS_ZEROS, _JULIUS_ROLLOFF = 24, 0.945


def check_finite(wav: torch.Tensor, origin: str, samplerate: int, offset: int = 0) -> None:
    """Raise `ValueError` naming the first NaN or infinite sample of `wav` `[C, T]`, if any.

    Such samples would turn every separated stem into NaN; `offset` is the position of `wav`
    in the whole track, for the time reported.
    """
    bad = ~torch.isfinite(wav)
    if not bad.any():
        return
    first = int(bad.any(0).nonzero()[0, 0]) + offset
    raise ValueError(f"{origin} holds {int(bad.sum())} NaN or infinite sample(s), the first at "
                     f"sample {first} ({first / samplerate:.3f} s); repair or re-encode the audio "
                     "before separating it.")


def convert_audio_channels(wav: torch.Tensor, channels: int = 2) -> torch.Tensor:
    """Convert `[*, C, T]` audio to `channels` channels.

    Mono output is the mean of the input channels; mono input is repeated; extra input channels
    are dropped (the first `channels` are kept). Upmixing from more than one channel is an error.
    """
    *shape, src_channels, length = wav.shape
    if src_channels == channels:
        return wav
    if channels == 1:
        return wav.mean(dim=-2, keepdim=True)
    if src_channels == 1:
        return wav.expand(*shape, channels, length)
    if src_channels > channels:
        return wav[..., :channels, :]
    raise ValueError(f"Cannot convert audio with {src_channels} channels to {channels} channels: "
                     "only mono can be upmixed.")


def convert_audio(wav: torch.Tensor, from_samplerate: float, to_samplerate: float,
                  channels: int) -> torch.Tensor:
    """Convert `[*, C, T]` audio to `channels` channels and resample it (see `resample`)."""
    wav = convert_audio_channels(wav, channels)
    return resample(wav, from_samplerate, to_samplerate)


def _resample_kernel_size(old: int, new: int) -> int:
    """Coefficients of julius' filter bank from `old` to `new` Hz (0 when nothing to do)."""
    gcd = math.gcd(old, new)
    old, new = old // gcd, new // gcd
    if old == new:
        return 0
    width = math.ceil(_JULIUS_ZEROS * old / (_JULIUS_ROLLOFF * min(old, new)))
    return new * (2 * width + old)


def _close_ratio(from_samplerate: int, to_samplerate: int) -> Fraction:
    """The closest fraction to `to / from` whose filter bank fits `_MAX_RESAMPLE_KERNEL`."""
    exact = Fraction(to_samplerate, from_samplerate)
    denominator = min(from_samplerate, 2 ** 12)
    while denominator >= 1:
        ratio = max(exact.limit_denominator(denominator), Fraction(1, denominator))
        if _resample_kernel_size(ratio.denominator, ratio.numerator) <= _MAX_RESAMPLE_KERNEL:
            return ratio
        denominator //= 2
    raise ValueError(f"cannot resample from {from_samplerate} to {to_samplerate} Hz: the ratio "
                     "is too large")


def resample(wav: torch.Tensor, from_samplerate: int, to_samplerate: int) -> torch.Tensor:
    """Resample `[*, T]` audio to `int(T * to / from)` samples with julius.

    Exact for the usual rates. When the reduced ratio `to / from` would need a huge filter bank
    (e.g. 44101 -> 44100 Hz, gigabytes), a close ratio is used instead (relative error below
    0.1 %, under 2 cents of pitch, for rates of 8 to 96 kHz; logged) and the output is cut or
    zero padded to the same length.
    """
    if int(from_samplerate) != from_samplerate or int(to_samplerate) != to_samplerate \
            or from_samplerate <= 0 or to_samplerate <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_samplerate} and "
                         f"{to_samplerate}")
    from_samplerate, to_samplerate = int(from_samplerate), int(to_samplerate)
    if _resample_kernel_size(from_samplerate, to_samplerate) <= _MAX_RESAMPLE_KERNEL:
        return julius.resample_frac(wav, from_samplerate, to_samplerate)
    ratio = _close_ratio(from_samplerate, to_samplerate)
    error = abs(float(ratio / Fraction(to_samplerate, from_samplerate)) - 1)
    logger.info("resampling %d -> %d Hz with the close ratio %s (relative error %.1e)",
                from_samplerate, to_samplerate, ratio, error)
    out = julius.resample_frac(wav, ratio.denominator, ratio.numerator, full=True)
    length = wav.shape[-1] * to_samplerate // from_samplerate
    return F.pad(out, (0, max(0, length - out.shape[-1])))[..., :length]


def prevent_clip(wav: torch.Tensor, mode: tp.Optional[str] = "rescale",
                 peak: tp.Optional[float] = None) -> torch.Tensor:
    """Keep float audio inside [-1, 1] before it is written.

    Modes: `rescale` divides by `max(1.01 * peak, 1)` (no change if already safe), `clamp` clips
    to +/-0.99, `tanh` soft clips, `none` (or None) leaves the audio as is. `peak` is the
    largest absolute sample of the whole audio when `wav` is one block of it (default: `wav`'s),
    so that every block is rescaled alike.
    """
    if mode is None or mode == "none":
        return wav
    if not wav.dtype.is_floating_point:
        raise ValueError(f"prevent_clip needs float audio, got {wav.dtype}.")
    if mode == "rescale":
        if peak is None:
            peak = wav.abs().max().item() if wav.numel() else 0.0
        return wav / max(1.01 * peak, 1.0)
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    if mode == "tanh":
        return torch.tanh(wav)
    raise ValueError(f"Invalid clip mode {mode!r}, expected one of {', '.join(CLIP_MODES)}.")


def i16_pcm(wav: torch.Tensor) -> torch.Tensor:
    """Float audio in [-1, 1] (clamped) to int16 PCM; int16 input is returned unchanged."""
    if wav.dtype.is_floating_point:
        return (wav.clamp(-1, 1) * _I16_SCALE).round().to(torch.int16)
    if wav.dtype != torch.int16:
        raise ValueError(f"i16_pcm expects float or int16 audio, got {wav.dtype}.")
    return wav


def f32_pcm(wav: torch.Tensor) -> torch.Tensor:
    """int16 PCM to float audio in [-1, 1]; float input is returned unchanged."""
    if wav.dtype.is_floating_point:
        return wav
    return wav.float() / _I16_SCALE


def as_dtype_pcm(wav: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert PCM audio to `dtype`: float audio for a float dtype, int16 otherwise."""
    if dtype.is_floating_point:
        return f32_pcm(wav).to(dtype)
    return i16_pcm(wav)
