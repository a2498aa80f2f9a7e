"""Pre-trained models by name: the HuggingFace hub, the legacy release, a local folder (`--repo`),
a locally trained XP (`--sig`), or the test model."""
import argparse
import logging
import re
from pathlib import Path
import typing as tp

import torch
import yaml

from . import hf
from .apply import Model
from .hdemucs import HDemucs
from .repo import (AnyModel, AnyModelRepo, BagOnlyRepo, LocalRepo, ModelLoadingError,
                   ModelOnlyRepo, RemoteRepo)
from .states import ModelPackageError, _check_diffq
from .utils import fatal

__all__ = ["ROOT_URL", "REMOTE_ROOT", "SOURCES", "DEFAULT_MODEL", "demucs_unittest",
           "add_model_flags", "get_model", "get_model_from_args", "get_model_from_sig",
           "ModelLoadingError",
           "RemoteRepo", "LocalRepo", "BagOnlyRepo", "AnyModelRepo", "ModelOnlyRepo"]

logger = logging.getLogger(__name__)

ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/"
REMOTE_ROOT = Path(__file__).parent / "remote"
SOURCES = ["drums", "bass", "other", "vocals"]
DEFAULT_MODEL = "htdemucs"
_SIGNATURE = re.compile(r"^[\w.-]+$")  # what a signature and a file name of files.txt may hold


def demucs_unittest() -> Model:
    """A small randomly initialised HDemucs, for smoke tests of the separation pipeline."""
    return HDemucs(channels=4, sources=SOURCES)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Add `-s/--sig`, `-n/--name` and `--repo` to a command line parser."""
    group = parser.add_mutually_exclusive_group(required=False)
    group.add_argument("-s", "--sig", help="Locally trained XP signature.")
    group.add_argument("-n", "--name", default=None,
                       help=f"Pretrained model name or signature. Default is {DEFAULT_MODEL}.")
    parser.add_argument("--repo", type=Path,
                        help="Folder containing all pre-trained models for use with -n.")


def _parse_remote_files(remote_file_list: Path) -> tp.Dict[str, str]:
    """`{sig: url}` from a files.txt (`root: PREFIX/` lines set the folder of the next files)."""
    root = ""
    models: tp.Dict[str, str] = {}
    try:
        text = remote_file_list.read_text()
    except UnicodeDecodeError as error:
        raise ModelLoadingError(f"{remote_file_list} is not a text file list: {error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("root:"):
            root = line.split(":", 1)[1].strip()
            continue
        sig = line.split("-", 1)[0]
        if not _SIGNATURE.match(sig) or not _SIGNATURE.match(line):
            raise ModelLoadingError(f"line {number} of {remote_file_list} is not a model file "
                                    f"name like SIG-HASH8.th: {line!r}")
        if sig in models:
            raise ModelLoadingError(f"signature {sig} is listed twice in {remote_file_list}")
        models[sig] = ROOT_URL + root + line
    return models


def _release_repositories() -> AnyModelRepo:
    """The legacy release: models listed in files.txt (kept in the torch hub cache), bag yamls."""
    model_repo = RemoteRepo(_parse_remote_files(REMOTE_ROOT / "files.txt"))
    return AnyModelRepo(model_repo, BagOnlyRepo(REMOTE_ROOT, model_repo))


def _local_repositories(repo: Path) -> AnyModelRepo:
    """The models and bags of a `--repo` folder."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelLoadingError(f"model repository {repo} must exist and be a directory.")
    model_repo = LocalRepo(repo)
    return AnyModelRepo(model_repo, BagOnlyRepo(repo, model_repo))


def _from_repositories(any_repo: AnyModelRepo, name: str) -> AnyModel:
    try:
        return any_repo.get_model(name)
    except ImportError as exc:
        if "diffq" in str(exc):
            _check_diffq()
        raise


def _release_files(name: str) -> tp.List[str]:
    """Signatures of the released models `name` stands for (a bag's members, or itself)."""
    bag_file = REMOTE_ROOT / f"{name}.yaml"
    if bag_file.is_file():
        return [str(sig) for sig in yaml.safe_load(bag_file.read_text())["models"]]
    return [name] if name in _parse_remote_files(REMOTE_ROOT / "files.txt") else []


def _not_found_message(name: str, hub_error: tp.Optional[Exception],
                       release_error: Exception) -> str:
    """One message for a released name found nowhere: each place looked and the files expected."""
    sigs = _release_files(name)
    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")
    th_files = [urls[sig].rsplit("/", 1)[-1] for sig in sigs]
    lines = [f"could not load model {name!r}. Looked in:"]
    if hub_error is not None:
        lines.append(f"- the HuggingFace hub ({hf.hub_repo_id(name)}): {hub_error}")
    else:
        lines.append("- not the HuggingFace hub: huggingface-hub is not installed")
    lines.append(f"- the official release and the torch hub cache: {release_error}")
    if sigs:
        hub_files = [f"{name}.yaml"] + [f"{sig}.safetensors" for sig in sigs]
        if hub_error is not None:
            lines.append(f"Files expected in the HuggingFace cache "
                         f"({hf.repo_cache_dir(hf.hub_repo_id(name))}/snapshots/REVISION/): "
                         f"{', '.join(hub_files)}")
        lines.append(f"Files expected in the torch hub cache "
                     f"({Path(torch.hub.get_dir()) / 'checkpoints'}): {', '.join(th_files)}")
        bag = f"{name}.yaml and " if len(hub_files) > 2 or name != sigs[0] else ""
        lines.append(f"Or put {bag}{', '.join(th_files)} in a folder and pass it with "
                     "`--repo FOLDER` (`repo=Path(FOLDER)` in Python).")
    return "\n".join(lines)


def _get_released_model(name: str) -> AnyModel:
    """`name` from the HuggingFace hub (or its cache), else from the legacy release (or the
    torch hub cache), in the order of Demucs 4.1; one error listing every place otherwise."""
    hub_error: tp.Optional[Exception] = None
    if hf.hub_available():
        try:
            return hf.get_hf_model(name)
        except hf.HubLookupError as error:
            hub_error = error
            logger.debug("%s is not available from the HuggingFace hub (%s); trying the "
                         "legacy release", name, error)
        except (ModelLoadingError, ModelPackageError) as error:
            hub_error = error
            logger.warning("the HuggingFace hub copy of %s cannot be used (%s); trying the "
                           "legacy release", name, error)
    try:
        return _from_repositories(_release_repositories(), name)
    except ModelLoadingError as error:
        raise ModelLoadingError(_not_found_message(name, hub_error, error)) from error


def get_model(name: str, repo: tp.Optional[Path] = None) -> AnyModel:
    """The model or bag called `name` (a bag name or an XP signature), in eval mode.

    Without `repo`, as Demucs 4.1: first the HuggingFace hub (through its cache), then the legacy
    release (downloaded once into the torch hub cache). `hf://[namespace/]name` is taken from the
    hub only. With `repo`, only that folder: models are `SIG[-HASH8].th` or `.safetensors` files
    and bags `NAME.yaml` files. `demucs_unittest` is always the small random test model.
    Offline, the caches answer at once (see `demucs.hf`).
    """
    if name.startswith(hf.HUB_PREFIX):
        model: AnyModel = hf.get_hf_model(name[len(hf.HUB_PREFIX):])
    elif name == "demucs_unittest":
        return demucs_unittest()
    elif repo is None:
        model = _get_released_model(name)
    else:
        model = _from_repositories(_local_repositories(repo), name)
    model.eval()
    return model


def get_model_from_sig(sig: str) -> Model:
    """The model of a locally trained XP (its best state when it has one), in eval mode.

    Needs the training extras (`pip install demucs[train]`) and the XP's Dora folder; exits with
    a message (`utils.fatal`) when the training code cannot be imported.
    """
    try:
        from .train import get_solver_from_sig
    except ImportError as exc:
        fatal("Loading a model from a signature needs the training dependencies: "
              f"`pip install demucs[train]` ({exc}).")
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
