"""Time separation with the PyTorch and the ONNX Runtime backends (a benchmark, not a test).

usage: python3 -m tools.bench_onnx [--seconds 30] [--threads 2] [--repeats 2] [--no-int8]

Builds the released htdemucs architecture with random weights (seeded), exports it to ONNX
(float32, and int8 unless --no-int8) and separates the same random stereo mix with
`apply_model` on each backend (same shift offsets), printing the best wall time of each and the
relative L2 difference of the ONNX outputs to PyTorch's. The figures go to docs/onnx.md.
"""
import argparse
from fractions import Fraction
import random
import tempfile
import time
from pathlib import Path
import typing as tp

import torch

from demucs.apply import apply_model
from demucs.htdemucs import HTDemucs
from demucs.onnx_export import export_bag
from demucs.onnx_runtime import load_onnx_bag

SOURCES = ["drums", "bass", "other", "vocals"]


def released_htdemucs() -> HTDemucs:
    """The architecture of the released `htdemucs` model, randomly initialised (seed 0)."""
    torch.manual_seed(0)
    return HTDemucs(SOURCES, dconv_mode=3, bottom_channels=512, t_layers=5, t_dropout=0.02,
                    segment=Fraction(39, 5)).eval()


def best_time(separate: tp.Callable[[], torch.Tensor],
              repeats: int) -> tp.Tuple[float, torch.Tensor]:
    """Shortest wall time of `repeats` calls of `separate`, and its output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        random.seed(0)  # the same shift offsets for every backend
        begin = time.perf_counter()
        out = separate()
        best = min(best, time.perf_counter() - begin)
    assert out is not None
    return best, out


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser("tools.bench_onnx")
    parser.add_argument("--seconds", type=float, default=30.)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = released_htdemucs()
    mix = 0.1 * torch.randn(1, 2, int(args.seconds * model.samplerate),
                            generator=torch.Generator().manual_seed(1))
    torch_time, reference = best_time(lambda: apply_model(model, mix), args.repeats)
    print(f"pytorch: {torch_time:.2f} s")
    variants = [None] if args.no_int8 else [None, "int8"]
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in variants:
            folder = Path(tmp) / (quantize or "fp32")
            begin = time.perf_counter()
            export_bag(model, folder, name="htdemucs", quantize=quantize)
            export_time = time.perf_counter() - begin
            bag = load_onnx_bag(folder, threads=args.threads)
            seconds, out = best_time(lambda: apply_model(bag, mix), args.repeats)
            error = float((out - reference).norm() / reference.norm())
            print(f"onnxruntime {quantize or 'fp32'}: {seconds:.2f} s "
                  f"({seconds / torch_time:.3f} of pytorch), rel. L2 to pytorch {error:.2e}, "
                  f"export {export_time:.0f} s")


if __name__ == "__main__":
    main()
