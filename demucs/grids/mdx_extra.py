"""MDX 2021 Track B (extra training data): the first training of each Track B model.

Each root XP is launched on the extra tracks (`extra44`) and on the extra tracks plus the
MusDB test set (`extra_test`, also with DiffQ); its later stages are listed by `dora info -f SIG`.
"""
from dora import Launcher

from ._explorers import MyExplorer
from ._xps import TRACK_B, checked_argv, overrides_of, root_of
from ..train import main
from .mdx import DIFFQ_PENALTIES


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="learnlab")
    for sig in TRACK_B:
        root = root_of(sig)
        argv = checked_argv(main, overrides_of(root), root)
        for dset in ["extra44", "extra_test"]:
            sub = launcher.bind(argv, dset=dset)
            sub()
            if dset == "extra_test":
                for penalty in DIFFQ_PENALTIES:
                    sub({"quant.diffq": penalty})
