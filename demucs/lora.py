"""Low-rank adapters (LoRA): fine-tune a model through small low-rank updates of its weights.

An adapted weight `W` becomes `W + (alpha / rank) * B @ A` (seen as a matrix of its first
dimension by the rest), with `A` `[rank, cols]` drawn like a layer's weight and `B` `[rows, rank]`
zero, so the adapted model starts equal to the base one. Only `A` and `B` train.

The update is a `torch.nn.utils.parametrize` parametrization of the weight tensor, so it works
wherever the module reads its weight: `nn.Linear` (also the attention's output projection),
`nn.MultiheadAttention`'s packed `in_proj_weight` (a bare parameter, not a Linear: the query,
key and value projections get one adapter over the three), and the convolutions. While adapted,
the state dict names a weight `NAME.parametrizations.weight.original` and its adapter
`...parametrizations.weight.0.lora_a` / `lora_b`; `merged_state_dict` folds the adapters in under
the plain names, and `merge_adapters` loads that into a new, ordinary model of the same class.

Neither removes the parametrizations in place: torch's `remove_parametrizations` edits the
module's parametrized class, which `copy.deepcopy` shares between a module and its copies, so
merging one copy in place would break the others.
"""
import math
import typing as tp

import torch
from torch import nn
from torch.nn.utils import parametrize

# Kinds of layers `add_adapters` can adapt, and the weights it adapts in each.
LINEAR, ATTENTION, CONV = "linear", "attention", "conv"
TARGETS = (LINEAR, ATTENTION, CONV)
DEFAULT_TARGETS = (LINEAR, ATTENTION)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


class LowRankUpdate(nn.Module):
    """Parametrization `W -> W + scale * (lora_b @ lora_a).view_as(W)` of one weight tensor."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        rows, cols = weight.shape[0], weight[0].numel()
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(weight.new_empty(rank, cols))
        self.lora_b = nn.Parameter(weight.new_zeros(rows, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_b @ self.lora_a).view_as(weight)


def _adapted_tensors(module: nn.Module, targets: tp.Collection[str]) -> tp.List[str]:
    """Names of the weights of `module` itself (not its children) that `targets` adapt."""
    if isinstance(module, nn.Linear) and LINEAR in targets:
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention) and ATTENTION in targets:
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, _CONVS) and CONV in targets:
        return ["weight"]
    return []


def add_adapters(model: nn.Module, rank: int, alpha: tp.Optional[float] = None,
                 targets: tp.Collection[str] = DEFAULT_TARGETS) -> tp.List[str]:
    """Adapt the weights of `model`'s layers of the `targets` kinds (`linear`: every
    `nn.Linear`; `attention`: the q/k/v projections of `nn.MultiheadAttention`; `conv`: the
    (transposed) 1d/2d convolutions) with rank-`rank` updates scaled by `alpha / rank`
    (`alpha` None: `rank`, a scale of 1), and freeze every other parameter.

    In place; returns the adapted weights' names. Raises ValueError for a rank below 1, an
    unknown target, or targets that match no layer.
    """
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: choose among {list(TARGETS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (0 disables the adapters), got {rank}")
    alpha = rank if alpha is None else alpha
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        for tensor in _adapted_tensors(module, targets):
            update = LowRankUpdate(getattr(module, tensor).detach(), rank, alpha)
            parametrize.register_parametrization(module, tensor, update)
            adapted.append(f"{name}.{tensor}" if name else tensor)
    if not adapted:
        raise ValueError(f"{type(model).__name__} has no layer of the kinds {list(targets)} to "
                         f"adapt (kinds: {list(TARGETS)})")
    return adapted


def _adapters(model: nn.Module) -> tp.Iterator[tp.Tuple[nn.Module, str]]:
    """(module, tensor name) of every weight adapted by `add_adapters`."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor, chain in module.parametrizations.items():
                if any(isinstance(step, LowRankUpdate) for step in chain):
                    yield module, tensor


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` holds adapters from `add_adapters`."""
    return next(_adapters(model), None) is not None


def merged_state_dict(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """`model.state_dict()` with each adapted weight replaced by its adapted value under its
    plain name (`NAME.weight`), and no adapter entries: the state of an ordinary model of
    `model`'s class and arguments. `model` is left unchanged."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{prefix}." if prefix else ""
        for tensor, chain in module.parametrizations.items():
            if not any(isinstance(step, LowRankUpdate) for step in chain):
                continue
            inner = f"{prefix}parametrizations.{tensor}."
            state = {key: value for key, value in state.items() if not key.startswith(inner)}
            state[prefix + tensor] = getattr(module, tensor).detach()
    return state


def merge_adapters(model: nn.Module) -> nn.Module:
    """A new model of `model`'s class and constructor arguments (`capture_init`), on CPU, whose
    weights are `merged_state_dict(model)`; `model` is left unchanged, and so is the global
    random generator (the new model's random initialisation is overwritten)."""
    if not hasattr(model, "_init_args_kwargs"):
        raise ValueError(f"cannot rebuild a {type(model).__name__}: its constructor arguments "
                         "were not recorded (decorate its __init__ with capture_init)")
    args, kwargs = model._init_args_kwargs
    with torch.random.fork_rng(devices=[]):
        plain = type(model)(*args, **kwargs)
    plain.load_state_dict(merged_state_dict(model))
    return plain
