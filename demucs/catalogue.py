"""The model catalogue: every lookup of a model by name, and the one reader of the release list.

A name is looked up in one of three places, in the order of Demucs 4.1:
- `hf://[namespace/]name`: the HuggingFace hub only (`demucs.hf`);
- without a folder: the hub first (through its cache), then the legacy release, that is the models
  listed in `remote/files.txt` (downloaded once into the torch hub cache) and the bags of
  `remote/*.yaml`;
- with a folder (`--repo`): only its `SIG[-HASH8].th|.safetensors` models and `NAME.yaml` bags.

`remote/files.txt` is read here and nowhere else (`read_release_list`), every bag yaml through
`repo.read_bag`. `demucs.pretrained` is the public facade over this module (`get_model`, the
command-line flags, locally trained XPs); the training code (`continue_pretrained`) uses this module
directly, so that training never imports the facade, which imports training.
"""
import functools
import logging
from pathlib import Path
import re
import typing as tp

import torch

from . import hf
from .bag import Model
from .hdemucs import HDemucs
from .repo import (AnyModel, AnyModelRepo, BagOnlyRepo, LocalRepo, ModelLoadingError,
                   ModelOnlyRepo, RemoteRepo, read_bag)
from .states import ModelPackageError, check_diffq

logger = logging.getLogger(__name__)

ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/"
REMOTE_ROOT = Path(__file__).parent / "remote"
RELEASE_LIST = REMOTE_ROOT / "files.txt"
SOURCES = ["drums", "bass", "other", "vocals"]
UNITTEST_MODEL = "demucs_unittest"
_FILE_NAME = re.compile(r"^[\w.-]+$")  # what a signature and a file name of files.txt may hold
ModelListing = tp.Dict[str, tp.Dict[str, tp.Union[str, Path]]]


def demucs_unittest() -> Model:
    """A small randomly initialised HDemucs, for smoke tests of the separation pipeline."""
    return HDemucs(channels=4, sources=SOURCES)


def read_release_list(path: Path = RELEASE_LIST) -> tp.Dict[str, str]:
    """`{sig: url}` of a release list such as `remote/files.txt`: one `SIG-HASH8.th` file name a
    line, `root: PREFIX/` lines setting the folder of the next files, `#` comments.

    `ModelLoadingError` names the file and line of anything else (binary content, a name that is
    not a file name, a signature listed twice)."""
    root = ""
    models: tp.Dict[str, str] = {}
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ModelLoadingError(f"{path} is not a text file list: {error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("root:"):
            root = line.split(":", 1)[1].strip()
            continue
        sig = line.split("-", 1)[0]
        if not _FILE_NAME.match(sig) or not _FILE_NAME.match(line):
            raise ModelLoadingError(f"line {number} of {path} is not a model file name like "
                                    f"SIG-HASH8.th: {line!r}")
        if sig in models:
            raise ModelLoadingError(f"signature {sig} is listed twice in {path}")
        models[sig] = ROOT_URL + root + line
    return models


class ModelCatalogue:
    """The models one lookup reaches: with `repo` None, the hub and the legacy release; else only
    the folder `repo`. Its repositories are built on first use (reading files.txt, or listing the
    folder), so a catalogue sees the folder as it is when it is first asked."""

    def __init__(self, repo: tp.Optional[Path] = None):
        self.repo = None if repo is None else Path(repo)

    @functools.cached_property
    def repositories(self) -> AnyModelRepo:
        """The single models and bags of the legacy release, or of the folder `repo`."""
        model_repo: ModelOnlyRepo
        if self.repo is None:
            model_repo, root = RemoteRepo(read_release_list()), REMOTE_ROOT
        elif self.repo.is_dir():
            model_repo, root = LocalRepo(self.repo), self.repo
        else:
            raise ModelLoadingError(f"model repository {self.repo} must exist and be a directory.")
        return AnyModelRepo(model_repo, BagOnlyRepo(root, model_repo))

    def list_models(self) -> ModelListing:
        """`{"single": {sig: url or path}, "bag": {name: yaml path}}` (the hub is not listed)."""
        return {"single": self.repositories.model_repo.list_model(),
                "bag": self.repositories.bag_repo.list_model()}

    def bag(self, name: str) -> dict:
        """The checked content of the bag `name` stands for: a single model's signature is a bag
        of one (`{"models": [sig]}`), a bag the content of its yaml (`repo.read_bag`)."""
        if self.repositories.model_repo.has_model(name):
            return {"models": [name]}
        bags = self.repositories.bag_repo.list_model()
        if name not in bags:
            raise ModelLoadingError(f"{name} is neither a bag ({name}.yaml) nor a model in "
                                    f"{self._place()}; bags: {', '.join(sorted(bags))}")
        return read_bag(Path(bags[name]))

    def location(self, sig: str) -> tp.Union[str, Path]:
        """Where the file of the single model `sig` is: its URL in the release, its path in a
        folder."""
        models = self.repositories.model_repo.list_model()
        if sig not in models:
            raise ModelLoadingError(f"no model with signature {sig} in {self._place()}")
        return models[sig]

    def get_model(self, name: str) -> AnyModel:
        """The model or bag called `name`, in eval mode (the test model `demucs_unittest` as
        built); see the module's docstring for where it is looked up."""
        if name.startswith(hf.HUB_PREFIX):
            model: AnyModel = hf.get_hf_model(name[len(hf.HUB_PREFIX):])
        elif name == UNITTEST_MODEL:
            return demucs_unittest()
        elif self.repo is None:
            model = self._released_model(name)
        else:
            model = self._from_repositories(name)
        model.eval()
        return model

    def _place(self) -> str:
        return f"the release ({REMOTE_ROOT})" if self.repo is None else str(self.repo)

    def _from_repositories(self, name: str) -> AnyModel:
        try:
            return self.repositories.get_model(name)
        except ImportError as exc:
            if "diffq" in str(exc):
                check_diffq()
            raise

    def _released_model(self, name: str) -> AnyModel:
        """`name` from the HuggingFace hub (or its cache), else from the legacy release (or the
        torch hub cache); one error listing every place otherwise."""
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
            return self._from_repositories(name)
        except ModelLoadingError as error:
            raise ModelLoadingError(self._not_found_message(name, hub_error, error)) from error

    def _released_members(self, name: str) -> tp.List[str]:
        """Signatures of the released models `name` stands for; none for an unknown name."""
        try:
            return self.bag(name)["models"]
        except ModelLoadingError:
            return []

    def _not_found_message(self, name: str, hub_error: tp.Optional[Exception],
                           release_error: Exception) -> str:
        """One message for a released name found nowhere: each place looked and the files
        expected there."""
        sigs = self._released_members(name)
        th_files = [str(self.location(sig)).rsplit("/", 1)[-1] for sig in sigs]
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
