"""Experiment tracking: each epoch's metrics as one summary line per stage in the logs, as
TensorBoard events in the XP folder, and optionally in Weights & Biases.

`tensorboard --logdir outputs/xps` then shows every XP side by side (one run per signature). The
events hold every number of `history.json` (`train/loss`, `valid/nsdr_vocals`, `test/si_sdr`, ...),
the learning rate (`optim/lr`) and the epoch's duration in seconds (`time/epoch`). Tracking is on
by default (`misc.tensorboard`, outside the signature) and needs the `tensorboard` package
(`pip install ".[train]"`); without it the run says so once and goes on.

With `misc.wandb=true` (off by default; needs `pip install wandb`) the same numbers go to a W&B
run named after the signature, in project `misc.wandb_project`, its files in the XP folder.
`WANDB_MODE=offline` keeps everything local (`wandb sync` uploads it later).
"""
import logging
from pathlib import Path
import typing as tp

logger = logging.getLogger(__name__)

EVENTS_FOLDER = "tensorboard"

# The metrics each stage's summary line shows, and their formats.
TRAIN_FORMATS = {"loss": ".4f", "reco": ".4f", "grad": ".4f", "ms": ".2f", "penalty": ".4f"}
VALID_FORMATS = {"loss": ".4f", "reco": ".4f", "ms": ".2f", "penalty": ".4f", "best": ".4f",
                 "nsdr": ".3f"}
TEST_FORMATS = {"sdr": ".3f", "sdr_med": ".3f", "nsdr": ".3f", "si_sdr": ".3f"}
FORMATS = {"Train": TRAIN_FORMATS, "Valid": VALID_FORMATS, "Test": TEST_FORMATS}
SUMMARY_STAGES = tuple(FORMATS)  # also the history keys, lower-cased


def _format(metrics: tp.Dict[str, tp.Any], formats: tp.Dict[str, str]) -> tp.Dict[str, str]:
    """Keep the metrics named in `formats` (plus `nsdr*`), formatted for the logs."""
    out = {}
    for key, value in metrics.items():
        fmt = formats.get(key, ".3f" if key.startswith("nsdr") else None)
        if fmt is not None and isinstance(value, (int, float)):
            out[key] = format(value, fmt)
    return out


def log_summary(stage: str, epoch: int, metrics: tp.Dict[str, tp.Any]) -> None:
    """Log `Train|Valid|Test Summary | Epoch N | Key=value | ...` (`stage` is one of
    `SUMMARY_STAGES`, `epoch` 0-based) for the logs and the console."""
    text = " | ".join(f"{key.capitalize()}={value}"
                      for key, value in _format(metrics, FORMATS[stage]).items())
    logger.info("%s Summary | Epoch %d | %s", stage, epoch + 1, text)


def _wandb_run(folder: Path, project: str, config: tp.Any) -> tp.Any:
    """A W&B run for the XP in `folder` (named after its signature, resumed if it exists), or
    None when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        logger.warning("misc.wandb=true but wandb is not installed (pip install wandb): the "
                       "metrics go to TensorBoard and history.json only.")
        return None
    return wandb.init(project=project, name=folder.name, id=folder.name, resume="allow",
                      dir=str(folder), config=config)


class EpochTracker:
    """Writes the metrics of each finished epoch to `folder / EVENTS_FOLDER` and, when
    `wandb_project` is given, to Weights & Biases; a no-op when disabled or when the packages
    are not installed."""

    def __init__(self, folder: Path, enabled: bool, wandb_project: tp.Optional[str] = None,
                 config: tp.Any = None):
        self._writer: tp.Any = None
        self._wandb: tp.Any = None
        if wandb_project:
            self._wandb = _wandb_run(Path(folder), wandb_project, config)
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
        scalars = {f"{stage}/{name}": value for stage, values in metrics.items()
                   for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        scalars.update({"optim/lr": lr, "time/epoch": seconds})
        step = epoch + 1
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
