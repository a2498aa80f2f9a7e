"""The Dora explorer shared by every grid: which metrics `dora grid NAME` shows for each XP, and
what `dora grid NAME` says when Slurm cannot take the jobs.

A grid module defines `explorer`, a function taking a `dora.Launcher` and decorated with
`MyExplorer`; Dora imports it as `demucs.grids.NAME`.
"""
import contextlib
import io
import os
import subprocess
import sys
import typing as tp

from dora import Explorer
from dora.shep import Shepherd
import treetable as tt
from treetable.table import _Node

SOURCES = ("drums", "bass", "other", "vocals")


# sbatch's words when the machine has Slurm's programs but no cluster to talk to.
NO_SLURM_CONFIG = ("Could not establish a configuration source", "Unable to contact slurm",
                   "slurm.conf", "Zero Bytes were transmitted or received")


def _grid_name(explore: tp.Callable) -> str:
    """`NAME` of the grid module `demucs.grids.NAME` defining `explore`."""
    module = getattr(explore, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if module.startswith("demucs.grids.") else "NAME"


def slurm_failure_message(grid: str, error: BaseException) -> str:
    """One line for a submission that Slurm could not take: Slurm missing or not configured on
    this machine (what runs locally instead), or sbatch refusing the job (its own words)."""
    text = " ".join(str(error).split())
    local = (f"`dora grid {grid} --dry_run --init` lists the grid's XPs and registers their "
             "signatures, then `dora run -f SIG` trains one of them on this machine")
    if isinstance(error, FileNotFoundError) or "Could not detect \"srun\"" in text:
        return (f"dora grid {grid}: Slurm is not installed on this machine (no srun/sbatch on "
                f"PATH), nothing was submitted: {local}.")
    if any(words in text for words in NO_SLURM_CONFIG):
        return (f"dora grid {grid}: Slurm is not configured on this machine ({text}), nothing "
                f"was submitted: {local}.")
    return (f"dora grid {grid}: sbatch refused a job ({text or type(error).__name__}); the XPs "
            f"submitted before it keep running. Check the Slurm settings (-p PARTITION, "
            f"--constraint, the config's slurm section: docs/training.md, section 9), or {local}.")


def _is_submission_error(error: BaseException) -> bool:
    """Whether `error`, raised while Dora submits or cancels jobs, comes from Slurm's programs
    (sbatch/scancel failing or missing) rather than from a bug."""
    from submitit.core.utils import FailedJobError
    if isinstance(error, (FailedJobError, subprocess.CalledProcessError, FileNotFoundError)):
        return True
    return isinstance(error, RuntimeError) and "srun" in str(error)


class _GuardedShepherd(Shepherd):
    """Dora's `Shepherd` whose `commit()` (where Dora calls sbatch and scancel through submitit)
    ends the command with `slurm_failure_message` and status 1, instead of an 11-frame
    traceback. What submitit prints on stderr meanwhile (sbatch's error) is held back: the
    message repeats it. Set HYDRA_FULL_ERROR=1 to see the traceback."""

    grid_name = "NAME"

    def commit(self) -> None:
        held = io.StringIO()
        try:
            with contextlib.redirect_stderr(held):
                super().commit()
        except Exception as error:
            if not _is_submission_error(error) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                sys.stderr.write(held.getvalue())
                raise
            print(slurm_failure_message(self.grid_name, error), file=sys.stderr)
            raise SystemExit(1) from None
        sys.stderr.write(held.getvalue())


def _guard_submissions(shepherd: tp.Any, grid: str) -> None:
    """Turn the grid's `shepherd` into a `_GuardedShepherd` (its class is swapped, so that it
    still pickles for Dora's process pool)."""
    if type(shepherd) is Shepherd:
        shepherd.__class__ = _GuardedShepherd
    if isinstance(shepherd, _GuardedShepherd):
        shepherd.grid_name = grid


class MyExplorer(Explorer):
    """Explorer summarising a Demucs XP history as train / valid / test columns.

    The valid columns show the best values reached so far (`breco`, `b_nsdr`, ...), as the
    last epoch of a noisy training is rarely the one that gets kept. A run without validation
    (`dset.valid_tracks=0`) leaves them empty.

    Calling it (Dora does, with the grid's `Launcher`) also makes a failed submission end with
    one line saying why (`slurm_failure_message`).
    """

    test_metrics = ["nsdr", "sdr_med"]

    def __call__(self, launcher: tp.Any) -> None:
        shepherd = getattr(launcher, "_shepherd", None)
        if shepherd is not None:
            _guard_submissions(shepherd, _grid_name(self.explore))
        super().__call__(launcher)

    def get_grid_metrics(self) -> tp.List[_Node]:
        """Columns of the `dora grid` table, grouped as train / valid / test."""
        best_nsdr = [tt.leaf("b_nsdr", ".2f")]
        best_nsdr += [tt.leaf(f"b_nsdr_{source}", ".2f") for source in SOURCES]
        return [
            tt.group("train", [
                tt.leaf("epoch"),
                tt.leaf("reco", ".3f"),
            ], align=">"),
            tt.group("valid", [
                tt.leaf("penalty", ".1f"),
                tt.leaf("ms", ".1f"),
                tt.leaf("reco", ".2%"),
                tt.leaf("breco", ".2%"),
            ] + best_nsdr, align=">"),
            tt.group("test", [tt.leaf(name, ".2f") for name in self.test_metrics], align=">"),
        ]

    def process_history(self, history: tp.List[dict]) -> dict:
        """Summarise the per-epoch metrics (`history.json`) into the table columns.

        train and test hold the latest values (test is only run every few epochs); valid holds
        the latest values plus `bmain` / `breco`, the lowest raw-model loss and reconstruction
        error so far, and `b_<source>`, `b_nsdr*`, taken at the latest best epoch.
        """
        train: tp.Dict[str, tp.Any] = {"epoch": len(history)}
        valid: tp.Dict[str, tp.Any] = {}
        test: tp.Dict[str, tp.Any] = {}
        best_main_loss = float("inf")
        best_reco = float("inf")
        for metrics in history:
            train.update(metrics.get("train", {}))
            test.update(metrics.get("test", {}))
            epoch_valid = metrics.get("valid")
            if not epoch_valid:  # trained without validation
                continue
            valid.update(epoch_valid)
            if "main" in epoch_valid:
                best_main_loss = min(best_main_loss, epoch_valid["main"]["loss"])
            best_reco = min(best_reco, epoch_valid["reco"])
            valid["bmain"] = best_main_loss
            valid["breco"] = best_reco
            if _is_best_epoch(epoch_valid):
                valid.update(_best_epoch_columns(epoch_valid))
        return {"train": train, "valid": valid, "test": test}


def _is_best_epoch(valid: dict) -> bool:
    """Whether this epoch's valid metrics are the best so far (the selection metric is either
    the loss or the nSDR, and the solver records its best value under `best`)."""
    best = valid.get("best")
    return valid.get("loss") == best or valid.get("nsdr") == best


def _best_epoch_columns(valid: dict) -> dict:
    """`b_<source>` from each `reco_<source>`, and `b_nsdr*` from each `nsdr*` metric."""
    columns = {}
    for name, value in valid.items():
        if name.startswith("reco_"):
            columns["b_" + name[len("reco_"):]] = value
        elif name.startswith("nsdr"):
            columns["b_" + name] = value
    return columns
