"""Pre-trained models by name: the remote release, a local folder (`--repo`), or the test model."""
import argparse
import logging
import re
from pathlib import Path
import typing as tp

from .apply import BagOfModels, Model
from .repo import AnyModelRepo, BagOnlyRepo, LocalRepo, ModelLoadingError, ModelOnlyRepo, RemoteRepo
from .states import _check_diffq

__all__ = ["ROOT_URL", "REMOTE_ROOT", "SOURCES", "DEFAULT_MODEL", "demucs_unittest",
           "add_model_flags", "get_model", "get_model_from_args", "ModelLoadingError",
           "RemoteRepo", "LocalRepo", "BagOnlyRepo", "AnyModelRepo", "ModelOnlyRepo"]

logger = logging.getLogger(__name__)

ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/"
REMOTE_ROOT = Path(__file__).parent / "remote"
SOURCES = ["drums", "bass", "other", "vocals"]
DEFAULT_MODEL = "htdemucs"
_SIGNATURE = re.compile(r"^[\w.-]+$")  # what a signature and a file name of files.txt may hold


def demucs_unittest() -> Model:
    """A small randomly initialised HDemucs, for smoke tests of the separation pipeline."""
    from .hdemucs import HDemucs
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


def _repositories(repo: tp.Optional[Path]) -> AnyModelRepo:
    model_repo: ModelOnlyRepo
    if repo is None:
        model_repo = RemoteRepo(_parse_remote_files(REMOTE_ROOT / "files.txt"))
        return AnyModelRepo(model_repo, BagOnlyRepo(REMOTE_ROOT, model_repo))
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelLoadingError(f"model repository {repo} must exist and be a directory.")
    model_repo = LocalRepo(repo)
    return AnyModelRepo(model_repo, BagOnlyRepo(repo, model_repo))


def get_model(name: str, repo: tp.Optional[Path] = None) -> tp.Union[Model, BagOfModels]:
    """The model or bag called `name` (a bag name or an XP signature), in eval mode.

    Without `repo` the official release is used (downloaded once into the torch hub cache);
    with `repo`, models are `SIG[-HASH8].th` files and bags `NAME.yaml` files in that folder.
    `demucs_unittest` is always the small random test model.
    """
    if name == "demucs_unittest":
        return demucs_unittest()
    any_repo = _repositories(repo)
    try:
        model = any_repo.get_model(name)
    except ImportError as exc:
        if "diffq" in str(exc):
            _check_diffq()
        raise
    model.eval()
    return model


def get_model_from_args(args: argparse.Namespace) -> tp.Union[Model, BagOfModels]:
    """The model selected by the flags of `add_model_flags` (default: `htdemucs`)."""
    if args.name is None:
        args.name = DEFAULT_MODEL
        logger.info("using the default model %s", DEFAULT_MODEL)
    return get_model(name=args.name, repo=args.repo)
