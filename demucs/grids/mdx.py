"""MDX 2021 Track A (MusDB HQ only): the four models the automix fine-tuning starts from.

Each is launched plain and with the DiffQ penalties used for the quantized `mdx_q` models.
Once they are trained, `dora grid mdx_refine` runs the fine-tunings themselves.
"""
from dora import Launcher

from ._explorers import MyExplorer
from ._xps import TRACK_A, mdx_2021_argvs, parent_of
from ..train import main

__all__ = ["TRACK_A", "explorer"]

DIFFQ_PENALTIES = [1e-4, 3e-4]


@MyExplorer
def explorer(launcher: Launcher) -> None:
    for argv in mdx_2021_argvs(launcher, main, TRACK_A, parent_of):
        launcher(argv)
        for penalty in DIFFQ_PENALTIES:
            launcher(argv, {"quant.diffq": penalty})
