"""MDX 2021 Track A (MusDB HQ only): the four models the automix fine-tuning starts from.

Each is launched plain and with the DiffQ penalties used for the quantized `mdx_q` models.
Once they are trained, `dora grid mdx_refine` runs the fine-tunings themselves.
"""
from dora import Launcher

from ._explorers import MyExplorer
from ._xps import TRACK_A, checked_argv, overrides_of, parent_of
from ..train import main

__all__ = ["TRACK_A", "explorer"]

DIFFQ_PENALTIES = [1e-4, 3e-4]


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="learnlab")
    for sig in TRACK_A:
        parent = parent_of(sig)
        argv = checked_argv(main, overrides_of(parent), parent)
        launcher(argv)
        for penalty in DIFFQ_PENALTIES:
            launcher(argv, {"quant.diffq": penalty})
