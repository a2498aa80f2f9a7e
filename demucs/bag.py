"""Bags of models, and the one rule for the segment lengths a model accepts.

A `BagOfModels` averages the estimates of several separation models with one weight per model and
source (a zero weight drops a model's estimate of that source). It lives below the separation
engine so that the model files layer (`repo`, `hf`, `pretrained`) can build bags without
importing `apply`; `demucs.apply.BagOfModels` is the same class, as in Demucs 4.1.
"""
import math
import typing as tp

from torch import nn

from .htdemucs import HTDemucs

Model = nn.Module


def has_fixed_segment(model: nn.Module) -> bool:
    """True for the transformer model, whose input length is fixed by its training segment
    (and for its ONNX Runtime stand-in, `demucs.onnx_runtime.OnnxRuntimeModel`)."""
    return isinstance(model, HTDemucs) or getattr(model, "processes_training_segment", False)


def max_segment(model: nn.Module) -> float:
    """Longest segment (seconds) `model` can be applied with: for a bag, the shortest of its
    members'; for a transformer, its training segment; for an ONNX Runtime model, its longest
    graph; otherwise unlimited (`math.inf`)."""
    if isinstance(model, BagOfModels):
        return min(map(max_segment, model.models))
    if isinstance(model, HTDemucs):
        return float(model.segment)
    return float(getattr(model, "max_segment", math.inf))


class BagOfModels(nn.Module):
    """Several separation models whose estimates are averaged, with one weight per model and source.

    Args:
        models: the member models; they must share `sources`, `samplerate` and `audio_channels`.
        weights: one list of per-source weights for each model (default: all ones). A zero weight
            removes a model's estimate of that source.
        segment: segment length in seconds given to the non-transformer members whose own segment
            is longer (transformer members keep the length they were trained on).
    """

    def __init__(self, models: tp.List[nn.Module],
                 weights: tp.Optional[tp.List[tp.List[float]]] = None,
                 segment: tp.Optional[float] = None):
        super().__init__()
        if not models:
            raise ValueError("BagOfModels needs at least one model")
        first = models[0]
        for index, other in enumerate(models[1:], 1):
            for attribute in ["sources", "samplerate", "audio_channels"]:
                if getattr(other, attribute) != getattr(first, attribute):
                    raise ValueError(
                        f"model {index} of the bag has {attribute}={getattr(other, attribute)!r} "
                        f"but model 0 has {getattr(first, attribute)!r}; all must agree")
        if segment is not None:
            for member in models:
                if not has_fixed_segment(member) and segment <= member.segment:
                    member.segment = segment
        self.audio_channels = first.audio_channels
        self.samplerate = first.samplerate
        self.sources = first.sources
        self.models = nn.ModuleList(models)
        if weights is None:
            weights = [[1. for _ in first.sources] for _ in models]
        self._check_weights(weights)
        self.weights = weights

    def _check_weights(self, weights: tp.List[tp.List[float]]) -> None:
        if len(weights) != len(self.models):
            raise ValueError(f"the bag has {len(self.models)} models but {len(weights)} "
                             "weight lists")
        for index, model_weights in enumerate(weights):
            if len(model_weights) != len(self.sources):
                raise ValueError(f"weights of model {index} have {len(model_weights)} entries, "
                                 f"expected one per source {self.sources}")

    @property
    def max_allowed_segment(self) -> float:
        """Longest segment (seconds) usable with every member: the shortest transformer segment."""
        return max_segment(self)

    def forward(self, x):
        raise NotImplementedError("a BagOfModels is applied with demucs.apply.apply_model")
