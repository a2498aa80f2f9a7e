"""Sound Demixing Challenge 2023 (MDX track): training on the corrupted MoisesDB sets only."""
from dora import Launcher

from ._explorers import MyExplorer


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="speechgpt,learnfair")
    launcher.bind_({"dset.use_musdb": False})
    with launcher.job_array():
        for dset in ["sdx23_bleeding", "sdx23_labelnoise"]:
            launcher(dset=dset)
