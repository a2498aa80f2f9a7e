"""MDX 2021 Track B (extra training data): the first training of each Track B model.

Each root XP is launched on the extra tracks (`extra44`) and on the extra tracks plus the
MusDB test set (`extra_test`, also with DiffQ); its later stages are listed by `dora info -f SIG`.
"""
from dora import Launcher

from ._explorers import MyExplorer
from ._xps import TRACK_B, mdx_2021_argvs, root_of
from ..train import main
from .mdx import DIFFQ_PENALTIES


@MyExplorer
def explorer(launcher: Launcher) -> None:
    for argv in mdx_2021_argvs(launcher, main, TRACK_B, root_of):
        for dset in ["extra44", "extra_test"]:
            sub = launcher.bind(argv, dset=dset)
            sub()
            if dset == "extra_test":
                for penalty in DIFFQ_PENALTIES:
                    sub({"quant.diffq": penalty})
