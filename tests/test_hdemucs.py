"""Hybrid Demucs: building blocks, layer plan and state_dict of the default model, forward variants,
gradients, and agreement with the official implementation's reference vectors."""
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from demucs.hdemucs import (HDecLayer, HDemucs, HEncLayer, MultiWrap, ScaledEmbedding,
                            WIENER_WINDOW_FRAMES, pad1d)
from demucs.wiener import wiener

SOURCES = ["drums", "bass", "other", "vocals"]
KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "official_state_dict_keys.txt"
TINY = dict(channels=4, nfft=256, depth=4)  # 3 freq layers (128 → 32 → 8 → 1 bins) + 1 time layer


def tiny(**kwargs) -> HDemucs:
    torch.manual_seed(0)
    return HDemucs(SOURCES[:2], **dict(TINY, **kwargs))


def _mix(length: int, channels: int = 2, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(length))


# ---------------------------------------------------------------- building blocks

@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 12), left=st.integers(0, 20), right=st.integers(0, 20),
       mode=st.sampled_from(["reflect", "constant"]))
def test_pad1d_accepts_padding_wider_than_input(length, left, right, mode):
    x = torch.randn(2, length)
    out = pad1d(x, (left, right), mode=mode)
    assert out.shape == (2, length + left + right)
    assert torch.equal(out[:, left:left + length], x)
    if mode == "reflect" and max(left, right) < length:
        assert torch.equal(out, F.pad(x, (left, right), mode="reflect"))


def test_scaled_embedding_stores_weights_divided_by_scale():
    torch.manual_seed(0)
    emb = ScaledEmbedding(16, 3, scale=10.0, smooth=True)
    idx = torch.tensor([0, 5, 15])
    assert torch.allclose(emb(idx), emb.weight[idx])
    assert torch.allclose(emb.weight, emb.embedding.weight * 10)
    # smooth init: neighbouring entries are close (cumulative sums normalised by sqrt(n))
    gaps = (emb.weight[1:] - emb.weight[:-1]).norm(dim=1)
    assert gaps[8:].mean() < gaps[:1].mean() + 1


def test_freq_encoder_divides_bins_by_stride():
    layer = HEncLayer(4, 8, kernel_size=8, stride=4, dconv=False)
    y = layer(torch.randn(2, 4, 64, 10))
    assert y.shape == (2, 8, 16, 10)


def test_time_encoder_pads_to_stride_multiple():
    layer = HEncLayer(2, 8, freq=False, dconv=True, norm=False,
                      dconv_kw={"depth": 1, "compress": 2})
    assert layer(torch.randn(1, 2, 101)).shape == (1, 8, 26)


def test_empty_encoder_keeps_only_its_conv():
    layer = HEncLayer(4, 8, freq=False, empty=True)
    assert [name for name, _ in layer.named_children()] == ["conv"]
    x = torch.randn(1, 4, 64)
    assert torch.equal(layer(x), layer.conv(x))


def test_injected_time_branch_must_match_frames():
    layer = HEncLayer(4, 8, kernel_size=4, stride=4, pad=False, dconv=False)
    with pytest.raises(ValueError, match="frames"):
        layer(torch.randn(1, 4, 4, 10), inject=torch.randn(1, 8, 9))


def test_decoders_restore_shapes_and_return_pre_activation():
    dec = HDecLayer(8, 4, dconv=False)
    out, pre = dec(torch.randn(2, 8, 16, 10), torch.randn(2, 8, 16, 10), None)
    assert out.shape == (2, 4, 64, 10) and pre.shape == (2, 8, 16, 10)
    tdec = HDecLayer(8, 4, freq=False, last=True, dconv=False)
    out, _ = tdec(torch.randn(1, 8, 26), torch.randn(1, 8, 26), 101)
    assert out.shape == (1, 4, 101)
    empty = HDecLayer(8, 4, freq=False, empty=True, dconv=False)
    with pytest.raises(ValueError, match="skip"):
        empty(torch.randn(1, 8, 26), torch.randn(1, 8, 26), 101)


def test_multiwrap_replicates_and_validates():
    enc = HEncLayer(4, 8, norm=False, dconv=False)
    wrapped = MultiWrap(enc, [0.25, 0.5])
    assert len(wrapped.layers) == 3
    assert not torch.equal(wrapped.layers[0].conv.weight, wrapped.layers[1].conv.weight)
    with pytest.raises(ValueError, match="norm"):
        MultiWrap(HEncLayer(4, 8, dconv=False), [0.5])
    with pytest.raises(ValueError, match="context_freq"):
        MultiWrap(HDecLayer(8, 4, norm=False, dconv=False), [0.5])


# ---------------------------------------------------------------- full model

@pytest.fixture(scope="module")
def default_model() -> HDemucs:
    torch.manual_seed(0)
    return HDemucs(SOURCES, multi_freqs=[], dconv_init=1e-3)  # conf/config.yaml 'hdemucs'


def _official_hdemucs_keys():
    if not KEYS_FILE.exists():
        pytest.skip(f"official key list not found at {KEYS_FILE}")
    lines = KEYS_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# hdemucs:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("#"))
    return [line for line in lines[start + 1:end] if line.strip()]


def test_default_parameter_count(default_model):
    assert sum(p.numel() for p in default_model.parameters()) == 83_637_832


def test_default_state_dict_matches_official(default_model):
    ours = [f"{k} {tuple(v.shape)}" for k, v in default_model.state_dict().items()]
    assert ours == _official_hdemucs_keys()


def test_constructor_defaults_differ_from_config_where_upstream_does():
    import inspect
    params = inspect.signature(HDemucs).parameters
    assert params["multi_freqs"].default is None
    assert params["multi_freqs_depth"].default == 2
    assert params["dconv_init"].default == 1e-4
    assert params["samplerate"].default == 44100 and params["segment"].default == 40


def test_capture_init_records_arguments():
    model = tiny(cac=False)
    assert model._init_args_kwargs == ((SOURCES[:2],), dict(TINY, cac=False))


def test_legacy_wdemucs_alias():
    from demucs.wdemucs import WDemucs
    assert WDemucs is HDemucs


@pytest.mark.parametrize("kwargs", [
    {},
    {"cac": False, "wiener_iters": 1, "end_iters": 1},
    {"cac": False, "wiener_iters": -1, "end_iters": -1},
    {"cac": False, "wiener_iters": 1, "end_iters": 1, "wiener_residual": True},
    {"hybrid": False},
    {"hybrid_old": True},
    {"multi_freqs": [0.25, 0.5], "multi_freqs_depth": 2},
    {"dconv_mode": 3, "dconv_attn": 2, "dconv_lstm": 3, "norm_starts": 2, "channels_time": 8},
], ids=["cac", "wiener", "phase", "residual", "spec_only", "hybrid_old", "multi_freqs", "dconv3"])
def test_forward_shapes(kwargs):
    model = tiny(**kwargs).eval()
    with torch.no_grad():
        out = model(_mix(1500, batch=2))
    assert out.shape == (2, 2, 2, 1500)
    assert torch.isfinite(out).all()


def test_mono_and_odd_length():
    model = tiny(audio_channels=1).eval()
    with torch.no_grad():
        assert model(_mix(777, channels=1)).shape == (1, 2, 1, 777)


@pytest.mark.parametrize("kwargs", [{}, {"cac": False, "wiener_iters": 1, "end_iters": 1}],
                         ids=["cac", "wiener"])
def test_backward_gives_finite_gradients(kwargs):
    model = tiny(**kwargs).train()
    mix = _mix(1200, batch=2)
    loss = F.l1_loss(model(mix), mix[:, None].expand(-1, 2, -1, -1))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_inconsistent_options_are_rejected():
    with pytest.raises(ValueError, match="hybrid_old"):
        tiny(hybrid=False, hybrid_old=True)
    with pytest.raises(ValueError, match="wiener_iters == end_iters"):
        tiny(cac=False, wiener_iters=1, end_iters=0)


@pytest.mark.parametrize("hybrid", [True, False])
def test_spec_and_ispec_invert_each_other(hybrid):
    model = tiny(hybrid=hybrid)
    # `_spec` drops the Nyquist bin, so only a signal without energy there comes back, and hybrid
    # framing drops the two outer frames, which leaves the first and last ~hop samples incomplete.
    t = torch.arange(1000, dtype=torch.float32)
    x = torch.stack([torch.sin(0.05 * t + 1), torch.cos(0.13 * t)])[None]
    z = model._spec(x)
    assert z.shape[-2] == 128
    if hybrid:
        assert z.shape[-1] == -(-1000 // model.hop_length)  # ceil: frames align with time branch
    inner = slice(2 * model.hop_length, -2 * model.hop_length)
    assert torch.allclose(model._ispec(z, 1000)[..., inner], x[..., inner], atol=1e-4)


def test_cac_magnitude_and_mask_are_inverse():
    model = tiny()
    z = torch.randn(2, 2, 8, 5, dtype=torch.complex64)
    m = model._magnitude(z)
    assert m.shape == (2, 4, 8, 5)
    per_source = torch.stack([m, 2 * m], dim=1)
    out = model._mask(z, per_source)
    assert torch.equal(out[:, 0], z) and torch.allclose(out[:, 1], 2 * z)


def test_phase_mask_keeps_mixture_phase():
    model = tiny(cac=False, wiener_iters=-1, end_iters=-1)
    z = torch.randn(1, 2, 8, 5, dtype=torch.complex64)
    mags = torch.rand(1, 2, 2, 8, 5)
    out = model._mask(z, mags)
    assert torch.allclose(out.abs(), mags, atol=1e-6)
    assert torch.allclose(out / (out.abs() + 1e-12), (z / z.abs())[:, None].expand_as(out),
                          atol=1e-5)


def test_wiener_runs_by_windows_of_frames():
    model = tiny(cac=False)
    frames = WIENER_WINDOW_FRAMES + 37
    gen = torch.Generator().manual_seed(0)
    mags = torch.rand(1, 2, 2, 6, frames, generator=gen)
    mix = torch.randn(1, 2, 6, frames, dtype=torch.complex64, generator=gen)
    out = model._wiener(mags, mix, 0)  # no EM: frames are independent, windows must not show
    whole = wiener(mags[0].permute(3, 2, 1, 0), torch.view_as_real(mix[0].permute(2, 1, 0)), 0)
    expected = torch.view_as_complex(whole.transpose(-1, -2).contiguous()).permute(3, 2, 1, 0)
    assert out.shape == (1, 2, 2, 6, frames)
    assert torch.allclose(out[0], expected)


# ---------------------------------------------------------------- official reference vectors

@pytest.mark.parametrize("case", ["hdemucs_cac", "hdemucs_wiener", "demucs_unittest"])
def test_forward_matches_official(golden_dir, case):
    states = pytest.importorskip("demucs.states")
    if not hasattr(states, "load_model"):
        pytest.skip("demucs.states.load_model is not available yet")
    model = states.load_model(str(golden_dir / case / "model.th")).eval()
    assert isinstance(model, HDemucs)
    io = torch.load(golden_dir / case / "io.pt", weights_only=True)
    with torch.no_grad():
        out = model(io["forward_mix"].clone())
    ref = io["forward_out"]
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.parametrize("cac", [True, False])
def test_half_precision_masks_give_float32_spectrograms(cac):
    """Under CUDA's fp16 autocast the decoder's last (transposed) convolution gives float16: the
    masking and the inverse STFT still work in float32 (CPU autocast keeps that layer float32,
    so the half output is made by hand here)."""
    model = tiny(cac=cac).eval()
    z = torch.randn(1, 2, 8, 5, dtype=torch.complex64)
    m = torch.randn(1, 2, 4 if cac else 2, 8, 5)
    assert model._mask(z, m.half()).dtype == torch.complex64
    assert torch.allclose(model._mask(z, m.half()), model._mask(z, m.half().float()))
