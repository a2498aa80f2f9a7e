"""Named models from the HuggingFace hub, as Demucs 4.1 publishes them.

Each named model (a bag) has its own hub repository, `adefossez/HTDemucs` for `htdemucs`,
`adefossez/HTDemucs-ft` for `htdemucs_ft`, `adefossez/Demucs-mdx_extra_q` for `mdx_extra_q`,
holding `NAME.yaml` (the bag: member signatures, weights, segment) and one `SIG.safetensors` per
member (weights, with the class and constructor arguments as JSON metadata). `tools/export_hf.py`
writes such a repository from `.th` packages.

Files are kept in the standard HuggingFace cache (`HF_HUB_CACHE`, `HF_HOME`). When the hub cannot
be reached (`HF_HUB_OFFLINE=1`, or no network, detected in under a second) the cache answers at
once; nothing waits for retries to time out. The `huggingface-hub` package is needed for the hub.
"""
import os
from pathlib import Path
import typing as tp

from . import network
from .bag import BagOfModels, Model
from .repo import ModelLoadingError, build_bag, read_bag
from .states import load_model, load_safetensors

DEFAULT_NAMESPACE = "adefossez"
HUB_PREFIX = "hf://"
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class HubLookupError(ModelLoadingError):
    """A named model could not be taken from the HuggingFace hub or its cache.

    `repo_id` is the hub repository, `missing` the files that could be found neither there nor in
    the cache (empty when the failure is of another kind), `offline` why the hub was not
    contacted (None when it was).
    """

    def __init__(self, message: str, repo_id: str, missing: tp.Sequence[str] = (),
                 offline: tp.Optional[str] = None):
        super().__init__(message)
        self.repo_id = repo_id
        self.missing = list(missing)
        self.offline = offline


def hf_repo_name(name: str) -> str:
    """The hub repository of a model name: `htdemucs` -> `HTDemucs`, `htdemucs_ft` ->
    `HTDemucs-ft`, any other name -> `Demucs-<name>` (e.g. `Demucs-mdx_extra_q`)."""
    if name == "htdemucs":
        return "HTDemucs"
    if name.startswith("htdemucs_"):
        return "HTDemucs-" + name[len("htdemucs_"):]
    return "Demucs-" + name


def split_hub_name(name: str) -> tp.Tuple[str, str]:
    """`[namespace/]name` (an `hf://` prefix allowed) -> (namespace, name); the namespace
    defaults to `DEFAULT_NAMESPACE`."""
    if name.startswith(HUB_PREFIX):
        name = name[len(HUB_PREFIX):]
    if "/" not in name:
        return DEFAULT_NAMESPACE, name
    namespace, short = name.split("/", 1)
    return namespace, short


def hub_repo_id(name: str) -> str:
    """`htdemucs` -> `adefossez/HTDemucs`, `someone/htdemucs_ft` -> `someone/HTDemucs-ft`."""
    namespace, short = split_hub_name(name)
    return f"{namespace}/{hf_repo_name(short)}"


def hub_available() -> bool:
    """Whether the `huggingface-hub` package is installed."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _hub_constants() -> tp.Any:
    try:
        from huggingface_hub import constants
    except ImportError as error:
        raise ModelLoadingError(
            "loading a model from the HuggingFace hub needs the huggingface-hub package: "
            "`pip install huggingface-hub`.") from error
    return constants


def hub_cache_dir() -> Path:
    """The HuggingFace hub cache folder the hub client uses (`HF_HUB_CACHE`, `HF_HOME/hub`)."""
    return Path(_hub_constants().HF_HUB_CACHE)


def repo_cache_dir(repo_id: str) -> Path:
    """Where the hub cache keeps `repo_id`'s files: `<cache>/models--NS--NAME/snapshots/REV/`."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def offline_reason() -> tp.Optional[str]:
    """Why the hub must not or cannot be contacted (`HF_HUB_OFFLINE`, no network), else None."""
    constants = _hub_constants()
    variable = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if variable.upper() in _TRUE_VALUES or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return network.unreachable_reason(constants.ENDPOINT)


def _cached_files(repo_id: str, filenames: tp.Sequence[str],
                  offline: str) -> tp.Dict[str, Path]:
    """Paths of `filenames` in the hub cache, or `HubLookupError` naming every one missing."""
    from huggingface_hub import try_to_load_from_cache
    found = {name: try_to_load_from_cache(repo_id, name) for name in filenames}
    missing = [name for name, path in found.items() if not isinstance(path, str)]
    if missing:
        raise HubLookupError(
            f"the HuggingFace hub was not contacted ({offline}) and its cache "
            f"{repo_cache_dir(repo_id)} lacks {', '.join(missing)}", repo_id, missing, offline)
    return {name: Path(tp.cast(str, path)) for name, path in found.items()}


def _downloaded_files(repo_id: str, filenames: tp.Sequence[str]) -> tp.Dict[str, Path]:
    """Paths of `filenames` downloaded from the hub (or its cache, if up to date)."""
    from huggingface_hub import hf_hub_download
    paths = {}
    for name in filenames:
        try:
            paths[name] = Path(hf_hub_download(repo_id, name))
        except Exception as error:  # the client's many error types (HTTP, not found, offline)
            raise HubLookupError(f"could not get {name} from the HuggingFace hub repository "
                                 f"{repo_id}: {error}", repo_id, [name]) from error
    return paths


def _fetch(repo_id: str, filenames: tp.Sequence[str]) -> tp.Dict[str, Path]:
    offline = offline_reason()
    if offline is not None:
        return _cached_files(repo_id, filenames, offline)
    return _downloaded_files(repo_id, filenames)


def load_safetensors_model(path: tp.Union[str, Path]) -> Model:
    """A single model from a `.safetensors` file whose metadata holds its class and constructor
    arguments (the layout of the hub files)."""
    return load_model(load_safetensors(path))


def get_hf_model(name: str) -> BagOfModels:
    """The bag called `name` (`[namespace/]name`, e.g. `htdemucs_ft` or `someone/htdemucs_ft`)
    from the HuggingFace hub, through the standard HuggingFace cache.

    Raises `HubLookupError` when the hub (or, offline, its cache) does not have the files.
    """
    namespace, short = split_hub_name(name)
    repo_id = f"{namespace}/{hf_repo_name(short)}"
    bag_file = _fetch(repo_id, [f"{short}.yaml"])[f"{short}.yaml"]
    bag = read_bag(bag_file)
    filenames = [f"{sig}.safetensors" for sig in bag["models"]]
    files = _fetch(repo_id, filenames)
    return build_bag(bag_file, bag, [load_safetensors_model(files[name]) for name in filenames])
