"""Separation with ONNX Runtime: the graphs written by `demucs.onnx_export` as Demucs models.

`load_onnx_bag(folder)` reads the export's `manifest.json` and returns a `BagOfModels` whose
members are `OnnxRuntimeModel`s: modules with the attributes `apply_model` reads (`sources`,
`samplerate`, `audio_channels`, `segment`, `valid_length`) whose forward runs an ONNX Runtime
session. Splitting, overlap-add, shifts and bag weighting are then `apply_model`'s, unchanged:

    from demucs.apply import apply_model
    from demucs.onnx_runtime import load_onnx_bag
    bag = load_onnx_bag("onnx/htdemucs")
    sources = apply_model(bag, mix[None])[0]

Only `onnxruntime` (and numpy) is needed here, not the `onnx` package.
"""
from fractions import Fraction
import hashlib
import json
from pathlib import Path
import random
import typing as tp

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .apply import BagOfModels

MANIFEST = "manifest.json"
FORMAT = "demucs-onnx"
SUPPORTED_VERSIONS = (1,)
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
REEXPORT_ADVICE = "export the model again with python3 -m tools.export_onnx"
# What a manifest must hold: top-level keys, then the keys of each model's entry and graph.
_MANIFEST_KEYS = ("models", "weights")
_ENTRY_KEYS = ("class", "sources", "samplerate", "audio_channels", "segment", "pad", "graphs")
_GRAPH_KEYS = ("file", "input_length")


class OnnxManifestError(ValueError):
    """An export folder whose manifest is missing, unreadable or of an unknown format."""


class OnnxExportCorruptError(OnnxManifestError):
    """A graph file of an export that is missing, incomplete or altered since the export, or that
    ONNX Runtime cannot load. `path` is the file, `problem` what is wrong with it (the message
    adds what to do)."""

    def __init__(self, path: Path, problem: str, advice: str = REEXPORT_ADVICE):
        super().__init__(f"{path} {problem}: {advice}")
        self.path = path
        self.problem = problem


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_graph_files(folder: tp.Union[str, Path], manifest: dict) -> None:
    """Raises `OnnxExportCorruptError` for the first graph of the export in `folder` that is
    missing, or whose size or sha256 differs from what its manifest recorded when it was written
    (a truncated copy, an interrupted write, an edited file). Manifests of older exports record
    neither: their files are only checked to exist (ONNX Runtime then finds a damaged one)."""
    for entry in manifest["models"]:
        for graph in entry["graphs"]:
            path = Path(folder) / graph["file"]
            if not path.is_file():
                raise OnnxExportCorruptError(path, "is missing")
            size = path.stat().st_size
            if "bytes" in graph and size != graph["bytes"]:
                raise OnnxExportCorruptError(
                    path, f"has {size} bytes, not the {graph['bytes']} the export wrote "
                          f"(incomplete or damaged)")
            if "sha256" in graph and file_sha256(path) != graph["sha256"]:
                raise OnnxExportCorruptError(
                    path, "differs from the file the export wrote (its sha256 is not the "
                          "manifest's; damaged or changed)")


def import_onnxruntime() -> tp.Any:
    """The `onnxruntime` module, or an ImportError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("separating with the ONNX Runtime backend needs the onnxruntime "
                          "package: pip install 'demucs[onnx]' (or pip install onnxruntime)"
                          ) from exc
    return onnxruntime


def default_providers() -> tp.List[str]:
    """ONNX Runtime execution providers to use: CUDA when this onnxruntime has it, then CPU."""
    available = import_onnxruntime().get_available_providers()
    return [name for name in PREFERRED_PROVIDERS if name in available]


def providers_for_device(device: tp.Union[str, torch.device]) -> tp.List[tp.Any]:
    """The execution providers that run a model on the torch `device`: the CPU provider for
    "cpu", the CUDA provider (on that GPU) then the CPU one for "cuda[:N]". Raises `ValueError`
    for other devices, or CUDA when this onnxruntime build has no CUDA provider."""
    device = torch.device(device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in import_onnxruntime().get_available_providers():
            raise ValueError("the installed onnxruntime has no CUDAExecutionProvider: install "
                             "onnxruntime-gpu to separate on a GPU with ONNX Runtime, or use "
                             "-d cpu")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                "CPUExecutionProvider"]
    raise ValueError(f"the ONNX Runtime backend runs on cpu or cuda, not {device.type}; use "
                     f"-d cpu, or the torch backend")


def _segment_from_json(value: tp.Union[int, float, str]) -> tp.Union[int, float, Fraction]:
    """Inverse of the export's encoding: "num/den" strings are `Fraction`s."""
    return Fraction(value) if isinstance(value, str) else value


def make_session(path: Path, threads: tp.Optional[int] = None,
                 providers: tp.Optional[tp.Sequence[tp.Any]] = None) -> tp.Any:
    """An ONNX Runtime inference session for the graph `path`, using `threads` threads for each
    operator (default: as many as torch uses) and all graph optimisations."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=list(providers or default_providers()))
    except Exception as error:  # onnxruntime's errors only derive from Exception
        if type(error).__name__ not in _UNREADABLE_GRAPH_ERRORS:
            raise
        lines = str(error).strip().splitlines()
        cause = lines[0].rsplit(":", 1)[-1].strip().rstrip(".") if lines else ""
        raise OnnxExportCorruptError(
            Path(path), f"cannot be read by ONNX Runtime ({type(error).__name__}: {cause}; "
                        f"truncated or damaged)") from None


# ONNX Runtime's errors for a graph file that is not a valid model (others, e.g. a provider
# that cannot start, are left as they are).
_UNREADABLE_GRAPH_ERRORS = ("InvalidProtobuf", "NoSuchFile", "InvalidGraph")


class OnnxRuntimeModel(nn.Module):
    """One exported model, run by ONNX Runtime, usable wherever `apply_model` takes a model.

    Each graph processes one input length (see the manifest's `graphs`). An input of a length
    that has its own graph is processed exactly as PyTorch does. Other lengths (the shorter last
    segment of a track) are run by `fallback`, the PyTorch model, when one is given, so that the
    result stays PyTorch's; without it, a shorter input is zero padded to the next graph's
    length (at its end for HTDemucs, as HTDemucs does, which is exact; on both sides for the
    others, as `apply_model` pads segments, which is not) and the output cropped back. Longer
    inputs are refused.

    Args:
        folder: the export folder.
        entry: the model's entry of the manifest.
        threads: ONNX Runtime threads per operator (default: torch's thread count).
        providers: ONNX Runtime execution providers (default: `default_providers()`).
        fallback: the PyTorch model that was exported, for input lengths without a graph.
    """

    def __init__(self, folder: Path, entry: dict, threads: tp.Optional[int] = None,
                 providers: tp.Optional[tp.Sequence[tp.Any]] = None,
                 fallback: tp.Optional[nn.Module] = None):
        super().__init__()
        self.fallback = fallback
        self.exported_class: str = entry["class"]
        self.sources: tp.List[str] = list(entry["sources"])
        self.samplerate: int = entry["samplerate"]
        self.audio_channels: int = entry["audio_channels"]
        self.segment = _segment_from_json(entry["segment"])
        self.pads_at_end = entry["pad"] == "end"
        self.random_draws = int(entry.get("random_draws", 0))
        graphs = sorted(entry["graphs"], key=lambda graph: graph["input_length"])
        self.sessions = {
            graph["input_length"]: make_session(folder / graph["file"], threads, providers)
            for graph in graphs}
        # Code that asks a model for its device (next(model.parameters())) finds this one.
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def input_lengths(self) -> tp.List[int]:
        """Input lengths that have a graph, shortest first."""
        return list(self.sessions)

    @property
    def processes_training_segment(self) -> bool:
        """Whether this is an HTDemucs, which pads every input to its training segment (at its
        end): `apply_model` and `BagOfModels` then treat it as they treat HTDemucs."""
        return self.pads_at_end

    @property
    def max_segment(self) -> float:
        """Longest segment (seconds) a graph of this model can process."""
        return self.input_lengths[-1] / self.samplerate

    def valid_length(self, length: int) -> int:
        """The input length a `length`-sample input is processed at (see the class doc)."""
        if self.fallback is not None:  # as apply_model pads for the PyTorch model
            own_length = getattr(self.fallback, "valid_length", None)
            return length if own_length is None else own_length(length)
        for candidate in self.sessions:
            if candidate >= length:
                return candidate
        raise ValueError(
            f"{self.exported_class} was exported to ONNX for inputs of at most "
            f"{self.input_lengths[-1]} samples, got {length}: split the mix with "
            f"apply_model(..., split=True) and a segment no longer than "
            f"{self.input_lengths[-1] / self.samplerate:.2f} s, or export it again with a "
            f"longer --segment")

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separates `mix` [B, audio_channels, T] into [B, len(sources), audio_channels, T]."""
        batch, channels, length = mix.shape
        if channels != self.audio_channels:
            raise ValueError(f"{self.exported_class} takes {self.audio_channels} audio "
                             f"channels, got {channels}")
        if self.fallback is not None and length not in self.sessions:
            with torch.no_grad():
                return self.fallback(mix)
        target = self.valid_length(length)
        for _ in range(self.random_draws):  # as the PyTorch model does (see the manifest)
            random.randrange(1)
        delta = target - length
        left = 0 if self.pads_at_end else delta // 2
        padded = F.pad(mix.detach().float().cpu(), (left, delta - left))
        session = self.sessions[target]
        # ONNX Runtime reads the array's memory as dense: views of a longer track must be copied
        outs = [session.run(None, {"mix": np.ascontiguousarray(item.numpy())})[0]
                for item in padded.split(1)]
        out = torch.from_numpy(np.concatenate(outs, axis=0))
        return out[..., left:left + length].to(mix.device)


def missing_manifest_message(folder: tp.Union[str, Path]) -> str:
    """Why `folder` (which has no manifest) is not an export, and how to make one."""
    folder = Path(folder)
    if not folder.exists():
        return (f"{folder} does not exist: give the folder of an export made with "
                f"python3 -m tools.export_onnx NAME -o FOLDER")
    if not folder.is_dir():
        return (f"{folder} is a file, not the folder of an export made with "
                f"python3 -m tools.export_onnx NAME -o FOLDER")
    graphs = sorted(path.name for path in folder.glob("*.onnx"))
    held = f" (it holds {', '.join(graphs[:3])}{', ...' if len(graphs) > 3 else ''})" \
        if graphs else ""
    return (f"{folder} has no {MANIFEST}{held}, so it is not an output of "
            f"python3 -m tools.export_onnx (or that export was interrupted): export the model "
            f"there with python3 -m tools.export_onnx NAME [--repo FOLDER] -o {folder}")


def read_manifest(folder: tp.Union[str, Path]) -> dict:
    """The manifest of an export folder, checked for its format, version and keys."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise OnnxManifestError(missing_manifest_message(folder)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OnnxManifestError(f"{path} is not valid JSON ({exc}): {REEXPORT_ADVICE}") \
            from exc
    if not isinstance(manifest, dict):
        raise OnnxManifestError(f"{path} holds a JSON {type(manifest).__name__}, not a "
                                f"{FORMAT} manifest: {REEXPORT_ADVICE}")
    if manifest.get("format") != FORMAT or manifest.get("version") not in SUPPORTED_VERSIONS:
        raise OnnxManifestError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('version')!r}"
            f"; this version of demucs reads {FORMAT!r} versions {SUPPORTED_VERSIONS}")
    _check_manifest_keys(path, manifest)
    return manifest


def _check_manifest_keys(path: Path, manifest: dict) -> None:
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if not missing:
        if not isinstance(manifest["models"], list) or not manifest["models"]:
            missing = ["models (a list of at least one model)"]
        for index, entry in enumerate(manifest["models"] if not missing else []):
            if not isinstance(entry, dict):
                missing.append(f"models[{index}] (an object)")
                continue
            missing += [f"models[{index}].{key}" for key in _ENTRY_KEYS if key not in entry]
            for number, graph in enumerate(entry.get("graphs") or []):
                if not isinstance(graph, dict):
                    missing.append(f"models[{index}].graphs[{number}] (an object)")
                    continue
                missing += [f"models[{index}].graphs[{number}].{key}" for key in _GRAPH_KEYS
                            if key not in graph]
    if missing:
        raise OnnxManifestError(f"{path} lacks {', '.join(missing[:3])}"
                                f"{' and more' if len(missing) > 3 else ''}: {REEXPORT_ADVICE}")


def load_onnx_bag(folder: tp.Union[str, Path], threads: tp.Optional[int] = None,
                  providers: tp.Optional[tp.Sequence[tp.Any]] = None,
                  segment: tp.Optional[float] = None,
                  pytorch_model: tp.Optional[nn.Module] = None) -> BagOfModels:
    """The exported models of `folder` as a `BagOfModels` of `OnnxRuntimeModel`s, with the
    bag's weights (a single exported model gives a bag of one, as `demucs.pretrained` does).

    `threads` and `providers` are given to every ONNX Runtime session; `segment` is the
    `BagOfModels` option (it cannot exceed the exported lengths). `pytorch_model`, the model or
    bag that was exported, serves the input lengths that have no graph (see
    `OnnxRuntimeModel`), which keeps the output PyTorch's for any track length.

    Raises `OnnxManifestError` for a folder that is not an export, and its subclass
    `OnnxExportCorruptError` for a graph file that is missing, differs from what the export
    wrote (size and sha256 recorded in the manifest) or cannot be read by ONNX Runtime."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_graph_files(folder, manifest)
    entries = manifest["models"]
    fallbacks = _fallbacks(pytorch_model, entries, folder)
    models = [OnnxRuntimeModel(folder, entry, threads, providers, fallback)
              for entry, fallback in zip(entries, fallbacks)]
    return BagOfModels(models, manifest["weights"], segment)


def _fallbacks(pytorch_model: tp.Optional[nn.Module], entries: tp.List[dict],
               folder: Path) -> tp.List[tp.Optional[nn.Module]]:
    """The PyTorch member standing behind each exported one (None where none is needed: the
    transformer models process every input at their one exported length)."""
    if pytorch_model is None:
        return [None] * len(entries)
    members = list(pytorch_model.models) if isinstance(pytorch_model, BagOfModels) \
        else [pytorch_model]
    classes = [f"{type(member).__module__}.{type(member).__qualname__}" for member in members]
    if classes != [entry["class"] for entry in entries]:
        raise OnnxManifestError(f"{folder} holds exports of {[e['class'] for e in entries]}, "
                                f"but the PyTorch model given is {classes}")
    return [None if entry["pad"] == "end" else member.eval()
            for member, entry in zip(members, entries)]
