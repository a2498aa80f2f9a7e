"""Peak memory of the `demucs` command on long generated tracks (is it bounded by the duration?).

    python -m tools.bench_separate [--minutes 10 60] [-n demucs_unittest] [--repo DIR]
                                   [--compare OTHER_PYTHON] [--workdir DIR] [--threads 1]

Each track (stereo 44.1 kHz 16-bit wav, a few tones plus noise) is written in blocks, then
separated by `python -m demucs` in a fresh process on CPU; the peak resident memory of that
process (ru_maxrss) and the wall time are reported. Streaming separation should give about the
same peak for every duration.

`--compare PY` also separates each track with the `demucs` installed in the interpreter `PY`
(e.g. the official package in `~/.cache/demucs-peer/bin/python`, as set up by
`../shared/bench/peer_compare.py`) and prints the peak-memory and time ratios ours/theirs.
"""
import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import typing as tp

import numpy as np
import soundfile

from tools.child_usage import run_measured

SAMPLERATE = 44100
_BLOCK_SECONDS = 60


def generate_track(path: Path, minutes: float, seed: int = 0) -> None:
    """Write a `minutes` long stereo track without holding it in memory."""
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * SAMPLERATE)
    frequencies = np.array([55., 220., 440., 1320.])
    with soundfile.SoundFile(str(path), "w", SAMPLERATE, 2, "PCM_16") as file:
        for start in range(0, total, _BLOCK_SECONDS * SAMPLERATE):
            count = min(total - start, _BLOCK_SECONDS * SAMPLERATE)
            time_s = (start + np.arange(count)) / SAMPLERATE
            tones = 0.1 * np.sin(2 * np.pi * frequencies[:, None] * time_s).sum(0)
            noise = 0.05 * rng.standard_normal((count, 2))
            file.write((tones[:, None] + noise).astype(np.float32))


_STDERR_TAIL_BYTES = 4000


def measure(track: Path, out: Path, model: str, extra: tp.List[str],
            python: str = sys.executable, threads: int = 1) -> tp.Dict[str, float]:
    """Run the separation with `python -m demucs` in a child process with `threads` OpenMP
    threads; its peak RSS (MiB), wall time (s) and CPU time (s, user and system: less sensitive
    than the wall time to other work on the machine). A failing child raises RuntimeError with
    the end of its stderr.

    The child runs in the track's folder: `python -m` puts the working directory first on
    `sys.path`, so from a checkout of this project another interpreter would import this
    project's `demucs` instead of its own."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [python, "-m", "demucs", "-n", model, "-d", "cpu", "-o", str(out),
               *extra, str(track)]
    with tempfile.TemporaryFile() as log:
        usage = run_measured(command, cwd=track.parent, env=env, stdout=subprocess.DEVNULL,
                             stderr=log)
        if usage.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with status {usage.returncode}; "
                               f"the end of its stderr:\n{_tail(log)}")
    return {"peak_rss_mib": usage.peak_rss_mib, "wall_s": usage.wall_s, "cpu_s": usage.cpu_s}


def _tail(file: tp.BinaryIO) -> str:
    """The last `_STDERR_TAIL_BYTES` of `file`, decoded."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - _STDERR_TAIL_BYTES))
    return file.read().decode(errors="replace").strip()


def check_outputs(track: Path, folder: Path) -> None:
    """Every written stem must have the length and channels of the track."""
    expected = soundfile.info(str(track))
    stems = sorted(folder.iterdir())
    if not stems:
        raise RuntimeError(f"no stems written in {folder}")
    for stem in stems:
        info = soundfile.info(str(stem))
        if (info.frames, info.channels) != (expected.frames, expected.channels):
            raise RuntimeError(f"{stem} has {info.frames} frames x {info.channels} channels, "
                               f"expected {expected.frames} x {expected.channels}")
        stem.unlink()


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser("tools.bench_separate", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10., 60.])
    parser.add_argument("-n", "--name", default="demucs_unittest")
    parser.add_argument("--repo", type=Path, help="Local folder of model packages (`--repo`).")
    parser.add_argument("--compare", metavar="PYTHON",
                        help="Also run the demucs of this interpreter and print the ratios.")
    parser.add_argument("--workdir", type=Path, help="Where tracks and outputs go (default: tmp).")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP threads of each separation (default: 1).")
    parser.add_argument("extra", nargs="*", help="Extra flags for `demucs` (after --).")
    args = parser.parse_args(argv)
    extra = (["--repo", str(args.repo.resolve())] if args.repo else []) + args.extra
    sides = {"ours": sys.executable, **({"theirs": args.compare} if args.compare else {})}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results: tp.Dict[str, tp.Dict[str, tp.Dict[str, float]]] = {}
        for minutes in args.minutes:
            track = Path(tmp).resolve() / f"track_{minutes:g}min.wav"
            generate_track(track, minutes)
            key = f"{minutes:g}min"
            results[key] = {}
            for side, python in sides.items():
                out = track.parent / "out"
                results[key][side] = measure(track, out, args.name, extra, python,
                                             args.threads)
                check_outputs(track, out / args.name / track.stem)
                print(f"{key} {side}: {json.dumps(results[key][side])}", flush=True)
            if args.compare:
                ours, theirs = results[key]["ours"], results[key]["theirs"]
                print(f"{key}: peak memory ratio ours/theirs "
                      f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.3f}, time ratio "
                      f"{ours['wall_s'] / theirs['wall_s']:.3f}", flush=True)
            track.unlink()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
