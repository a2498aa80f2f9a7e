"""Time-domain Demucs and its building blocks (DConv, LocalState, BLSTM, rescaling)."""
import math

from hypothesis import given, settings, strategies as st
import pytest
import torch
from torch import nn

from demucs.demucs import BLSTM, DConv, Demucs, LocalState, rescale_module

SOURCES = ["drums", "bass", "other", "vocals"]


def tiny_demucs(**kwargs) -> Demucs:
    torch.manual_seed(0)
    config = dict(channels=4, depth=3, norm_starts=1, norm_groups=2, dconv_attn=2, dconv_lstm=2,
                  dconv_mode=3, lstm_layers=1)
    config.update(kwargs)
    return Demucs(SOURCES[:2], **config)


@settings(max_examples=6, deadline=None)
@given(length=st.integers(2, 3000), batch=st.integers(1, 2))
def test_forward_shape_any_length(length: int, batch: int):
    model = tiny_demucs().eval()
    mix = torch.randn(batch, 2, length)
    with torch.no_grad():
        out = model(mix)
    assert out.shape == (batch, 2, 2, length)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("resample", [True, False])
@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 100_000))
def test_valid_length_is_a_fixed_point(resample: bool, length: int):
    model = Demucs(SOURCES, channels=2, depth=4, dconv_mode=0, rescale=0, resample=resample)
    valid = model.valid_length(length)
    assert valid >= length
    assert model.valid_length(valid) == valid


def test_valid_length_default_config():
    model = Demucs.__new__(Demucs)
    model.resample, model.depth, model.kernel_size, model.stride = True, 6, 8, 4
    assert model.valid_length(1) == 4778


def test_convolutions_lose_no_sample_at_valid_length():
    """Without resampling, encoders then decoders map a valid length back onto itself."""
    model = tiny_demucs(resample=False, lstm_layers=0, dconv_mode=0)
    length = model.valid_length(1000)
    x = torch.randn(1, 2, length)
    for encode in model.encoder:
        x = encode(x)
    for decode in model.decoder:
        x = decode(x)
    assert x.shape[-1] == length


def test_train_mode_backward_gives_finite_gradients():
    model = tiny_demucs().train()
    out = model(torch.randn(1, 2, 1000))
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_normalize_makes_output_equivariant_to_gain_and_offset():
    model = tiny_demucs(normalize=True).eval()
    mix = torch.randn(1, 2, 1500)
    with torch.no_grad():
        base = model(mix)
        scaled = model(3 * mix + 0.5)
    torch.testing.assert_close(scaled, 3 * base + 0.5, atol=1e-4, rtol=1e-4)


def test_v2_layout_has_82_entries():
    with torch.device("meta"):
        model = Demucs(SOURCES, dconv_mode=0, gelu=False, lstm_layers=2)
    keys = list(model.state_dict())
    assert len(keys) == 82
    assert "encoder.0.3.weight" in keys and "encoder.4.4.weight" in keys
    assert "encoder.3.1.weight" not in keys  # Identity norm before norm_starts keeps index 1 free
    assert isinstance(model.decoder[0][5], nn.ReLU)


def test_legacy_v2_keys_are_remapped():
    model = tiny_demucs(dconv_mode=0)

    def legacy_name(key: str) -> str:
        return key.replace(".3.", ".2.") if key.startswith(("encoder.0.", "decoder.0.")) else key

    legacy = {legacy_name(key): value for key, value in model.state_dict().items()}
    assert "encoder.0.2.weight" in legacy
    fresh = tiny_demucs(dconv_mode=0, rescale=0)
    fresh.load_state_dict(legacy)
    torch.testing.assert_close(fresh.encoder[0][3].weight, model.encoder[0][3].weight)
    torch.testing.assert_close(fresh.decoder[0][3].weight, model.decoder[0][3].weight)


def test_dconv_layout_with_attention_and_lstm():
    dconv = DConv(16, compress=4, depth=2, attn=True, lstm=True)
    branch = dconv.layers[1]
    assert [type(m).__name__ for m in branch] == [
        "Conv1d", "GroupNorm", "GELU", "BLSTM", "LocalState", "Conv1d", "GroupNorm", "GLU",
        "LayerScale"]
    assert branch[0].dilation == (2,) and branch[0].padding == (2,)
    assert branch[3].max_steps == 200 and branch[3].skip
    torch.testing.assert_close(branch[8].scale, torch.full((16,), 1e-4))


def test_dconv_negative_depth_disables_dilation_and_norm_false_keeps_indices():
    dconv = DConv(8, depth=-3, norm=False, gelu=False)
    assert len(dconv.layers) == 3
    assert all(layer[0].dilation == (1,) for layer in dconv.layers)
    assert isinstance(dconv.layers[0][1], nn.Identity) and isinstance(dconv.layers[0][2], nn.ReLU)
    assert [key for key in dconv.state_dict() if key.startswith("layers.0.")] == [
        "layers.0.0.weight", "layers.0.0.bias", "layers.0.3.weight", "layers.0.3.bias",
        "layers.0.6.scale"]


def test_dconv_at_zero_scale_is_identity():
    dconv = DConv(8, init=0.)
    x = torch.randn(2, 8, 50)
    torch.testing.assert_close(dconv(x), x)


def test_local_state_initialisation_and_errors():
    attn = LocalState(8, heads=2, nfreqs=3, ndecay=4)
    assert attn.query_decay.weight.shape == (8, 8, 1)
    assert torch.all(attn.query_decay.bias == -2)
    assert attn.proj.weight.shape == (8, 8 + 2 * 3, 1)
    x = torch.randn(1, 8, 30)
    assert attn(x).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        LocalState(6, heads=4)


def test_local_state_never_attends_to_itself():
    """With two time steps, each step attends only to the other one (self scores are masked)."""
    torch.manual_seed(1)
    attn = LocalState(4, heads=1, ndecay=0)
    x = torch.randn(1, 4, 2)
    with torch.no_grad():
        content = attn.content(x)
        expected = x + attn.proj(content.flip(-1))
        torch.testing.assert_close(attn(x), expected)


def test_blstm_windows_match_the_plain_lstm_on_the_first_window():
    torch.manual_seed(0)
    lstm = BLSTM(6, layers=1, max_steps=40, skip=True)
    x = torch.randn(2, 6, 130)
    out = lstm(x)
    assert out.shape == x.shape
    first = lstm._recurrent(x[..., :40]) + x[..., :40]
    keep = 40 - 40 // 2 // 2
    torch.testing.assert_close(out[..., :keep], first[..., :keep])
    short = x[..., :40]
    torch.testing.assert_close(lstm(short), lstm._recurrent(short) + short)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blstm_runs_under_cpu_autocast_close_to_float32(dtype: torch.dtype):
    # oneDNN has no float16 LSTM on CPU: `demucs --amp fp16` on a Demucs v3 used to fail
    torch.manual_seed(0)
    lstm = BLSTM(8, layers=2, skip=True)
    x = torch.randn(2, 8, 50)
    with torch.no_grad():
        reference = lstm(x)
        with torch.autocast("cpu", dtype=dtype):
            mixed = lstm(x)
    assert mixed.shape == reference.shape
    error = (mixed.float() - reference).norm() / reference.norm()
    assert error < 3e-2


def test_rescale_module_moves_weight_std_towards_reference():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ConvTranspose2d(8, 2, 3), nn.Linear(4, 4))
    stds = [module[0].weight.std().item(), module[1].weight.std().item()]
    linear = module[2].weight.clone()
    rescale_module(module, reference=0.1)
    for conv, std in zip(module[:2], stds):
        assert math.isclose(conv.weight.std().item(), math.sqrt(std * 0.1), rel_tol=1e-4)
    torch.testing.assert_close(module[2].weight, linear)
