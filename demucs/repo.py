"""Model repositories: where pre-trained models and bags of models are found by name.

A single model is identified by its XP signature (e.g. `955717e8`) and stored as `SIG.th` or
`SIG-HASH8.th` (HASH8 = first 8 hex digits of the file's sha256, checked on load), or in the
`.safetensors` format that Demucs 4.1 publishes on the HuggingFace hub (`SIG.safetensors`).
A bag is a `NAME.yaml` file listing member signatures (`models`), optional per-source `weights`
and `segment`.
"""
from hashlib import sha256
import logging
from pathlib import Path
import re
import typing as tp
from urllib.error import URLError

import torch
import yaml

from . import network
from .bag import BagOfModels, Model
from .files import atomic_write
from .states import CorruptPackageError, load_model

logger = logging.getLogger(__name__)

AnyModel = tp.Union[Model, BagOfModels]
_CHECKSUM = re.compile(r"^[0-9a-f]{8}$")


class ModelLoadingError(RuntimeError):
    """A model could not be found, downloaded or verified."""


def _sha256_prefix(path: Path, length: int) -> str:
    digest = sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def check_checksum(path: Path, checksum: str) -> None:
    """Raise `ModelLoadingError` unless the sha256 of `path` starts with `checksum`."""
    actual = _sha256_prefix(path, len(checksum))
    if actual != checksum:
        raise ModelLoadingError(
            f"invalid checksum for file {path}: expected {checksum} but got {actual}; "
            "the file is corrupted or was modified, delete it and export or download it again")


class ModelOnlyRepo:
    """Interface of a repository of single models, indexed by signature."""

    def has_model(self, sig: str) -> bool:
        """Whether the repository holds a model with signature `sig`."""
        raise NotImplementedError()

    def get_model(self, sig: str) -> Model:
        """The model with signature `sig`; `ModelLoadingError` when it cannot be had."""
        raise NotImplementedError()

    def list_model(self) -> tp.Dict[str, tp.Union[str, Path]]:
        """`{sig: location}` of every model of the repository."""
        raise NotImplementedError()


class RemoteRepo(ModelOnlyRepo):
    """Models downloaded on demand (into the torch hub cache) from `{sig: url}`."""

    def __init__(self, models: tp.Dict[str, str]):
        self._models = models

    def has_model(self, sig: str) -> bool:
        return sig in self._models

    def get_model(self, sig: str) -> Model:
        try:
            url = self._models[sig]
        except KeyError:
            raise ModelLoadingError(f"could not find a pre-trained model with signature {sig}.")
        path = self.cache_path(sig)
        if path.exists():
            return _load_cached(path)
        return self._download_and_load(sig, url, path)

    def cache_path(self, sig: str) -> Path:
        """Where the model file of `sig` is kept: the torch hub cache, under the URL's name."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self._models[sig].rsplit("/", 1)[-1]

    def _download_and_load(self, sig: str, url: str, path: Path) -> Model:
        """Download `url` beside `path`, check it (checksum of its name, then a full parse) and
        only then rename it to `path`: a failed or corrupted download leaves nothing behind."""
        reason = network.unreachable_reason(url)
        if reason is not None:
            raise ModelLoadingError(
                f"model {sig} is not in the torch hub cache ({path}) and cannot be downloaded "
                f"from {url}: {reason}. {_OFFLINE_HINT.format(filename=path.name)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, path)
        with atomic_write(path) as partial:
            _download(sig, url, partial)
            _verify_download(url, partial, split_signature(path.stem)[1])
            try:
                model = load_model(partial)
            except CorruptPackageError as error:
                raise ModelLoadingError(f"the download of {url} is truncated or corrupted "
                                        f"({error}); it was not kept, try again.") from error
        return model

    def list_model(self) -> tp.Dict[str, tp.Union[str, Path]]:
        return dict(self._models)


_OFFLINE_HINT = ("Without network access, put the model files (e.g. {filename}) and the bag's "
                 ".yaml in a folder and pass it with `--repo FOLDER` (or `repo=Path(FOLDER)` in "
                 "Python).")


def _download(sig: str, url: str, destination: Path) -> None:
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=None, progress=True)
    except (URLError, OSError) as error:
        raise ModelLoadingError(
            f"could not download model {sig} from {url} ({error}). "
            + _OFFLINE_HINT.format(filename=url.rsplit("/", 1)[-1])) from error


def _verify_download(url: str, path: Path, checksum: tp.Optional[str]) -> None:
    """Raise `ModelLoadingError` when a download does not match the checksum in its name."""
    if checksum is None:
        return
    actual = _sha256_prefix(path, len(checksum))
    if actual != checksum:
        raise ModelLoadingError(f"the download of {url} is truncated or corrupted (sha256 starts "
                                f"with {actual}, expected {checksum}); it was not kept, try again.")


def _load_cached(path: Path) -> Model:
    """Load a model file found in the torch hub cache, as it is.

    The file may have been placed there by the user: it is never deleted. When its content does
    not match the checksum in its name, a warning says so and the file is used anyway (as the
    official Demucs does, which checks the hash only when it downloads).
    """
    checksum = split_signature(path.stem)[1]
    if checksum is not None:
        actual = _sha256_prefix(path, len(checksum))
        if actual != checksum:
            logger.warning("%s does not match the checksum in its name (sha256 starts with %s, "
                           "expected %s); using it as it is. Delete it to download the "
                           "released file again.", path, actual, checksum)
    try:
        return load_model(path)
    except CorruptPackageError as error:
        raise ModelLoadingError(f"{error} It is in the torch hub cache and was left in place: "
                                "delete it to download the released file again.") from error


def split_signature(stem: str) -> tp.Tuple[str, tp.Optional[str]]:
    """`SIG-HASH8` -> (SIG, HASH8); a stem without a checksum suffix is the signature itself.

    The naming rule of model files, shared by the repositories and `tools.export_hf`."""
    if "-" in stem:
        sig, suffix = stem.rsplit("-", 1)
        if _CHECKSUM.match(suffix):
            return sig, suffix
    return stem, None


MODEL_SUFFIXES = (".th", ".safetensors")


class LocalRepo(ModelOnlyRepo):
    """Models stored as `SIG.th`, `SIG-HASH8.th` or `SIG[-HASH8].safetensors` files in a folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.scan()

    def scan(self) -> None:
        self._models: tp.Dict[str, Path] = {}
        self._checksums: tp.Dict[str, str] = {}
        for file in sorted(self.root.iterdir()):
            if file.suffix not in MODEL_SUFFIXES:
                continue
            sig, checksum = split_signature(file.stem)
            if sig in self._models:
                raise ModelLoadingError(
                    f"duplicate pre-trained models for signature {sig} in {self.root}: "
                    f"{self._models[sig].name} and {file.name}; delete all but one.")
            if checksum is not None:
                self._checksums[sig] = checksum
            self._models[sig] = file

    def has_model(self, sig: str) -> bool:
        return sig in self._models

    def get_model(self, sig: str) -> Model:
        try:
            file = self._models[sig]
        except KeyError:
            raise ModelLoadingError(f"could not find pre-trained model {sig} in {self.root} "
                                    f"(available: {', '.join(sorted(self._models)) or 'none'}).")
        if sig in self._checksums:
            check_checksum(file, self._checksums[sig])
        return load_model(file)

    def list_model(self) -> tp.Dict[str, tp.Union[str, Path]]:
        return dict(self._models)


def read_bag(yaml_file: Path) -> dict:
    """The content of a bag file, checked: `models` a list of signatures, optional `weights`
    (one list of numbers per model) and `segment` (a positive number).

    Every bag yaml (a `--repo` folder, the release, a hub download) is read here, so that a bag is
    refused with the same message wherever it comes from; `ModelLoadingError` names the file."""
    try:
        bag = yaml.safe_load(yaml_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ModelLoadingError(f"{yaml_file} is not a valid bag yaml file: {error}") from None
    if not isinstance(bag, dict) or "models" not in bag:
        raise ModelLoadingError(f"{yaml_file} must be a mapping with a `models` list.")
    models, weights, segment = bag["models"], bag.get("weights"), bag.get("segment")
    if not isinstance(models, list) or not models or not all(
            isinstance(sig, (str, int)) and not isinstance(sig, bool) for sig in models):
        raise ModelLoadingError(f"{yaml_file}: `models` must be a non-empty list of signatures, "
                                f"got {models!r}")
    bag["models"] = [str(sig) for sig in models]  # an all-digit signature is read as an int
    if weights is not None and not (
            isinstance(weights, list) and len(weights) == len(models)
            and all(isinstance(row, list) and all(_is_number(w) for w in row) for row in weights)):
        raise ModelLoadingError(f"{yaml_file}: `weights` must hold one list of numbers per model "
                                f"({len(models)}), got {weights!r}")
    if weights is not None and any(sum(column) == 0 for column in zip(*weights)):
        raise ModelLoadingError(f"{yaml_file}: the `weights` of a source sum to 0 over the "
                                "models, its estimate would be undefined (NaN)")
    if segment is not None and not (_is_number(segment) and segment > 0):
        raise ModelLoadingError(f"{yaml_file}: `segment` must be a positive number of seconds, "
                                f"got {segment!r}")
    return bag


def build_bag(yaml_file: Path, bag: dict, models: tp.List[Model]) -> BagOfModels:
    """The `BagOfModels` of `models`, the members `bag` (read from `yaml_file` by `read_bag`)
    names, with its weights and segment; `ModelLoadingError` naming the file when the members do
    not fit together (other sources, sample rate or channels)."""
    try:
        return BagOfModels(models, bag.get("weights"), bag.get("segment"))
    except ValueError as error:
        raise ModelLoadingError(f"invalid bag {yaml_file}: {error}") from error


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and value == value and abs(value) != float("inf")


class BagOnlyRepo:
    """Bags of models described by `NAME.yaml` files, members fetched from `model_repo`."""

    def __init__(self, root: Path, model_repo: ModelOnlyRepo):
        self.root = Path(root)
        self.model_repo = model_repo
        self.scan()

    def scan(self) -> None:
        self._bags = {file.stem: file for file in sorted(self.root.iterdir())
                      if file.suffix == ".yaml"}

    def has_model(self, name: str) -> bool:
        return name in self._bags

    def get_model(self, name: str) -> BagOfModels:
        try:
            yaml_file = self._bags[name]
        except KeyError:
            raise ModelLoadingError(f"{name} is neither a single pre-trained model nor a bag of "
                                    f"models (looked in {self.root}).")
        bag = read_bag(yaml_file)
        return build_bag(yaml_file, bag, [self.model_repo.get_model(sig) for sig in bag["models"]])

    def list_model(self) -> tp.Dict[str, tp.Union[str, Path]]:
        return dict(self._bags)


class AnyModelRepo:
    """Single models first, then bags."""

    def __init__(self, model_repo: ModelOnlyRepo, bag_repo: BagOnlyRepo):
        self.model_repo = model_repo
        self.bag_repo = bag_repo

    def has_model(self, name_or_sig: str) -> bool:
        return self.model_repo.has_model(name_or_sig) or self.bag_repo.has_model(name_or_sig)

    def get_model(self, name_or_sig: str) -> AnyModel:
        if self.model_repo.has_model(name_or_sig):
            return self.model_repo.get_model(name_or_sig)
        return self.bag_repo.get_model(name_or_sig)

    def list_model(self) -> tp.Dict[str, tp.Union[str, Path]]:
        models = self.model_repo.list_model()
        models.update(self.bag_repo.list_model())
        return models
