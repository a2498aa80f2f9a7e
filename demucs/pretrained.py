"""Pre-trained models by name, the public facade of Demucs 4.1: `get_model`, the command-line flags
(`add_model_flags`, `get_model_from_args`) and locally trained XPs (`--sig`, `get_model_from_sig`).

The lookups themselves (the HuggingFace hub, the legacy release, a `--repo` folder, the test model)
are `demucs.catalogue.ModelCatalogue`. This module sits above the training code, which it imports
(lazily) for `get_model_from_sig`; the training code uses the catalogue, never this module.
"""
import argparse
import logging
from pathlib import Path
import typing as tp

from .bag import Model
from .catalogue import ModelCatalogue
# Names of Demucs 4.1's `demucs.pretrained`, kept importable from here.
from .catalogue import REMOTE_ROOT, ROOT_URL, SOURCES, demucs_unittest  # noqa: F401
from .hdemucs import HDemucs  # noqa: F401
from .repo import (AnyModel, AnyModelRepo, BagOnlyRepo, LocalRepo, ModelLoadingError,  # noqa: F401
                   ModelOnlyRepo, RemoteRepo)
from .utils import fatal  # noqa: F401

__all__ = ["ROOT_URL", "REMOTE_ROOT", "SOURCES", "DEFAULT_MODEL", "demucs_unittest",
           "add_model_flags", "get_model", "get_model_from_args", "get_model_from_sig",
           "ModelLoadingError", "TrainingCodeMissingError",
           "RemoteRepo", "LocalRepo", "BagOnlyRepo", "AnyModelRepo", "ModelOnlyRepo"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "htdemucs"


class TrainingCodeMissingError(ModelLoadingError):
    """A locally trained XP (`--sig`) was asked for, but the training code cannot be imported
    (the training extras are not installed)."""


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Add `-s/--sig`, `-n/--name` and `--repo` to a command line parser."""
    group = parser.add_mutually_exclusive_group(required=False)
    group.add_argument("-s", "--sig", help="Locally trained XP signature.")
    group.add_argument("-n", "--name", default=None,
                       help=f"Pretrained model name or signature. Default is {DEFAULT_MODEL}.")
    parser.add_argument("--repo", type=Path,
                        help="Folder containing all pre-trained models for use with -n.")


def get_model(name: str, repo: tp.Optional[Path] = None) -> AnyModel:
    """The model or bag called `name` (a bag name or an XP signature), in eval mode.

    Without `repo`, as Demucs 4.1: first the HuggingFace hub (through its cache), then the legacy
    release (downloaded once into the torch hub cache). `hf://[namespace/]name` is taken from the
    hub only. With `repo`, only that folder: models are `SIG[-HASH8].th` or `.safetensors` files
    and bags `NAME.yaml` files. `demucs_unittest` is always the small random test model.
    Offline, the caches answer at once (see `demucs.hf`). `ModelLoadingError` says where it looked.
    """
    return ModelCatalogue(repo).get_model(name)


def get_model_from_sig(sig: str) -> Model:
    """The model of a locally trained XP (its best state when it has one), in eval mode.

    Needs the training extras (`pip install demucs[train]`) and the XP's Dora folder;
    `TrainingCodeMissingError` (a `ModelLoadingError`) says what to install when the training code
    cannot be imported.
    """
    try:
        from .train import get_solver_from_sig
    except ImportError as exc:
        raise TrainingCodeMissingError(
            f"loading the model of XP {sig} needs the training dependencies: "
            f"`pip install demucs[train]` ({exc}).") from exc
    solver = get_solver_from_sig(sig, model_only=True)
    if solver.best_state is not None:
        solver.model.load_state_dict(solver.best_state)
    model = solver.model
    model.eval()
    return model


def get_model_from_args(args: argparse.Namespace) -> AnyModel:
    """The model selected by the flags of `add_model_flags`: the XP of `--sig` when given, else
    `--name` (default: `htdemucs`) from `--repo` or the released models."""
    if getattr(args, "sig", None) is not None:
        return get_model_from_sig(args.sig)
    if getattr(args, "name", None) is None:
        args.name = DEFAULT_MODEL
        logger.info("using the default model %s", DEFAULT_MODEL)
    return get_model(name=args.name, repo=getattr(args, "repo", None))
