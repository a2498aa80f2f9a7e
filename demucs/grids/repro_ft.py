"""Automix fine-tuning of every finished XP of the `repro` grid (run `dora grid repro` first)."""
import typing as tp

from dora import Launcher
from dora.xp import XP

from ._explorers import MyExplorer
from ..train import main

FINE_TUNING = {
    "ema.epoch": [0.9, 0.95], "ema.batch": [0.9995, 0.9999],
    "test.every": 1, "test.sdr": True, "epochs": 4,
    "dset.segment": 28, "dset.shift": 2,
    "dset": "auto_mus", "augment.remix.proba": 0, "augment.scale.proba": 0,
    "augment.shift_same": True,
    "batch_size": 16, "optim.lr": 1e-4, "model_segment": 44,
}


def finished_repro_xps() -> tp.Iterator[XP]:
    """XPs linked from the `repro` grid folder whose training ran all its epochs."""
    folder = main.dora.dir / main.dora._grids / "repro"
    if not folder.is_dir():
        raise RuntimeError(f"No grid folder {folder}: run `dora grid repro` first.")
    for link in sorted(folder.iterdir()):
        if not link.is_symlink():
            continue
        xp = main.get_xp_from_sig(link.name)
        xp.link.load()
        if len(xp.link.history) == xp.cfg.epochs:
            yield xp


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=300, partition="devlab,learnlab", constraint="volta32gb")
    for xp in finished_repro_xps():
        launcher(xp.argv, [f'continue_from="{xp.sig}"'], FINE_TUNING)
