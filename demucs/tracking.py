"""Experiment tracking: each epoch's metrics as TensorBoard events in the XP folder.

`tensorboard --logdir outputs/xps` then shows every XP side by side (one run per signature). The
events hold every number of `history.json` (`train/loss`, `valid/nsdr_vocals`, `test/si_sdr`, ...),
the learning rate (`optim/lr`) and the epoch's duration in seconds (`time/epoch`). Tracking is on
by default (`misc.tensorboard`, outside the signature) and needs the `tensorboard` package
(`pip install ".[train]"`); without it the run says so once and goes on.
"""
import logging
from pathlib import Path
import typing as tp

logger = logging.getLogger(__name__)

EVENTS_FOLDER = "tensorboard"


class EpochTracker:
    """Writes the metrics of each finished epoch to `folder / EVENTS_FOLDER`; a no-op when
    disabled or when tensorboard is not installed."""

    def __init__(self, folder: Path, enabled: bool):
        self._writer: tp.Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("TensorBoard events are not written: install tensorboard "
                           "(pip install tensorboard) or set misc.tensorboard=false.")
            return
        self._writer = SummaryWriter(str(Path(folder) / EVENTS_FOLDER))

    def log_epoch(self, epoch: int, metrics: tp.Dict[str, tp.Dict[str, tp.Any]], lr: float,
                  seconds: float) -> None:
        """Record epoch `epoch` (0-based; logged as step epoch + 1): `{stage: {name: value}}`."""
        if self._writer is None:
            return
        step = epoch + 1
        for stage, values in metrics.items():
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{stage}/{name}", value, step)
        self._writer.add_scalar("optim/lr", lr, step)
        self._writer.add_scalar("time/epoch", seconds, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
