"""Where the weights of a new XP come from when it has no checkpoint of its own: a released model
(`continue_pretrained`, looked up like `demucs -n NAME`) or another XP's checkpoint
(`continue_from`, its best or last state, optionally with its optimizer and loss scale).

The Solver calls these once, when it starts an XP afresh; a run that resumes from its own
checkpoint never does. The signature of `continue_from` was matched and checked with the config
(`config_check`), so that a bad one is refused before the XP folder exists.
"""
import logging
from pathlib import Path
import typing as tp

import torch

from .catalogue import ModelCatalogue
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_grad_scaler

logger = logging.getLogger(__name__)


def load_pretrained(model: torch.nn.Module, name: str, repo: tp.Optional[str]) -> None:
    """Load the weights of the released single model `name` (from `repo`, a local folder, when
    given) into `model`; a bag of models is refused."""
    logger.info("Starting from the pretrained model %s", name)
    loaded = ModelCatalogue(Path(repo) if repo else None).get_model(name)
    models = getattr(loaded, "models", [loaded])
    if len(models) != 1:
        raise ValueError(f"continue_pretrained={name} is a bag of {len(models)} models; "
                         "fine-tuning needs a single model.")
    model.load_state_dict(models[0].state_dict())


def continue_from_xp(folder: Path, model: torch.nn.Module, best: bool,
                     optimizer: tp.Optional[torch.optim.Optimizer] = None,
                     scaler: tp.Optional[torch.amp.GradScaler] = None) -> dict:
    """Load the best (`best`) or last state of the XP in `folder` into `model`, and its
    optimizer state (and fp16 loss scale) into `optimizer` and `scaler` when an optimizer is
    given (`continue_opt`). Returns that XP's best state, which the new XP starts with."""
    path = folder / CHECKPOINT_NAME
    sig = folder.name
    if not path.exists():
        raise FileNotFoundError(f"continue_from={sig}: no checkpoint at {path}. Train that XP "
                                "first (or check the signature with `dora info -f SIG`).")
    logger.info("Starting from XP %s (%s state)", sig, "best" if best else "last")
    package = load_checkpoint(path)
    model.load_state_dict(package["best_state"] if best else package["state"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(package["optimizer"])
        restore_grad_scaler(package, scaler, path)
    return package["best_state"]
