"""Pitch and tempo augmentation through the `soundstretch` program (SoundTouch)."""
import random
import shutil
import subprocess
import tempfile
import typing as tp
from pathlib import Path

import soundfile
import torch

from .audio import save_audio  # noqa: F401  (importable from here in Demucs 4.1)


SOUNDSTRETCH = "soundstretch"


class SoundstretchMissingError(RuntimeError):
    """The `soundstretch` program needed for repitch augmentation is not installed."""


class RepitchError(RuntimeError):
    """`soundstretch` failed on an input."""


def check_soundstretch() -> None:
    """Fail early, with installation hints, when `soundstretch` is not on the PATH."""
    if shutil.which(SOUNDSTRETCH) is None:
        raise SoundstretchMissingError(
            "The repitch augmentation needs the `soundstretch` program (SoundTouch), which was not "
            "found on the PATH. Install it (Debian/Ubuntu: `sudo apt-get install soundstretch`, "
            "conda: `conda install -c conda-forge soundtouch`, macOS: `brew install sound-touch`) "
            "or disable the augmentation with `augment.repitch.proba=0`.")


# The official trainer hands soundstretch the example clamped to [-0.99, 0.99] in 16-bit PCM.
OFFICIAL_CLAMP = 0.99


def repitch(wav: torch.Tensor, pitch: float, tempo: float, voice: bool = False,
            quick: bool = False, samplerate: int = 44100, keep_level: bool = False
            ) -> torch.Tensor:
    """Shift `wav` (`[channels, time]`) by `pitch` semitones and speed it up by `tempo` percent.

    The output length is about `time / (1 + tempo / 100)`. `voice` tunes the algorithm for speech,
    `quick` trades quality for speed.

    By default the audio goes to soundstretch as the official trainer sends it: clamped to
    [-0.99, 0.99] and in 16-bit PCM, so that seeded training matches it; normalised training
    examples often exceed 1, and are then clipped. `keep_level` scales the audio under full range
    in 24-bit PCM instead and restores its level afterwards: no clipping.
    """
    if keep_level:
        peak = wav.detach().abs().max().item()
        gain = 1 / (1.01 * peak) if peak > 0 else 1.
        # soundstretch misreads float wavs: 24-bit PCM
        audio, subtype = (gain * wav.detach().cpu()).t().numpy(), "PCM_24"
    else:
        gain = 1.
        clamped = wav.detach().cpu().clamp(-OFFICIAL_CLAMP, OFFICIAL_CLAMP)
        # the official encoder's integers: scaled by 2**15 - 1 and truncated
        audio, subtype = (clamped * (2 ** 15 - 1)).t().numpy().astype("<i2"), "PCM_16"
    with tempfile.TemporaryDirectory(prefix="repitch_") as folder:
        infile, outfile = Path(folder) / "in.wav", Path(folder) / "out.wav"
        soundfile.write(str(infile), audio, samplerate, subtype=subtype)
        command = [SOUNDSTRETCH, str(infile), str(outfile),
                   f"-pitch={pitch}", f"-tempo={tempo:.6f}"]
        if voice:
            command.append("-speech")
        if quick:
            command.append("-quick")
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            check_soundstretch()
            raise
        if result.returncode != 0 or not outfile.exists():
            raise RepitchError(f"`{' '.join(command)}` failed with code {result.returncode}: "
                               f"{result.stderr.strip()[-500:]}")
        data, _ = soundfile.read(str(outfile), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy() / gain).to(wav)


class RepitchedWrapper:
    """Dataset wrapper changing pitch and tempo of random examples, all stems alike.

    Every example is cropped to `int((1 - max_tempo / 100) * time)` samples so that the batch
    length does not depend on the tempo drawn.

    Args:
        dataset: dataset of `[sources, channels, time]` examples.
        proba: probability of repitching an example.
        max_pitch: largest pitch change, in semitones (drawn uniformly among the integers).
        max_tempo: largest tempo change, in percent.
        tempo_std: standard deviation of the (Gaussian, clipped) tempo change, in percent.
        vocals: indexes of the sources processed in `soundstretch`'s speech mode.
        same: use one draw for all the stems (keeps them aligned); otherwise one per stem.
        keep_level: see `repitch` (default: clamped as the official trainer does).
    """

    def __init__(self, dataset, proba: float = 0.2, max_pitch: int = 2, max_tempo: float = 12,
                 tempo_std: float = 5, vocals: tp.Sequence[int] = (3,), same: bool = True,
                 keep_level: bool = False):
        if proba > 0:
            check_soundstretch()
        self.dataset = dataset
        self.proba = proba
        self.max_pitch = max_pitch
        self.max_tempo = max_tempo
        self.tempo_std = tempo_std
        self.vocals = list(vocals)
        self.same = same
        self.keep_level = keep_level

    def __len__(self) -> int:
        return len(self.dataset)

    def _draw(self) -> tp.Tuple[int, float]:
        pitch = random.randint(-self.max_pitch, self.max_pitch)
        tempo = random.gauss(0, self.tempo_std)
        return pitch, min(max(tempo, -self.max_tempo), self.max_tempo)

    def __getitem__(self, index: int) -> torch.Tensor:
        streams = self.dataset[index]
        out_length = int((1 - 0.01 * self.max_tempo) * streams.shape[-1])
        if random.random() >= self.proba:
            return streams[..., :out_length]
        outs = []
        for idx, stream in enumerate(streams):
            if idx == 0 or not self.same:
                pitch, tempo = self._draw()
            out = repitch(stream, pitch, tempo, voice=idx in self.vocals,
                          samplerate=getattr(self.dataset, "samplerate", 44100),
                          keep_level=self.keep_level)
            outs.append(out[:, :out_length])
        return torch.stack(outs)
