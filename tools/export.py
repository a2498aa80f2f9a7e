"""Export trained XPs as release model packages (`python -m tools.export SIG... [-o DIR] [--sign]`).

Each package is the XP's best state in half precision (or its quantized state when the XP was
trained with DiffQ/QAT), with the training metrics attached. Transformer models trained with
`use_train_segment` get, as their segment, the exact length of the augmented training examples.
Low-rank adapters (`lora.rank`) are merged into the weights: the package is an ordinary model of
the base class and arguments. The file is `SIG.th`, or `SIG-HASH8.th` with `--sign` (HASH8
checked by `--repo` loading).

`--specialists NAME` also writes the bag `NAME.yaml` of the exported XPs, as htdemucs_ft was made:
each XP was fine-tuned for one source (the one with the largest of its training `weights`), and the
bag takes each source from its specialist only (one-hot per-source weights).
"""
import argparse
import glob
from fractions import Fraction
import logging
from pathlib import Path
import sys
import typing as tp

import torch

import yaml

from demucs import lora, states
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
    if lora.has_adapters(model):
        if solver.quantizer is not None:
            raise ExportError(f"XP {sig} combines low-rank adapters with quantization, which "
                              "cannot be merged into one quantized model")
        logger.info("Merging the low-rank adapters of %s into its weights.", sig)
        model = lora.merge_adapters(model)
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


def _specialty(sig: str, sources: tp.Sequence[str], weights: tp.Sequence[float]) -> str:
    """The source an XP was fine-tuned for: the one with the largest training weight."""
    top = max(weights)
    best = [source for source, weight in zip(sources, weights) if weight == top]
    if len(weights) != len(sources) or len(best) != 1:
        raise ExportError(f"XP {sig} was trained with weights={list(weights)} for the sources "
                          f"{list(sources)}: a specialist is trained with one weight above the "
                          "others, e.g. weights=[0,0,0,1] for the last source")
    return best[0]


Specialist = tp.Tuple[str, tp.List[str], tp.List[float]]


def specialist_bag(members: tp.Sequence[Specialist]) -> dict:
    """The bag (`models`, one-hot `weights`) taking each source from its specialist.

    `members` are `(signature, sources, training weights)`; they must share their sources and
    cover each source exactly once (ExportError otherwise).
    """
    sources = members[0][1]
    owners: tp.Dict[str, str] = {}
    for sig, member_sources, weights in members:
        if list(member_sources) != list(sources):
            raise ExportError(f"XP {sig} separates {list(member_sources)}, XP {members[0][0]} "
                              f"{list(sources)}: the specialists of a bag share their sources")
        source = _specialty(sig, sources, weights)
        if source in owners:
            raise ExportError(f"XPs {owners[source]} and {sig} are both specialists of {source}: "
                              "give one specialist per source")
        owners[source] = sig
    missing = [source for source in sources if source not in owners]
    if missing:
        raise ExportError(f"no specialist for {', '.join(missing)}: give one XP per source")
    rows = [[int(owners[source] == sig) for source in sources] for sig, _, _ in members]
    return {"models": [sig for sig, _, _ in members], "weights": rows}


def _specialist(sig: str, path: Path) -> Specialist:
    """`(signature, sources, training weights)` of the package exported at `path`."""
    package = states.load_package(path)
    sources = package["kwargs"].get("sources") or package["args"][0]
    weights = (package.get("training_args") or {}).get("weights")
    if weights is None:
        raise ExportError(f"{path} does not record its training weights: export it again")
    return sig, list(sources), list(weights)


def write_bag(bag: dict, name: str, out: Path) -> Path:
    """Save `bag` as `out/NAME.yaml`, the bag file `demucs -n NAME --repo out` loads."""
    path = out / f"{name}.yaml"
    with atomic_write(path) as temporary:
        temporary.write_text(yaml.safe_dump(bag, default_flow_style=None, sort_keys=False))
    return path


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.export", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("release_models"),
                        help="Folder receiving the model packages.")
    parser.add_argument("-s", "--sign", action="store_true",
                        help="Add the first 8 hex digits of the file's sha256 to its name.")
    parser.add_argument("--specialists", metavar="NAME",
                        help="Also write the bag NAME.yaml taking each source from the XP "
                             "fine-tuned for it (its largest training weight).")
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
    name = args.specialists
    if name is not None and (Path(name).name != name or name in args.xps or not name.strip()):
        parser.error(f"--specialists {name!r} must name the bag: a file name without folder, "
                     "other than the signatures of its models (the bag is written to -o)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exported = []
    for sig in args.xps:
        try:
            path = export(sig, args.out, args.sign)
        except (ExportError, FileNotFoundError, RuntimeError) as error:
            logger.error("Cannot export %s: %s", sig, error)
            continue
        logger.info("Exported %s to %s", sig, path)
        exported.append((sig, path))
    if len(exported) < len(args.xps):
        if args.specialists:
            logger.error("Bag %s not written: not every XP was exported.", args.specialists)
        sys.exit(1)
    if args.specialists:
        try:
            bag = specialist_bag([_specialist(sig, path) for sig, path in exported])
            path = write_bag(bag, args.specialists, args.out)
        except ExportError as error:
            logger.error("Cannot write the bag %s: %s", args.specialists, error)
            sys.exit(1)
        logger.info("Wrote the bag %s to %s", args.specialists, path)


if __name__ == "__main__":
    main()
