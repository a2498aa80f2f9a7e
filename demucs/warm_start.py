"""Where the weights of a new XP come from when it has no checkpoint of its own: a released model
(`continue_pretrained`, looked up like `demucs -n NAME`) or another XP's checkpoint
(`continue_from`, its best or last state, optionally with its optimizer and loss scale).

A released model gives the XP its architecture too: `train.build_model` builds the model from
the checkpoint's class and constructor arguments (`pretrained_base`), for the config's sources
(`start_from_pretrained`), every time the XP's model is built (also to resume it or export it,
so that an adapted or remapped model always has the same parameters). `continue_from` loads
weights into the model the config describes: the Solver calls it once, when it starts an XP
afresh; a run that resumes from its own checkpoint never does. Both were checked with the
config (`config_check`), so that a bad one is refused before the XP folder exists.
"""
import logging
from pathlib import Path
import typing as tp

import torch

from .catalogue import ModelCatalogue
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_grad_scaler
from .finetune import remap_sources

logger = logging.getLogger(__name__)


def pretrained_base(name: str, repo: tp.Optional[Path]) -> torch.nn.Module:
    """The released single model `name` (from the folder `repo` when given, else looked up like
    `demucs -n NAME`), on CPU, as it was built: its class and constructor arguments. A bag of
    models is refused (ValueError): fine-tuning starts from one model."""
    loaded = ModelCatalogue(repo).get_model(name)
    models = getattr(loaded, "models", [loaded])
    if len(models) != 1:
        raise ValueError(f"continue_pretrained={name} is a bag of {len(models)} models; "
                         "fine-tuning starts from a single model: name one of its members "
                         "(`demucs --list-models` shows them)")
    return models[0]


def start_from_pretrained(base: torch.nn.Module, name: str, sources: tp.Sequence[str],
                          init: tp.Optional[tp.Mapping[str, str]],
                          changes: tp.Mapping[str, tp.Any]) -> torch.nn.Module:
    """The model a fine-tuning from the released model `base` (named `name`) starts with: of
    `base`'s class and constructor arguments, for `sources` matched by name (`init` names the
    checkpoint source each new one starts from, see `finetune.remap_sources`), with the
    training-only arguments of `changes`. Logs what was kept, created and dropped."""
    model, remap = remap_sources(base, sources, init, changes)
    logger.info("Starting from the pretrained model %s (%s): %s", name, type(base).__name__,
                remap.describe())
    return model


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
