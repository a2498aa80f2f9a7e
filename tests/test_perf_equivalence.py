"""The speed-oriented code paths give the outputs of the plain computations they replace.

Each test runs an optimized path (direct `scaled_dot_product_attention`, the shift trick on a
window instead of a padded copy, the in-place overlap-add, the DConv's 1x1 conv and GroupNorm
fused in inference, transposed convolutions as phase convolutions) against a plain
reference written here, and requires a relative L2 error within 1e-4 (issue 7: optimizations must
not change the default numerics).
"""
import random

from hypothesis import given, settings, strategies as st
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from demucs import demucs as demucs_module, hdemucs as hdemucs_module, transformer
from demucs.apply import TensorChunk, apply_model, read_padded, segment_weight
from demucs.demucs import (DConv, conv1x1_group_norm, conv_transpose_polyphase,
                           dilated_conv_as_gemm, polyphase_applies)
from demucs.hdemucs import HDecLayer
from demucs.htdemucs import HTDemucs
from demucs.transformer import (CrossTransformerEncoderLayer, MultiheadAttention,
                                MyTransformerEncoderLayer, attend, get_mask,
                                scaled_query_key_softmax)
from demucs.utils import center_trim

SOURCES = ["drums", "bass", "other", "vocals"]
TOL = 1e-4
torch.set_num_threads(1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def module_attention(attn, query, key, attn_mask=None, key_padding_mask=None):
    """The plain path: torch's own `nn.MultiheadAttention` forward."""
    return attn(query, key, key, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                need_weights=False)[0]


def _tokens(batch: int, length: int, dim: int, batch_first: bool, seed: int) -> torch.Tensor:
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1)


@settings(max_examples=12, deadline=None)
@given(batch_first=st.booleans(), cross=st.booleans(), heads=st.sampled_from([1, 2, 4]),
       queries=st.integers(1, 40), keys=st.integers(1, 40), batch=st.integers(1, 3))
def test_attend_matches_torch_multihead_attention(batch_first, cross, heads, queries, keys,
                                                  batch):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, heads, batch_first=batch_first).eval()
    query = _tokens(batch, queries, 16, batch_first, seed=1)
    key = _tokens(batch, keys, 16, batch_first, seed=2) if cross else query
    with torch.no_grad():
        ref = module_attention(attn, query, key)
        out = attend(attn, query, key)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_attend_gradients_match_torch_multihead_attention():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True).train()
    query = _tokens(2, 30, 16, True, seed=1).requires_grad_()
    key = _tokens(2, 20, 16, True, seed=2)
    grads = []
    for fn in (module_attention, attend):
        attn.zero_grad()
        query.grad = None
        fn(attn, query, key).square().sum().backward()
        grads.append([query.grad.clone(), attn.in_proj_weight.grad.clone(),
                      attn.out_proj.weight.grad.clone()])
    for ref, out in zip(*grads):  # training goes through the module: upstream's roundings
        assert torch.equal(out, ref)


def test_attend_keeps_masked_calls_on_the_module():
    """A user-given mask keeps torch's semantics (True = masked out), through the module."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = _tokens(1, 6, 8, True, seed=3)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    with torch.no_grad():
        assert torch.equal(attend(attn, x, x, attn_mask=mask),
                           module_attention(attn, x, x, attn_mask=mask))


def test_sparse_attention_matches_explicit_masked_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 50, 8) for _ in range(3))
    mask = get_mask(50, 50, "diag_jmask", sparse_attn_window=3, global_window=4,
                    mask_random_seed=42, sparsity=0.9, device="cpu")
    ref = scaled_query_key_softmax(q, k, mask) @ v
    out = transformer.scaled_dot_product_attention(q, k, v, mask, nn.Dropout(0.5).eval())
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("layer_class", [MyTransformerEncoderLayer, CrossTransformerEncoderLayer])
def test_sparse_layers_still_match_dense_masked_attention(layer_class):
    """A sparse layer (custom MultiheadAttention + fixed mask) equals its math definition."""
    torch.manual_seed(0)
    layer = layer_class(16, 2, dim_feedforward=32, dropout=0., sparse=True, mask_type="diag",
                        sparse_attn_window=2, batch_first=True, norm_first=True).eval()
    attn = layer.self_attn if layer_class is MyTransformerEncoderLayer else layer.cross_attn
    assert isinstance(attn, MultiheadAttention)
    x = _tokens(1, 12, 16, True, seed=4)
    mask = get_mask(12, 12, "diag", 2, 50, 42, 0.95, "cpu")
    heads = attn._heads
    with torch.no_grad():
        q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
        ref = (scaled_query_key_softmax(q, k, mask) @ v).view(1, 2, 12, 8).transpose(1, 2)
        ref = attn.proj(ref.reshape(1, 12, 16))
        out = attn(x, x, x, attn_mask=mask)[0]
    assert rel_err(out, ref) < TOL


def tiny_htdemucs() -> HTDemucs:
    """Small HTDemucs (8 kHz, 0.25 s segments) with the released layer plan and a transformer."""
    torch.manual_seed(0)
    return HTDemucs(SOURCES, channels=8, nfft=4096, depth=4, t_layers=2, t_heads=2,
                    bottom_channels=16, dconv_mode=3, samplerate=8000, segment=0.25).eval()


def test_htdemucs_forward_matches_module_attention(monkeypatch):
    model = tiny_htdemucs()
    mix = torch.randn(2, 2, 2000, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(mix)
        monkeypatch.setattr(transformer, "attend", module_attention)
        ref = model(mix)
    assert rel_err(out, ref) < TOL


def plain_split(model, mix: torch.Tensor, overlap: float) -> torch.Tensor:
    """Reference overlap-add: every segment evaluated alone, weighted sums kept out of place."""
    length = mix.shape[-1]
    segment_length = int(model.samplerate * model.segment)
    stride = int((1 - overlap) * segment_length)
    weight = segment_weight(segment_length, 1.)
    total = torch.zeros(mix.shape[0], len(model.sources), mix.shape[1], length)
    weights = torch.zeros(length)
    for offset in range(0, length, stride):
        chunk = TensorChunk(mix, offset, segment_length)
        with torch.no_grad():
            out = center_trim(model(chunk.padded(segment_length)), chunk.length)
        n = out.shape[-1]
        total[..., offset:offset + n] = total[..., offset:offset + n] + weight[:n] * out
        weights[offset:offset + n] = weights[offset:offset + n] + weight[:n]
    return total / weights


def plain_shifted(model, mix: torch.Tensor, overlap: float, seed: int) -> torch.Tensor:
    """Reference shift trick: the whole track copied into a zero-padded one, then windowed."""
    random.seed(seed)
    length = mix.shape[-1]
    max_shift = int(0.5 * model.samplerate)
    padded = F.pad(mix, (max_shift, max_shift))
    offset = random.randint(0, max_shift)
    shifted = padded[..., offset:length + max_shift]  # zeros before it, as in the padding
    return plain_split(model, shifted, overlap)[..., max_shift - offset:]


@pytest.mark.parametrize("length", [700, 5003])
def test_split_matches_plain_overlap_add(length):
    model = tiny_htdemucs()
    mix = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(6))
    out = apply_model(model, mix, shifts=0, split=True, overlap=0.25)
    assert rel_err(out, plain_split(model, mix, 0.25)) < TOL


@pytest.mark.parametrize("seed", [0, 3])
def test_shift_window_matches_padded_copy(seed):
    model = tiny_htdemucs()
    mix = torch.randn(1, 2, 6000, generator=torch.Generator().manual_seed(7))
    random.seed(seed)
    out = apply_model(model, mix, shifts=1, split=True, overlap=0.25)
    ref = plain_shifted(model, mix, 0.25, seed)
    assert out.shape == ref.shape == (1, 4, 2, 6000)
    assert rel_err(out, ref) < TOL


def test_read_padded_reads_zeros_outside_the_track():
    """The shift trick reads its delayed view straight from the track: zeros before and after."""
    mix = torch.arange(1., 6.)[None]
    assert read_padded(mix, -2, 9).tolist() == [[0., 0., 1., 2., 3., 4., 5., 0., 0.]]
    assert read_padded(mix, -1, 4).tolist() == [[0., 1., 2., 3.]]
    assert read_padded(mix, -9, 3).tolist() == [[0., 0., 0.]]
    assert read_padded(mix, 7, 4).tolist() == [[0., 0., 0., 0.]]


# ---------------------------------------------------------------- DConv: fused 1x1 conv + GroupNorm

def _plain_dconv(dconv, x: torch.Tensor) -> torch.Tensor:
    """DConv as upstream computes it: x + branch(x) through every module, with autograd on."""
    with torch.enable_grad():
        for branch in dconv.layers:
            x = x + branch(x)
    return x.detach()


@settings(max_examples=15, deadline=None)
@given(channels=st.sampled_from([8, 48]), compress=st.sampled_from([4, 8]),
       items=st.integers(1, 6), frames=st.integers(3, 200), offset=st.sampled_from([0., 50.]),
       seed=st.integers(0, 1000))
def test_fused_dconv_matches_its_modules(channels, compress, items, frames, offset, seed):
    torch.manual_seed(seed)
    dconv = DConv(channels, compress=compress, depth=2, init=0.5)
    for module in dconv.modules():  # non-trivial affine parameters
        if isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    x = torch.randn(items, channels, frames) + offset  # a large mean tests the variance formula
    with torch.no_grad():
        fused = dconv(x)
    assert rel_err(fused, _plain_dconv(dconv, x)) < TOL


def test_fused_dconv_is_only_used_in_inference_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(demucs_module, "conv1x1_group_norm",
                        lambda *args: calls.append(1) or F.group_norm(args[0](args[2]), 1,
                                                                      args[1].weight,
                                                                      args[1].bias))
    dconv = DConv(16, compress=4, depth=2)
    x = torch.randn(2, 16, 30)
    dconv(x)
    assert not calls
    with torch.no_grad():
        dconv(x)
    assert len(calls) == 2  # one per branch
    without_norm = DConv(16, compress=4, depth=2, norm=False)
    with torch.no_grad():
        without_norm(x)
    assert len(calls) == 2


def test_conv1x1_group_norm_refuses_other_layers():
    with pytest.raises(ValueError, match="1x1 convolution and a one-group GroupNorm"):
        conv1x1_group_norm(nn.Conv1d(4, 8, 3), nn.GroupNorm(1, 8), torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match="1x1 convolution and a one-group GroupNorm"):
        conv1x1_group_norm(nn.Conv1d(4, 8, 1), nn.GroupNorm(2, 8), torch.randn(1, 4, 5))


@settings(max_examples=25, deadline=None)
@given(channels=st.integers(1, 24), out_channels=st.integers(1, 8),
       kernel=st.sampled_from([1, 3, 5]), dilation=st.integers(1, 4), frames=st.integers(1, 40),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_dilated_conv_as_gemm_matches_conv1d(channels, out_channels, kernel, dilation, frames,
                                             bias, seed):
    torch.manual_seed(seed)
    conv = nn.Conv1d(channels, out_channels, kernel, dilation=dilation,
                     padding=dilation * (kernel // 2), bias=bias)
    x = torch.randn(3, channels, frames)
    with torch.no_grad():
        assert rel_err(dilated_conv_as_gemm(conv, x), conv(x)) < TOL


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 2, 3, stride=2, padding=1),
                                  nn.Conv1d(4, 2, 3, padding=0),
                                  nn.Conv1d(4, 2, 3, padding=1, groups=2)])
def test_dilated_conv_as_gemm_refuses_other_convolutions(conv):
    with pytest.raises(ValueError, match="stride-1, ungrouped convolution"):
        dilated_conv_as_gemm(conv, torch.randn(1, 4, 9))


@settings(max_examples=25, deadline=None)
@given(two_d=st.booleans(), chin=st.integers(1, 12), chout=st.integers(1, 6),
       stride=st.integers(1, 4), taps=st.integers(1, 3), length=st.integers(1, 30),
       batch=st.integers(1, 2), bias=st.booleans(), seed=st.integers(0, 1000))
def test_conv_transpose_polyphase_matches_the_module(two_d, chin, chout, stride, taps, length,
                                                     batch, bias, seed):
    torch.manual_seed(seed)
    if two_d:
        conv = nn.ConvTranspose2d(chin, chout, [taps * stride, 1], [stride, 1], bias=bias)
        x = torch.randn(batch, chin, length, 5)
    else:
        conv = nn.ConvTranspose1d(chin, chout, taps * stride, stride, bias=bias)
        x = torch.randn(batch, chin, length)
    with torch.no_grad():
        ref = conv(x)
        out = conv_transpose_polyphase(conv, x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("conv", [nn.ConvTranspose1d(4, 2, 6, stride=4),
                                  nn.ConvTranspose1d(4, 2, 8, stride=4, padding=2),
                                  nn.ConvTranspose1d(4, 2, 8, stride=4, groups=2),
                                  nn.ConvTranspose1d(4, 2, 8, stride=4, dilation=2),
                                  nn.ConvTranspose2d(4, 2, [8, 3], [4, 1]),
                                  nn.ConvTranspose2d(4, 2, [8, 1], [4, 2]),
                                  nn.Conv1d(4, 2, 8, stride=4)])
def test_conv_transpose_polyphase_refuses_other_convolutions(conv):
    assert not polyphase_applies(conv)
    with pytest.raises(ValueError, match="kernel is a multiple of its stride"):
        conv_transpose_polyphase(conv, torch.randn(1, 4, 9, 1)[..., 0])


@pytest.mark.parametrize("freq", [True, False])
def test_decoder_uses_polyphase_only_in_inference_on_cpu(monkeypatch, freq):
    calls = []
    monkeypatch.setattr(hdemucs_module, "conv_transpose_polyphase",
                        lambda conv, x: calls.append(1) or conv(x))
    layer = HDecLayer(8, 4, freq=freq, dconv=False)
    x = torch.randn(1, 8, 6, 7) if freq else torch.randn(1, 8, 7)
    skip = torch.randn_like(x)
    layer(x, skip, 20)
    assert not calls
    with torch.no_grad():
        layer(x, skip, 20)
    assert calls == [1]
