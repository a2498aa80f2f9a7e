"""Hybrid Transformer Demucs trained on MusDB HQ plus 800 extra tracks (the `htdemucs` paper).

Gives `htdemucs` (955717e8: 5 transformer layers, 512 bottom channels, 10 s excerpts) and
`hdemucs_mmi` (75fc33f5, the v3 hybrid model on the same data), with ablations on the
transformer depth, the bottom channels, the excerpt length, the data and the augmentations.
"""
import typing as tp

from dora import Launcher

from ._explorers import MyExplorer

BASE = {
    "dset": "extra_mmi_goodclean",
    "test.shifts": 0,
    "model": "htdemucs",
    "htdemucs.dconv_mode": 3,
    "htdemucs.depth": 4,
    "htdemucs.t_dropout": 0.02,
    "htdemucs.t_layers": 5,
    "max_batches": 800,
    "ema.epoch": [0.9, 0.95],
    "ema.batch": [0.9995, 0.9999],
    "dset.segment": 10,
    "batch_size": 32,
}
# Sparse attention kernels (xformers): experimental, never released.
SPARSE = {
    "batch_size": 3 * 8,
    "augment.remix.group_size": 3,
    "htdemucs.t_auto_sparsity": True,
    "htdemucs.t_sparse_self_attn": True,
    "htdemucs.t_sparse_cross_attn": True,
    "htdemucs.t_sparsity": 0.9,
    "htdemucs.t_layers": 7,
}
# Repitching trims excerpts to survive the largest tempo change (12%): without it, train on
# excerpts that much shorter so that the model sees the same context.
NO_REPITCH = {"augment.repitch.proba": 0.0, "dset.segment": 10 * 0.88}
SEGMENTS = [5, 10, 15]


def transformer(t_layers: int, bottom_channels: int, *extra: dict) -> tp.List[dict]:
    """Overrides of an htdemucs XP of this grid, `extra` applied last."""
    return [BASE, {"htdemucs.t_layers": t_layers, "htdemucs.bottom_channels": bottom_channels},
            *extra]


HTDEMUCS = transformer(5, 512, {"dset.segment": 10})  # 955717e8
SPARSE_HTDEMUCS = transformer(5, 512, SPARSE, {"dset.segment": 15, "htdemucs.t_layers": 7})


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="devlab,learnlab,learnfair")
    for dset in ["extra_mmi_goodclean", "extra44", "musdb44"]:
        launcher(BASE, {"model": "hdemucs", "dset": dset})

    with launcher.job_array():
        for t_layers in [5, 7]:
            for bottom_channels in [0, 512]:
                if (t_layers, bottom_channels) == (5, 0):
                    launcher(transformer(5, 0, {"augment.remix.proba": 0.0}))
                    launcher(transformer(5, 0, NO_REPITCH))
                elif (t_layers, bottom_channels) == (5, 512):
                    for dset in ["musdb44", "extra44"]:
                        launcher(transformer(5, 512, {"dset": dset}))
                    launcher(SPARSE_HTDEMUCS)
                for segment in SEGMENTS:
                    launcher(transformer(t_layers, bottom_channels, {"dset.segment": segment}))
