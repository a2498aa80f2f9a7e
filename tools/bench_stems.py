"""What separating only some stems saves, and what shifts and overlap cost.

    python3 -m tools.bench_stems [--seconds 20] [--repeat 2] [--threads 2] [--json OUT]

Builds a bag of four specialists of the released htdemucs configuration (random weights, one-hot
weights per source, as htdemucs_ft) in a temporary folder, writes a synthetic track, and times the
`demucs` command in fresh processes (model loading, decoding and writing included):

- the full separation against `--two-stems vocals --other-method minus` and `--stems vocals`,
  which run only the vocals specialist; the vocals written must be bit-identical;
- one specialist alone with `--shifts 1` and `2` and `--overlap 0.25` and `0.5`: the time of a
  model forward should not change, so each run should cost its number of forwards (from
  `demucs.plan.make_plan`) times the same time per forward.

Runs are interleaved (A, B, A, B...) so that a change of machine load affects every setting.
"""
import argparse
from fractions import Fraction
import json
from pathlib import Path
import random
import sys
import tempfile
import typing as tp

import numpy as np
import soundfile
import torch
import yaml

from demucs.plan import ApplyOptions, make_plan
from demucs.states import serialize_model
from tools.bench_models import released_htdemucs_config, training_length
from tools.bench_separate import generate_track, measure

SPECIALISTS = 4
FULL = ["--float32", "--clip-mode", "none"]


def write_specialists(folder: Path) -> tp.List[str]:
    """Four released-size HTDemucs packages `spec0.th`... and the bag `specialists.yaml` whose
    weights give each model one source; returns the model names."""
    from demucs.train import get_model
    cfg = released_htdemucs_config()
    names = []
    for index in range(SPECIALISTS):
        torch.manual_seed(index)
        model = get_model(cfg)
        model.segment = Fraction(training_length(cfg), cfg.dset.samplerate)
        names.append(f"spec{index}")
        torch.save(serialize_model(model, {}), folder / f"{names[-1]}.th")
    weights = [[float(member == source) for source in range(SPECIALISTS)]
               for member in range(SPECIALISTS)]
    (folder / "specialists.yaml").write_text(yaml.safe_dump({"models": names,
                                                             "weights": weights}))
    return names


def forwards(seconds: float, shifts: int, overlap: float) -> int:
    """Model forwards of one released htdemucs over `seconds` of audio with these settings."""
    from demucs.train import get_model
    cfg = released_htdemucs_config()
    model = get_model(cfg)
    model.segment = Fraction(training_length(cfg), cfg.dset.samplerate)
    random.seed(0)
    plan = make_plan(model, ApplyOptions(shifts=shifts, overlap=overlap),
                     int(seconds * model.samplerate))
    return sum(len(pass_.segment_starts()) for leaf in plan.leaves() for pass_ in leaf.passes)


def _timed(settings: tp.Dict[str, tp.List[str]], name: str, track: Path, repo: Path,
           out: Path, repeat: int, threads: int) -> tp.Dict[str, tp.List[tp.Dict[str, float]]]:
    """Wall and CPU times of each setting's `demucs` run, interleaved."""
    runs: tp.Dict[str, tp.List[tp.Dict[str, float]]] = {key: [] for key in settings}
    for _ in range(repeat):
        for key, flags in settings.items():
            result = measure(track, out / key, name, ["--repo", str(repo), *flags],
                             threads=threads)
            runs[key].append(result)
            print(f"{name} {key}: {result['wall_s']:.2f} s wall, {result['cpu_s']:.2f} s CPU",
                  file=sys.stderr, flush=True)
    return runs


def _vocals(folder: Path) -> np.ndarray:
    data, _ = soundfile.read(str(next(folder.rglob("vocals.wav"))), dtype="float32")
    return data


def bench(seconds: float, repeat: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_specialists(root)
        track = root / "track.wav"
        generate_track(track, seconds / 60)
        stems = _timed({"full": FULL,
                        "two_stems_minus": FULL + ["--two-stems", "vocals", "--other-method",
                                                   "minus"],
                        "stems_vocals": FULL + ["--stems", "vocals"]},
                       "specialists", track, root, root / "out", repeat, threads)
        identical = {key: bool(np.array_equal(_vocals(root / "out" / key),
                                              _vocals(root / "out" / "full")))
                     for key in ["two_stems_minus", "stems_vocals"]}
        passes = {"shifts1_overlap0.25": (1, 0.25), "shifts2_overlap0.25": (2, 0.25),
                  "shifts1_overlap0.5": (1, 0.5)}
        costs = _timed({key: ["--shifts", str(shifts), "--overlap", str(overlap)]
                        for key, (shifts, overlap) in passes.items()},
                       names[0], track, root, root / "passes", repeat, threads)
    result = {"seconds": seconds, "threads": threads, "torch": torch.__version__,
              "stems_runs": stems, "vocals_bit_identical": identical, "passes_runs": costs,
              "passes_forwards": {key: forwards(seconds, *setting)
                                  for key, setting in passes.items()}}
    return result


def _median(runs: tp.Sequence[tp.Dict[str, float]], key: str) -> float:
    return float(np.median([run[key] for run in runs]))


def _timing(runs: tp.Sequence[tp.Dict[str, float]], base: tp.Sequence[tp.Dict[str, float]]
            ) -> str:
    """Median wall and CPU time of `runs`, and their ratios to those of `base`."""
    wall, cpu = _median(runs, "wall_s"), _median(runs, "cpu_s")
    return (f"{wall:7.2f} s wall (ratio {wall / _median(base, 'wall_s'):.3f}), {cpu:7.2f} s CPU "
            f"(ratio {cpu / _median(base, 'cpu_s'):.3f})")


def report(result: dict) -> str:
    stems = result["stems_runs"]
    lines = [f"{SPECIALISTS} specialists of the released htdemucs, {result['seconds']:g} s track, "
             f"{result['threads']} threads, torch {result['torch']} (medians of the demucs "
             f"command, loading and writing included):"]
    for key, runs in stems.items():
        same = result["vocals_bit_identical"].get(key)
        note = "" if same is None else f", vocals bit-identical: {same}"
        lines.append(f"  {key:18s} {_timing(runs, stems['full'])}{note}")
    lines.append("One specialist, cost against its forwards:")
    passes, base_key = result["passes_runs"], "shifts1_overlap0.25"
    base_forwards = result["passes_forwards"][base_key]
    for key, runs in passes.items():
        count = result["passes_forwards"][key]
        lines.append(f"  {key:20s} {_timing(runs, passes[base_key])}, {count} forwards "
                     f"(ratio {count / base_forwards:.2f})")
    return "\n".join(lines)


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools.bench_stems", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    result = bench(args.seconds, args.repeat, args.threads)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
