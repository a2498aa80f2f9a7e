"""Export of Demucs models and bags to ONNX, for separation with ONNX Runtime.

Each model of a bag becomes one `.onnx` graph for a fixed input length (its training segment by
default), written beside a `manifest.json` that `demucs.onnx_runtime.load_onnx_bag` reads back.
The graph holds the whole forward pass, STFT and inverse STFT included, so ONNX Runtime needs
nothing but the mixture.

Four things of the PyTorch forward do not translate to ONNX as they are, and are handled here:
- complex spectrograms: the exported copy of a hybrid model (`RealSpectrogramMixin`, in
  `demucs.onnx_spectrogram`) keeps real and imaginary parts in a dimension of size 2 and computes
  its transforms with the ONNX `STFT` and `DFT` operators (same Hann window, padding and
  normalisation as `demucs.spec`);
- the `Fraction` segment and every shape are plain Python numbers at tracing time: the graph is
  traced for one input length, recorded in the manifest;
- the random shift of the transformer's positional embedding (`t_sin_random_shift > 0`) has no
  fixed value, and the Wiener filter's EM iterations work on complex matrices: such models are
  refused with `OnnxExportError`;
- attention already runs as `scaled_dot_product_attention`, which the exporter writes as plain
  MatMul/Softmax operators.
"""
from copy import deepcopy
from fractions import Fraction
import hashlib
import json
import logging
import os
from pathlib import Path
import random
import re
import shutil
import time
import typing as tp
import warnings

import torch
from torch import nn

from .apply import BagOfModels, forward_random_draws
from .demucs import Demucs
from .files import atomic_open, atomic_write
from .hdemucs import HDemucs
from .htdemucs import HTDemucs
from .onnx_runtime import OnnxManifestError, check_graph_files, file_sha256, read_manifest
from .onnx_spectrogram import OnnxExportError, RealSpectrogramMixin
from .transformer import MyGroupNorm

logger = logging.getLogger(__name__)

OPSET = 17
"""ONNX opset of the exported graphs (the first with the `STFT` and `DFT` operators)."""
MANIFEST = "manifest.json"
FORMAT = "demucs-onnx"
FORMAT_VERSION = 1
QUANTIZE_CHOICES = ("int8",)


class _TokenGroupNorm(MyGroupNorm):
    """`MyGroupNorm` computed as the plain GroupNorm on channel-major tokens (what it stands
    for): its token-layout shortcut gives the layer norm a traced, hence dynamic, shape that the
    exporter refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.GroupNorm.forward(self, x.transpose(1, 2)).transpose(1, 2)


_EXPORTABLE: tp.Tuple[type, ...] = (Demucs, HDemucs, HTDemucs)


def check_exportable(model: nn.Module) -> None:
    """Raises `OnnxExportError` naming the option that keeps `model` from being exported."""
    name = type(model).__name__
    if not isinstance(model, _EXPORTABLE):
        raise OnnxExportError(f"{name} cannot be exported to ONNX: only Demucs, HDemucs and "
                              f"HTDemucs models (and bags of them) are supported")
    if isinstance(model, (HDemucs, HTDemucs)) and not model.cac and model.wiener_iters > 0:
        raise OnnxExportError(
            f"{name}(cac=False, wiener_iters={model.wiener_iters}) cannot be exported to ONNX: "
            f"the Wiener filter's EM iterations invert complex matrices, which the export does "
            f"not translate; only cac models and wiener_iters <= 0 are supported")
    transformer = getattr(model, "crosstransformer", None)
    if transformer is not None and transformer.emb == "sin" and transformer.sin_random_shift:
        raise OnnxExportError(
            f"{name}(t_sin_random_shift={transformer.sin_random_shift}) cannot be exported to "
            f"ONNX: its positional embedding is shifted at random on every call")


def exportable_copy(model: nn.Module) -> nn.Module:
    """An evaluation-mode float32 copy of `model` that traces to ONNX operators only: hybrid
    models get `RealSpectrogramMixin` in front of their class. Raises `OnnxExportError`."""
    check_exportable(model)
    copy = deepcopy(model).float().eval()
    if isinstance(copy, (HDemucs, HTDemucs)):
        klass = type(copy)
        copy.__class__ = type(f"Onnx{klass.__name__}", (RealSpectrogramMixin, klass), {})
    for module in copy.modules():
        if type(module) is MyGroupNorm:
            module.__class__ = _TokenGroupNorm
    return copy


def default_input_length(model: nn.Module, segment: tp.Optional[float] = None) -> int:
    """Input length (samples) the graph of `model` is traced for: what `apply_model` gives it
    for segments of `segment` seconds (default: the model's own segment). A transformer model
    always processes its training segment."""
    if isinstance(model, HTDemucs):
        return model.valid_length(0)
    length = int(model.samplerate * (segment if segment is not None else model.segment))
    return model.valid_length(length) if hasattr(model, "valid_length") else length


def pads_at_end(model: nn.Module) -> bool:
    """Whether a shorter input is zero padded at its end (HTDemucs, as its forward does), rather
    than on both sides (as `apply_model` pads segments)."""
    return isinstance(model, HTDemucs) and model.use_train_segment


# ----------------------------------------------------------------------------------------------
# Writing graphs and manifests.


def _segment_to_json(segment: tp.Union[int, float, Fraction]) -> tp.Union[int, float, str]:
    """A segment as JSON: numbers as they are, a `Fraction` as "num/den" (kept exact, so that
    `apply_model` cuts the same segments as with the PyTorch model)."""
    return str(segment) if isinstance(segment, Fraction) else segment


def _trace(model: nn.Module, path: Path, input_length: int, opset: int) -> None:
    """Traces `model` (an `exportable_copy`) for one [1, C, input_length] input into `path`."""
    example = torch.zeros(1, model.audio_channels, input_length)
    # The trace runs the forward, which may draw from `random` (HTDemucs): an export made in
    # the middle of a separation must leave the caller's random stream (shift offsets) as is.
    random_state = random.getstate()
    # Traced with gradients enabled on purpose: the models then run their plain modules
    # (convolutions, GroupNorm, ConvTranspose), not the CPU inference rewrites of
    # `demucs.demucs.DConv` and `HDecLayer`, which ONNX Runtime fuses and runs better as they are.
    with torch.enable_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but is the one that needs no extra
        # package and honours `symbolic` of autograd functions (our STFT operators).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Strided slices (the spectrogram framing) are kept as Slice nodes, which is fine.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1",
                                category=UserWarning)
        # The traced batch is 1, which is what this warning of LSTM exports asks for.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size",
                                category=UserWarning)
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["mix"], output_names=["sources"],
                              do_constant_folding=True)
        finally:
            random.setstate(random_state)


def _add_metadata(path: Path, metadata: tp.Dict[str, tp.Any]) -> None:
    """Stores `metadata` (JSON-encoded values) in the graph's `metadata_props`."""
    import onnx
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = f"demucs.{key}", json.dumps(value)
    onnx.save(graph, str(path))


def quantize_int8(source: Path, destination: Path) -> None:
    """Dynamic int8 quantization of the weights of MatMul/Gemm operators (onnxruntime's
    `quantize_dynamic`); activations are quantized on the fly at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])


def model_info(model: nn.Module, input_length: int) -> tp.Dict[str, tp.Any]:
    """What the ONNX Runtime leaf needs to stand in for `model` in `apply_model`."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "sources": list(model.sources), "samplerate": model.samplerate,
            "audio_channels": model.audio_channels, "segment": _segment_to_json(model.segment),
            "input_length": input_length,
            "pad": "end" if pads_at_end(model) else "center",
            # the ONNX Runtime leaf draws as many numbers from `random` as the PyTorch model
            "random_draws": len(forward_random_draws(model))}


def export_model(model: nn.Module, path: tp.Union[str, Path], input_length: int,
                 metadata: tp.Optional[dict] = None, quantize: tp.Optional[str] = None,
                 opset: int = OPSET) -> tp.Dict[str, tp.Any]:
    """Exports one model to the ONNX file `path` for inputs [1, channels, input_length].

    Args:
        model: a Demucs, HDemucs or HTDemucs model (left unchanged).
        path: the `.onnx` file to write (atomically).
        input_length: samples of the traced input (see `default_input_length`).
        metadata: extra entries for the graph's metadata (e.g. the bag's weights).
        quantize: None, or "int8" for dynamic int8 quantization of the matrix products.
        opset: ONNX opset (17 or more: the STFT and DFT operators).
    Returns:
        the model's entry of the manifest (see `model_info`), with the file name.
    Raises:
        OnnxExportError: the model, the length or the options cannot be exported.
    """
    if quantize not in (None,) + QUANTIZE_CHOICES:
        raise OnnxExportError(f"unknown quantization {quantize!r}; choose one of "
                              f"{', '.join(QUANTIZE_CHOICES)}")
    path = Path(path)
    exportable = exportable_copy(model)
    if isinstance(model, HTDemucs) and input_length != default_input_length(model):
        raise OnnxExportError(
            f"HTDemucs only processes its training segment of {default_input_length(model)} "
            f"samples, not {input_length}")
    info = dict(model_info(model, input_length), file=path.name, quantize=quantize)
    with atomic_write(path) as temporary:
        _trace(exportable, temporary, input_length, opset)
        if quantize:
            quantize_int8(temporary, temporary)
        _add_metadata(temporary, dict(info, **(metadata or {})))
    return info


def _bag_members(model: nn.Module) -> tp.Tuple[tp.List[nn.Module], tp.List[tp.List[float]]]:
    """The models of a bag (or the single model) and their per-source weights."""
    if isinstance(model, BagOfModels):
        return list(model.models), [list(map(float, row)) for row in model.weights]
    return [model], [[1.0] * len(model.sources)]


def export_bag(model: nn.Module, out: tp.Union[str, Path], name: str = "model",
               segment: tp.Optional[float] = None, quantize: tp.Optional[str] = None,
               extra_lengths: tp.Sequence[int] = (), opset: int = OPSET,
               digest: tp.Optional[str] = None) -> Path:
    """Exports a model or a bag into the folder `out`: one graph per member and input length,
    `NAME_I.onnx` (and `NAME_I_LENGTH.onnx` for `extra_lengths`), plus `manifest.json`.

    Every member is checked before anything is written, so a bag that cannot be exported leaves
    no partial folder content. `segment` (seconds) sets the traced length of the non-transformer
    members (default: their own segment); `extra_lengths` adds graphs for other input lengths
    (e.g. the last, shorter segment of a known track, for exact parity with PyTorch).

    The manifest records `weights_digest(model)` (`digest` when the caller computed it) and the
    size and sha256 of each graph, so that a loader can tell an export of other weights, or a
    damaged file. The graphs are written into a hidden folder of `out` first and moved in once
    all of them are made, the manifest last: an interrupted export leaves an earlier export of
    `out` as it was, or no manifest. Returns the manifest's path.
    """
    members, weights = _bag_members(model)
    for member in members:
        check_exportable(member)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_abandoned_exports(out)
    digest = digest or weights_digest(model)
    staging = out / f".export{PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        entries = [_export_member(member, member_weights, weights, index, len(members), staging,
                                  name, segment, quantize, extra_lengths, opset)
                   for index, (member, member_weights) in enumerate(zip(members, weights))]
        # From here on `out` holds no complete export until the new manifest is written.
        (out / MANIFEST).unlink(missing_ok=True)
        for entry in entries:
            for graph in entry["graphs"]:
                os.replace(staging / graph["file"], out / graph["file"])
        return _write_manifest(out, name, members[0], weights, entries, opset,
                               {"weights_digest": digest, "export_segment": segment})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_member(member: nn.Module, member_weights: tp.List[float],
                   weights: tp.List[tp.List[float]], index: int, count: int, folder: Path,
                   name: str, segment: tp.Optional[float], quantize: tp.Optional[str],
                   extra_lengths: tp.Sequence[int], opset: int) -> dict:
    """Exports the graphs of one member of a bag into `folder`; its entry of the manifest."""
    lengths = [default_input_length(member, segment)]
    if not isinstance(member, HTDemucs):
        lengths += [length for length in extra_lengths if length not in lengths]
    graphs = []
    info: tp.Dict[str, tp.Any] = {}
    for length in lengths:
        stem = f"{name}_{index}" if length == lengths[0] else f"{name}_{index}_{length}"
        logger.info("Exporting model %d of %d (%s, %d samples) to %s.onnx", index + 1, count,
                    type(member).__name__, length, stem)
        info = export_model(member, folder / f"{stem}.onnx", length, quantize=quantize,
                            opset=opset, metadata={"bag_weights": weights, "bag_index": index})
        path = folder / info.pop("file")
        graphs.append({"file": path.name, "input_length": info.pop("input_length"),
                       "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return dict(info, weights=member_weights, graphs=graphs)


def _write_manifest(out: Path, name: str, first: nn.Module, weights: tp.List[tp.List[float]],
                    entries: tp.List[dict], opset: int, extra: tp.Dict[str, tp.Any]) -> Path:
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "opset": opset,
                "torch": torch.__version__, "sources": list(first.sources),
                "samplerate": first.samplerate, "audio_channels": first.audio_channels,
                "weights": weights, **extra, "models": entries}
    path = out / MANIFEST
    with atomic_open(path, "w") as file:
        json.dump(manifest, file, indent=2)
        file.write("\n")
    return path


# ----------------------------------------------------------------------------------------------
# Exports made on demand (`demucs --backend onnxruntime` without --onnx-dir), kept in a cache.


def file_stem(name: str) -> str:
    """`name` made safe as the start of a file name (e.g. `hf://org/model` → `hf_org_model`)."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def _digests(model: nn.Module, segment: tp.Optional[float]) -> tp.Tuple[str, str]:
    """`(model_digest(model, segment), weights_digest(model))`, in one pass over the weights."""
    members, weights = _bag_members(model)
    export = hashlib.sha256(json.dumps(
        [FORMAT, FORMAT_VERSION, OPSET, segment, weights]).encode())
    plain = hashlib.sha256(json.dumps(["weights", weights]).encode())
    for member in members:
        for digest in (export, plain):
            digest.update(f"{type(member).__qualname__}:{member.segment}".encode())
        for key, tensor in member.state_dict().items():
            data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for digest in (export, plain):
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(data)
    return export.hexdigest(), plain.hexdigest()


def model_digest(model: nn.Module, segment: tp.Optional[float] = None) -> str:
    """A hex digest of what an export of `model` (a model or bag) depends on: each member's
    class, segment and weights, the bag's weights, the export `segment` and format. Two models
    with the same digest give the same graphs."""
    return _digests(model, segment)[0]


def weights_digest(model: nn.Module) -> str:
    """A hex digest of the weights of `model` (a model or bag): each member's class, segment and
    tensors, and the bag's weights, whatever the export options. An export's manifest records
    it, so that a model retrained under the same name is told apart from the one exported."""
    return _digests(model, None)[1]


def default_cache_root() -> Path:
    """Where on-demand exports are kept: `$TORCH_HOME/hub/demucs_onnx` (beside the downloaded
    checkpoints)."""
    return Path(torch.hub.get_dir()) / "demucs_onnx"


PARTIAL_MARK = ".partial-"
"""Folders being written are named `NAME.partial-PID` (`remove_abandoned_exports`)."""
_ABANDONED_AFTER_S = 3600.


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists
        return True
    return True


def remove_abandoned_exports(folder: Path) -> tp.List[Path]:
    """Removes the `*.partial-PID` folders in `folder` left by exports that were killed (their
    process is gone and nothing in them changed for an hour); returns them."""
    removed = []
    for path in sorted(Path(folder).glob(f"*{PARTIAL_MARK}*")) if Path(folder).is_dir() else []:
        pid = path.name.rsplit(PARTIAL_MARK, 1)[1]
        if not path.is_dir() or not pid.isdigit() or _process_is_running(int(pid)):
            continue
        try:
            changed = max(item.stat().st_mtime for item in [path, *path.rglob("*")])
        except OSError:
            continue
        if time.time() - changed > _ABANDONED_AFTER_S:
            logger.info("Removing %s, left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def cache_problem(folder: Path, digest: str) -> tp.Optional[str]:
    """What keeps the cached export `folder` from being used for weights of `weights_digest`
    `digest` ("has no manifest.json" when it was never made), or None when it is usable."""
    try:
        manifest = read_manifest(folder)
        exported = manifest.get("weights_digest")
        if exported is not None and exported != digest:
            return (f"was exported from other weights (digest {exported[:16]}, the model's is "
                    f"{digest[:16]})")
        check_graph_files(folder, manifest)
    except OnnxManifestError as error:
        problem = getattr(error, "problem", None)
        if problem is not None:  # a graph file: named, without the export advice
            return f"holds {error.path.name}, which {problem}"
        if not (folder / MANIFEST).exists():
            return f"has no {MANIFEST}"
        return f"has an unusable {MANIFEST} ({str(error).split(': ', 1)[-1]})"
    return None


def cached_export(model: nn.Module, name: str, cache_root: tp.Optional[Path] = None,
                  segment: tp.Optional[float] = None, rebuild: bool = False) -> Path:
    """The export folder of `model` under `cache_root` (default `default_cache_root()`),
    exported first if no earlier call made it. The folder is named after `name` and the
    model's digest, so retrained weights get a new export; it appears whole or not at all, and
    concurrent calls keep whichever export finished first.

    A cached export is checked before it is used: one of other weights (its manifest's
    `weights_digest`), with a missing, incomplete or altered graph file, or an unreadable
    manifest is exported again (with a warning), as it is with `rebuild`."""
    cache_digest, digest = _digests(model, segment)
    root = cache_root or default_cache_root()
    folder = root / f"{file_stem(name)}-{cache_digest[:16]}"
    remove_abandoned_exports(root)
    problem = None if rebuild else cache_problem(folder, digest)
    if rebuild:  # the caller said why
        logger.info("Exporting %s to ONNX in %s", name, folder)
    elif problem is None:
        return folder
    elif folder.exists():
        logger.warning("The cached ONNX export %s %s: exporting %s again.", folder, problem, name)
    else:
        logger.info("Exporting %s to ONNX in %s (once; later runs reuse it)", name, folder)
    partial = folder.with_name(f"{folder.name}{PARTIAL_MARK}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        export_bag(model, partial, name=file_stem(name), segment=segment, digest=digest)
        if folder.exists():  # the broken export is moved aside, then removed
            broken = folder.with_name(f"{folder.name}.broken{PARTIAL_MARK}{os.getpid()}")
            shutil.rmtree(broken, ignore_errors=True)
            os.replace(folder, broken)
            shutil.rmtree(broken, ignore_errors=True)
        try:
            os.replace(partial, folder)
        except OSError:
            if cache_problem(folder, digest) is not None:  # not another process's export
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
