"""Encoding float audio to files: wav and flac with soundfile, mp3 with lameenc (starting with the
gapless header of `demucs.mp3_header`), any other format with ffmpeg.

`AudioWriter` accumulates a stem block by block in a spool before encoding it, `save_audio`
encodes one tensor; both go through the same block encoders, so a file written either way is the
same. Files named by the caller are written through `demucs.files.atomic_write`.
"""
import io
from pathlib import Path
import shutil
import subprocess
import tempfile
import typing as tp

import lameenc
import soundfile
import torch
from torch.nn import functional as F

from .audio_conversion import f32_pcm, i16_pcm, prevent_clip
from .audio_decoders import last_message
from .audio_spool import AudioSpool, tensor_blocks
from .files import PathLike, atomic_write
from .mp3_header import MP3_SAMPLERATES, info_frame_of_file, lame_info_frame

SAVE_SUFFIXES = (".wav", ".flac", ".mp3")


class AudioFormat(tp.NamedTuple):
    """How audio is encoded: the file type (`ext`: "wav", "flac" or "mp3") and its options."""
    ext: str
    samplerate: int
    clip: tp.Optional[str] = "rescale"  # see `prevent_clip`
    bits_per_sample: int = 16  # wav and flac PCM: 16 or 24
    as_float: bool = False  # wav as 32-bit float (flac, integer only, then uses 24 bits)
    bitrate: int = 320  # mp3, in kbps
    preset: int = 2  # mp3: lame's algorithm quality, 2 (best) to 7 (fastest)


def _soundfile_subtype(fmt: AudioFormat) -> str:
    if fmt.as_float and fmt.ext == "wav":
        return "FLOAT"
    if fmt.as_float:  # FLAC is integer only: 24 bits is the closest to float precision.
        return "PCM_24"
    if fmt.bits_per_sample not in (16, 24):
        raise ValueError(f"bits_per_sample must be 16 or 24, got {fmt.bits_per_sample}.")
    return f"PCM_{fmt.bits_per_sample}"


def _encode_soundfile(blocks: tp.Iterable[torch.Tensor], path: Path, channels: int,
                      fmt: AudioFormat) -> None:
    subtype = _soundfile_subtype(fmt)
    with soundfile.SoundFile(str(path), "w", fmt.samplerate, channels, subtype,
                             format=fmt.ext.upper()) as file:
        for block in blocks:
            file.write(block.float().t().contiguous().numpy())


def _lame_encoder(channels: int, fmt: AudioFormat, verbose: bool) -> lameenc.Encoder:
    if channels not in (1, 2):
        raise ValueError(f"mp3 holds 1 or 2 channels, got {channels}; convert the audio first.")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(fmt.bitrate)
    encoder.set_in_sample_rate(fmt.samplerate)
    encoder.set_channels(channels)
    encoder.set_quality(fmt.preset)
    if not verbose:
        encoder.silence()
    return encoder


def _encode_mp3(blocks: tp.Iterable[torch.Tensor], path: Path, channels: int, fmt: AudioFormat,
                verbose: bool = False) -> None:
    """Encode to a constant bit rate mp3 that starts with a gapless Info/LAME frame.

    That frame describes the whole stream (frame count, length, end padding), so lame's output
    is first kept in an anonymous temporary file: an mp3 is small, but memory would still grow
    with the duration.
    """
    encoder = _lame_encoder(channels, fmt, verbose)
    samples = 0
    with tempfile.TemporaryFile() as stream:
        for block in blocks:
            stream.write(encoder.encode(i16_pcm(block).t().contiguous().numpy().tobytes()))
            samples += block.shape[-1]
        stream.write(encoder.flush())
        stream.flush()
        with open(path, "wb") as file:
            file.write(info_frame_of_file(stream, fmt.samplerate, samples))
            stream.seek(0)
            shutil.copyfileobj(stream, file)


def mp3_round_trip(wav: torch.Tensor, samplerate: int, bitrate: int, preset: int = 7
                   ) -> torch.Tensor:
    """`[C, T]` audio (C = 1 or 2) encoded to mp3 at `bitrate` kbps and decoded back, in memory:
    the same length and level, with the codec's artefacts (for training augmentation).

    The level is scaled to full range for the 16-bit encoder and back. Needs a sample rate of
    MPEG-1 Layer III (32, 44.1 or 48 kHz), whose gapless tag makes the decoded length exact.
    """
    if samplerate not in MP3_SAMPLERATES:
        raise ValueError(f"mp3 round trips need a sample rate of 32000, 44100 or 48000 Hz, got "
                         f"{samplerate}")
    peak = float(wav.abs().max())
    if peak == 0:
        return wav.clone()
    encoder = _lame_encoder(wav.shape[0], AudioFormat("mp3", samplerate, bitrate=bitrate,
                                                      preset=preset), verbose=False)
    encoder.set_out_sample_rate(samplerate)  # low bitrates would otherwise be resampled
    data = encoder.encode(i16_pcm(wav / peak).t().contiguous().numpy().tobytes())
    data += encoder.flush()
    stream = io.BytesIO(lame_info_frame(data, samplerate, wav.shape[-1]) + data)
    decoded, _ = soundfile.read(stream, dtype="float32", always_2d=True)
    out = torch.from_numpy(decoded.T.copy())[:, :wav.shape[-1]]
    out = F.pad(out, (0, wav.shape[-1] - out.shape[-1]))
    return (out * peak).to(wav.dtype)


def encode_blocks(blocks: tp.Iterable[torch.Tensor], path: Path, channels: int,
                  fmt: AudioFormat) -> None:
    """Write float audio blocks `[channels, n]`, already kept within [-1, 1], to `path`."""
    if fmt.ext == "mp3":
        _encode_mp3(blocks, path, channels, fmt)
    elif fmt.ext in ("wav", "flac"):
        _encode_soundfile(blocks, path, channels, fmt)
    else:
        raise ValueError(f"Cannot encode audio as {fmt.ext!r}: use one of "
                         f"{', '.join(suffix[1:] for suffix in SAVE_SUFFIXES)}.")


class AudioWriter(AudioSpool):
    """Accumulates float audio block by block in a spool, then encodes it to wav, flac or mp3.

    The peak of the whole audio is tracked as blocks arrive, so that `rescale` clipping divides
    every block by the factor `save_audio` would use for the whole audio in one go, while memory
    holds one block at a time.
    """

    def __init__(self, channels: int):
        super().__init__(channels)
        self.peak = 0.

    def append(self, block: torch.Tensor) -> None:
        block = block.detach().cpu().float()
        if block.numel():
            self.peak = max(self.peak, float(block.abs().max()))
        super().append(block)

    def encode(self, path: PathLike, fmt: AudioFormat) -> None:
        """Write everything appended to `path`, as is (wrap it in `atomic_write` to replace a
        file only on success)."""
        blocks = (prevent_clip(block, fmt.clip, peak=self.peak) for block in self.blocks())
        encode_blocks(blocks, Path(path), self.channels, fmt)


def encode_mp3(wav: torch.Tensor, path: PathLike, samplerate: int = 44100, bitrate: int = 320,
               quality: int = 2, verbose: bool = False) -> None:
    """Encode `[C, T]` audio (C = 1 or 2) to a constant bit rate mp3 file with lameenc.

    `quality` is lame's algorithm quality, 2 (best) to 7 (fastest). A LAME "Info" tag is added
    so that decoders trim the codec delay and padding and give back exactly T samples.
    """
    fmt = AudioFormat("mp3", samplerate, bitrate=bitrate, preset=quality)
    with atomic_write(path) as temporary:
        _encode_mp3(tensor_blocks(wav), temporary, wav.shape[0], fmt, verbose)


def _format_of(path: Path, samplerate: int, **options: tp.Any) -> AudioFormat:
    """The `AudioFormat` that `path`'s suffix chooses."""
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise ValueError(f"Cannot save audio to {path}: unsupported suffix {path.suffix!r}, "
                         f"use one of {', '.join(SAVE_SUFFIXES)}.")
    return AudioFormat(suffix[1:], samplerate, **options)


def save_audio(wav: torch.Tensor, path: PathLike, samplerate: int, bitrate: int = 320,
               clip: tp.Optional[str] = "rescale", bits_per_sample: int = 16,
               as_float: bool = False, preset: int = 2) -> None:
    """Write `[C, T]` float audio (or `[T]` mono) to `.wav`, `.flac` or `.mp3`, chosen by suffix.

    Args:
        clip: how to avoid clipping, see `prevent_clip`.
        bitrate, preset: mp3 bit rate (kbps) and lame quality (2 best to 7 fastest).
        bits_per_sample: 16 or 24 for wav and flac PCM.
        as_float: wav as 32-bit float (flac, integer only, then uses 24 bits).

    The file is first written next to its destination under a temporary name, then renamed, so
    a failure never leaves a partial output file.
    """
    path = Path(path)
    fmt = _format_of(path, samplerate, clip=clip, bits_per_sample=bits_per_sample,
                     as_float=as_float, bitrate=bitrate, preset=preset)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(
            f"save_audio expects [channels, time] audio, got shape {tuple(wav.shape)}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot save audio to {path}: folder {path.parent} does not exist.")
    wav = prevent_clip(f32_pcm(wav.detach().cpu()), mode=clip)
    with atomic_write(path) as temporary:
        encode_blocks(tensor_blocks(wav), temporary, wav.shape[0], fmt)


def encode_wav(wav: torch.Tensor, path: PathLike, samplerate: int, bits_per_sample: int = 16,
               as_float: bool = False) -> None:
    """Write `[C, T]` float audio, clamped to [-1, 1], as a wav file whatever `path`'s suffix:
    16 or 24-bit PCM, or 32-bit float with `as_float` (Demucs 4.1's `encode_wav`)."""
    fmt = AudioFormat("wav", samplerate, clip=None, bits_per_sample=bits_per_sample,
                      as_float=as_float)
    wav = f32_pcm(wav.detach().cpu()).clamp(-1, 1)
    with atomic_write(path) as temporary:
        encode_blocks(tensor_blocks(wav), temporary, wav.shape[0], fmt)


def _pcm_bytes(wav: torch.Tensor, bits_per_sample: int) -> bytes:
    """Interleaved little-endian PCM: int16 for 16 bits, full-scale int32 for 24 bits."""
    if bits_per_sample == 16:
        return i16_pcm(wav).t().contiguous().numpy().astype("<i2").tobytes()
    if bits_per_sample == 24:
        scaled = (f32_pcm(wav).double().clamp(-1, 1) * (2 ** 31 - 1)).round()
        return scaled.to(torch.int32).t().contiguous().numpy().astype("<i4").tobytes()
    raise ValueError(f"bits_per_sample must be 16 or 24, got {bits_per_sample}.")


def encode_ffmpeg(wav: torch.Tensor, path: PathLike, samplerate: int,
                  bits_per_sample: int = 16) -> None:
    """Write `[C, T]` float audio with ffmpeg, in the format `path`'s suffix names (any format
    ffmpeg can write, e.g. `.flac`, `.ogg`, `.m4a`; Demucs 4.1's `encode_ffmpeg`). Needs ffmpeg."""
    path = Path(path)
    channels = wav.shape[0]
    pcm = _pcm_bytes(wav.detach().cpu(), bits_per_sample)
    sample_format = "s16le" if bits_per_sample == 16 else "s32le"
    with tempfile.TemporaryDirectory(prefix="demucs_encode_") as folder:
        encoded = Path(folder) / path.name  # ffmpeg picks the format from this name's suffix
        command = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", sample_format,
                   "-ar", str(samplerate), "-ac", str(channels), "-i", "-", str(encoded)]
        try:
            result = subprocess.run(command, input=pcm, capture_output=True)
        except FileNotFoundError:
            raise RuntimeError(f"Cannot write {path}: ffmpeg is not installed; install it, "
                               "or save as .wav, .flac or .mp3 with save_audio.") from None
        if result.returncode != 0:
            message = last_message(result.stderr.decode(errors="replace"))
            raise RuntimeError(f"ffmpeg cannot write {path}: {message}")
        with atomic_write(path) as temporary:
            shutil.move(str(encoded), temporary)
