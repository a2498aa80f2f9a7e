"""Deterministic toy MusDB-HQ: synthetic multitrack songs in the exact MusDB-HQ layout.

MusDB-HQ cannot be downloaded everywhere (CI, offline machines), so training and evaluation can
run on this generated stand-in instead:

    OUT/{train,test}/<Artist - Title>/{mixture,drums,bass,other,vocals}.wav

44.1 kHz stereo 16-bit; `mixture.wav` is exactly the sum of the four quantized stems. Each song
has a tempo, a key and a chord progression shared by its stems: drums are synthesized kick,
snare and hat hits on a sixteenth-note grid; bass is a low monophonic line on the chord roots;
other holds chords and arpeggios with a few timbres; vocals are a sung-like melody (vibrato,
glides, vowel formants, syllable envelopes). Gains, panning, stereo width and short silences are
drawn per stem. Some train songs carry names of the MusDB validation tracks so that the usual
train/valid split finds them.

Training with `dset=toy` generates it on first use (`ensure_toy_musdb`); from the shell:

    python3 -m tools.toy_musdb OUT [--tracks N --seconds S --seed K]
"""
import argparse
from dataclasses import dataclass
import json
import logging
import math
from pathlib import Path
import shutil
import time
import typing as tp

import numpy as np
from scipy import signal
import soundfile

from .files import partial_path

logger = logging.getLogger(__name__)

SOURCES = ("drums", "bass", "other", "vocals")
MIXTURE = "mixture"
MANIFEST = "toy_musdb.json"
# Validation tracks of MusDB18 (the `musdb` package's `validation_tracks`).
MUSDB_VALID_TRACKS = (
    "Actions - One Minute Smile",
    "Clara Berry And Wooldog - Waltz For My Victims",
    "Johnny Lokke - Promises & Lies",
    "Patrick Talbot - A Reason To Leave",
    "Triviul - Angelsaint",
    "Alexander Ross - Goodbye Bolero",
    "Fergessen - Nos Palpitants",
    "Leaf - Summerghost",
    "Skelpolu - Human Mistakes",
    "Young Griffo - Pennies",
    "ANiMAL - Rockshow",
    "James May - On The Line",
    "Meaxic - Take A Step",
    "Traffic Experiment - Sirens",
)
ARTIST_FIRST = ("Paper", "Neon", "Velvet", "Copper", "Silent", "Lunar", "Static", "Amber",
                "Hollow", "Crystal", "Rusty", "Golden", "Violet", "Northern")
ARTIST_SECOND = ("Foxes", "Signals", "Harbors", "Engines", "Gardens", "Circuits", "Tides",
                 "Lanterns", "Pilots", "Orchards", "Comets", "Rivers")
TITLE_FIRST = ("Waiting For", "Dancing In", "Lost In", "Under", "Beyond", "Chasing",
               "Counting", "Far From", "Back To", "Across")
TITLE_SECOND = ("The Rain", "Midnight", "Blue Skies", "The Static", "Summer", "The Harbor",
                "Paper Moons", "The Wire", "Glass Towers", "Tomorrow", "The Echo")

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Chord roots as scale degrees (0 = tonic), one chord per bar.
PROGRESSIONS = ((0, 4, 5, 3), (5, 3, 0, 4), (0, 3, 4, 3), (1, 4, 0, 5), (0, 5, 3, 4),
                (0, 0, 3, 4))
STEPS_PER_BAR = 16  # sixteenth-note grid in 4/4.
VOWEL_FORMANTS = {"a": (800, 1200, 2600), "e": (450, 1900, 2600), "i": (300, 2300, 3000),
                  "o": (480, 850, 2500), "u": (330, 750, 2400)}
FORMANT_GAINS = (1.0, 0.55, 0.3)
FORMANT_BANDWIDTHS = (90.0, 120.0, 160.0)


@dataclass
class Song:
    """What the four stems of one song share: length, tempo, key and chords."""
    samplerate: int
    length: int
    tempo: float
    tonic: int
    scale: tp.Tuple[int, ...]
    progression: tp.Tuple[int, ...]

    @property
    def step_seconds(self) -> float:
        return 60.0 / self.tempo / 4

    @property
    def steps(self) -> int:
        return math.ceil(self.length / self.samplerate / self.step_seconds)

    def pitch(self, degree: int, octave: int = 0) -> int:
        """MIDI pitch of a scale degree (any integer) shifted by whole octaves."""
        return self.tonic + self.scale[degree % 7] + 12 * (degree // 7 + octave)

    def chord_root(self, step: int) -> int:
        return self.progression[(step // STEPS_PER_BAR) % len(self.progression)]

    def chord_degrees(self, step: int) -> tp.Tuple[int, int, int]:
        root = self.chord_root(step)
        return root, root + 2, root + 4


@dataclass
class Notes:
    """A monophonic line: onsets and durations in seconds, MIDI pitches."""
    onsets: np.ndarray
    durations: np.ndarray
    pitches: np.ndarray

    @classmethod
    def from_lists(cls, onsets: list, durations: list, pitches: list) -> "Notes":
        order = np.argsort(onsets, kind="stable")
        return cls(np.asarray(onsets, dtype=float)[order],
                   np.asarray(durations, dtype=float)[order],
                   np.asarray(pitches, dtype=float)[order])


def midi_to_hz(pitch: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(pitch) - 69) / 12)


def draw_song(rng: np.random.Generator, seconds: float, samplerate: int) -> Song:
    return Song(samplerate=samplerate, length=int(round(seconds * samplerate)),
                tempo=float(rng.uniform(84, 140)), tonic=int(rng.integers(45, 57)),
                scale=SCALES[str(rng.choice(list(SCALES)))],
                progression=PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))])


# ---------------------------------------------------------------------------------------------
# Signal helpers (vectorised over the whole song)

def line_controls(song: Song, notes: Notes) -> tp.Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: the pitch of the current note, time since its onset and its duration.

    Before the first note the pitch is the first note's and the time since onset is negative
    (a line without notes is silent throughout).
    """
    if not len(notes.onsets):
        notes = Notes(np.array([song.length / song.samplerate]), np.zeros(1), np.full(1, 60.0))
    current = np.maximum(note_index(song, notes), 0)
    starts = np.round(notes.onsets * song.samplerate)[current]
    since = ((np.arange(song.length) - starts) / song.samplerate).astype(np.float32)
    return (notes.pitches.astype(np.float32)[current], since,
            notes.durations.astype(np.float32)[current])


def note_index(song: Song, notes: Notes) -> np.ndarray:
    """Per sample, the index of the note sounding (the last one started), -1 before the first."""
    starts = np.clip(np.round(notes.onsets * song.samplerate).astype(np.int64), 0, song.length)
    counts = np.diff(np.concatenate([[0], starts, [song.length]]))
    return np.repeat(np.arange(-1, len(starts)), counts)


def envelope(since: np.ndarray, duration: np.ndarray, attack: float, decay: float,
             sustain: float, release: float, samplerate: int) -> np.ndarray:
    """Attack / exponential decay to sustain / linear release after the note ends.

    Smoothed over 2 ms so that a note cut by the next one does not click.
    """
    rise = np.clip(since / attack, 0.0, 1.0)
    fall = sustain + (1 - sustain) * np.exp(-np.maximum(since, 0) / decay)
    tail = np.clip(1 - (since - duration) / release, 0.0, 1.0)
    env = np.where(since >= 0, rise * fall * tail, 0.0)
    return one_pole_lowpass(env, 1 / 0.002, samplerate)


def one_pole_lowpass(x: np.ndarray, cutoff_hz: float, samplerate: int) -> np.ndarray:
    pole = math.exp(-2 * math.pi * cutoff_hz / samplerate)
    x = np.asarray(x, dtype=np.float32)
    return signal.lfilter(np.array([1 - pole], np.float32), np.array([1, -pole], np.float32), x)


def phase_of(freq: np.ndarray, samplerate: int) -> np.ndarray:
    """Running phase (radians, wrapped) of an oscillator following `freq`, as float32."""
    cycles = np.cumsum(freq, dtype=np.float64) / samplerate
    return (2 * np.pi * (cycles - np.floor(cycles))).astype(np.float32)


def harmonic_tone(phase: np.ndarray, freq: np.ndarray, amplitudes: tp.Sequence[float],
                  samplerate: int) -> np.ndarray:
    """Sum of harmonics `k` with the given amplitudes, each silenced above 0.45 * samplerate.

    sin(k * phase) comes from the Chebyshev recurrence s[k+1] = 2 cos(phase) s[k] - s[k-1], which
    needs no trigonometry per harmonic (float32 buffers, reused in place).
    """
    limit = 0.45 * samplerate
    twice_cos = (2 * np.cos(phase)).astype(np.float32)
    previous, current = np.zeros_like(twice_cos), np.sin(phase).astype(np.float32)
    spare = np.empty_like(twice_cos)
    out = np.zeros_like(twice_cos)
    for k, amplitude in enumerate(amplitudes, start=1):
        if k * freq.min() >= limit:
            break
        if amplitude and k * freq.max() < limit:
            out += np.float32(amplitude) * current
        elif amplitude:
            out += np.where(k * freq < limit, np.float32(amplitude) * current, np.float32(0))
        np.multiply(twice_cos, current, out=spare)
        spare -= previous
        previous, current, spare = current, spare, previous
    return out


def filtered_noise(rng: np.random.Generator, length: int, band: tp.Tuple[float, float],
                   samplerate: int) -> np.ndarray:
    low, high = band
    sos = signal.butter(2, [low, min(high, 0.45 * samplerate)], "bandpass", fs=samplerate,
                        output="sos")
    return signal.sosfilt(sos.astype(np.float32), rng.standard_normal(length, dtype=np.float32))


def place_hits(length: int, positions: np.ndarray, velocities: np.ndarray,
               sound: np.ndarray) -> np.ndarray:
    """Copies of the one-shot `sound` starting at sample `positions`, scaled by `velocities`."""
    out = np.zeros(length, dtype=np.float32)
    for position, velocity in zip(positions, velocities):
        if 0 <= position < length:
            end = min(length, position + len(sound))
            out[position:end] += velocity * sound[:end - position]
    return out


def grid_positions(song: Song, steps: np.ndarray, rng: np.random.Generator,
                   jitter: float = 0.004) -> np.ndarray:
    """Sample positions of grid steps, humanised by a few milliseconds."""
    seconds = steps * song.step_seconds + rng.normal(0, jitter, len(steps))
    return np.round(np.maximum(seconds, 0) * song.samplerate).astype(int)


# ---------------------------------------------------------------------------------------------
# Stems

def kick_sound(rng: np.random.Generator, samplerate: int) -> np.ndarray:
    t = np.arange(int(0.35 * samplerate), dtype=np.float32) / samplerate
    low, sweep = rng.uniform(42, 60), rng.uniform(80, 160)
    freq = low + sweep * np.exp(-t / rng.uniform(0.02, 0.05))
    body = np.sin(phase_of(freq, samplerate)) * np.exp(-t / rng.uniform(0.08, 0.2))
    click = rng.standard_normal(len(t), dtype=np.float32) * np.exp(-t / 0.002) * 0.3
    return body + click


def snare_sound(rng: np.random.Generator, samplerate: int) -> np.ndarray:
    t = np.arange(int(0.3 * samplerate)) / samplerate
    rattle = filtered_noise(rng, len(t), (rng.uniform(900, 2000), 9000), samplerate)
    rattle = rattle / np.abs(rattle).max() * np.exp(-t / rng.uniform(0.05, 0.11))
    tone = np.sin(2 * np.pi * rng.uniform(160, 240) * t) * np.exp(-t / 0.04)
    return 0.8 * rattle + 0.5 * tone


def hat_sound(rng: np.random.Generator, samplerate: int, decay: float) -> np.ndarray:
    t = np.arange(int(min(8 * decay, 0.5) * samplerate)) / samplerate
    noise = filtered_noise(rng, len(t), (rng.uniform(6000, 8500), 16000), samplerate)
    return noise / np.abs(noise).max() * np.exp(-t / decay)


def drum_pattern(rng: np.random.Generator) -> tp.Dict[str, np.ndarray]:
    """One bar of velocities per drum: kick on 1 and 3 (+ syncopations), snare on 2 and 4."""
    kick = np.zeros(STEPS_PER_BAR)
    kick[[0, 8]] = 1.0
    extras = rng.choice([3, 6, 10, 11, 14], size=int(rng.integers(0, 3)), replace=False)
    kick[extras] = rng.uniform(0.6, 0.9, len(extras))
    snare = np.zeros(STEPS_PER_BAR)
    snare[[4, 12]] = 1.0
    if rng.random() < 0.5:
        snare[int(rng.choice([7, 9, 15]))] = 0.25
    hat_every = int(rng.choice([1, 2]))
    hat = np.zeros(STEPS_PER_BAR)
    hat[::hat_every] = 0.35
    hat[::4] = 0.6
    return {"kick": kick, "snare": snare, "hat": hat}


def render_drums(song: Song, rng: np.random.Generator) -> np.ndarray:
    """The track's one-bar pattern repeated, with velocity and timing variations and fills."""
    pattern = drum_pattern(rng)
    sounds = {"kick": kick_sound(rng, song.samplerate), "snare": snare_sound(rng, song.samplerate),
              "hat": hat_sound(rng, song.samplerate, rng.uniform(0.015, 0.04))}
    gains = {"kick": 1.0, "snare": rng.uniform(0.6, 0.9), "hat": rng.uniform(0.2, 0.4)}
    steps = np.arange(song.steps)
    out = np.zeros(song.length, dtype=np.float32)
    for drum, bar in pattern.items():
        velocities = bar[steps % STEPS_PER_BAR]
        if drum == "snare":  # a fill on the last beat of every fourth bar.
            fill = (steps // STEPS_PER_BAR % 4 == 3) & (steps % STEPS_PER_BAR >= 12)
            velocities = np.where(fill, rng.uniform(0.4, 0.9, len(steps)), velocities)
        hit = velocities > 0
        velocities = velocities[hit] * rng.uniform(0.85, 1.0, int(hit.sum()))
        positions = grid_positions(song, steps[hit], rng)
        out += gains[drum] * place_hits(song.length, positions, velocities, sounds[drum])
    return out


def render_bass(song: Song, rng: np.random.Generator) -> np.ndarray:
    """Eighth notes on the chord roots (sometimes the fifth or octave), low register."""
    rhythm = rng.random(8) < 0.75
    rhythm[0] = True
    onsets, durations, pitches = [], [], []
    gate = rng.uniform(0.5, 0.95)
    for step in range(0, song.steps, 2):
        if not rhythm[(step // 2) % 8]:
            continue
        root = song.chord_root(step)
        degree = root + int(rng.choice([0, 4, 7], p=[0.8, 0.1, 0.1]))  # root, fifth, octave.
        onsets.append(step * song.step_seconds)
        durations.append(2 * song.step_seconds * gate)
        pitches.append(song.pitch(degree, octave=-1))
    pitch, since, duration = line_controls(song, Notes.from_lists(onsets, durations, pitches))
    freq = midi_to_hz(pitch)
    brightness = rng.uniform(0.3, 0.8)
    tone = harmonic_tone(phase_of(freq, song.samplerate), freq,
                         [brightness ** (k - 1) / k for k in range(1, 9)], song.samplerate)
    env = envelope(since, duration, 0.005, rng.uniform(0.1, 0.4), 0.6, 0.03, song.samplerate)
    return tone * env


TIMBRES = {
    "organ": dict(harmonics=(1.0, 0.6, 0.4, 0.25, 0, 0.2, 0, 0.15), attack=0.01, decay=1.0,
                  sustain=1.0, release=0.05),
    "pad": dict(harmonics=tuple(0.8 ** k / (k + 1) for k in range(10)), attack=0.15, decay=1.0,
                sustain=0.8, release=0.3),
    "pluck": dict(harmonics=(1.0, 0.5, 0.3, 0.2, 0.12, 0.08), attack=0.003, decay=0.18,
                  sustain=0.0, release=0.05),
    "square": dict(harmonics=(1.0, 0, 0.33, 0, 0.2, 0, 0.14, 0, 0.11), attack=0.005, decay=0.12,
                   sustain=0.3, release=0.04),
    "piano": dict(harmonics=(1.0, 0.45, 0.3, 0.18, 0.12, 0.08, 0.05), attack=0.004, decay=0.6,
                  sustain=0.15, release=0.2),
}


def chord_voices(song: Song, rng: np.random.Generator, pattern: str) -> tp.List[Notes]:
    """Voices of the chord part: held chords, off-beat stabs or a sixteenth arpeggio."""
    octave = int(rng.choice([0, 1]))
    if pattern == "arpeggio":
        order = rng.permutation(3)
        onsets = [step * song.step_seconds for step in range(song.steps)]
        pitches = [song.pitch(song.chord_degrees(step)[order[step % 3]], octave + 1)
                   for step in range(song.steps)]
        return [Notes.from_lists(onsets, [song.step_seconds * 0.9] * len(onsets), pitches)]
    starts = (range(0, song.steps, STEPS_PER_BAR // 2) if pattern == "held"
              else range(2, song.steps, 4))
    length = STEPS_PER_BAR // 2 if pattern == "held" else 1
    voices = []
    for voice in range(3):
        onsets = [step * song.step_seconds for step in starts]
        pitches = [song.pitch(song.chord_degrees(step)[voice], octave) for step in starts]
        voices.append(Notes.from_lists(onsets, [length * song.step_seconds] * len(onsets),
                                       pitches))
    return voices


def render_part(song: Song, voices: tp.List[Notes], timbre: dict, detune: float) -> np.ndarray:
    out = np.zeros(song.length, dtype=np.float32)
    for notes in voices:
        pitch, since, duration = line_controls(song, notes)
        env = envelope(since, duration, timbre["attack"], timbre["decay"], timbre["sustain"],
                       timbre["release"], song.samplerate)
        for cents in (-detune, detune) if detune else (0.0,):
            freq = midi_to_hz(pitch + cents / 100)
            out += harmonic_tone(phase_of(freq, song.samplerate), freq, timbre["harmonics"],
                                 song.samplerate) * env
    return out


def render_other(song: Song, rng: np.random.Generator) -> np.ndarray:
    """One or two chord parts, each with its own timbre and rhythm."""
    parts = int(rng.integers(1, 3))
    patterns = rng.choice(["held", "stabs", "arpeggio"], size=parts, replace=False)
    out = np.zeros(song.length, dtype=np.float32)
    for pattern in patterns:
        timbre_name = {"held": rng.choice(["organ", "pad"]), "stabs": "square",
                       "arpeggio": rng.choice(["pluck", "square"])}[str(pattern)]
        detune = rng.uniform(4, 12) if timbre_name == "pad" else 0.0
        part = render_part(song, chord_voices(song, rng, str(pattern)), TIMBRES[str(timbre_name)],
                           detune)
        out += rng.uniform(0.5, 1.0) * part / (np.abs(part).max() + 1e-9)
    return out


def vocal_melody(song: Song, rng: np.random.Generator) -> tp.Tuple[Notes, np.ndarray]:
    """Sung phrases (some bars rest), notes near the previous one, chord tones on beats.

    Returns the notes and one vowel index per note.
    """
    onsets, durations, pitches = [], [], []
    degree = int(rng.integers(7, 12))
    register = int(rng.choice([0, 1]))
    step = 0
    while step < song.steps:
        if step % STEPS_PER_BAR == 0 and rng.random() < 0.3:  # a bar of rest.
            step += STEPS_PER_BAR
            continue
        length = int(rng.choice([2, 2, 3, 4, 4, 6, 8]))
        if rng.random() < 0.85:
            degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 5, 14))
            if step % 4 == 0:
                chord = np.array(song.chord_degrees(step)) + 7
                degree = int(chord[np.argmin(np.abs(chord - degree))])
            onsets.append(step * song.step_seconds)
            durations.append(length * song.step_seconds * 0.92)
            pitches.append(song.pitch(degree, register))
        step += length
    if not onsets:
        onsets, durations, pitches = [0.0], [song.length / song.samplerate], [song.pitch(7)]
    vowels = rng.integers(len(VOWEL_FORMANTS), size=len(onsets))
    return Notes.from_lists(onsets, durations, pitches), vowels


def sung_pitch(song: Song, rng: np.random.Generator, pitch: np.ndarray,
               since: np.ndarray) -> np.ndarray:
    """Glides between notes and vibrato that grows after each onset, in MIDI pitch."""
    glided = pitch[0] + one_pole_lowpass(pitch - pitch[0], 1 / 0.03, song.samplerate)
    rate, depth = rng.uniform(4.8, 6.5), rng.uniform(0.15, 0.45)
    times = np.arange(song.length, dtype=np.float32) / song.samplerate
    vibrato = depth * np.clip((since - 0.15) / 0.3, 0, 1) * np.sin(2 * np.pi * rate * times)
    drift = one_pole_lowpass(rng.standard_normal(song.length, dtype=np.float32), 3.0,
                             song.samplerate)
    drift *= 0.05 / (drift.std() + 1e-12)  # a slow wander of about 5 cents.
    return glided + vibrato + drift


def formant_filter(source: np.ndarray, vowel_weights: np.ndarray, scale: float,
                   samplerate: int) -> np.ndarray:
    """Source through each vowel's formant resonators, mixed by per-sample vowel weights."""
    out = np.zeros_like(source)
    for weights, formants in zip(vowel_weights, VOWEL_FORMANTS.values()):
        voiced = np.zeros_like(source)
        for centre, gain, width in zip(formants, FORMANT_GAINS, FORMANT_BANDWIDTHS):
            centre *= scale
            sos = signal.butter(1, [centre - width / 2, centre + width / 2], "bandpass",
                                fs=samplerate, output="sos").astype(np.float32)
            voiced += gain * signal.sosfilt(sos, source)
        out += weights * voiced
    return out


def render_vocals(song: Song, rng: np.random.Generator) -> np.ndarray:
    notes, vowels = vocal_melody(song, rng)
    pitch, since, duration = line_controls(song, notes)
    freq = midi_to_hz(sung_pitch(song, rng, pitch, since))
    tilt = rng.uniform(0.9, 1.3)
    source = harmonic_tone(phase_of(freq, song.samplerate), freq,
                           [1 / k ** tilt for k in range(1, 41)], song.samplerate)
    source += 0.02 * rng.standard_normal(song.length, dtype=np.float32)
    index = np.maximum(note_index(song, notes), 0)
    one_hot = vowels[index][None] == np.arange(len(VOWEL_FORMANTS))[:, None]
    weights = np.stack([one_pole_lowpass(row, 1 / 0.025, song.samplerate) for row in one_hot])
    voice = formant_filter(source, weights, rng.uniform(0.9, 1.15), song.samplerate)
    env = envelope(since, duration, rng.uniform(0.02, 0.05), 0.4, 0.75, 0.08, song.samplerate)
    consonant = filtered_noise(rng, song.length, (3000, 9000), song.samplerate)
    consonant *= np.where((since >= 0) & (since < 0.04), np.exp(-np.abs(since) / 0.012), 0.0)
    voice = voice / (np.abs(voice).max() + 1e-9)
    return voice * env + 0.25 * consonant / (np.abs(consonant).max() + 1e-9)


def render_guitar(song: Song, rng: np.random.Generator) -> np.ndarray:
    """A plucked arpeggio (for sets with a `guitar` stem)."""
    return render_part(song, chord_voices(song, rng, "arpeggio"), TIMBRES["pluck"],
                       rng.uniform(0, 4))


def render_piano(song: Song, rng: np.random.Generator) -> np.ndarray:
    """Struck chords, held or off-beat (for sets with a `piano` stem)."""
    pattern = str(rng.choice(["held", "stabs"]))
    return render_part(song, chord_voices(song, rng, pattern), TIMBRES["piano"], 0.0)


RENDERERS: tp.Dict[str, tp.Callable[[Song, np.random.Generator], np.ndarray]] = {
    "drums": render_drums, "bass": render_bass, "other": render_other, "vocals": render_vocals,
    "guitar": render_guitar, "piano": render_piano}


# ---------------------------------------------------------------------------------------------
# Mixing

def early_reflections(mono: np.ndarray, rng: np.random.Generator, samplerate: int,
                      taps: int = 6) -> np.ndarray:
    """A few delayed (2 to 40 ms), decaying copies of `mono`: a tiny room, of unit energy gain."""
    delays = np.sort(rng.integers(int(0.002 * samplerate), int(0.04 * samplerate), taps))
    gains = rng.choice([-1.0, 1.0], taps) * np.exp(-np.arange(taps) / 3)
    gains /= np.sqrt(np.sum(gains ** 2))
    out = np.zeros_like(mono)
    for delay, gain in zip(delays, gains):
        if delay < len(mono):
            out[delay:] += gain * mono[:len(mono) - delay]
    return out


def to_stereo(mono: np.ndarray, rng: np.random.Generator, samplerate: int,
              max_pan: float, max_width: float) -> np.ndarray:
    """Constant-power panning plus different reflections per side for stereo width."""
    angle = (rng.uniform(-max_pan, max_pan) + 1) * np.pi / 4
    width = rng.uniform(0, max_width)
    left = np.cos(angle) * np.sqrt(2) * mono + width * early_reflections(mono, rng, samplerate)
    right = np.sin(angle) * np.sqrt(2) * mono + width * early_reflections(mono, rng, samplerate)
    return np.stack([left, right])


def silences(song: Song, rng: np.random.Generator) -> np.ndarray:
    """A gain curve muting up to two short spans (one or two beats), with 10 ms fades."""
    gain = np.ones(song.length, dtype=np.float32)
    beat = 4 * song.step_seconds * song.samplerate
    for _ in range(int(rng.choice([0, 0, 1, 2]))):
        span = int(rng.integers(1, 3) * beat)
        start = int(rng.integers(0, max(1, song.length - span)))
        gain[start:start + span] = 0.0
    return one_pole_lowpass(gain, 1 / 0.01, song.samplerate)


STEREO = {"drums": (0.15, 0.25), "bass": (0.1, 0.05), "other": (0.6, 0.6), "vocals": (0.2, 0.3),
          "guitar": (0.7, 0.3), "piano": (0.3, 0.6)}


def render_stems(song: Song, rng: np.random.Generator,
                 sources: tp.Sequence[str] = SOURCES) -> tp.Dict[str, np.ndarray]:
    """Float stereo stems `[2, length]` of `sources`: equal loudness (RMS), then random gains,
    silences, panning and width."""
    stems = {}
    for name in sources:
        mono = RENDERERS[name](song, rng)
        loudness = np.sqrt(np.mean(mono ** 2)) + 1e-9
        mono = mono / loudness * 10 ** (rng.uniform(-8, 0) / 20)
        if name != "vocals":
            mono = mono * silences(song, rng)
        max_pan, max_width = STEREO[name]
        stems[name] = to_stereo(mono, rng, song.samplerate, max_pan, max_width)
    return stems


def quantize(stems: tp.Dict[str, np.ndarray], peak: float) -> tp.Dict[str, np.ndarray]:
    """16-bit stems scaled together so that neither their sum nor any stem passes `peak`.

    The returned mixture is the exact integer sum of the quantized stems.
    """
    mixture = sum(stems.values())
    loudest = max(np.abs(mixture).max(), *(np.abs(stem).max() for stem in stems.values()))
    scale = peak * (2 ** 15 - 1) / loudest
    quantized = {name: np.round(stem * scale).astype(np.int16) for name, stem in stems.items()}
    total = sum(stem.astype(np.int32) for stem in quantized.values())
    quantized[MIXTURE] = total.astype(np.int16)
    return quantized


# ---------------------------------------------------------------------------------------------
# Names and files

def toy_names(rng: np.random.Generator, count: int) -> tp.List[str]:
    artists = [f"{first} {second}" for first in ARTIST_FIRST for second in ARTIST_SECOND]
    titles = [f"{first} {second}" for first in TITLE_FIRST for second in TITLE_SECOND]
    if count > len(artists):
        raise ValueError(f"At most {len(artists)} toy tracks per set, asked for {count}.")
    chosen_artists = rng.choice(len(artists), size=count, replace=False)
    chosen_titles = rng.integers(len(titles), size=count)
    return [f"{artists[a]} - {titles[t]}" for a, t in zip(chosen_artists, chosen_titles)]


def track_plan(seed: int, tracks: int, valid_tracks: int,
               test_tracks: int) -> tp.List[tp.Tuple[str, str]]:
    """(split, name) of every track: validation names first in train, then toy names."""
    if not 0 <= valid_tracks <= min(tracks, len(MUSDB_VALID_TRACKS)):
        raise ValueError(f"valid_tracks must be between 0 and min(tracks={tracks}, "
                         f"{len(MUSDB_VALID_TRACKS)}), got {valid_tracks}.")
    names = toy_names(np.random.default_rng([seed, 0]), tracks - valid_tracks + test_tracks)
    train = list(MUSDB_VALID_TRACKS[:valid_tracks]) + names[:tracks - valid_tracks]
    test = names[tracks - valid_tracks:]
    return [("train", name) for name in train] + [("test", name) for name in test]


def write_track(folder: Path, pcm: tp.Dict[str, np.ndarray], samplerate: int) -> None:
    folder.mkdir(parents=True)
    for name, wav in pcm.items():
        soundfile.write(str(folder / f"{name}.wav"), wav.T, samplerate, subtype="PCM_16")


def make_track(seed: int, number: int, seconds: float, samplerate: int,
               sources: tp.Sequence[str] = SOURCES) -> tp.Dict[str, np.ndarray]:
    """The int16 `[2, length]` stems of `sources` and mixture of track `number`
    (deterministic)."""
    rng = np.random.default_rng([seed, 1, number])
    song = draw_song(rng, seconds, samplerate)
    return quantize(render_stems(song, rng, sources), peak=float(rng.uniform(0.5, 0.9)))


def generate(out: tp.Union[str, Path], tracks: int = 8, seconds: float = 10.0, seed: int = 42,
             samplerate: int = 44100, test_tracks: int = 2,
             valid_tracks: tp.Optional[int] = None, overwrite: bool = False,
             sources: tp.Sequence[str] = SOURCES) -> Path:
    """Write a toy MusDB-HQ to `out` and return its path.

    Args:
        tracks: songs in `train/`, of which `valid_tracks` carry MusDB validation names
            (default: a quarter of them, at least one when there are two tracks or more).
        seconds: duration of every song.
        seed: the same seed gives the same files.
        samplerate: sample rate of the files.
        test_tracks: songs in `test/`.
        overwrite: replace an existing toy set at `out` (other folders are never deleted).
        sources: the stems of every song, among `RENDERERS` (e.g. drums, bass, guitar, piano,
            other, vocals for a six-stem set).

    The set is built in a temporary sibling folder and renamed into place, so `out` never holds
    a half-written set, even when the process is killed.
    """
    out = Path(out)
    if valid_tracks is None:
        valid_tracks = math.ceil(tracks / 4) if tracks > 1 else 0
    unknown = [name for name in sources if name not in RENDERERS]
    if unknown or not sources or len(set(sources)) != len(sources):
        raise ValueError(f"sources {list(sources)}: give distinct stems among "
                         f"{', '.join(RENDERERS)}")
    plan = track_plan(seed, tracks, valid_tracks, test_tracks)
    settings: tp.Dict[str, tp.Any] = dict(seed=seed, tracks=tracks, valid_tracks=valid_tracks,
                                          test_tracks=test_tracks, seconds=seconds,
                                          samplerate=samplerate)
    if tuple(sources) != SOURCES:  # sets made before other stems existed have no such key
        settings["sources"] = list(sources)
    if not overwrite and _generated_settings(out) == settings:
        logger.info("%s already holds the toy MusDB of these settings: nothing to do.", out)
        return out
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = partial_path(out)
    begin = time.time()
    try:
        for number, (split, name) in enumerate(plan):
            write_track(staging / split / name,
                        make_track(seed, number, seconds, samplerate, sources), samplerate)
        manifest = dict(settings, train=[n for s, n in plan if s == "train"],
                        test=[n for s, n in plan if s == "test"])
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _move_into_place(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote toy MusDB to %s in %.1f s: %d train (%d with validation names) and %d "
                "test tracks of %.1f s at %d Hz.", out, time.time() - begin, tracks,
                valid_tracks, test_tracks, seconds, samplerate)
    return out


def _generated_settings(out: Path) -> tp.Optional[dict]:
    """The generation settings recorded in the manifest of the toy set at `out`, if any."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    manifest.pop("train", None)
    manifest.pop("test", None)
    return manifest


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        recorded = _generated_settings(out)
        what = (f"a toy MusDB made with other settings ({recorded})" if recorded is not None
                else "files")
        raise FileExistsError(f"{out} already holds {what}: add --overwrite to replace a toy "
                              "set, or choose another folder.")
    if not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} was not generated by tools.toy_musdb (no {MANIFEST}): "
                              "refusing to delete it.")


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir() and (overwrite or not any(out.iterdir())):
        shutil.rmtree(out)
    try:
        staging.rename(out)
    except OSError:
        if not is_toy_musdb(out):  # another process may have written the same set meanwhile.
            raise


def is_toy_musdb(path: tp.Union[str, Path]) -> bool:
    """True when `path` holds a MusDB-HQ style set (`train/` and `test/` folders)."""
    path = Path(path)
    return (path / "train").is_dir() and (path / "test").is_dir()


def ensure_toy_musdb(path: tp.Union[str, Path], **kwargs: tp.Any) -> Path:
    """Return `path`, generating the toy MusDB there first (with `kwargs`) when it is missing.

    An existing set is used as is, whatever the arguments.
    """
    path = Path(path)
    if is_toy_musdb(path):
        logger.debug("Using the existing dataset at %s", path)
        return path
    logger.info("No dataset at %s: generating the toy MusDB.", path)
    return generate(path, **kwargs)


def describe(path: tp.Union[str, Path]) -> str:
    """A few lines saying what a MusDB-HQ style folder holds (tracks, durations, size)."""
    path = Path(path)
    lines = [f"Toy MusDB at {path.resolve()}:"]
    for split in ("train", "test"):
        folders = sorted(p for p in (path / split).iterdir() if p.is_dir())
        durations = [soundfile.info(str(folder / f"{MIXTURE}.wav")).duration for folder in folders]
        valid = sum(folder.name in MUSDB_VALID_TRACKS for folder in folders)
        lines.append(f"  {split}/: {len(folders)} tracks, {sum(durations):.1f} s of audio"
                     + (f" ({valid} with MusDB validation names)" if split == "train" else ""))
        lines += [f"    {folder.name}" for folder in folders]
    size = sum(f.stat().st_size for f in path.rglob("*.wav"))
    lines.append(f"  {size / 2 ** 20:.1f} MiB in {len(list(path.rglob('*.wav')))} wav files")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.toy_musdb", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--tracks", type=int, default=8, help="train tracks (default 8)")
    parser.add_argument("--valid-tracks", type=int,
                        help="train tracks named after MusDB validation tracks "
                             "(default: a quarter of --tracks)")
    parser.add_argument("--test-tracks", type=int, default=2, help="test tracks (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="track duration (default 10)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--samplerate", type=int, default=44100)
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help="comma-separated stems of every song, among "
                             f"{','.join(RENDERERS)} (default: {','.join(SOURCES)})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a toy set previously generated at OUT")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    """The `python3 -m tools.toy_musdb` command; returns its exit status."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate(args.out, tracks=args.tracks, seconds=args.seconds, seed=args.seed,
                 samplerate=args.samplerate, test_tracks=args.test_tracks,
                 valid_tracks=args.valid_tracks, overwrite=args.overwrite,
                 sources=[name.strip() for name in args.sources.split(",") if name.strip()])
    except (ValueError, FileExistsError) as exc:
        logger.error("Error: %s", exc)
        return 1
    print(describe(args.out))
    return 0
