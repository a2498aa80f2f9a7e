"""The project end to end on a CPU: `python3 -m tools.demo` (what `make demo` runs).

The demo is a list of steps run in order, each reporting what it did. Today it generates the toy
MusDB under ./data/toy_musdb (kept between runs, with the settings of conf/dset/toy.yaml), the
dataset every later step uses.
"""
import argparse
from dataclasses import dataclass
import logging
from pathlib import Path
import sys
import time
import typing as tp

from omegaconf import OmegaConf

from tools.toy_musdb import describe, ensure_toy_musdb, is_toy_musdb

logger = logging.getLogger(__name__)

TOY_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "dset" / "toy.yaml"


@dataclass
class Demo:
    """What the steps share: the folder the demo works in (config paths are relative to it)."""
    workdir: Path

    @property
    def toy_settings(self) -> tp.Dict[str, tp.Any]:
        return OmegaConf.to_container(OmegaConf.load(TOY_CONFIG).dset, resolve=True)

    @property
    def toy_path(self) -> Path:
        return self.workdir / self.toy_settings["musdb"]


def generate_toy_musdb(demo: Demo) -> str:
    """Generate the toy MusDB where `dset=toy` training looks for it, unless it is there."""
    path = demo.toy_path
    existed = is_toy_musdb(path)
    ensure_toy_musdb(path, **demo.toy_settings["toy"])
    status = "Already present, kept as is." if existed else "Generated."
    return f"{status}\n{describe(path)}"


Step = tp.Tuple[str, tp.Callable[[Demo], str]]
STEPS: tp.List[Step] = [
    ("Generate the toy MusDB", generate_toy_musdb),
]


def run(demo: Demo, steps: tp.Sequence[Step] = STEPS) -> None:
    for number, (title, step) in enumerate(steps, start=1):
        print(f"[{number}/{len(steps)}] {title}", flush=True)
        begin = time.time()
        report = step(demo)
        print(report)
        print(f"    ({time.time() - begin:.1f} s)", flush=True)


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd(),
                        help="folder holding data/ and the other outputs (default: current)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(Demo(args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
