"""Prepare named models for the HuggingFace hub, in the layout Demucs 4.1 downloads.

    python -m tools.export_hf [--models NAME...] [--out release_hf] [--check]
                              [--repo FOLDER] [--cache DIR] [--hf-cache [DIR]] [--namespace NS]

For each named model (a bag, or a single signature, which becomes a bag of one) it writes
`OUT/NAME/` with:
- `NAME.yaml`, the bag (member signatures, per-source weights, segment);
- `SIG.safetensors` per member: the weights, with `klass`, `args`, `kwargs` as JSON metadata (and
  `structure` for a diffq quantized state), readable by Demucs 4.1 and by this project;
- `SIG.json`, the same metadata plus the training arguments and metrics;
- `README.md`, a model card stub.

The `.th` packages come from the official release (downloaded into `--cache`, by default the torch
hub cache, where a file already present is used) or from a local folder with `--repo` (e.g.
`release_models/` made by `tools.export`). Upload a folder with `hf upload NS/REPO OUT/NAME`
(REPO from `demucs.hf.hf_repo_name`). `--hf-cache` also places each folder in a HuggingFace cache,
as a download would have, so that `get_model('hf://NAME')` finds it offline.
"""
import argparse
import hashlib
import json
from fractions import Fraction
import logging
from pathlib import Path
import shutil
import sys
import typing as tp

import torch
import yaml

from demucs import states
from demucs.files import atomic_open, atomic_write
from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name
from demucs.catalogue import ModelCatalogue
from demucs.repo import ModelLoadingError, check_checksum, split_signature

logger = logging.getLogger("tools.export_hf")

MODEL_CARD = """---
license: mit
tags:
- audio
- music-source-separation
- demucs
---

# {name}

Demucs model `{name}` for music source separation: a bag of {count} model(s) whose estimates
are combined with the per-source weights of `{name}.yaml`.

{members}

Each `.safetensors` file holds one model's weights, with its class and constructor arguments
as JSON metadata; the `.json` files next to them add the training arguments and metrics.
Load it with `demucs.pretrained.get_model("hf://NAMESPACE/{name}")`.
"""


class ExportError(Exception):
    """A model cannot be exported."""


class CatalogueSource:
    """The models and bags of the official release (`repo` None; `.th` files downloaded into
    `cache`, by default the torch hub cache) or of a local folder `repo`, as the model catalogue
    (`demucs.catalogue.ModelCatalogue`) lists them."""

    def __init__(self, repo: tp.Optional[Path] = None, cache: tp.Optional[Path] = None):
        self.catalogue = ModelCatalogue(repo)
        self.cache = cache or Path(torch.hub.get_dir()) / "checkpoints"

    def names(self) -> tp.List[str]:
        """The bags, exported when no `--models` are given."""
        return sorted(self.catalogue.list_models()["bag"])

    def bag(self, name: str) -> dict:
        """The checked bag `name` stands for (a single model is a bag of one)."""
        return self.catalogue.bag(name)

    def package(self, sig: str) -> dict:
        """The package of model `sig`, its file's checksum checked when its name has one."""
        location = self.catalogue.location(sig)
        if isinstance(location, Path):
            _check_named_checksum(location)
            return states.load_package(location)
        return states.load_package(self._downloaded(location))

    def _downloaded(self, url: str) -> Path:
        """The file of `url` in the cache, downloaded (and checked) first when it is not there;
        a download that fails its checksum is not kept."""
        path = self.cache / url.rsplit("/", 1)[-1]
        if not path.exists():
            logger.info("downloading %s", url)
            self.cache.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as partial:
                torch.hub.download_url_to_file(url, str(partial), progress=True)
                _check_named_checksum(partial, path.stem)
        return path


def _check_named_checksum(path: Path, stem: tp.Optional[str] = None) -> None:
    """`ModelLoadingError` unless `path` matches the checksum of its name (`stem`, by default the
    file's own: `SIG-HASH8`); a name without one is not checked."""
    checksum = split_signature(stem or path.stem)[1]
    if checksum is not None:
        check_checksum(path, checksum)


def _sidecar_default(value: tp.Any) -> tp.Any:
    """JSON for the sidecar's training arguments and metrics (numpy scalars, fractions...)."""
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator,
                "denominator": value.denominator}
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_model(package: dict, sig: str, out: Path) -> Path:
    """`SIG.safetensors` (metadata as Demucs 4.1 reads it) and the `SIG.json` sidecar."""
    hub_package = {key: package[key] for key in ["klass", "args", "kwargs", "state"]}
    weights = states.save_safetensors(hub_package, out / f"{sig}.safetensors")
    sidecar: tp.Dict[str, tp.Any] = dict(states.safetensors_metadata(hub_package))
    for key in ["training_args", "metrics"]:
        if package.get(key) is not None:
            sidecar[key] = json.loads(json.dumps(package[key], default=_sidecar_default))
    with atomic_open(out / f"{sig}.json", "w") as file:
        json.dump(sidecar, file, indent=2)
    return weights


def check_model(package: dict, weights: Path) -> None:
    """Raise `ExportError` unless `weights` rebuilds exactly the model of `package`."""
    expected = states.load_model(package).state_dict()
    restored = states.load_model(weights).state_dict()
    if set(expected) != set(restored):
        raise ExportError(f"{weights}: state keys differ from the original package")
    for key, value in expected.items():
        if not torch.equal(value, restored[key]):
            raise ExportError(f"{weights}: {key} differs from the original package")


def export_model(source: CatalogueSource, name: str, out: Path, check: bool = False) -> Path:
    """Write the hub folder `out/name` of the named model `name`; returns it."""
    bag = source.bag(name)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / f"{name}.yaml", "w") as file:
        yaml.safe_dump(bag, file)
    for sig in bag["models"]:
        package = source.package(sig)
        weights = write_model(package, sig, folder)
        if check:
            check_model(package, weights)
            logger.info("checked %s: the exported model is identical", sig)
    members = "\n".join(f"- `{sig}` (`{sig}.safetensors`)" for sig in bag["models"])
    with atomic_open(folder / "README.md", "w") as file:
        file.write(MODEL_CARD.format(name=name, count=len(bag["models"]), members=members))
    return folder


def _snapshot_revision(folder: Path) -> str:
    """A stable 40-hex revision name for a folder's content (a hub commit hash stands there)."""
    digest = hashlib.sha1()
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def install_in_hf_cache(folder: Path, repo_id: str, cache_dir: Path) -> Path:
    """Copy a hub folder into a HuggingFace cache as the hub client would have downloaded it
    (`models--NS--NAME/snapshots/REV/` with `refs/main` naming REV); returns the snapshot."""
    revision = _snapshot_revision(folder)
    repo_cache = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_cache / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        with atomic_write(snapshot / file.name) as partial:
            shutil.copyfile(file, partial)
    (repo_cache / "refs").mkdir(exist_ok=True)
    with atomic_open(repo_cache / "refs" / "main", "w") as ref:
        ref.write(revision)
    return snapshot


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.export_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("release_hf"),
                        help="Folder receiving one sub-folder per named model.")
    parser.add_argument("--models", nargs="*", default=None,
                        help="Names (bags or signatures) to export; default: every bag.")
    parser.add_argument("--check", action="store_true",
                        help="Reload each exported model and check it equals the original.")
    parser.add_argument("--repo", type=Path, default=None,
                        help="Take models and bags from this folder instead of the release.")
    parser.add_argument("--cache", type=Path, default=None,
                        help="Where released .th files are downloaded (default: torch hub cache).")
    parser.add_argument("--hf-cache", type=Path, nargs="?", const=True, default=None,
                        help="Also place each folder in this HuggingFace cache (default: the "
                             "one the hub client uses), for offline `hf://` loading.")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help="Hub namespace the cached copies are filed under.")
    return parser


def _source(args: argparse.Namespace) -> CatalogueSource:
    if args.repo is not None and not args.repo.is_dir():
        raise ExportError(f"--repo {args.repo} must be an existing folder")
    return CatalogueSource(args.repo, args.cache)


def _hf_cache_dir(option: tp.Union[Path, bool]) -> Path:
    if isinstance(option, Path):
        return option
    from demucs.hf import hub_cache_dir
    return hub_cache_dir()


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        source = _source(args)
        for name in args.models or source.names():
            folder = export_model(source, name, args.out, args.check)
            print(f"wrote {folder}")
            if args.hf_cache is not None:
                repo_id = f"{args.namespace}/{hf_repo_name(name)}"
                snapshot = install_in_hf_cache(folder, repo_id, _hf_cache_dir(args.hf_cache))
                print(f"placed {repo_id} in the HuggingFace cache: {snapshot}")
    except (ExportError, ModelLoadingError, states.ModelPackageError, OSError) as error:
        sys.exit(f"tools.export_hf: {error}")


if __name__ == "__main__":
    main()
