"""Transformer building blocks of HTDemucs (v4): positional embeddings, sparse attention masks,
layer scale, self/cross-attention encoder layers and the cross-domain transformer encoder.

The cross-domain encoder runs two token streams side by side, one from the spectrogram branch
and one from the waveform branch; every other layer lets each stream attend to the other one.
State dict keys and module order follow upstream Demucs 4.x so released checkpoints load.
"""
import random
import typing as tp

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .rounding import exact, fast_cpu_inference

MASK_TYPES = ("diag", "jmask", "random", "global")
Activation = tp.Union[str, tp.Callable[[torch.Tensor], torch.Tensor]]


def _check_even(dim: int, multiple: int, what: str) -> None:
    if dim % multiple or dim < 2 * multiple:
        raise ValueError(f"{what} needs a dimension that is a multiple of {multiple} and at "
                         f"least {2 * multiple}, got dim={dim}")


def _sin_cos_of_positions(pos: torch.Tensor, dim: int, max_period: float,
                          device: tp.Union[str, torch.device]) -> torch.Tensor:
    """Concatenate cos then sin of `pos` at `dim // 2` geometric periods, last axis = `dim`."""
    half_dim = dim // 2
    freq_index = torch.arange(half_dim, device=device).view(1, 1, -1)
    period = torch.full([], float(max_period), device=device)
    phase = pos / (period ** (freq_index / (half_dim - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def create_sin_embedding(length: int, dim: int, shift: int = 0,
                         device: tp.Union[str, torch.device] = "cpu",
                         max_period: float = 10000) -> torch.Tensor:
    """1-D sinusoidal positional embedding of shape (length, 1, dim): cosines then sines.

    Args:
        length: number of positions.
        dim: embedding dimension (even).
        shift: offset added to every position (random shift augmentation).
        device: where to create the tensor.
        max_period: longest period of the sinusoids.
    """
    _check_even(dim, 2, "create_sin_embedding")
    pos = shift + torch.arange(length, device=device).view(-1, 1, 1)
    return _sin_cos_of_positions(pos, dim, max_period, device)


def create_2d_sin_embedding(d_model: int, height: int, width: int,
                            device: tp.Union[str, torch.device] = "cpu",
                            max_period: float = 10000) -> torch.Tensor:
    """2-D sinusoidal embedding of shape (1, d_model, height, width).

    The first half of the channels encodes the width position (interleaved sin, cos), the second
    half the height position, each with `d_model / 4` frequencies.
    """
    if d_model % 4 != 0:
        raise ValueError(f"create_2d_sin_embedding needs d_model divisible by 4, got {d_model}")
    period = torch.full([], float(max_period), device=device)
    half = d_model // 2
    inv_freq = torch.exp(torch.arange(0.0, half, 2, device=device) * -(torch.log(period) / half))
    pos_w = torch.arange(0.0, width, device=device)[:, None] * inv_freq  # (W, d/4)
    pos_h = torch.arange(0.0, height, device=device)[:, None] * inv_freq  # (H, d/4)
    emb = torch.zeros(d_model, height, width, device=device)
    emb[0:half:2] = torch.sin(pos_w).t()[:, None, :]
    emb[1:half:2] = torch.cos(pos_w).t()[:, None, :]
    emb[half::2] = torch.sin(pos_h).t()[:, :, None]
    emb[half + 1::2] = torch.cos(pos_h).t()[:, :, None]
    return emb[None]


def create_sin_embedding_cape(length: int, dim: int, batch_size: int, mean_normalize: bool,
                              augment: bool, max_global_shift: float = 0.0,
                              max_local_shift: float = 0.0, max_scale: float = 1.0,
                              device: tp.Union[str, torch.device] = "cpu",
                              max_period: float = 10000.0) -> torch.Tensor:
    """CAPE embedding (arXiv:2106.03143) of shape (length, batch_size, dim).

    Positions are optionally centred (`mean_normalize`) and, when `augment` (training), randomly
    shifted globally (±max_global_shift), locally (±max_local_shift) and scaled by a factor in
    [1/max_scale, max_scale], independently for every batch item (numpy's global RNG).
    """
    _check_even(dim, 2, "create_sin_embedding_cape")
    pos = torch.arange(length, dtype=torch.float32).view(-1, 1, 1).repeat(1, batch_size, 1)
    if mean_normalize:
        pos = pos - torch.nanmean(pos, dim=0, keepdim=True)
    if augment:
        global_shift = np.random.uniform(-max_global_shift, max_global_shift, [1, batch_size, 1])
        local_shift = np.random.uniform(-max_local_shift, max_local_shift,
                                        [length, batch_size, 1])
        log_scale = np.random.uniform(-np.log(max_scale), np.log(max_scale), [1, batch_size, 1])
        pos = (pos + torch.from_numpy(global_shift) + torch.from_numpy(local_shift)) \
            * torch.from_numpy(np.exp(log_scale))
    return _sin_cos_of_positions(pos.to(device), dim, max_period, device).float()


def get_causal_mask(length: int) -> torch.Tensor:
    """Boolean (length, length) matrix, True strictly above the diagonal (future positions)."""
    pos = torch.arange(length)
    return pos > pos[:, None]


def _diag_mask(T1: int, T2: int, window: int) -> torch.Tensor:
    rows = torch.arange(T2)[:, None]
    cols = (T1 / T2 * rows + torch.arange(-window, window + 1)).long().clamp(0, T1 - 1)
    mask = torch.zeros(T2, T1, dtype=torch.bool)
    return mask.scatter_(1, cols, True)


def _jmask(T1: int, T2: int) -> torch.Tensor:
    """Keys at triangular-number offsets (0, ±1, ±3, ±6, ...) around the rescaled diagonal."""
    rows = torch.arange(T2 + 2)[:, None]
    steps = torch.arange(0, int((2 * T1) ** 0.5 + 1))
    offsets = (steps * (steps + 1) / 2).int()
    offsets = torch.cat([-offsets.flip(0)[:-1], offsets])
    cols = (T1 / T2 * rows + offsets).long().clamp(0, T1 + 1)
    mask = torch.zeros(T2 + 2, T1 + 2, dtype=torch.bool)
    return mask.scatter_(1, cols, True)[1:-1, 1:-1]


def _global_mask(T1: int, T2: int, global_window: int) -> torch.Tensor:
    mask = torch.zeros(T2, T1, dtype=torch.bool)
    mask[:, :global_window] = True
    mask[:int(global_window * T2 / T1), :] = True
    return mask


def get_elementary_mask(T1: int, T2: int, mask_type: str, sparse_attn_window: int,
                        global_window: int, mask_random_seed: int, sparsity: float,
                        device: tp.Union[str, torch.device]) -> torch.Tensor:
    """Boolean attention mask of shape (T2, T1) for T2 queries over T1 keys (True = attend).

    Args:
        mask_type: "diag" (keys within ±sparse_attn_window of the rescaled diagonal), "jmask"
            (triangular-number offsets), "random" (kept with probability 1 - sparsity, seeded by
            mask_random_seed) or "global" (the first global_window keys and matching queries).
    """
    if mask_type == "diag":
        mask = _diag_mask(T1, T2, sparse_attn_window)
    elif mask_type == "jmask":
        mask = _jmask(T1, T2)
    elif mask_type == "random":
        generator = torch.Generator(device=device)
        generator.manual_seed(mask_random_seed)
        mask = torch.rand(T1 * T2, generator=generator, device=device).reshape(T2, T1) > sparsity
    elif mask_type == "global":
        mask = _global_mask(T1, T2, global_window)
    else:
        raise ValueError(f"unknown attention mask type {mask_type!r}, expected one of {MASK_TYPES}")
    return mask.to(device)


def get_mask(T1: int, T2: int, mask_type: str, sparse_attn_window: int, global_window: int,
             mask_random_seed: int, sparsity: float,
             device: tp.Union[str, torch.device]) -> torch.Tensor:
    """Union of the elementary masks named in `mask_type` joined by "_" (e.g. "diag_jmask").

    Returns a dense boolean mask of shape (1, T2, T1). Upstream converts it to an xformers sparse
    CSR tensor; a dense mask gives the same attention on any device, at O(T1·T2) memory.
    """
    masks = [get_elementary_mask(T1, T2, name, sparse_attn_window, global_window,
                                 mask_random_seed, sparsity, device)
             for name in mask_type.split("_")]
    return torch.stack(masks).any(dim=0)[None]


class ScaledEmbedding(nn.Module):
    """Embedding whose stored weights are divided by `boost` and outputs multiplied back, which
    multiplies its effective learning rate by `boost`.

    Args:
        num_embeddings: number of positions.
        embedding_dim: embedding size.
        scale: standard deviation of the initial (effective) embedding.
        boost: learning rate multiplier.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 1.0,
                 boost: float = 3.0):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data *= scale / boost
        self.boost = boost

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight * self.boost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.boost


class LayerScale(nn.Module):
    """Learnt per-channel rescaling of a residual branch (CaiT-style layer scale).

    Starting from a small `init` lets a deep residual stack begin close to the identity.

    Args:
        channels: number of channels to scale.
        init: initial value of every per-channel scale.
        channel_last: if True the channel dimension is last (..., C), otherwise it is
            the second one (B, C, T).
    """

    def __init__(self, channels: int, init: float = 0, channel_last: bool = False):
        super().__init__()
        self.channel_last = channel_last
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last:
            return self.scale * x
        return self.scale[:, None] * x


class MyGroupNorm(nn.GroupNorm):
    """GroupNorm over token sequences shaped (B, T, C): with one group, each item is normalised
    over all its tokens and channels together.

    For inference on CPU, one group is computed in the token layout itself (a layer norm over
    (T, C), then the per-channel affine), because GroupNorm on the transposed tokens returns
    channel-major memory that makes every following residual add and norm stride through memory.
    Training and `upstream_rounding()` take upstream's GroupNorm of the transposed tokens (the
    same values, other roundings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1 and x.dim() == 3 and fast_cpu_inference(x):
            normalized = F.layer_norm(x, x.shape[1:], eps=self.eps)
            if not self.affine:
                return normalized
            return torch.addcmul(self.bias, normalized, self.weight)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _activation_fn(activation: Activation) -> tp.Callable[[torch.Tensor], torch.Tensor]:
    if callable(activation):
        return activation
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise ValueError(f"activation should be 'relu', 'gelu' or a callable, not {activation!r}")


def _token_norm(group_norm: tp.Union[bool, int], d_model: int, eps: float,
                factory_kwargs: dict) -> nn.Module:
    if group_norm:
        return MyGroupNorm(int(group_norm), d_model, eps=eps, **factory_kwargs)
    return nn.LayerNorm(d_model, eps=eps, **factory_kwargs)


# Transient attention scores per block of queries in `dropout_attention`, in elements.
ATTENTION_BLOCK_ELEMENTS = 2 ** 25


class _DropoutAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√d) with dropout, times v, keeping only a boolean dropout mask for backward.

    torch runs attention with dropout on CPU through its math kernel, which keeps the float
    weights, the dropout noise and the dropped weights of every layer until backward and draws
    the noise with a slow Bernoulli sampler. Here the weights are recomputed in backward (one
    more q·kᵀ product), only the mask is kept (1 byte per weight instead of 12), and the mask
    is drawn as 31-bit integers compared to `p · 2^31` (exact to 5e-10, twice as fast).
    Queries go by blocks of at most `ATTENTION_BLOCK_ELEMENTS` scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, p: float, generator):  # type: ignore[override]
        scale = q.shape[-1] ** -0.5
        q3, k3, v3 = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
        heads, queries, keys = q3.shape[0], q3.shape[1], k3.shape[1]
        dropped = torch.empty(heads, queries, keys, dtype=torch.bool, device=q.device)
        out = q3.new_empty(heads, queries, v3.shape[-1])
        threshold = round(p * 2 ** 31)
        for rows in _query_blocks(heads, queries, keys):
            probs = torch.softmax(torch.bmm(q3[:, rows], k3.transpose(1, 2)).mul_(scale), -1)
            # drawn rows first, so that the mask does not depend on the block size
            draws = torch.empty(probs.shape[1], heads, keys, dtype=torch.int32,
                                device=q.device).random_(generator=generator)
            block_dropped = dropped[:, rows]
            torch.lt(draws.transpose(0, 1), threshold, out=block_dropped)
            out[:, rows] = torch.bmm(probs.masked_fill_(block_dropped, 0), v3).mul_(1 / (1 - p))
        ctx.save_for_backward(q3, k3, v3, dropped, out)
        ctx.p, ctx.scale, ctx.shapes = p, scale, (q.shape, k.shape, v.shape)
        return out.view(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q3, k3, v3, dropped, out = ctx.saved_tensors
        inv_keep = 1 / (1 - ctx.p)
        grad_out = grad_out.reshape(out.shape)
        heads, queries, keys = dropped.shape
        # Σ_j dropped_ij · ∂L/∂dropped_ij, the softmax backward term, in one pass over out
        row_terms = (grad_out * out).sum(-1, keepdim=True)
        grad_q = torch.empty_like(q3)
        grad_k = torch.zeros_like(k3)
        grad_v = torch.zeros_like(v3)
        for rows in _query_blocks(heads, queries, keys):
            probs = torch.softmax(torch.bmm(q3[:, rows], k3.transpose(1, 2)).mul_(ctx.scale), -1)
            block_dropped = dropped[:, rows]
            block_grad = grad_out[:, rows]
            grad_probs = torch.bmm(block_grad, v3.transpose(1, 2)).masked_fill_(block_dropped, 0)
            grad_scores = grad_probs.mul_(inv_keep).sub_(row_terms[:, rows]).mul_(probs)
            grad_q[:, rows] = torch.bmm(grad_scores, k3).mul_(ctx.scale)
            grad_k.baddbmm_(grad_scores.transpose(1, 2), q3[:, rows], alpha=ctx.scale)
            # the weights are no longer needed undropped: drop them in place
            grad_v.baddbmm_(probs.masked_fill_(block_dropped, 0).transpose(1, 2), block_grad,
                            alpha=inv_keep)
        q_shape, k_shape, v_shape = ctx.shapes
        return grad_q.view(q_shape), grad_k.view(k_shape), grad_v.view(v_shape), None, None


def _query_blocks(heads: int, queries: int, keys: int) -> tp.Iterator[slice]:
    """Equal slices of query rows whose (heads x rows x keys) scores fit
    `ATTENTION_BLOCK_ELEMENTS`."""
    blocks = -(-heads * queries * keys // ATTENTION_BLOCK_ELEMENTS)
    rows = -(-queries // max(1, blocks))
    for start in range(0, queries, rows):
        yield slice(start, min(start + rows, queries))


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                      generator: tp.Optional[torch.Generator] = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, dropout_p=p)` for training on CPU, in less
    memory and time (see `_DropoutAttention`); same distribution of dropout masks.

    q: (..., N, D), k: (..., S, D), v: (..., S, Dv); `generator` draws the masks (default: torch's).
    """
    if not 0 < p < 1:
        raise ValueError(f"dropout_attention needs 0 < p < 1, got {p}")
    return _DropoutAttention.apply(q, k, v, p, generator)


def _has_plain_projections(attn: nn.MultiheadAttention) -> bool:
    """True when `attn` is a standard torch attention: one packed q/k/v projection, no extra
    key/value biases and no zero attention."""
    return (attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
            and attn.in_proj_bias is not None)


def _packed_attention(attn: nn.MultiheadAttention, query: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
    """`attn(query, key, key)` for batch-first inputs, calling `F.scaled_dot_product_attention`
    directly with the module's own weights.

    Why: in evaluation torch routes self-attention to its fused "fast path", which on CPU builds
    the full (tokens x tokens) attention matrix with batched matmuls and is about three times
    slower than the flash kernel of `scaled_dot_product_attention` at HTDemucs' 2,700 tokens.
    The result is the same attention (up to float rounding); parameters and keys are unchanged.
    """
    dim = query.shape[-1]
    heads = attn.num_heads
    if key is query:
        q, k, v = F.linear(query, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    else:
        q = F.linear(query, attn.in_proj_weight[:dim], attn.in_proj_bias[:dim])
        k, v = F.linear(key, attn.in_proj_weight[dim:], attn.in_proj_bias[dim:]).chunk(2, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, dim // heads)).transpose(1, 2) for t in (q, k, v))
    dropout = attn.dropout if attn.training else 0.
    # torch.compile cannot trace dropout_attention's in-place draws: it gets torch's kernel
    if (dropout > 0 and q.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        out = dropout_attention(q, k, v, dropout)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor,
           attn_mask: tp.Optional[torch.Tensor] = None,
           key_padding_mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output of the attention module `attn` for `query` attending to `key` (= value).

    Unmasked standard attention runs through `_packed_attention` for inference and evaluation
    (fast on CPU; also what the ONNX export traces) and for training with dropout on CPU
    (`dropout_attention`, lean in memory). Training without it
    goes through the module like upstream: its projections run on time-first tokens, so the
    weight gradients add the tokens in upstream's order (batch-first tokens round differently
    once there are several items). Masks, the sparse `MultiheadAttention`, unusual projections
    and `upstream_rounding()` (whose evaluation then takes torch's own fast path, as upstream's
    does) go through the module too.
    """
    plain = (isinstance(attn, nn.MultiheadAttention) and _has_plain_projections(attn)
             and attn_mask is None and key_padding_mask is None)
    if plain and attn.training and torch.is_grad_enabled():
        packed = attn.dropout > 0 and query.device.type == "cpu"
    else:
        packed = plain and not exact()
    if packed:
        if attn.batch_first:
            return _packed_attention(attn, query, key)
        query_bf = query.transpose(0, 1)
        key_bf = query_bf if key is query else key.transpose(0, 1)
        return _packed_attention(attn, query_bf, key_bf).transpose(0, 1)
    return attn(query, key, key, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                need_weights=False)[0]


class _AttentionLayer(nn.Module):
    """What self- and cross-attention encoder layers share: a feed-forward block, token norms,
    layer scales, the optional output GroupNorm and the sparse-mask bookkeeping.

    Children are registered in upstream order: attention, linear1, dropout, linear2,
    norm1..normN, dropout1, dropout2, norm_out, gamma_1, gamma_2.
    """

    def __init__(self, attn_name: str, num_norms: int, d_model: int, nhead: int,
                 dim_feedforward: int, dropout: float, activation: Activation,
                 layer_norm_eps: float, layer_scale: bool, init_values: float, norm_first: bool,
                 group_norm: tp.Union[bool, int], norm_out: tp.Union[bool, int], sparse: bool,
                 mask_type: str, mask_random_seed: int, sparse_attn_window: int,
                 global_window: int, sparsity: float, auto_sparsity: tp.Optional[bool],
                 device, dtype, batch_first: bool):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.batch_first = batch_first
        self.norm_first = norm_first
        self.sparse = sparse
        self.auto_sparsity = auto_sparsity
        self.mask_type = mask_type
        self.sparse_attn_window = sparse_attn_window
        self.global_window = global_window
        self.sparsity = sparsity
        self.mask_random_seed = mask_random_seed
        self._cached_mask: tp.Optional[torch.Tensor] = None
        if sparse:
            attn: nn.Module = MultiheadAttention(
                d_model, nhead, dropout=dropout, batch_first=batch_first,
                auto_sparsity=sparsity if auto_sparsity else 0)
        else:
            attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                         batch_first=batch_first, **factory_kwargs)
        setattr(self, attn_name, attn)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory_kwargs)
        for index in range(1, num_norms + 1):
            setattr(self, f"norm{index}",
                    _token_norm(group_norm, d_model, layer_norm_eps, factory_kwargs))
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_out: tp.Optional[nn.Module] = None
        if norm_first and norm_out:
            self.norm_out = MyGroupNorm(num_groups=int(norm_out), num_channels=d_model)
        self.gamma_1 = LayerScale(d_model, init_values, True) if layer_scale else nn.Identity()
        self.gamma_2 = LayerScale(d_model, init_values, True) if layer_scale else nn.Identity()
        self.activation = _activation_fn(activation)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(x) if self.norm_out is not None else x

    def _sparse_mask(self, num_queries: int, num_keys: int,
                     device: torch.device) -> tp.Optional[torch.Tensor]:
        """Fixed sparse mask (queries × keys) for sparse layers, cached per shape."""
        if not self.sparse or self.auto_sparsity:
            return None
        cached = self._cached_mask
        if cached is None or cached.shape[-2:] != (num_queries, num_keys) \
                or cached.device != device:
            cached = get_mask(num_keys, num_queries, self.mask_type, self.sparse_attn_window,
                              self.global_window, self.mask_random_seed, self.sparsity, device)
            self._cached_mask = cached
        return cached

    def _length(self, x: torch.Tensor) -> int:
        return x.shape[1] if self.batch_first else x.shape[0]


class MyTransformerEncoderLayer(_AttentionLayer):
    """Self-attention transformer layer (torch's TransformerEncoderLayer layout and keys) with
    optional layer scale, GroupNorm token norms, output GroupNorm and sparse attention.

    Args:
        d_model: token dimension.
        nhead: attention heads.
        dim_feedforward: hidden size of the feed-forward block.
        dropout: dropout probability in attention and feed-forward.
        activation: "relu", "gelu" or a callable.
        group_norm: if non zero, norm1/norm2 are GroupNorms with that many groups over
            (tokens, channels) instead of LayerNorms.
        norm_first: pre-norm (True) or post-norm (False) residual blocks.
        norm_out: number of groups of a GroupNorm applied to the output (pre-norm only; 0 = none).
        layer_norm_eps: epsilon of the norms.
        layer_scale: scale both residual branches by a LayerScale starting at `init_values`.
        init_values: initial layer scale.
        sparse: use the sparse `MultiheadAttention` (keys q, k, v, proj).
        mask_type, mask_random_seed, sparse_attn_window, global_window, sparsity: sparse mask
            options, see `get_elementary_mask`.
        auto_sparsity: data-dependent (LSH) sparsity; needs xformers CUDA kernels.
        batch_first: inputs are (B, T, C) instead of (T, B, C).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Activation = F.relu,
                 group_norm: tp.Union[bool, int] = 0, norm_first: bool = False,
                 norm_out: tp.Union[bool, int] = False, layer_norm_eps: float = 1e-5,
                 layer_scale: bool = False, init_values: float = 1e-4, device=None, dtype=None,
                 sparse: bool = False, mask_type: str = "diag", mask_random_seed: int = 42,
                 sparse_attn_window: int = 500, global_window: int = 50,
                 auto_sparsity: bool = False, sparsity: float = 0.95, batch_first: bool = False):
        super().__init__(
            "self_attn", 2, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
            layer_scale, init_values, norm_first, group_norm, norm_out, sparse, mask_type,
            mask_random_seed, sparse_attn_window, global_window, sparsity, auto_sparsity,
            device, dtype, batch_first)

    def _sa_block(self, x: torch.Tensor, attn_mask: tp.Optional[torch.Tensor],
                  key_padding_mask: tp.Optional[torch.Tensor]) -> torch.Tensor:
        out = attend(self.self_attn, x, x, attn_mask, key_padding_mask)
        return self.dropout1(out)

    def forward(self, src: torch.Tensor, src_mask: tp.Optional[torch.Tensor] = None,
                src_key_padding_mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """src: (B, T, C) if batch_first else (T, B, C)."""
        if src_mask is None:
            length = self._length(src)
            src_mask = self._sparse_mask(length, length, src.device)
        x = src
        if self.norm_first:
            x = x + self.gamma_1(self._sa_block(self.norm1(x), src_mask, src_key_padding_mask))
            x = x + self.gamma_2(self._ff_block(self.norm2(x)))
            return self._finish(x)
        x = self.norm1(x + self.gamma_1(self._sa_block(x, src_mask, src_key_padding_mask)))
        return self.norm2(x + self.gamma_2(self._ff_block(x)))


class CrossTransformerEncoderLayer(_AttentionLayer):
    """Cross-attention transformer layer: tokens `q` attend to another sequence `k`.

    Pre-norm: x = q + γ1·Attn(norm1(q), norm2(k)); x += γ2·FF(norm3(x)); then norm_out.
    Args: as `MyTransformerEncoderLayer` (with a third norm for the feed-forward block).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Activation = F.relu,
                 layer_norm_eps: float = 1e-5, layer_scale: bool = False,
                 init_values: float = 1e-4, norm_first: bool = False,
                 group_norm: tp.Union[bool, int] = False, norm_out: tp.Union[bool, int] = False,
                 sparse: bool = False, mask_type: str = "diag", mask_random_seed: int = 42,
                 sparse_attn_window: int = 500, global_window: int = 50, sparsity: float = 0.95,
                 auto_sparsity: tp.Optional[bool] = None, device=None, dtype=None,
                 batch_first: bool = False):
        super().__init__(
            "cross_attn", 3, d_model, nhead, dim_feedforward, dropout, activation,
            layer_norm_eps, layer_scale, init_values, norm_first, group_norm, norm_out, sparse,
            mask_type, mask_random_seed, sparse_attn_window, global_window, sparsity,
            auto_sparsity, device, dtype, batch_first)

    def _ca_block(self, q: torch.Tensor, k: torch.Tensor,
                  attn_mask: tp.Optional[torch.Tensor]) -> torch.Tensor:
        out = attend(self.cross_attn, q, k, attn_mask)
        return self.dropout1(out)

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """q: queries (B, T, C), k: keys/values (B, S, C) (time first if not batch_first);
        mask: optional (T, S) attention mask."""
        if mask is None:
            mask = self._sparse_mask(self._length(q), self._length(k), q.device)
        if self.norm_first:
            x = q + self.gamma_1(self._ca_block(self.norm1(q), self.norm2(k), mask))
            x = x + self.gamma_2(self._ff_block(self.norm3(x)))
            return self._finish(x)
        x = self.norm1(q + self.gamma_1(self._ca_block(q, k, mask)))
        return self.norm2(x + self.gamma_2(self._ff_block(x)))


class CrossTransformerEncoder(nn.Module):
    """Transformer over the two HTDemucs bottlenecks: a spectrogram stream (B, C, Fr, T1),
    flattened to tokens in (time, freq) order, and a waveform stream (B, C, T2).

    Layers alternate between self-attention within each stream and cross-attention, where each
    stream attends to the other's previous output. Each stream has its own layer stack
    (`layers` for the spectrogram, `layers_t` for the waveform).

    Args:
        dim: token dimension (multiple of num_heads, and of 4 for the 2-D embedding).
        emb: positional embedding of the waveform stream: "sin", "cape" or "scaled"
            (the spectrogram stream always uses a 2-D sinusoidal embedding).
        hidden_scale: feed-forward hidden size as a multiple of dim.
        num_heads: attention heads.
        num_layers: layers per stream.
        cross_first: start with a cross-attention layer instead of a self-attention one.
        dropout: dropout probability.
        max_positions: table size of the "scaled" embedding.
        norm_in: LayerNorm the tokens before adding the embeddings.
        norm_in_group: if norm_in is False, a GroupNorm with that many groups instead.
        group_norm: GroupNorm groups for the layers' token norms (0 = LayerNorm).
        norm_first: pre-norm layers.
        norm_out: groups of the output GroupNorm of each pre-norm layer (0 = none).
        max_period: longest period of the sinusoidal embeddings.
        weight_decay: weight decay of the transformer's optimizer group.
        lr: learning rate of that group (None = the optimizer's).
        layer_scale: LayerScale (init 1e-4) on every residual branch.
        gelu: GELU activation, else ReLU.
        sin_random_shift: "sin" positions get a random shift in [0, sin_random_shift].
        weight_pos_embed: weight of the positional embeddings.
        cape_mean_normalize, cape_augment, cape_glob_loc_scale: CAPE options
            ([max global shift, max local shift, max scale]).
        sparse_self_attn, sparse_cross_attn: sparse attention in self/cross layers.
        mask_type, mask_random_seed, sparse_attn_window, global_window, sparsity, auto_sparsity:
            sparse attention options, see `get_elementary_mask`.
    """

    def __init__(self, dim: int, emb: str = "sin", hidden_scale: float = 4.0,
                 num_heads: int = 8, num_layers: int = 6, cross_first: bool = False,
                 dropout: float = 0.0, max_positions: int = 1000, norm_in: bool = True,
                 norm_in_group: tp.Union[bool, int] = False,
                 group_norm: tp.Union[bool, int] = False, norm_first: bool = False,
                 norm_out: tp.Union[bool, int] = False, max_period: float = 10000.0,
                 weight_decay: float = 0.0, lr: tp.Optional[float] = None,
                 layer_scale: bool = False, gelu: bool = True, sin_random_shift: int = 0,
                 weight_pos_embed: float = 1.0, cape_mean_normalize: bool = True,
                 cape_augment: bool = True,
                 cape_glob_loc_scale: tp.Sequence[float] = (5000.0, 1.0, 1.4),
                 sparse_self_attn: bool = False, sparse_cross_attn: bool = False,
                 mask_type: str = "diag", mask_random_seed: int = 42,
                 sparse_attn_window: int = 500, global_window: int = 50,
                 auto_sparsity: bool = False, sparsity: float = 0.95):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"transformer dim {dim} must be divisible by num_heads {num_heads}")
        if emb not in ("sin", "cape", "scaled"):
            raise ValueError(f"unknown positional embedding {emb!r}: use sin, cape or scaled")
        self.num_layers = num_layers
        self.classic_parity = 1 if cross_first else 0
        self.emb = emb
        self.max_period = max_period
        self.weight_decay = weight_decay
        self.weight_pos_embed = weight_pos_embed
        self.sin_random_shift = sin_random_shift
        self.cape_mean_normalize = cape_mean_normalize
        self.cape_augment = cape_augment
        self.cape_glob_loc_scale = list(cape_glob_loc_scale)
        if emb == "scaled":
            self.position_embeddings = ScaledEmbedding(max_positions, dim, scale=0.2)
        self.lr = lr

        self.norm_in, self.norm_in_t = self._input_norm(norm_in, norm_in_group, dim)
        common = dict(
            d_model=dim, nhead=num_heads, dim_feedforward=int(dim * hidden_scale),
            dropout=dropout, activation=F.gelu if gelu else F.relu, group_norm=group_norm,
            norm_first=norm_first, norm_out=norm_out, layer_scale=layer_scale,
            mask_type=mask_type, mask_random_seed=mask_random_seed,
            sparse_attn_window=sparse_attn_window, global_window=global_window,
            sparsity=sparsity, auto_sparsity=auto_sparsity, batch_first=True)
        self.layers = nn.ModuleList()
        self.layers_t = nn.ModuleList()
        for index in range(num_layers):
            for stack in (self.layers, self.layers_t):
                if self._is_self_attention(index):
                    stack.append(MyTransformerEncoderLayer(sparse=sparse_self_attn, **common))
                else:
                    stack.append(CrossTransformerEncoderLayer(sparse=sparse_cross_attn, **common))

    @staticmethod
    def _input_norm(norm_in: bool, norm_in_group: tp.Union[bool, int],
                    dim: int) -> tp.Tuple[nn.Module, nn.Module]:
        if norm_in:
            return nn.LayerNorm(dim), nn.LayerNorm(dim)
        if norm_in_group:
            return MyGroupNorm(int(norm_in_group), dim), MyGroupNorm(int(norm_in_group), dim)
        return nn.Identity(), nn.Identity()

    def _is_self_attention(self, index: int) -> bool:
        return index % 2 == self.classic_parity

    def forward(self, x: torch.Tensor,
                xt: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """x: spectrogram features (B, C, Fr, T1); xt: waveform features (B, C, T2).
        Returns both, same shapes."""
        B, C, Fr, T1 = x.shape
        pos_2d = create_2d_sin_embedding(C, Fr, T1, x.device, self.max_period)
        x = self.norm_in(_spec_to_tokens(x))
        x = x + self.weight_pos_embed * _spec_to_tokens(pos_2d)

        T2 = xt.shape[-1]
        xt = self.norm_in_t(xt.transpose(1, 2))
        pos_1d = self._get_pos_embedding(T2, B, C, x.device).transpose(0, 1)
        xt = xt + self.weight_pos_embed * pos_1d

        for index in range(self.num_layers):
            if self._is_self_attention(index):
                x = self.layers[index](x)
                xt = self.layers_t[index](xt)
            else:
                x, xt = self.layers[index](x, xt), self.layers_t[index](xt, x)
        return _tokens_to_spec(x, Fr), xt.transpose(1, 2)

    def _get_pos_embedding(self, T: int, B: int, C: int,
                           device: tp.Union[str, torch.device]) -> torch.Tensor:
        """Waveform-stream positional embedding, (T, 1 or B, C)."""
        if self.emb == "sin":
            shift = random.randrange(self.sin_random_shift + 1)
            return create_sin_embedding(T, C, shift=shift, device=device,
                                        max_period=self.max_period)
        if self.emb == "cape":
            augment = self.training and self.cape_augment
            max_global, max_local, max_scale = self.cape_glob_loc_scale
            return create_sin_embedding_cape(
                T, C, B, device=device, max_period=self.max_period,
                mean_normalize=self.cape_mean_normalize, augment=augment,
                max_global_shift=max_global, max_local_shift=max_local, max_scale=max_scale)
        return self.position_embeddings(torch.arange(T, device=device))[:, None]

    def make_optim_group(self) -> dict:
        """Optimizer parameter group of the transformer with its own weight decay and lr."""
        group: tp.Dict[str, tp.Any] = {"params": list(self.parameters()),
                                       "weight_decay": self.weight_decay}
        if self.lr is not None:
            group["lr"] = self.lr
        return group


def _spec_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, Fr, T) -> (B, T·Fr, C), time-major so that token = t * Fr + f."""
    B, C, Fr, T = x.shape
    return x.permute(0, 3, 2, 1).reshape(B, T * Fr, C)


def _tokens_to_spec(tokens: torch.Tensor, freqs: int) -> torch.Tensor:
    """Inverse of `_spec_to_tokens`."""
    B, N, C = tokens.shape
    return tokens.reshape(B, N // freqs, freqs, C).permute(0, 3, 2, 1)


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, used by sparse layers.

    With a fixed boolean mask (True = attend) it runs dense masked attention, which equals
    upstream's xformers sparse kernels. With `auto_sparsity` (data-dependent LSH sparsity) it
    needs xformers' CUDA kernels and raises NotImplementedError.

    Args:
        embed_dim: token dimension.
        num_heads: attention heads.
        dropout: dropout on attention weights and output.
        bias: projections have a bias.
        add_bias_kv, add_zero_attn, kdim, vdim: accepted for signature compatibility, unused.
        batch_first: inputs are (B, N, C) instead of (N, B, C).
        auto_sparsity: target sparsity of LSH attention (0 = fixed mask).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, auto_sparsity: tp.Optional[float] = None):
        super().__init__()
        if auto_sparsity is None:
            raise ValueError("MultiheadAttention needs auto_sparsity (0 for a fixed mask)")
        self.num_heads = num_heads
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(embed_dim, embed_dim, bias)
        self.proj_drop = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.auto_sparsity = auto_sparsity

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B·heads, N, C/heads)."""
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2).flatten(0, 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask=None, need_weights: bool = True,
                attn_mask: tp.Optional[torch.Tensor] = None,
                average_attn_weights: bool = True) -> tp.Tuple[torch.Tensor, None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, N_q, C = query.shape
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        if self.auto_sparsity:
            x = dynamic_sparse_attention(q, k, v, sparsity=self.auto_sparsity)
        else:
            x = scaled_dot_product_attention(q, k, v, attn_mask, dropout=self.attn_drop)
        x = x.reshape(B, self.num_heads, N_q, C // self.num_heads).transpose(1, 2)
        x = self.proj_drop(self.proj(x.reshape(B, N_q, C)))
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x, None


def scaled_query_key_softmax(q: torch.Tensor, k: torch.Tensor,
                             att_mask: tp.Optional[torch.Tensor]) -> torch.Tensor:
    """Attention weights softmax(q·kᵀ/√d) restricted to `att_mask` (boolean, True = attend)."""
    scores = (q / k.size(-1) ** 0.5) @ k.transpose(-2, -1)
    if att_mask is not None:
        scores = scores.masked_fill(~att_mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 att_mask: tp.Optional[torch.Tensor],
                                 dropout: nn.Module) -> torch.Tensor:
    """Masked attention: dropout(scaled_query_key_softmax(q, k, att_mask)) @ v.

    Computed by `F.scaled_dot_product_attention` (flash kernels where available), which never
    materialises the weights; `dropout` is a `nn.Dropout` whose rate applies in training.
    """
    rate = dropout.p if dropout.training else 0.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=att_mask, dropout_p=rate)


def dynamic_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             sparsity: float, infer_sparsity: bool = True,
                             attn_bias=None) -> torch.Tensor:
    """Data-dependent (LSH bucketed) sparse attention of upstream's `t_auto_sparsity`.

    It exists only as custom xformers CUDA kernels, so it is not available here.
    """
    raise NotImplementedError(
        "dynamic sparse attention (t_auto_sparsity=True) needs xformers' custom CUDA kernels, "
        "which this implementation does not ship; the model's parameters load, but to run it "
        "re-create the model with t_auto_sparsity=False (fixed sparse masks run densely).")
