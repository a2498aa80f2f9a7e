"""Export a model or bag to ONNX for separation with ONNX Runtime.

usage: python3 -m tools.export_onnx NAME_OR_SIG [--repo DIR] -o OUT [--segment S]
                                    [--quantize int8] [--opset N]

Writes `OUT/NAME_I.onnx` for each model I of the bag and `OUT/manifest.json`; load them with
`demucs.onnx_runtime.load_onnx_bag(OUT)` (see docs/onnx.md). Exit status 1 with one message
when the model cannot be exported (e.g. a Wiener-filtered HDemucs).
"""
import argparse
import logging
from pathlib import Path
import sys
import typing as tp

from demucs.files import describe_write_error, unwritable_reason
from demucs.onnx_export import OPSET, QUANTIZE_CHOICES, OnnxExportError, export_bag, file_stem
from demucs.pretrained import ModelLoadingError, get_model
from demucs.states import ModelPackageError

logger = logging.getLogger("tools.export_onnx")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "tools.export_onnx", description="Export a Demucs model or bag to ONNX graphs.")
    parser.add_argument("name", help="pretrained model or bag name, or an XP signature")
    parser.add_argument("--repo", type=Path,
                        help="folder of local models (as `demucs --repo`)")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output folder (created; its manifest.json is overwritten)")
    parser.add_argument("--segment", type=float,
                        help="segment in seconds the non-transformer models are exported for "
                             "(default: their own); transformer models keep their training "
                             "segment")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="dynamic int8 quantization of the matrix products (smaller, "
                             "faster on CPU, slightly less accurate)")
    parser.add_argument("--opset", type=int, default=OPSET,
                        help=f"ONNX opset (default {OPSET}, the first with STFT and DFT)")
    return parser


def _fail(message: str) -> int:
    print(f"tools.export_onnx: {message}", file=sys.stderr)
    return 1


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problem = (f"{args.out} is a file, not a folder" if args.out.is_file()
               else unwritable_reason(args.out))
    if problem:  # before the model is loaded (maybe downloaded)
        return _fail(f"-o {args.out}: {problem}; choose another -o.")
    try:
        model = get_model(args.name, repo=args.repo)
    except (ModelLoadingError, ModelPackageError) as exc:
        return _fail(f"cannot load {args.name}: {exc}")
    try:
        manifest = export_bag(model, args.out, name=file_stem(args.name), segment=args.segment,
                              quantize=args.quantize, opset=args.opset)
    except OnnxExportError as exc:
        return _fail(f"cannot export {args.name}: {exc}")
    except OSError as exc:
        return _fail(f"could not write the export: {describe_write_error(exc, args.out)}")
    logger.info("Exported %s to %s", args.name, manifest.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
