"""The Dora explorer shared by every grid: which metrics `dora grid NAME` shows for each XP.

A grid module defines `explorer`, a function taking a `dora.Launcher` and decorated with
`MyExplorer`; Dora imports it as `demucs.grids.NAME`.
"""
import typing as tp

from dora import Explorer
import treetable as tt
from treetable.table import _Node

SOURCES = ("drums", "bass", "other", "vocals")


class MyExplorer(Explorer):
    """Explorer summarising a Demucs XP history as train / valid / test columns.

    The valid columns show the best values reached so far (`breco`, `b_nsdr`, ...), as the
    last epoch of a noisy training is rarely the one that gets kept.
    """

    test_metrics = ["nsdr", "sdr_med"]

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
            epoch_valid = metrics["valid"]
            train.update(metrics["train"])
            valid.update(epoch_valid)
            if "main" in epoch_valid:
                best_main_loss = min(best_main_loss, epoch_valid["main"]["loss"])
            best_reco = min(best_reco, epoch_valid["reco"])
            valid["bmain"] = best_main_loss
            valid["breco"] = best_reco
            if _is_best_epoch(epoch_valid):
                valid.update(_best_epoch_columns(epoch_valid))
            test.update(metrics.get("test", {}))
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
