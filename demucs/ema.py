"""Exponential moving average of a model's weights, evaluated alongside the raw model."""
from contextlib import contextmanager
import typing as tp

import torch
from torch import nn

from .states import swap_state


class ModelEMA:
    """Keep an exponential moving average of the float32 entries of `model.state_dict()`, frozen
    parameters (`requires_grad=False` when the EMA is made) left out: they keep their exact value
    in the model, and swapping the average in leaves them alone, where averaging an unchanged
    value could still move it by a rounding.

    With `unbias`, the weight of a new value is `1 / count` with `count <- count * decay + 1`, which
    removes the bias toward the initial weights early in training; otherwise it is `1 - decay`.
    The average lives on `device` (CPU by default, so it costs no accelerator memory).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, unbias: bool = True,
                 device: tp.Union[str, torch.device, None] = "cpu"):
        self.decay = decay
        self.model = model
        self.unbias = unbias
        self.device = device
        self.count = 0.
        self._frozen = frozenset(name for name, param in model.named_parameters()
                                 if not param.requires_grad)
        self.state: tp.Dict[str, torch.Tensor] = {}
        for key, value in self._float_entries():
            self.state[key] = value.detach().to(self._device_for(value), copy=True)

    def _float_entries(self) -> tp.Iterator[tp.Tuple[str, torch.Tensor]]:
        for key, value in self.model.state_dict().items():
            if value.dtype == torch.float32 and key not in self._frozen:
                yield key, value

    def _device_for(self, value: torch.Tensor) -> tp.Union[str, torch.device]:
        return value.device if self.device is None else self.device

    def update(self) -> None:
        """Fold the current model weights into the average."""
        if self.unbias:
            self.count = self.count * self.decay + 1
            weight = 1 / self.count
        else:
            weight = 1 - self.decay
        for key, value in self._float_entries():
            average = self.state[key]
            average.mul_(1 - weight)
            average.add_(value.detach().to(average.device), alpha=weight)

    @contextmanager
    def swap(self) -> tp.Iterator[None]:
        """Temporarily load the averaged weights into the model (restored on exit)."""
        with swap_state(self.model, self.state):
            yield

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        """`{'state': averaged tensors, 'count': unbiasing count}`, as stored in checkpoints."""
        return {"state": self.state, "count": self.count}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        """Restore what `state_dict` returned."""
        self.count = state["count"]
        for key, value in state["state"].items():
            self.state[key].copy_(value)
