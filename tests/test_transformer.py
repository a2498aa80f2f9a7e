"""Transformer pieces of HTDemucs: embeddings, masks, layers and the cross-domain encoder."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn import functional as F

from demucs.rounding import upstream_rounding
from demucs.transformer import (
    CrossTransformerEncoder, CrossTransformerEncoderLayer, LayerScale, MultiheadAttention,
    MyGroupNorm, MyTransformerEncoderLayer, ScaledEmbedding, create_2d_sin_embedding,
    create_sin_embedding, create_sin_embedding_cape, dropout_attention, dynamic_sparse_attention,
    get_causal_mask, get_elementary_mask, get_mask, scaled_query_key_softmax)
from demucs import transformer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# ---------------------------------------------------------------- embeddings

def test_sin_embedding_is_cos_then_sin_of_geometric_periods():
    length, dim, period = 7, 8, 100.
    emb = create_sin_embedding(length, dim, max_period=period)
    assert emb.shape == (length, 1, dim)
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freqs = period ** (-torch.arange(dim // 2) / (dim // 2 - 1))
    torch.testing.assert_close(emb[:, 0, :dim // 2], torch.cos(pos * freqs))
    torch.testing.assert_close(emb[:, 0, dim // 2:], torch.sin(pos * freqs))
    # the first frequency turns one radian per position, the last one 1/period
    torch.testing.assert_close(emb[3, 0, dim // 2], torch.tensor(math.sin(3.)))
    torch.testing.assert_close(emb[3, 0, -1], torch.tensor(math.sin(3. / period)))


def test_sin_embedding_shift_moves_positions():
    shifted = create_sin_embedding(5, 16, shift=3)
    longer = create_sin_embedding(8, 16)
    torch.testing.assert_close(shifted, longer[3:])


def test_sin_embedding_rejects_odd_dim():
    with pytest.raises(ValueError, match="dim=7"):
        create_sin_embedding(4, 7)


def test_2d_embedding_width_half_and_height_half():
    d_model, height, width = 16, 3, 5
    emb = create_2d_sin_embedding(d_model, height, width)
    assert emb.shape == (1, d_model, height, width)
    half = d_model // 2
    # first half depends on width only, second half on height only
    assert torch.equal(emb[0, :half], emb[0, :half, :1].expand(-1, height, -1))
    assert torch.equal(emb[0, half:], emb[0, half:, :, :1].expand(-1, -1, width))
    # interleaved sin / cos: at position 0, sin = 0 and cos = 1
    assert torch.equal(emb[0, 0:half:2, 0, 0], torch.zeros(half // 2))
    assert torch.equal(emb[0, 1:half:2, 0, 0], torch.ones(half // 2))
    torch.testing.assert_close(emb[0, 0, 0, 4], torch.tensor(math.sin(4.)))
    torch.testing.assert_close(emb[0, half + 1, 2, 0], torch.tensor(math.cos(2.)))


def test_2d_embedding_needs_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        create_2d_sin_embedding(6, 2, 2)


def test_cape_without_augment_is_centred_sin_embedding():
    length, dim, batch = 6, 8, 3
    cape = create_sin_embedding_cape(length, dim, batch, mean_normalize=True, augment=False)
    assert cape.shape == (length, batch, dim) and cape.dtype == torch.float32
    pos = torch.arange(length) - (length - 1) / 2
    freqs = 10000. ** (-torch.arange(dim // 2) / (dim // 2 - 1))
    torch.testing.assert_close(cape[:, 1, :dim // 2], torch.cos(pos[:, None] * freqs))
    plain = create_sin_embedding_cape(length, dim, batch, mean_normalize=False, augment=False)
    torch.testing.assert_close(plain[:, :1], create_sin_embedding(length, dim))


def test_cape_augment_differs_per_item_and_follows_numpy_seed():
    def cape():
        return create_sin_embedding_cape(10, 8, 2, mean_normalize=True, augment=True,
                                         max_global_shift=5., max_local_shift=1., max_scale=1.4)
    np.random.seed(1)
    first = cape()
    np.random.seed(1)
    torch.testing.assert_close(cape(), first)
    assert not torch.allclose(first[:, 0], first[:, 1])


def test_scaled_embedding_boosts_weights():
    emb = ScaledEmbedding(100, 32, scale=0.2, boost=3.)
    torch.testing.assert_close(emb.weight, emb.embedding.weight * 3.)
    index = torch.tensor([0, 5, 99])
    torch.testing.assert_close(emb(index), emb.weight[index])
    assert 0.15 < float(emb.weight.detach().std()) < 0.25


# ---------------------------------------------------------------- masks

def test_causal_mask_is_strict_upper_triangle():
    assert torch.equal(get_causal_mask(5), torch.ones(5, 5, dtype=torch.bool).triu(1))


def test_diag_mask_square_is_band():
    mask = get_elementary_mask(9, 9, "diag", 2, 0, 0, 0.9, "cpu")
    idx = torch.arange(9)
    assert torch.equal(mask, (idx[:, None] - idx[None]).abs() <= 2)


@settings(max_examples=25, deadline=None)
@given(keys=st.integers(1, 40), queries=st.integers(1, 40), window=st.integers(0, 5))
def test_diag_mask_every_query_sees_at_most_the_window(keys, queries, window):
    mask = get_elementary_mask(keys, queries, "diag", window, 0, 0, 0.9, "cpu")
    assert mask.shape == (queries, keys)
    per_row = mask.sum(dim=1)
    assert bool((per_row >= 1).all()) and bool((per_row <= 2 * window + 1).all())


def test_global_and_random_masks():
    glob = get_elementary_mask(20, 10, "global", 0, 4, 0, 0.9, "cpu")
    assert glob[:, :4].all() and glob[:2].all() and not glob[2:, 4:].any()
    rand = get_elementary_mask(100, 100, "random", 0, 0, 7, 0.9, "cpu")
    assert torch.equal(rand, get_elementary_mask(100, 100, "random", 0, 0, 7, 0.9, "cpu"))
    assert 0.07 < rand.float().mean() < 0.13
    jmask = get_elementary_mask(30, 30, "jmask", 0, 0, 0, 0.9, "cpu")
    assert jmask.diagonal().all() and jmask[10, 11] and jmask[10, 13] and not jmask[10, 12]


def test_get_mask_is_union_and_rejects_unknown_type():
    union = get_mask(12, 12, "diag_global", 1, 3, 0, 0.9, "cpu")
    diag = get_elementary_mask(12, 12, "diag", 1, 3, 0, 0.9, "cpu")
    glob = get_elementary_mask(12, 12, "global", 1, 3, 0, 0.9, "cpu")
    assert torch.equal(union, (diag | glob)[None])
    with pytest.raises(ValueError, match="'band'"):
        get_mask(4, 4, "diag_band", 1, 1, 0, 0.9, "cpu")


# ---------------------------------------------------------------- small modules

def test_layer_scale_channel_layouts():
    scale = LayerScale(3, init=0.5)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(scale(x), 0.5 * x)
    last = LayerScale(3, init=2., channel_last=True)
    last.scale.data = torch.tensor([1., 2., 3.])
    y = torch.ones(2, 4, 3)
    torch.testing.assert_close(last(y)[0, 0], torch.tensor([1., 2., 3.]))
    assert list(dict(last.named_parameters())) == ["scale"]


def test_my_group_norm_normalises_tokens_and_channels_together():
    norm = MyGroupNorm(1, 6, affine=False)
    x = torch.randn(2, 5, 6) * 3 + 1
    ref = (x - x.mean(dim=(1, 2), keepdim=True)) / torch.sqrt(
        x.var(dim=(1, 2), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), ref)


@pytest.mark.parametrize("groups", [1, 2])
def test_my_group_norm_equals_group_norm_of_transposed_tokens(groups):
    norm = MyGroupNorm(groups, 6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    reference = nn.GroupNorm(groups, 6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 5, 6) * 3 + 1
    expected = reference(x.transpose(1, 2)).transpose(1, 2)
    # training (autograd) takes upstream's transposed GroupNorm: the same bits
    assert torch.equal(norm(x), expected)
    with torch.no_grad():
        out = norm(x)
        with upstream_rounding():
            assert torch.equal(norm(x), expected)
    torch.testing.assert_close(out, expected)
    if groups == 1:  # inference computes in the token layout: the output stays token-major
        assert out.is_contiguous()


# ---------------------------------------------------------------- layers

SELF_KEYS = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
             "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
             "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]


@pytest.mark.parametrize("norm_first", [True, False])
def test_self_layer_equals_torch_transformer_layer(norm_first):
    ours = MyTransformerEncoderLayer(16, 4, 32, dropout=0., activation=F.gelu,
                                     norm_first=norm_first, batch_first=True)
    assert list(ours.state_dict()) == SELF_KEYS
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0., activation=F.gelu,
                                     norm_first=norm_first, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), ref(x))


def test_self_layer_extras_keys_and_group_norm():
    layer = MyTransformerEncoderLayer(16, 2, 32, group_norm=1, norm_first=True, norm_out=True,
                                      layer_scale=True, batch_first=True)
    assert list(layer.state_dict()) == SELF_KEYS + [
        "norm_out.weight", "norm_out.bias", "gamma_1.scale", "gamma_2.scale"]
    assert isinstance(layer.norm1, MyGroupNorm) and isinstance(layer.norm_out, MyGroupNorm)
    torch.testing.assert_close(layer.gamma_1.scale, torch.full((16,), 1e-4))
    post = MyTransformerEncoderLayer(16, 2, 32, norm_first=False, norm_out=True)
    assert post.norm_out is None  # the output norm exists only for pre-norm layers


def test_self_layer_time_first_layout():
    layer = MyTransformerEncoderLayer(8, 2, 16, dropout=0., batch_first=False).eval()
    x = torch.randn(5, 2, 8)
    batch_first = MyTransformerEncoderLayer(8, 2, 16, dropout=0., batch_first=True).eval()
    batch_first.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), batch_first(x.transpose(0, 1)).transpose(0, 1))


@pytest.mark.parametrize("norm_first", [True, False])
def test_cross_layer_on_itself_is_a_self_layer(norm_first):
    kw = dict(dropout=0., activation=F.gelu, norm_first=norm_first, norm_out=True,
              layer_scale=True, init_values=0.5, batch_first=True)
    cross = CrossTransformerEncoderLayer(16, 4, 32, **kw)
    assert [k.split(".")[0] for k in cross.state_dict()] == [
        "cross_attn"] * 4 + ["linear1"] * 2 + ["linear2"] * 2 + ["norm1"] * 2 + ["norm2"] * 2 \
        + ["norm3"] * 2 + (["norm_out"] * 2 if norm_first else []) + ["gamma_1", "gamma_2"]
    single = MyTransformerEncoderLayer(16, 4, 32, **kw)
    state = {k.replace("cross_attn", "self_attn"): v for k, v in cross.state_dict().items()}
    if norm_first:  # the feed-forward block reads norm3 in a cross layer, norm2 in a self one
        state["norm2.weight"], state["norm2.bias"] = state["norm3.weight"], state["norm3.bias"]
    single.load_state_dict({k: v for k, v in state.items() if not k.startswith("norm3")})
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(cross(x, x), single(x))


def test_cross_layer_queries_and_keys_of_different_lengths():
    cross = CrossTransformerEncoderLayer(8, 2, 16, dropout=0., norm_first=True, batch_first=True)
    out = cross(torch.randn(2, 5, 8), torch.randn(2, 11, 8))
    assert out.shape == (2, 5, 8)


# ---------------------------------------------------------------- sparse attention

def _copy_dense_into_sparse(dense: nn.MultiheadAttention, sparse: MultiheadAttention) -> None:
    for name, weight, bias in zip("qkv", dense.in_proj_weight.data.chunk(3),
                                  dense.in_proj_bias.data.chunk(3)):
        getattr(sparse, name).weight.data = weight.clone()
        getattr(sparse, name).bias.data = bias.clone()
    sparse.proj.load_state_dict(dense.out_proj.state_dict())


def test_sparse_attention_matches_dense_attention_without_mask():
    dense = nn.MultiheadAttention(16, 4, batch_first=True)
    sparse = MultiheadAttention(16, 4, batch_first=True, auto_sparsity=0)
    _copy_dense_into_sparse(dense, sparse)
    q, k = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    torch.testing.assert_close(sparse(q, k, k)[0], dense(q, k, k, need_weights=False)[0])


def test_masked_softmax_ignores_masked_keys():
    q, k = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    mask = get_mask(6, 6, "diag", 1, 0, 0, 0.9, "cpu")
    att = scaled_query_key_softmax(q, k, mask)
    assert torch.equal(att[:, ~mask[0]], torch.zeros_like(att[:, ~mask[0]]))
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 6))


def test_sparse_self_layer_with_wide_window_equals_dense_one():
    kw = dict(dropout=0., norm_first=True, batch_first=True)
    sparse = MyTransformerEncoderLayer(8, 2, 16, sparse=True, sparse_attn_window=50, **kw)
    assert "self_attn.q.weight" in sparse.state_dict()
    dense = MyTransformerEncoderLayer(8, 2, 16, **kw)
    _copy_dense_into_sparse(dense.self_attn, sparse.self_attn)
    for name in ("linear1", "linear2", "norm1", "norm2"):
        getattr(sparse, name).load_state_dict(getattr(dense, name).state_dict())
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(sparse(x), dense(x))
    narrow = MyTransformerEncoderLayer(8, 2, 16, sparse=True, sparse_attn_window=1, **kw)
    narrow.load_state_dict(sparse.state_dict())
    assert not torch.allclose(narrow(x), dense(x))


def test_auto_sparsity_is_refused_clearly():
    layer = CrossTransformerEncoderLayer(8, 2, 16, sparse=True, auto_sparsity=True,
                                         batch_first=True)
    with pytest.raises(NotImplementedError, match="xformers"):
        layer(torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(NotImplementedError, match="t_auto_sparsity"):
        dynamic_sparse_attention(torch.randn(1, 2, 2), torch.randn(1, 2, 2),
                                 torch.randn(1, 2, 2), 0.9)


# ---------------------------------------------------------------- cross transformer encoder

def _encoder(**kwargs):
    base = dict(dim=16, num_heads=2, num_layers=3, dropout=0., norm_first=True, norm_out=True,
                layer_scale=True)
    base.update(kwargs)
    return CrossTransformerEncoder(**base)


@pytest.mark.parametrize("cross_first", [False, True])
def test_encoder_alternates_self_and_cross_layers(cross_first):
    enc = _encoder(num_layers=4, cross_first=cross_first)
    kinds = [type(layer) for layer in enc.layers]
    self_kind, cross_kind = MyTransformerEncoderLayer, CrossTransformerEncoderLayer
    expected = [cross_kind, self_kind] * 2 if cross_first else [self_kind, cross_kind] * 2
    assert kinds == expected and [type(layer) for layer in enc.layers_t] == expected


def test_encoder_with_no_layers_adds_positional_embeddings_in_token_order():
    enc = _encoder(num_layers=0, norm_in=False, weight_pos_embed=1.)
    x, xt = enc(torch.zeros(2, 16, 3, 5), torch.zeros(2, 16, 7))
    torch.testing.assert_close(x, create_2d_sin_embedding(16, 3, 5).expand(2, -1, -1, -1))
    torch.testing.assert_close(xt, create_sin_embedding(7, 16).permute(1, 2, 0).expand(2, -1, -1))


def test_encoder_cross_layers_read_the_other_stream_before_the_update():
    enc = _encoder(num_layers=2)
    seen = {}
    enc.layers[1].register_forward_hook(lambda m, inputs, out: seen.update(x_out=out))
    enc.layers_t[1].register_forward_hook(lambda m, inputs, out: seen.update(t_keys=inputs[1]))
    enc.layers[0].register_forward_hook(lambda m, inputs, out: seen.update(x_before=out))
    enc(torch.randn(1, 16, 2, 3), torch.randn(1, 16, 8))
    assert torch.equal(seen["t_keys"], seen["x_before"])
    assert not torch.equal(seen["t_keys"], seen["x_out"])


@pytest.mark.parametrize("options", [
    dict(emb="cape"), dict(emb="scaled", max_positions=50), dict(norm_in=False, norm_in_group=1),
    dict(group_norm=1), dict(norm_first=False), dict(gelu=False, sin_random_shift=3),
])
def test_encoder_variants_train_and_eval(options):
    enc = _encoder(**options)
    x, xt = torch.randn(2, 16, 4, 3), torch.randn(2, 16, 12)
    out, out_t = enc(x, xt)
    assert out.shape == x.shape and out_t.shape == xt.shape
    out.sum().backward()
    enc.eval()
    with torch.no_grad():
        assert torch.isfinite(enc(x, xt)[0]).all()
    if options.get("norm_in_group"):
        assert isinstance(enc.norm_in, MyGroupNorm)


def test_encoder_variant_keys():
    assert "position_embeddings.embedding.weight" in _encoder(emb="scaled").state_dict()
    identity = _encoder(norm_in=False)
    assert isinstance(identity.norm_in, nn.Identity) and "norm_in.weight" not in \
        identity.state_dict()


def test_encoder_checks_options():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        _encoder(dim=18, num_heads=4)
    with pytest.raises(ValueError, match="'rope'"):
        _encoder(emb="rope")


def test_make_optim_group():
    enc = _encoder(weight_decay=0.05)
    group = enc.make_optim_group()
    assert group["weight_decay"] == 0.05 and "lr" not in group
    assert len(group["params"]) == len(list(enc.parameters()))
    assert _encoder(lr=1e-4).make_optim_group()["lr"] == 1e-4


# ---------------------------------------------------------------- attention with dropout (CPU)

def _seeded_dropout_attention(p: float):
    """dropout_attention drawing the same masks at every call (a deterministic function)."""
    return lambda q, k, v: dropout_attention(q, k, v, p, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("block_elements", [2 ** 25, 40])
def test_dropout_attention_gradients_match_its_forward(monkeypatch, block_elements):
    monkeypatch.setattr(transformer, "ATTENTION_BLOCK_ELEMENTS", block_elements)
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64, requires_grad=True)
               for n in (5, 7, 7))
    assert torch.autograd.gradcheck(_seeded_dropout_attention(0.3), (q, k, v))


def test_dropout_attention_masks_do_not_depend_on_the_block_size(monkeypatch):
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    whole = _seeded_dropout_attention(0.4)(q, k, v)
    monkeypatch.setattr(transformer, "ATTENTION_BLOCK_ELEMENTS", 2 * 4 * 6 * 2)  # 2 rows
    torch.testing.assert_close(_seeded_dropout_attention(0.4)(q, k, v), whole)


def test_dropout_attention_drops_weights_with_probability_p_and_rescales():
    p, keys = 0.25, 400
    q, k = torch.zeros(1, 2, 50, 8), torch.zeros(1, 2, keys, 8)  # uniform weights 1/keys
    weights = dropout_attention(q, k, torch.eye(keys).expand(1, 2, keys, keys), p)
    kept = weights != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.01  # 40,000 draws: sd 0.002
    torch.testing.assert_close(weights[kept], torch.full_like(weights[kept], 1 / keys / (1 - p)))


def test_dropout_attention_without_drops_is_plain_attention():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 6)
    torch.testing.assert_close(dropout_attention(q, k, v, 1e-12),
                               F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("p", [0., 1., -0.1])
def test_dropout_attention_rejects_rates_outside_0_1(p):
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_attention(q, q, q, p)


def test_training_layers_use_dropout_attention_only_with_gradients(monkeypatch):
    calls = []
    original = transformer._DropoutAttention.apply
    monkeypatch.setattr(transformer._DropoutAttention, "apply",
                        lambda *args: calls.append(1) or original(*args))
    layer = MyTransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True).train()
    x = torch.randn(2, 7, 16, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 1 and x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        layer(x)
    layer.eval()(x)
    assert len(calls) == 1  # no gradient or no dropout: torch's fused kernels
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer.train()(x).sum().backward()
    assert len(calls) == 1  # torch.compile cannot trace it: torch's kernel with dropout
