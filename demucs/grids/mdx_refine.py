"""MDX 2021 Track A, second stage: the automix fine-tunings of the `mdx` grid's XPs.

The DiffQ versions continue from the matching quantized XP of the `mdx` grid, which must have
finished training first.
"""
import typing as tp

from dora import Launcher

from ._explorers import MyExplorer
from ._xps import TRACK_A, checked_argv, overrides_of, parent_of
from ..train import main
from .mdx import DIFFQ_PENALTIES


def finished_quantized_parent(parent_argv: tp.List[str], penalty: float) -> str:
    """Signature of the `mdx` XP `parent_argv` with DiffQ `penalty`; it must have completed."""
    xp = main.get_xp(parent_argv + [f"quant.diffq={penalty}"])
    xp.link.load()
    epochs = len(xp.link.history)
    if epochs != xp.cfg.epochs:
        raise RuntimeError(
            f"XP {xp.sig} (quant.diffq={penalty}) of the mdx grid has {epochs} of its "
            f"{xp.cfg.epochs} epochs in {xp.history}: run `dora grid mdx` to completion before "
            "`dora grid mdx_refine`.")
    return xp.sig


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="learnlab")
    for sig in TRACK_A:
        argv = checked_argv(main, overrides_of(sig), sig)
        launcher(argv)
        parent = parent_of(sig)
        parent_argv = main.value_to_argv(overrides_of(parent))
        for penalty in DIFFQ_PENALTIES:
            quantized = finished_quantized_parent(parent_argv, penalty)
            launcher(argv, {"quant.diffq": penalty, "continue_from": quantized})
