"""ModelEMA: unbiased and plain averaging math, float32-only state, swap, checkpoint round trip."""
import pytest
import torch
from torch import nn

from demucs.ema import ModelEMA


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    return model


def _set_weight(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model[0].weight.fill_(value)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99])
def test_unbiased_average_matches_hand_computation(decay):
    model = _model()
    ema = ModelEMA(model, decay=decay, unbias=True)
    values = [1., 3., -2., 5.]
    expected_num, expected_den = 0., 0.
    for value in values:
        _set_weight(model, value)
        ema.update()
        expected_num = expected_num * decay + value
        expected_den = expected_den * decay + 1
    expected = expected_num / expected_den
    assert ema.count == pytest.approx(expected_den)
    assert torch.allclose(ema.state["0.weight"], torch.full((2, 3), expected), atol=1e-6)


def test_plain_average_weights_new_value_by_one_minus_decay():
    model = _model()
    _set_weight(model, 0.)
    ema = ModelEMA(model, decay=0.75, unbias=False)
    _set_weight(model, 4.)
    ema.update()
    assert torch.allclose(ema.state["0.weight"], torch.full((2, 3), 1.))


def test_only_float32_entries_are_tracked():
    ema = ModelEMA(_model())
    assert "1.num_batches_tracked" not in ema.state
    assert "1.running_mean" in ema.state and "0.bias" in ema.state


def test_swap_loads_average_then_restores_weights():
    model = _model()
    _set_weight(model, 2.)
    ema = ModelEMA(model)
    _set_weight(model, 7.)
    with ema.swap():
        assert torch.all(model[0].weight == 2.)
    assert torch.all(model[0].weight == 7.)


def test_state_dict_round_trip():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    _set_weight(model, 3.)
    ema.update()
    other = ModelEMA(_model(1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.count == ema.count
    for key, value in ema.state.items():
        assert torch.equal(other.state[key], value)


def test_frozen_parameters_are_left_out_and_keep_their_exact_value():
    model = _model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ema = ModelEMA(model, decay=0.9)
    assert "0.weight" not in ema.state and "0.bias" in ema.state
    for value in [1., 3., -2.]:
        with torch.no_grad():
            model[0].bias.fill_(value)
        ema.update()
    with ema.swap():
        assert torch.equal(model[0].weight, frozen)
        assert not torch.equal(model[0].bias, torch.full((2,), -2.))  # the average is in
    assert torch.equal(model[0].weight, frozen)
