"""Starting from a released model: its output heads remapped to other sources by name, its
architecture checked against the config, parts of it frozen.

Only the outermost decoder layers depend on the sources. In every family, the last transposed
convolution of a branch gives `len(sources) * k` channels, source after source, `k` channels each:

- `Demucs` (v2/v3): `decoder[-1][-1]` (a `ConvTranspose1d`), `k = audio_channels`;
- `HDemucs` / `HTDemucs`, frequency branch: `decoder[-1].conv_tr` (one per band,
  `decoder[-1].layers[i].conv_tr`, with `multi_freqs`), `k = 2 * audio_channels` with
  complex-as-channels (`cac`, real and imaginary parts), else `audio_channels`;
- `HDemucs` (hybrid) / `HTDemucs`, time branch: `tdecoder[-1].conv_tr`, `k = audio_channels`.

A transposed convolution computes each output channel from its own slice of the weight
(`weight[:, o]`, `bias[o]`), so selecting these slices by source keeps each kept source's output
as it was. No other parameter or buffer has a size that depends on the sources
(tests/test_finetune.py checks it on all three families). One exception to "as it was": a hybrid
model without complex-as-channels that Wiener-filters its output (`cac=False`, `wiener_iters` >= 0)
filters all its sources jointly, so its stems change with the set of sources even though every
weight is carried over by name.
"""
from dataclasses import dataclass, field
import difflib
from fnmatch import fnmatchcase
import inspect
import typing as tp

import torch
from torch import nn

from . import states
from .demucs import Demucs
from .hdemucs import HDemucs, MultiWrap
from .htdemucs import HTDemucs

# The checkpoint's source a new source starts from when the caller names none.
DEFAULT_INIT_SOURCE = "other"
# Constructor arguments that shape no weight and follow the fine-tuning config rather than the
# checkpoint: the segment (set by the training) and training-only regularisation and optimizer
# settings of the transformer.
TRAINING_KEYS = frozenset({"segment", "t_dropout", "t_lr", "t_weight_decay"})
# Constructor arguments that may differ between a checkpoint and the fine-tuning config: the
# sources (remapped), `TRAINING_KEYS`, and what only shapes the random initialisation (replaced
# by the checkpoint's weights).
FREE_KEYS = frozenset({"sources", "rescale", "dconv_init", "emb_smooth"}) | TRAINING_KEYS


class SourceRemapError(ValueError):
    """A model cannot be remapped to the requested sources."""


@dataclass(frozen=True)
class OutputHead:
    """A transposed convolution whose output channels are `per_source` channels per source."""
    name: str
    per_source: int


def output_heads(model: nn.Module) -> tp.List[OutputHead]:
    """The layers of `model` whose output channels are per source (see the module docstring).

    Raises `SourceRemapError` for other model classes, and when a head is followed by a
    GroupNorm (`norm_starts=0`), which mixes the channels of several sources.
    """
    if isinstance(model, Demucs):
        return [_demucs_head(model)]
    if isinstance(model, (HDemucs, HTDemucs)):
        return _hybrid_heads(model)
    raise SourceRemapError(f"cannot remap the sources of a {type(model).__name__}: only Demucs, "
                           "HDemucs and HTDemucs models are supported")


def _demucs_head(model: Demucs) -> OutputHead:
    last = len(model.decoder) - 1
    layer = model.decoder[last]
    if not isinstance(layer[-1], nn.ConvTranspose1d):
        raise SourceRemapError(f"Demucs decoder.{last} does not end with its transposed "
                               f"convolution ({type(layer[-1]).__name__}): unknown layout")
    return OutputHead(f"decoder.{last}.{len(layer) - 1}", model.audio_channels)


def _hybrid_heads(model: tp.Union[HDemucs, HTDemucs]) -> tp.List[OutputHead]:
    last = len(model.decoder) - 1
    layer = model.decoder[last]
    per_freq_source = model.audio_channels * (2 if model.cac else 1)
    if isinstance(layer, MultiWrap):  # one replica per frequency band
        heads = [_decoder_layer_head(band, f"decoder.{last}.layers.{index}", per_freq_source)
                 for index, band in enumerate(layer.layers)]
    else:
        heads = [_decoder_layer_head(layer, f"decoder.{last}", per_freq_source)]
    if model.hybrid:
        tlast = len(model.tdecoder) - 1
        heads.append(_decoder_layer_head(model.tdecoder[tlast], f"tdecoder.{tlast}",
                                         model.audio_channels))
    return heads


def _decoder_layer_head(layer: nn.Module, name: str, per_source: int) -> OutputHead:
    if not isinstance(layer.norm2, nn.Identity):
        raise SourceRemapError(f"{name} normalises its output with a GroupNorm (norm_starts=0), "
                               "which mixes the channels of several sources: its sources "
                               "cannot be remapped")
    return OutputHead(f"{name}.conv_tr", per_source)


@dataclass
class SourceRemap:
    """Where each output of the remapped model comes from, for the log.

    `origins[new_source]` is the checkpoint source whose output channels it starts from.
    """
    origins: tp.Dict[str, str]
    kept: tp.List[str] = field(default_factory=list)
    created: tp.Dict[str, str] = field(default_factory=dict)
    dropped: tp.List[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: what was copied, created and dropped."""
        created = ", ".join(f"{new} (from {old})" for new, old in self.created.items())
        return (f"sources kept: {', '.join(self.kept) or 'none'}; "
                f"created: {created or 'none'}; dropped: {', '.join(self.dropped) or 'none'}")


def plan_sources(checkpoint: tp.Sequence[str], sources: tp.Sequence[str],
                 init: tp.Optional[tp.Mapping[str, str]] = None) -> SourceRemap:
    """Match `sources` to the `checkpoint`'s sources by name.

    A source of the checkpoint keeps its channels; a new one starts from `init[source]`, else
    from `other` when the checkpoint has it. Raises `SourceRemapError` naming the source for
    duplicates, an initialisation that names no new source or no checkpoint source, and a new
    source without one.
    """
    init = dict(init or {})
    duplicates = sorted({name for name in sources if list(sources).count(name) > 1})
    if not sources or duplicates:
        raise SourceRemapError(f"the sources {list(sources)} must be a non-empty list of distinct "
                               f"names (repeated: {', '.join(duplicates) or 'none'})")
    available = ", ".join(checkpoint)
    for new, old in init.items():
        if new not in sources:
            raise SourceRemapError(f"continue_sources_init names {new!r}, which is not one of the "
                                   f"new sources {list(sources)}")
        if new in checkpoint:
            raise SourceRemapError(f"continue_sources_init names {new!r}, which the checkpoint "
                                   "has: it keeps its own output channels, remove it")
        if old not in checkpoint:
            raise SourceRemapError(f"continue_sources_init initialises {new!r} from {old!r}, "
                                   f"which the checkpoint does not have (it has: {available})")
    origins = {}
    for name in sources:
        if name in checkpoint:
            origins[name] = name
        elif name in init:
            origins[name] = init[name]
        elif DEFAULT_INIT_SOURCE in checkpoint:
            origins[name] = DEFAULT_INIT_SOURCE
        else:
            raise SourceRemapError(
                f"new source {name!r} needs a checkpoint source to start from and the checkpoint "
                f"has no {DEFAULT_INIT_SOURCE!r}: name one of {available} with "
                f"continue_sources_init={{{name}:SOURCE}}")
    return SourceRemap(origins=origins,
                       kept=[name for name in sources if name in checkpoint],
                       created={name: origins[name] for name in sources if name not in checkpoint},
                       dropped=[name for name in checkpoint if name not in sources])


def remap_state(state: tp.Mapping[str, torch.Tensor], heads: tp.Sequence[OutputHead],
                checkpoint: tp.Sequence[str], plan: SourceRemap) -> tp.Dict[str, torch.Tensor]:
    """`state` with the output channels of each head taken, source by source, from
    `plan.origins` (a transposed convolution's weight is `[in, out, ...]`, its bias `[out]`)."""
    remapped = dict(state)
    for head in heads:
        index = torch.cat([torch.arange(head.per_source) + checkpoint.index(old) * head.per_source
                           for old in plan.origins.values()])
        for key, dim in [(f"{head.name}.weight", 1), (f"{head.name}.bias", 0)]:
            if key not in state:
                continue
            expected = len(checkpoint) * head.per_source
            if state[key].shape[dim] != expected:
                raise SourceRemapError(
                    f"{key} has {state[key].shape[dim]} output channels, expected {expected} "
                    f"({len(checkpoint)} sources x {head.per_source})")
            remapped[key] = state[key].index_select(dim, index)
    return remapped


def _constructor(model: nn.Module, sources: tp.List[str],
                 changes: tp.Mapping[str, tp.Any]) -> tp.Tuple[list, dict]:
    """The constructor arguments of `model` (from `capture_init`) with `sources` and the keyword
    arguments of `changes` replaced."""
    args, kwargs = model._init_args_kwargs
    args, kwargs = list(args), dict(kwargs)
    if "sources" in kwargs or not args:
        kwargs["sources"] = list(sources)
    else:
        args[0] = list(sources)
    kwargs.update(changes)
    return args, kwargs


def remap_sources(model: nn.Module, sources: tp.Sequence[str],
                  init: tp.Optional[tp.Mapping[str, str]] = None,
                  changes: tp.Optional[tp.Mapping[str, tp.Any]] = None
                  ) -> tp.Tuple[nn.Module, SourceRemap]:
    """A new model of `model`'s class and constructor arguments, for `sources`.

    Every weight is `model`'s; the output channels of a source `model` has are its own, those
    of a new source are copied from its initialisation source (`plan_sources`), and those of a
    source left out are dropped. `changes` replaces constructor arguments that shape no weight
    (`TRAINING_KEYS`: the segment, training-only settings). `model` is left unchanged.
    """
    changes = dict(changes or {})
    shaping = sorted(set(changes) - TRAINING_KEYS)
    if shaping:
        raise SourceRemapError(f"remap_sources may only change {sorted(TRAINING_KEYS)}, not "
                               f"{shaping}: these shape the checkpoint's weights")
    plan = plan_sources(list(model.sources), list(sources), init)
    state = remap_state(model.state_dict(), output_heads(model), list(model.sources), plan)
    args, kwargs = _constructor(model, list(sources), changes)
    package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": state}
    return states.load_model(package), plan


def remap_package(package: states.Package, sources: tp.Sequence[str],
                  init: tp.Optional[tp.Mapping[str, str]] = None
                  ) -> tp.Tuple[nn.Module, SourceRemap]:
    """`remap_sources` of the model a package (as `states.load_package` reads it) holds."""
    return remap_sources(states.load_model(package), sources, init)


@dataclass(frozen=True)
class Conflict:
    """A constructor argument that the config sets to another value than the checkpoint's."""
    key: str
    checkpoint: tp.Any
    config: tp.Any

    def describe(self) -> str:
        return f"{self.key}: checkpoint {self.checkpoint!r}, config {self.config!r}"


def _comparable(value: tp.Any) -> tp.Any:
    """`value` with lists and tuples alike (configs give lists, packages may hold tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item) for item in value)
    return value


def architecture_conflicts(klass: type, checkpoint_kwargs: tp.Mapping[str, tp.Any],
                           requested: tp.Mapping[str, tp.Any],
                           free: tp.AbstractSet[str] = FREE_KEYS) -> tp.List[Conflict]:
    """The `requested` constructor arguments that contradict the checkpoint's.

    `requested` holds only what the user set (the caller decides what "set" means); a key the
    checkpoint does not store is compared with `klass`'s default; keys `klass` does not take
    and `free` keys are ignored. Pure: nothing is built.
    """
    parameters = inspect.signature(klass).parameters
    conflicts = []
    for key, value in requested.items():
        if key in free or key not in parameters:
            continue
        default = parameters[key].default
        stored = checkpoint_kwargs.get(key, None if default is inspect.Parameter.empty
                                       else default)
        if _comparable(stored) != _comparable(value):
            conflicts.append(Conflict(key, stored, value))
    return conflicts


@dataclass(frozen=True)
class FreezeReport:
    """What `freeze_parameters` froze: parameter names, and counts of scalar weights."""
    frozen: tp.Tuple[str, ...]
    trainable: int
    total: int

    def describe(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.
        return (f"{len(self.frozen)} parameter tensors frozen; trainable weights: "
                f"{self.trainable:,} of {self.total:,} ({share:.1f}%)")


def freeze_parameters(model: nn.Module, patterns: tp.Sequence[str]) -> FreezeReport:
    """Set `requires_grad=False` on the parameters whose names match one of `patterns`
    (`fnmatch` style, `*` spans dots: `encoder.*`, `crosstransformer.*`).

    Raises ValueError naming a pattern that matches no parameter, with close names.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter of "
                             f"{type(model).__name__}; close names: "
                             f"{', '.join(_close_names(pattern, names)) or 'none'}")
    frozen = []
    for name, param in model.named_parameters():
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return FreezeReport(frozen=tuple(frozen), trainable=count_trainable(model),
                        total=sum(param.numel() for param in model.parameters()))


def count_trainable(model: nn.Module) -> int:
    """Number of scalar weights of `model` that require a gradient."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def _close_names(pattern: str, names: tp.Sequence[str]) -> tp.List[str]:
    """Patterns of whole submodules (`encoder.*`) and parameter names resembling `pattern`."""
    prefixes = sorted({name.split(".")[0] + ".*" for name in names})
    return difflib.get_close_matches(pattern, prefixes + list(names), n=4, cutoff=0.4)
