"""Does bf16 pay on this CPU? Separation time and output difference of `--amp bf16` against float32.

    python3 -m tools.bench_precision [--seconds 15] [--repeat 3] [--threads 2] [--models htdemucs
                                     hdemucs] [--json OUT]

For each model (the released htdemucs configuration and the MDX hdemucs one, random seeded
weights; hdemucs has BLSTMs, the layers oneDNN has no bf16 kernel for below AVX512_BF16), it
separates the same synthetic stereo mixture in float32 and in bf16, alternating the two so that
drift in the machine's speed hits both alike, and prints the median times, their ratio (below 1:
bf16 is faster) and the relative L2 distance and largest sample difference between the stems.
The first line names the CPU kind (`demucs.precision.cpu_isa`) and the kernel caps set in the
environment: run it again with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` to see an AVX2
CPU.
"""
import argparse
from fractions import Fraction
import json
import os
import random
import statistics
import sys
import time
import typing as tp

import torch

from demucs.apply import apply_model
from demucs.hdemucs import HDemucs
from demucs.precision import cpu_has_bf16_units, cpu_isa
from demucs.pretrained import SOURCES
from tools.bench_models import separation_model, synthetic_mix

CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def build_model(name: str) -> torch.nn.Module:
    """The released htdemucs configuration, or the MDX hdemucs one, with seeded random weights."""
    if name == "htdemucs":
        return separation_model(None).eval()
    torch.manual_seed(0)
    return HDemucs(SOURCES, segment=Fraction(44)).eval()


def separate(model: torch.nn.Module, mix: torch.Tensor,
             amp: tp.Optional[str]) -> tp.Tuple[float, torch.Tensor]:
    """Wall seconds of one separation of `mix` in the precision `amp` selects, and the stems."""
    random.seed(0)
    begin = time.perf_counter()
    with torch.no_grad():
        stems = apply_model(model, mix, shifts=1, split=True, overlap=0.25, amp=amp)[0]
    return time.perf_counter() - begin, stems


def compare(name: str, seconds: float, repeat: int) -> dict:
    """float32 against bf16 for the model `name` on `seconds` of audio, `repeat` times each."""
    model = build_model(name)
    mix = synthetic_mix(seconds, model.samplerate, model.audio_channels)
    times: tp.Dict[str, tp.List[float]] = {"float32": [], "bf16": []}
    outputs = {}
    for _ in range(repeat):
        for label, amp in [("float32", None), ("bf16", "bf16")]:
            wall, outputs[label] = separate(model, mix, amp)
            times[label].append(wall)
    reference, mixed = outputs["float32"], outputs["bf16"]
    medians = {label: statistics.median(values) for label, values in times.items()}
    return {"model": name, "seconds_of_audio": seconds, "float32_s": medians["float32"],
            "bf16_s": medians["bf16"], "ratio": medians["bf16"] / medians["float32"],
            "relative_l2": float((mixed - reference).norm() / reference.norm()),
            "max_abs_diff": float((mixed - reference).abs().max()), "times": times}


def machine() -> dict:
    """The CPU kind and the caps that decide which kernels ran."""
    return {"cpu_isa": cpu_isa(), "bf16_units": cpu_has_bf16_units(),
            "aten": torch.backends.cpu.get_cpu_capability(),
            "caps": {name: os.environ[name] for name in CAPS if name in os.environ},
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def format_results(info: dict, results: tp.Sequence[dict]) -> str:
    caps = " ".join(f"{key}={value}" for key, value in info["caps"].items()) or "no caps"
    lines = [f"CPU {info['cpu_isa']} (bf16 units: {'yes' if info['bf16_units'] else 'no'}), "
             f"ATen {info['aten']}, {caps}, {info['threads']} threads, torch {info['torch']}",
             f"{'model':<10} {'float32 s':>9} {'bf16 s':>8} {'bf16/fp32':>9} {'rel. L2':>9} "
             f"{'max |diff|':>10}"]
    for res in results:
        lines.append(f"{res['model']:<10} {res['float32_s']:>9.2f} {res['bf16_s']:>8.2f} "
                     f"{res['ratio']:>9.2f} {res['relative_l2']:>9.2e} "
                     f"{res['max_abs_diff']:>10.2e}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.bench_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15., help="mixture length")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per precision")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", choices=["htdemucs", "hdemucs"],
                        default=["htdemucs", "hdemucs"])
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0:
        get_parser().error("--repeat must be at least 1 and --seconds positive")
    torch.set_num_threads(args.threads)
    info = machine()
    results = [compare(name, args.seconds, args.repeat) for name in args.models]
    print(format_results(info, results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": info, "results": results}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
