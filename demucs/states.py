"""Model state utilities: constructor capture, model packages (save/load), state copies and swaps.

A *package* is the dict `{klass, args, kwargs, state, training_args}` from which a model is rebuilt:
`klass(*args, **kwargs)` then `set_state`. It is stored with `torch.save` (`.th`, the official
Demucs format) or as `.safetensors` (tensors + JSON metadata, as Demucs 4.1 publishes its models).

Loading never runs arbitrary pickled code: `.th` files are read with `torch.load(weights_only=True)`
and only the globals listed in `ALLOWED_GLOBALS` (model classes, `fractions.Fraction`, numpy scalars
of saved metrics, diffq quantizer classes) may appear in them.
"""
import argparse
from contextlib import contextmanager
import hashlib
import importlib
import inspect
import io
import json
from fractions import Fraction
import logging
from pathlib import Path
import pickle
import typing as tp
import warnings
import zipfile

import torch
from torch import nn

from .files import atomic_open, atomic_write
# capture_init lives with the models' helpers (the models sit below this module); both names are
# importable from here, as in Demucs 4.1.
from .utils import capture_init, fatal  # noqa: F401

logger = logging.getLogger(__name__)

PathLike = tp.Union[str, Path]
Package = tp.Dict[str, tp.Any]

# Pickled name -> (module, attribute) of every global a model package may reference
# ("a|b": the first of these modules that imports, for names that moved between versions).
ALLOWED_GLOBALS: tp.Dict[str, tp.Tuple[str, str]] = {
    "demucs.demucs.Demucs": ("demucs.demucs", "Demucs"),
    "demucs.hdemucs.HDemucs": ("demucs.hdemucs", "HDemucs"),
    "demucs.wdemucs.WDemucs": ("demucs.wdemucs", "WDemucs"),
    "demucs.htdemucs.HTDemucs": ("demucs.htdemucs", "HTDemucs"),
    "demucs.train.TorchHDemucsWrapper": ("demucs.torch_hdemucs", "TorchHDemucsWrapper"),
    "fractions.Fraction": ("fractions", "Fraction"),
    # numpy scalars (e.g. metrics stored next to the model), numpy 1.x and 2.x names.
    "numpy.core.multiarray.scalar": ("numpy._core.multiarray|numpy.core.multiarray", "scalar"),
    "numpy._core.multiarray.scalar": ("numpy._core.multiarray|numpy.core.multiarray", "scalar"),
    "numpy.dtype": ("numpy", "dtype"),
    # diffq quantized states reference the quantizer class that rebuilds the weights.
    "diffq.diffq.DiffQuantizer": ("diffq.diffq", "DiffQuantizer"),
    "diffq.uniform.UniformQuantizer": ("diffq.uniform", "UniformQuantizer"),
    "diffq.lsq.LSQ": ("diffq.lsq", "LSQ"),
}
# Classes the unpickler may rebuild with a state (BUILD) without naming them as a global.
_NUMPY_DTYPE_CLASSES = ["Float64DType", "Float32DType", "Float16DType", "Int64DType",
                        "Int32DType", "BoolDType"]
# Model classes a package (in particular a `.safetensors` one) may name as `klass`.
MODEL_CLASSES = [name for name in ALLOWED_GLOBALS if name.startswith("demucs.")]


class ModelPackageError(Exception):
    """A model package cannot be turned into a model (bad structure, class, keys or shapes)."""


class UnsafeCheckpointError(ModelPackageError):
    """A checkpoint references a pickled global outside the allow-list; it was not unpickled."""


class CorruptPackageError(ModelPackageError):
    """A package file cannot be parsed: truncated, corrupted, or not a model package at all."""


def check_diffq() -> None:
    """Raise an `ImportError` saying what to install when diffq (quantized models) is missing."""
    try:
        import diffq  # noqa: F401
    except ImportError as exc:
        raise ImportError("Quantized models need diffq: run `pip install diffq`.") from exc


def get_quantizer(model: nn.Module, args: tp.Any,
                  optimizer: tp.Optional[torch.optim.Optimizer] = None):
    """Quantizer from the `quant` config section: DiffQ when `args.diffq` (a penalty weight),
    uniform quantization-aware training with `args.qat` bits, else None."""
    if args.diffq:
        check_diffq()
        from diffq import DiffQuantizer
        quantizer = DiffQuantizer(model, min_size=args.min_size, group_size=args.group_size)
        if optimizer is not None:
            quantizer.setup_optimizer(optimizer)
        return quantizer
    if args.qat:
        check_diffq()
        from diffq import UniformQuantizer
        return UniformQuantizer(model, bits=args.qat, min_size=args.min_size)
    return None


def get_state(model: nn.Module, quantizer: tp.Any = None, half: bool = False) -> dict:
    """State of `model` on CPU: fp16 tensors when `half`, or the quantizer's packed state
    (marked with `__quantized`) when a quantizer is given."""
    if quantizer is not None:
        state = quantizer.get_quantized_state()
        state["__quantized"] = True
        return state
    dtype = torch.half if half else None
    return {key: value.data.to(device="cpu", dtype=dtype)
            for key, value in model.state_dict().items()}


def set_state(model: nn.Module, state: dict, quantizer: tp.Any = None) -> dict:
    """Load a state produced by `get_state` (plain, half or quantized) into `model`."""
    if state.get("__quantized"):
        if quantizer is not None:
            quantizer.restore_quantized_state(state)
        else:
            check_diffq()
            from diffq import restore_quantized_state
            restore_quantized_state(model, state)
    else:
        _load_checked_state(model, state)
    return state


def _load_checked_state(model: nn.Module, state: tp.Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state)`, with errors naming missing/unexpected/mis-shaped keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        name = type(model).__name__
        raise ModelPackageError(f"The checkpoint state does not fit {name}: {exc}. Check that the "
                                "package's klass/kwargs match the weights it holds.") from exc


def copy_state(state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """Detached CPU copy of a state dict (e.g. to keep the best weights while training goes on)."""
    return {key: value.cpu().clone() for key, value in state.items()}


@contextmanager
def swap_state(model: nn.Module, state: tp.Mapping[str, torch.Tensor]):
    """Temporarily load `state` into `model`; the previous weights are restored on exit.

        with swap_state(model, ema_state):
            evaluate(model)
    """
    old_state = copy_state(model.state_dict())
    model.load_state_dict(state, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(old_state)


def _plain_training_args(training_args: tp.Any) -> tp.Any:
    """Training arguments as plain containers (an OmegaConf config is resolved)."""
    if isinstance(training_args, argparse.Namespace):
        return vars(training_args)
    from omegaconf import OmegaConf
    if OmegaConf.is_config(training_args):
        return OmegaConf.to_container(training_args, resolve=True)
    return training_args


def serialize_model(model: nn.Module, training_args: tp.Any, quantizer: tp.Any = None,
                    half: bool = True) -> Package:
    """Package `model` (decorated with `capture_init`) so that `load_model` can rebuild it."""
    args, kwargs = model._init_args_kwargs
    return {
        "klass": model.__class__,
        "args": args,
        "kwargs": kwargs,
        "state": get_state(model, quantizer, half),
        "training_args": _plain_training_args(training_args),
    }


def save_with_checksum(content: tp.Any, path: PathLike) -> Path:
    """`torch.save` `content` to `<stem>-<first 8 hex of sha256><suffix>` next to `path`."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    data = buffer.getvalue()
    signature = hashlib.sha256(data).hexdigest()[:8]
    target = path.parent / f"{path.stem}-{signature}{path.suffix}"
    with atomic_open(target, "wb") as file:
        file.write(data)
    return target


def _resolve_global(name: str) -> tp.Any:
    modules, attribute = ALLOWED_GLOBALS[name]
    *fallbacks, last = modules.split("|")
    for module in fallbacks:
        try:
            return getattr(importlib.import_module(module), attribute)
        except ImportError:
            continue
    return getattr(importlib.import_module(last), attribute)


def _safe_globals(names: tp.Iterable[str]) -> list:
    """`(object, pickled name)` pairs for the allowed `names` whose module imports here."""
    pairs: list = []
    for name in names:
        try:
            pairs.append((_resolve_global(name), name))
        except (ImportError, AttributeError) as exc:
            logger.debug("allowed global %s is not importable: %s", name, exc)
    try:
        import numpy.dtypes
        pairs += [getattr(numpy.dtypes, cls) for cls in _NUMPY_DTYPE_CLASSES]
    except ImportError:
        pass
    return pairs


def _referenced_globals(path: Path) -> tp.Optional[tp.List[str]]:
    """Globals (other than torch's own) named by the pickle in `path`, read without unpickling;
    None when the file is not in torch's zip format."""
    if not zipfile.is_zipfile(path):
        return None
    return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))


def _torch_load_safe(path: Path) -> tp.Any:
    """`torch.load(path, weights_only=True)` allowing only `ALLOWED_GLOBALS`."""
    referenced = _referenced_globals(path)
    if referenced is None:
        return _torch_load_legacy(path)
    forbidden = [name for name in referenced if name not in ALLOWED_GLOBALS]
    if forbidden:
        raise UnsafeCheckpointError(
            f"{path} references pickled globals outside the allow-list: {', '.join(forbidden)}. "
            "It was not loaded because unpickling them could run arbitrary code; only load "
            "model packages made by Demucs (see demucs.states.ALLOWED_GLOBALS).")
    try:
        with torch.serialization.safe_globals(_safe_globals(referenced)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path} could not be loaded safely: {exc}") from exc


# torch's legacy files start with a pickle (protocol 2) of their magic number.
_LEGACY_MAGIC = b"\x80\x02"


def _torch_load_legacy(path: Path) -> tp.Any:
    """Safe load of a file in torch's legacy (pre-1.6, non-zip) format.

    Its globals cannot be listed beforehand, so every allowed global that is cheap to import
    is allowed; model classes pickled in this format are refused by torch itself.
    """
    with open(path, "rb") as file:
        if file.read(2) != _LEGACY_MAGIC:
            raise CorruptPackageError(
                f"{path} is truncated, corrupted or not a model package: neither a zip "
                "archive (torch >= 1.6) nor torch's legacy format. Check that the file is "
                "complete and is a Demucs model (.th) or a safetensors file.")
    light = [name for name in ALLOWED_GLOBALS if not name.startswith("diffq.")]
    try:
        with torch.serialization.safe_globals(_safe_globals(light)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} is in torch's legacy (non-zip) format and could not be loaded safely: {exc}. "
            "If you trust its origin, re-save it with a recent torch (zip format).") from exc


def _json_default(value: tp.Any) -> tp.Any:
    # Fractions (HTDemucs's `segment`) are written as Demucs 4.1's safetensors files store them.
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator,
                "denominator": value.denominator}
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in safetensors metadata")


def _json_object_hook(obj: dict) -> tp.Any:
    if obj.get("_type") == "fraction":
        return Fraction(obj["numerator"], obj["denominator"])
    return obj


def _class_path(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _flatten_state(state: tp.Any) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Any]:
    """A nested state (e.g. a diffq packed state) as flat `{key: tensor}` plus a JSON tree that
    rebuilds it, in Demucs 4.1's `structure` layout: `{"_tensor": key}`, `{"_dict": [[k, v]]}`,
    `{"_list": []}`, `{"_tuple": []}`, `{"_class": "module.Name"}` or a JSON scalar."""
    tensors: tp.Dict[str, torch.Tensor] = {}

    def flatten(value: tp.Any, key: str) -> tp.Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous().clone()
            return {"_tensor": key}
        if isinstance(value, dict):
            return {"_dict": [[name, flatten(item, f"{key}.{name}")]
                              for name, item in value.items()]}
        if isinstance(value, (list, tuple)):
            kind = "_tuple" if isinstance(value, tuple) else "_list"
            return {kind: [flatten(item, f"{key}.{index}") for index, item in enumerate(value)]}
        if isinstance(value, type):
            return {"_class": _class_path(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ModelPackageError(f"cannot store a {type(value).__name__} ({key}) in safetensors")

    return tensors, flatten(state, "state")


def _unflatten_state(tensors: tp.Mapping[str, torch.Tensor], structure: tp.Any,
                     origin: str) -> tp.Any:
    """Inverse of `_flatten_state`; a `_class` node must be one of `ALLOWED_GLOBALS`."""
    def unflatten(node: tp.Any) -> tp.Any:
        if not isinstance(node, dict):
            return node
        if "_tensor" in node:
            return tensors[node["_tensor"]]
        if "_dict" in node:
            return {name: unflatten(item) for name, item in node["_dict"]}
        if "_list" in node:
            return [unflatten(item) for item in node["_list"]]
        if "_tuple" in node:
            return tuple(unflatten(item) for item in node["_tuple"])
        if node.get("_class") in ALLOWED_GLOBALS:
            return _resolve_global(node["_class"])
        raise ModelPackageError(f"{origin}: state structure node {node!r} is not allowed "
                                "(classes must be listed in demucs.states.ALLOWED_GLOBALS)")

    try:
        return unflatten(structure)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelPackageError(f"{origin}: invalid state structure ({error!r})") from error


def safetensors_metadata(package: Package) -> tp.Dict[str, str]:
    """The metadata Demucs 4.1 reads from a model's `.safetensors` file: `klass` (dotted path),
    `args` and `kwargs` as JSON strings (the training arguments travel separately)."""
    return {
        "klass": _class_path(package["klass"]),
        "args": json.dumps(list(package["args"]), default=_json_default),
        "kwargs": json.dumps(package["kwargs"], default=_json_default),
    }


def save_safetensors(package: Package, path: PathLike) -> Path:
    """Write a package as `.safetensors`: the state as tensors, `klass`, `args`, `kwargs` (and
    `training_args` when the package has them) as JSON strings in the metadata; a nested state
    (diffq quantized) is flattened and its tree stored under `structure`, as Demucs 4.1 does."""
    metadata = safetensors_metadata(package)
    if package.get("training_args") is not None:
        metadata["training_args"] = json.dumps(package["training_args"], default=_json_default)
    state = package["state"]
    if state.get("__quantized"):
        tensors, structure = _flatten_state(state)
        metadata["structure"] = json.dumps(structure)
    else:
        tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    from safetensors.torch import save_file
    with atomic_write(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)
    return Path(path)


def load_safetensors(path: PathLike) -> Package:
    """Read a package written by `save_safetensors` (or by Demucs 4.1's hub export); `klass`
    must be one of `MODEL_CLASSES`."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # the parser's own error types, on untrusted bytes
        raise CorruptPackageError(
            f"{path} is truncated, corrupted or not a safetensors file "
            f"({type(exc).__name__}: {exc}); delete it, then export or download it again."
        ) from exc
    missing = [key for key in ["klass", "args", "kwargs"] if key not in metadata]
    if missing:
        raise ModelPackageError(f"{path} is not a Demucs model package: metadata lacks {missing}")
    klass_name = metadata["klass"]
    if klass_name not in MODEL_CLASSES:
        raise ModelPackageError(f"{path} names an unknown model class {klass_name!r}; "
                                f"expected one of {MODEL_CLASSES}")

    def decode(key: str) -> tp.Any:
        return json.loads(metadata.get(key, "null"), object_hook=_json_object_hook)

    state = tensors
    if "structure" in metadata:
        state = _unflatten_state(tensors, json.loads(metadata["structure"]), str(path))
    return {"klass": _resolve_global(klass_name), "args": decode("args"),
            "kwargs": decode("kwargs"), "state": state, "training_args": decode("training_args")}


def load_package(path: PathLike) -> Package:
    """Read a package file (`.th`, safely unpickled, or `.safetensors`) without building it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model package {path} does not exist")
    try:
        package = load_safetensors(path) if path.suffix == ".safetensors" \
            else _torch_load_safe(path)
    except ModelPackageError:
        raise
    except Exception as exc:  # any parser failure on these untrusted bytes means a bad file
        raise CorruptPackageError(
            f"{path} is truncated, corrupted or not a model package "
            f"({type(exc).__name__}: {exc}); delete it, then export or download it again."
        ) from exc
    if not isinstance(package, dict):
        raise ModelPackageError(
            f"{path} holds a {type(package).__name__}, not a model package dict")
    return package


def _check_package(package: Package, origin: str) -> None:
    missing = [key for key in ["klass", "args", "kwargs", "state"] if key not in package]
    if missing:
        raise ModelPackageError(f"{origin} is not a model package: missing {missing} "
                                f"(found keys {sorted(package)})")
    klass = package["klass"]
    if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
        raise ModelPackageError(f"{origin}: klass {klass!r} is not a model class")
    expected_types = {"args": (list, tuple), "kwargs": dict, "state": dict}
    for key, types in expected_types.items():
        if not isinstance(package[key], types):
            raise ModelPackageError(f"{origin}: `{key}` is a {type(package[key]).__name__}, "
                                    "not a model package entry")


def _known_kwargs(klass: type, kwargs: dict) -> dict:
    """`kwargs` without the names that `klass`'s constructor does not accept (with a warning)."""
    parameters = inspect.signature(klass).parameters
    if any(param.kind == param.VAR_KEYWORD for param in parameters.values()):
        return dict(kwargs)
    kept = {}
    for key, value in kwargs.items():
        if key in parameters:
            kept[key] = value
        else:
            warnings.warn(
                f"Dropping inexistant parameter {key} (not an argument of {klass.__name__})")
    return kept


def load_model(path_or_package: tp.Union[PathLike, Package], strict: bool = False) -> nn.Module:
    """Rebuild a model from a package dict or a `.th` / `.safetensors` package file.

    With `strict=False`, constructor kwargs unknown to the class (from another Demucs version)
    are dropped with a warning. Raises `UnsafeCheckpointError` for a `.th` file referencing
    a forbidden global and `ModelPackageError` for a malformed package or mismatched weights.
    """
    if isinstance(path_or_package, dict):
        package, origin = path_or_package, "package"
    elif isinstance(path_or_package, (str, Path)):
        origin = str(path_or_package)
        package = load_package(path_or_package)
    else:
        raise TypeError(f"load_model expects a path or a package dict, got {type(path_or_package)}")
    _check_package(package, origin)
    klass = package["klass"]
    kwargs = package["kwargs"] if strict else _known_kwargs(klass, package["kwargs"])
    model = klass(*package["args"], **kwargs)
    try:
        set_state(model, package["state"])
    except ModelPackageError as exc:
        raise ModelPackageError(f"{origin}: {exc}") from exc
    return model
