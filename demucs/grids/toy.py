"""Tiny CPU XPs on the toy MusDB, to check that `dora grid` works on a Slurm cluster in minutes.

Three XPs (two seeds of a tiny Demucs, a tiny Hybrid Transformer Demucs), each a few epochs of a
few batches (the second seed runs `LONG_EPOCHS`, long enough to be cancelled mid-training and
resumed) on `dset=toy` (generate it first: `python3 -m tools.toy_musdb data/toy_musdb`, as
the jobs would otherwise race to create it). They run on a CPU-only node:
`launcher.slurm_(gpus=0, cpus_per_task=1, mem_per_gpu=...)`, which Dora turns into one task with
one CPU and that memory (with `gpus=0`, `mem_per_gpu` is the memory of the job). The GPU-only
settings of the config's `slurm` section (the `volta32gb` constraint, the CUDA `module load`
setup) are cleared and the time limit is 15 minutes; the partition comes from the config and the
command line as for every grid (`dora grid toy -p PARTITION`).

`ToyExplorer` adds a `slurm.note` column: for a job that failed, its log file; for a pending job
whose reason means it can never start (its request exceeds the partition, e.g.
`PartitionConfig`), that reason, so that the table says so instead of showing PENDING forever.
"""
import subprocess
import typing as tp

from dora import Launcher
import treetable as tt
from treetable.table import _Node

from ._explorers import MyExplorer

# Pending reasons no amount of waiting resolves (the request does not fit the partition/node).
UNSCHEDULABLE_REASONS = frozenset({
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
    "PartitionDown", "PartitionInactive", "InvalidAccount", "InvalidQOS",
})
FAILED_STATES = frozenset({"FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL"})

MEMORY_GB = 2  # per job: a tiny model and a few 1 s excerpts
TIME_MINUTES = 15

TINY = {
    "dset": "toy",
    "dset.samplerate": 8000,  # the toy files are resampled on loading: 5 times less compute
    "dset.segment": 1,
    "dset.shift": 0.5,  # the shift augmentation crops that much: it must stay below the segment
    "epochs": 4,
    "batch_size": 2,
    "max_batches": 4,
    "augment.repitch.proba": 0.0,
    "augment.remix.group_size": 2,
    "misc.num_workers": 0,
    "test.workers": 0,
    "test.sdr": False,
}
LONG_EPOCHS = 16  # the XP that the Slurm tests cancel after its first epoch, then relaunch
TINY_DEMUCS = {"model": "demucs", "demucs.channels": 4, "demucs.depth": 2}
TINY_HTDEMUCS = {"model": "htdemucs", "htdemucs.channels": 8, "htdemucs.depth": 2,
                 "htdemucs.nfft": 64, "htdemucs.t_layers": 1, "htdemucs.t_heads": 1}


def _pending_reason(job_id: str) -> str:
    """Slurm's reason for a pending job (empty when squeue cannot tell)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip()


def job_note(state: tp.Optional[str], job_id: tp.Optional[str], log: tp.Any) -> str:
    """What the `note` column says for a job in `state`: its log when it failed, the reason
    when it pends and can never start, nothing otherwise."""
    if state in FAILED_STATES:
        return f"{state}, log: {log}"
    if state == "PENDING" and job_id is not None:
        reason = _pending_reason(job_id)
        if reason in UNSCHEDULABLE_REASONS:
            return f"never starts ({reason}): request exceeds the partition"
    return ""


class ToyExplorer(MyExplorer):
    """`MyExplorer` plus a `slurm.note` column telling why a job failed or will never start."""

    def get_grid_metrics(self) -> tp.List[_Node]:
        return super().get_grid_metrics() + [tt.group("slurm", [tt.leaf("note")])]

    def process_sheep(self, sheep: tp.Any, history: tp.List[dict]) -> dict:
        note = job_note(sheep.state(), sheep.current_job_id, sheep.log)
        return {**self.process_history(history), "slurm": {"note": note}}


@ToyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(gpus=0, cpus_per_task=1, mem_per_gpu=MEMORY_GB, time=TIME_MINUTES,
                    constraint="", setup=[])
    launcher.bind_(TINY)
    launcher(TINY_DEMUCS)
    launcher(TINY_DEMUCS, {"seed": 43, "epochs": LONG_EPOCHS})
    launcher(TINY_HTDEMUCS)
