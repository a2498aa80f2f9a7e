"""Build `outputs.tar.gz`: the Dora XP folders (`outputs/xps/<sig>/.argv.json`) of the released
models' experiments, so that after `tar xvf outputs.tar.gz` the command `dora info -f SIG` shows
the hyper-parameters of SIG and `dora run -f SIG` retrains it.

It holds every published MDX 2021 XP (Track A, Track B and all their ancestors) and every XP of
the grids that need no trained parent (mdx, mdx_extra, mmi, mmi_ft). Each signature is computed
from this checkout's config and grid definitions, so building it also checks them.

Usage: python3 -m tools.make_outputs [-o outputs.tar.gz]
"""
import argparse
import gzip
import io
import logging
from pathlib import Path
import tarfile
import tempfile
import typing as tp

from dora.grid import RunGridArgs, run_grid
from dora.main import DecoratedMain

from demucs.files import atomic_open

logger = logging.getLogger(__name__)

GRIDS = ["mdx", "mdx_extra", "mmi", "mmi_ft"]
ARGV_FILE = ".argv.json"


def init_published_xps(main: DecoratedMain) -> tp.List[str]:
    """Register every published MDX 2021 XP in `main.dora.dir`; returns their signatures."""
    from demucs.grids._xps import XPS, checked_argv

    for sig, overrides in XPS.items():
        main.init_xp(main.get_xp(checked_argv(main, overrides, sig)))
    return list(XPS)


def init_grid_xps(main: DecoratedMain, grid: str) -> tp.List[str]:
    """Register the XPs of `demucs.grids.<grid>` in `main.dora.dir`, as
    `dora grid GRID --dry_run --init` does; returns their signatures."""
    import importlib

    explorer = importlib.import_module(f"demucs.grids.{grid}").explorer
    args = RunGridArgs(dry_run=True, init=True, monitor=False, silent=True)
    return [sheep.xp.sig for sheep in run_grid(main, explorer, grid, args=args)]


def write_tarball(xps_dir: Path, sigs: tp.Iterable[str], output: Path) -> None:
    """Write `outputs/xps/<sig>/.argv.json` for each of `sigs` into the gzipped tar `output`.

    Entries are sorted and carry no time or owner, so the archive only changes with its content.
    """
    with atomic_open(output, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_entry(tar, "outputs")
        _add_entry(tar, "outputs/xps")
        for sig in sorted(set(sigs)):
            _add_entry(tar, f"outputs/xps/{sig}")
            _add_entry(tar, f"outputs/xps/{sig}/{ARGV_FILE}",
                       (xps_dir / sig / ARGV_FILE).read_bytes())


def _add_entry(tar: tarfile.TarFile, name: str, data: tp.Optional[bytes] = None) -> None:
    """Add a folder (no `data`) or a file to `tar`, with a fixed mode and no time or owner."""
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    else:
        info.mode = 0o644
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def build(output: Path) -> tp.List[str]:
    """Build `output`; returns the signatures it holds."""
    from demucs.train import main

    original_dir = main.dora.dir
    with tempfile.TemporaryDirectory() as tmp:
        main.dora.dir = Path(tmp) / "outputs"
        try:
            sigs = init_published_xps(main)
            for grid in GRIDS:
                sigs += init_grid_xps(main, grid)
                logger.info("grid %s registered", grid)
            write_tarball(main.dora.dir / main.dora.xps, sigs, output)
        finally:
            main.dora.dir = original_dir
    return sorted(set(sigs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs.tar.gz"),
                        help="archive to write (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sigs = build(args.output)
    logger.info("wrote %s with %d XPs", args.output, len(sigs))


if __name__ == "__main__":
    main()
