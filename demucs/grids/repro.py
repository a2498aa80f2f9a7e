"""Reproduction of the Demucs v2/v3 trainings on MusDB HQ only, and ablations of v3.

`repro_mdx_a*` bags use the `newt` (time domain) and `hdem` (hybrid) XPs trained with the SVD
penalty; finish them with `dora grid repro_ft`.
"""
from dora import Launcher

from ._explorers import MyExplorer

EMAS = {"ema.epoch": [0.9, 0.95], "ema.batch": [0.9995, 0.9999]}
DEMUCS_V2 = {"model": "demucs", "demucs.dconv_mode": 0, "demucs.gelu": False,
             "demucs.lstm_layers": 2}
TIME_V3 = {"model": "demucs", "demucs.normalize": True}
HYBRID_V3 = {"model": "hdemucs"}
SVD = {"svd.penalty": 1e-5, "svd": "base2"}
# Each removes or changes one ingredient of TIME_V3 (trained with SVD).
ABLATIONS = [
    {"ema.epoch": [], "ema.batch": []},
    {"demucs.dconv_lstm": 10},
    {"demucs.dconv_attn": 10},
    {"demucs.dconv_attn": 10, "demucs.dconv_lstm": 10, "demucs.lstm_layers": 2},
    {"demucs.dconv_mode": 0},
    {"demucs.gelu": False},
]


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="devlab,learnlab")
    launcher.bind_(EMAS, {"epochs": 600})

    with launcher.job_array():
        launcher(DEMUCS_V2, epochs=360)
        for model in [TIME_V3, HYBRID_V3]:
            sub = launcher.bind(model)
            sub(SVD)
            sub(SVD, seed=43)
            if model is TIME_V3:
                sub()
                for ablation in ABLATIONS:
                    sub(SVD, ablation)
