"""Export trained XPs as release model packages (`python -m tools.export SIG... [-o DIR] [--sign]`).

Each package is the XP's best state in half precision (or its quantized state when the XP was
trained with DiffQ/QAT), with the training metrics attached. Transformer models trained with
`use_train_segment` get, as their segment, the exact length of the augmented training examples.
The file is `SIG.th`, or `SIG-HASH8.th` with `--sign` (HASH8 checked by `--repo` loading).
"""
import argparse
import glob
from fractions import Fraction
import logging
from pathlib import Path
import sys
import typing as tp

import torch

from demucs import states
from demucs.files import atomic_write

logger = logging.getLogger("tools.export")


class ExportError(Exception):
    """An XP cannot be exported."""


def training_length(solver) -> int:
    """Length in samples of a training example after data augmentation.

    The dataset gives `dset.segment` seconds, pitch/tempo augmentation crops it by the largest
    tempo change, then the augmentation pipeline (random shift) shortens it further.
    """
    args = solver.args
    length = int(args.dset.segment * args.dset.samplerate)
    repitch = args.augment.repitch
    if repitch.proba:
        length = int((1 - 0.01 * repitch.max_tempo) * length)
    model = solver.model
    batch = max(1, int(args.augment.remix.group_size)) if args.augment.remix.proba else 1
    example = torch.zeros(batch, len(model.sources), model.audio_channels, length)
    with torch.no_grad():
        return solver.augment.eval()(example).shape[-1]


def _metrics(history: tp.List[dict]) -> tp.Tuple[dict, dict]:
    """(last validation metrics, last test metrics) of the training history."""
    valid = history[-1].get("valid", {}) if history else {}
    tests = [entry["test"] for entry in history if "test" in entry]
    return valid, tests[-1] if tests else {}


def build_package(solver, sig: str) -> dict:
    """The release package of the solver's XP, from its best state."""
    if solver.best_state is None:
        raise ExportError(f"XP {sig} has no best state yet: train it for at least one epoch "
                          "(`dora run -f SIG`).")
    if len(solver.history) < solver.args.epochs:
        logger.warning("XP %s is not finished (%d/%d epochs), exporting its best state so far.",
                       sig, len(solver.history), solver.args.epochs)
    model = solver.model
    model.load_state_dict(solver.best_state)
    package = states.serialize_model(model, solver.args, solver.quantizer, half=True)
    if getattr(model, "use_train_segment", False):
        package["kwargs"]["segment"] = Fraction(training_length(solver), model.samplerate)
    package["metrics"] = _metrics(solver.history)
    return package


def write_package(package: dict, sig: str, out: Path, sign: bool) -> Path:
    """Save `package` as `out/SIG.th` (or `SIG-HASH8.th` when `sign`), atomically, then remove
    earlier exports of the same XP from `out` (signed or not): a model folder holding two
    packages for one signature cannot be loaded from."""
    out.mkdir(parents=True, exist_ok=True)
    if sign:
        path = states.save_with_checksum(package, out / f"{sig}.th")
    else:
        path = out / f"{sig}.th"
        with atomic_write(path) as temporary:
            torch.save(package, temporary)
    for earlier in [out / f"{sig}.th", *out.glob(f"{glob.escape(sig)}-*.th")]:
        if earlier != path and earlier.is_file():
            logger.info("Removing %s, an earlier export of %s", earlier, sig)
            earlier.unlink()
    return path


def export(sig: str, out: Path, sign: bool = False) -> Path:
    """Export the XP with signature `sig` into the folder `out`; returns the written file."""
    from demucs.train import get_solver_from_sig
    solver = get_solver_from_sig(sig, model_only=True)
    solver.model.cpu()
    return write_package(build_package(solver, sig), sig, out, sign)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.export", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("release_models"),
                        help="Folder receiving the model packages.")
    parser.add_argument("-s", "--sign", action="store_true",
                        help="Add the first 8 hex digits of the file's sha256 to its name.")
    parser.add_argument("xps", nargs="*", help="Signatures of the XPs to export.")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.xps:
        parser.error("give the signatures of the XPs to export, e.g. `python3 -m tools.export "
                     "955717e8` (the 8 hex digits Dora printed for the XP)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"-o {args.out} is a file, not a folder: -o names the folder receiving "
                     "the packages (SIG.th), e.g. -o release_models")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failures = 0
    for sig in args.xps:
        try:
            path = export(sig, args.out, args.sign)
        except (ExportError, FileNotFoundError, RuntimeError) as error:
            logger.error("Cannot export %s: %s", sig, error)
            failures += 1
            continue
        logger.info("Exported %s to %s", sig, path)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
