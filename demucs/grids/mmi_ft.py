"""Per-source fine-tuning of the `mmi` XPs: gives `htdemucs_ft` (from 955717e8, 10 s excerpts).

Each parent is fine-tuned once per source, with a one-hot loss weight, from its best state.
"""
import typing as tp

from dora import Launcher

from ._explorers import MyExplorer
from ._xps import checked_argv
from ..train import main
from . import mmi

FINE_TUNING = {
    "optim.lr": 1e-4,
    "augment.remix.proba": 0,
    "augment.scale.proba": 0,
    "augment.shift_same": True,
    "htdemucs.t_weight_decay": 0.05,
    "batch_size": 8,
    "optim.clip_grad": 5,
    "optim.optim": "adamw",
    "epochs": 50,
    "dset.wav2_valid": True,
    "ema.epoch": [],  # faster validation
}
# parent signature -> (its overrides in the mmi grid, excerpt lengths to fine-tune on)
PARENTS: tp.Dict[str, tp.Tuple[tp.List[dict], tp.List[int]]] = {
    "2899e11a": (mmi.SPARSE_HTDEMUCS, [15, 18]),
    "955717e8": (mmi.HTDEMUCS, [10, 15]),
}
NUM_SOURCES = 4


def one_hot(index: int) -> tp.List[int]:
    """Loss weights training only source `index`."""
    return [int(source == index) for source in range(NUM_SOURCES)]


def get_sub(launcher: Launcher, sig: str) -> Launcher:
    """A launcher for the parent XP `sig` (scheduled once as it is, so that it exists), bound to
    continue from its best state (Demucs 4.1's name)."""
    overrides, _ = PARENTS[sig]
    sub = launcher.bind(checked_argv(main, overrides, sig))
    sub()
    sub.bind_({"continue_from": sig, "continue_best": True})
    return sub


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=4, time=3 * 24 * 60, partition="devlab,learnlab,learnfair")
    with launcher.job_array():
        for sig, (_, segments) in PARENTS.items():
            sub = get_sub(launcher, sig)
            sub.bind_(FINE_TUNING)
            for segment in segments:
                for source in range(NUM_SOURCES):
                    sub({"weights": one_hot(source), "dset.segment": segment})
