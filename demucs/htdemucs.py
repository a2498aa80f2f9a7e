"""Hybrid Transformer Demucs (v4): the hybrid spectrogram/waveform U-Net of `demucs.hdemucs` with a
cross-domain transformer between the two innermost bottlenecks.

Four frequency layers reduce the 2048 STFT bins to 8 while a parallel waveform branch reduces time
by the same factor; the transformer then mixes both bottlenecks (self-attention within a branch,
cross-attention between them) before both decoders rebuild their outputs, which are summed.
"""
import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from .demucs import rescale_module
from .hdemucs import HDecLayer, HDemucs, HEncLayer, MultiWrap, ScaledEmbedding
from .states import capture_init
from .transformer import CrossTransformerEncoder

Segment = tp.Union[int, float, Fraction]


class HTDemucs(nn.Module):
    """Hybrid Transformer Demucs. Input [B, audio_channels, T], output [B, S, audio_channels, T].

    With `use_train_segment`, the model only processes inputs of its training length: a forward
    in training mode records it in `segment` (a `Fraction` of seconds), and in evaluation shorter
    inputs are zero padded to it (and the output cropped back), longer ones are refused.

    Args:
        sources: names of the separated sources.
        audio_channels: input/output audio channels.
        channels: initial channels of the frequency branch.
        channels_time: initial channels of the time branch (`channels` if None).
        growth: channel multiplier per layer.
        nfft: STFT size (hop is nfft // 4).
        wiener_iters: Wiener filtering iterations at evaluation (non cac only).
        end_iters: Wiener filtering iterations in training (must equal wiener_iters).
        wiener_residual: add a residual source before Wiener filtering.
        cac: complex-as-channels output instead of magnitude masking.
        depth: number of layers in each encoder and decoder.
        rewrite: add 1x1 convolutions + GLU to each layer.
        multi_freqs: band split ratios; the first `multi_freqs_depth` frequency layers then use
            one replica per band (`MultiWrap`).
        multi_freqs_depth: number of layers wrapped by `MultiWrap`.
        freq_emb: weight of the frequency embedding added after the first layer (0 disables).
        emb_scale: learning rate boost of that embedding.
        emb_smooth: smooth initialisation of that embedding.
        kernel_size: kernel size of the encoder/decoder layers.
        time_stride: stride of time layers past the frequency layers (kernel 2 * time_stride).
        stride: stride of the encoder/decoder layers.
        context: context of the decoder rewrite convolutions.
        context_enc: context of the encoder rewrite convolutions.
        norm_starts: first layer index using GroupNorm.
        norm_groups: groups of those GroupNorms.
        dconv_mode: 1 = DConv residual branches in encoders, 2 = in decoders, 3 = both.
        dconv_depth: layers per DConv.
        dconv_comp: DConv channel compression.
        dconv_init: initial LayerScale of the DConv branches.
        bottom_channels: if > 0, 1x1 convolutions project both bottlenecks to this many
            channels before the transformer and back after it.
        t_layers: transformer layers per branch (0 = no transformer).
        t_emb: waveform positional embedding, "sin", "cape" or "scaled".
        t_hidden_scale: transformer feed-forward size as a multiple of its dimension.
        t_heads: attention heads.
        t_dropout: transformer dropout.
        t_max_positions: size of the "scaled" embedding table.
        t_norm_in: LayerNorm the tokens entering the transformer.
        t_norm_in_group: GroupNorm instead (used only when t_norm_in is False).
        t_group_norm: GroupNorm (over all tokens) instead of LayerNorm inside the layers.
        t_norm_first: pre-norm transformer layers.
        t_norm_out: GroupNorm at the end of each (pre-norm) layer.
        t_max_period: longest period of the sinusoidal embeddings.
        t_weight_decay: weight decay of the transformer's optimizer group.
        t_lr: learning rate of the transformer's optimizer group (None = global).
        t_layer_scale: LayerScale on the transformer residual branches.
        t_gelu: GELU (else ReLU) in the transformer.
        t_weight_pos_embed: weight of the positional embeddings.
        t_sin_random_shift: random position shift of the "sin" embedding in training.
        t_cape_mean_normalize, t_cape_augment, t_cape_glob_loc_scale: CAPE embedding options.
        t_sparse_self_attn, t_sparse_cross_attn: sparse attention in self/cross layers.
        t_mask_type: sparse mask, "diag", "jmask", "random", "global" or a "_" combination.
        t_mask_random_seed: seed of the "random" mask.
        t_sparse_attn_window: half width of the "diag" mask.
        t_global_window: width of the "global" mask.
        t_sparsity: sparsity of the "random" mask (and of auto sparsity).
        t_auto_sparsity: data-dependent sparse attention (xformers CUDA only).
        t_cross_first: start the transformer with a cross-attention layer.
        rescale: weight rescaling reference at initialisation (0 disables it).
        samplerate: audio sample rate.
        segment: training segment length in seconds.
        use_train_segment: process inputs at the training length (see above).
    """

    # The spectrogram plumbing is HDemucs' in its hybrid (non legacy) form.
    hybrid = True
    hybrid_old = False
    _spec = HDemucs._spec
    _ispec = HDemucs._ispec
    _magnitude = HDemucs._magnitude
    _mask = HDemucs._mask
    _wiener = HDemucs._wiener

    @capture_init
    def __init__(self, sources: tp.List[str], audio_channels: int = 2, channels: int = 48,
                 channels_time: tp.Optional[int] = None, growth: float = 2, nfft: int = 4096,
                 wiener_iters: int = 0, end_iters: int = 0, wiener_residual: bool = False,
                 cac: bool = True, depth: int = 4, rewrite: bool = True,
                 multi_freqs: tp.Optional[tp.Sequence[float]] = None, multi_freqs_depth: int = 3,
                 freq_emb: float = 0.2, emb_scale: float = 10, emb_smooth: bool = True,
                 kernel_size: int = 8, time_stride: int = 2, stride: int = 4, context: int = 1,
                 context_enc: int = 0, norm_starts: int = 4, norm_groups: int = 4,
                 dconv_mode: int = 1, dconv_depth: int = 2, dconv_comp: int = 8,
                 dconv_init: float = 1e-3, bottom_channels: int = 0, t_layers: int = 5,
                 t_emb: str = "sin", t_hidden_scale: float = 4.0, t_heads: int = 8,
                 t_dropout: float = 0.0, t_max_positions: int = 10000, t_norm_in: bool = True,
                 t_norm_in_group: bool = False, t_group_norm: bool = False,
                 t_norm_first: bool = True, t_norm_out: bool = True,
                 t_max_period: float = 10000.0, t_weight_decay: float = 0.0,
                 t_lr: tp.Optional[float] = None, t_layer_scale: bool = True,
                 t_gelu: bool = True, t_weight_pos_embed: float = 1.0,
                 t_sin_random_shift: int = 0, t_cape_mean_normalize: bool = True,
                 t_cape_augment: bool = True,
                 t_cape_glob_loc_scale: tp.Sequence[float] = (5000.0, 1.0, 1.4),
                 t_sparse_self_attn: bool = False, t_sparse_cross_attn: bool = False,
                 t_mask_type: str = "diag", t_mask_random_seed: int = 42,
                 t_sparse_attn_window: int = 500, t_global_window: int = 100,
                 t_sparsity: float = 0.95, t_auto_sparsity: bool = False,
                 t_cross_first: bool = False, rescale: float = 0.1, samplerate: int = 44100,
                 segment: Segment = 10, use_train_segment: bool = True):
        super().__init__()
        if wiener_iters != end_iters:
            raise ValueError(f"HTDemucs needs wiener_iters == end_iters (the time branch is "
                             f"trained with end_iters), got {wiener_iters} and {end_iters}")
        self.cac = cac
        self.wiener_residual = wiener_residual
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.bottom_channels = bottom_channels
        self.channels = channels
        self.samplerate = samplerate
        self.segment = segment
        self.use_train_segment = use_train_segment
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        self.freq_emb: tp.Optional[ScaledEmbedding] = None

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.tencoder = nn.ModuleList()
        self.tdecoder = nn.ModuleList()
        self._build_unets(
            channels, channels_time, growth, multi_freqs, multi_freqs_depth, freq_emb, emb_scale,
            emb_smooth, kernel_size, time_stride, stride, context, context_enc, norm_starts,
            norm_groups, dconv_mode, dconv_depth, dconv_comp, dconv_init, rewrite)
        if rescale:
            rescale_module(self, reference=rescale)

        transformer_channels = int(channels * growth ** (depth - 1))
        if bottom_channels:
            self.channel_upsampler = nn.Conv1d(transformer_channels, bottom_channels, 1)
            self.channel_downsampler = nn.Conv1d(bottom_channels, transformer_channels, 1)
            self.channel_upsampler_t = nn.Conv1d(transformer_channels, bottom_channels, 1)
            self.channel_downsampler_t = nn.Conv1d(bottom_channels, transformer_channels, 1)
            transformer_channels = bottom_channels

        self.crosstransformer: tp.Optional[CrossTransformerEncoder] = None
        if t_layers > 0:
            self.crosstransformer = CrossTransformerEncoder(
                dim=transformer_channels, emb=t_emb, hidden_scale=t_hidden_scale,
                num_heads=t_heads, num_layers=t_layers, cross_first=t_cross_first,
                dropout=t_dropout, max_positions=t_max_positions, norm_in=t_norm_in,
                norm_in_group=t_norm_in_group, group_norm=t_group_norm, norm_first=t_norm_first,
                norm_out=t_norm_out, max_period=t_max_period, weight_decay=t_weight_decay,
                lr=t_lr, layer_scale=t_layer_scale, gelu=t_gelu,
                sin_random_shift=t_sin_random_shift, weight_pos_embed=t_weight_pos_embed,
                cape_mean_normalize=t_cape_mean_normalize, cape_augment=t_cape_augment,
                cape_glob_loc_scale=t_cape_glob_loc_scale, sparse_self_attn=t_sparse_self_attn,
                sparse_cross_attn=t_sparse_cross_attn, mask_type=t_mask_type,
                mask_random_seed=t_mask_random_seed, sparse_attn_window=t_sparse_attn_window,
                global_window=t_global_window, sparsity=t_sparsity,
                auto_sparsity=t_auto_sparsity)

    def _build_unets(self, channels: int, channels_time: tp.Optional[int], growth: float,
                     multi_freqs: tp.Optional[tp.Sequence[float]], multi_freqs_depth: int,
                     freq_emb: float, emb_scale: float, emb_smooth: bool, kernel_size: int,
                     time_stride: int, stride: int, context: int, context_enc: int,
                     norm_starts: int, norm_groups: int, dconv_mode: int, dconv_depth: int,
                     dconv_comp: int, dconv_init: float, rewrite: bool) -> None:
        """Create the frequency (`encoder`/`decoder`) and time (`tencoder`/`tdecoder`) U-Nets
        and the frequency embedding, following HDemucs' layer plan."""
        chin = self.audio_channels
        chin_z = chin * 2 if self.cac else chin
        chout = channels_time or channels
        chout_z = channels
        freqs = self.nfft // 2
        for index in range(self.depth):
            freq = freqs > 1
            last_freq = freq and freqs <= kernel_size
            kw = {
                "kernel_size": kernel_size if freq else 2 * time_stride,
                "stride": stride if freq else time_stride,
                "freq": freq,
                "pad": True,
                "norm": index >= norm_starts,
                "rewrite": rewrite,
                "norm_groups": norm_groups,
                "dconv_kw": {"depth": dconv_depth, "compress": dconv_comp, "init": dconv_init,
                             "gelu": True},
            }
            if last_freq:
                kw.update(kernel_size=freqs, pad=False)
                chout_z = max(chout, chout_z)
                chout = chout_z
            time_kw = dict(kw, freq=False, kernel_size=kernel_size, stride=stride, pad=True)
            multi = bool(multi_freqs) and index < multi_freqs_depth
            dec_kw = dict(kw, context_freq=False) if multi else kw

            enc: nn.Module = HEncLayer(chin_z, chout_z, dconv=dconv_mode & 1,
                                       context=context_enc, **kw)
            if freq:
                self.tencoder.append(HEncLayer(chin, chout, dconv=dconv_mode & 1,
                                               context=context_enc, empty=last_freq, **time_kw))
            self.encoder.append(MultiWrap(enc, multi_freqs) if multi else enc)

            if index == 0:
                chin = self.audio_channels * len(self.sources)
                chin_z = chin * 2 if self.cac else chin
            dec: nn.Module = HDecLayer(chout_z, chin_z, dconv=dconv_mode & 2, last=index == 0,
                                       context=context, **dec_kw)
            if freq:
                self.tdecoder.insert(0, HDecLayer(chout, chin, dconv=dconv_mode & 2,
                                                  empty=last_freq, last=index == 0,
                                                  context=context, **time_kw))
            self.decoder.insert(0, MultiWrap(dec, multi_freqs) if multi else dec)

            chin, chin_z = chout, chout_z
            chout, chout_z = int(growth * chout), int(growth * chout_z)
            if freq:
                freqs = 1 if freqs <= kernel_size else freqs // stride
            if index == 0 and freq_emb:
                self.freq_emb = ScaledEmbedding(freqs, chin_z, smooth=emb_smooth, scale=emb_scale)
                self.freq_emb_scale = freq_emb

    def _training_length(self) -> int:
        return int(self.segment * self.samplerate)

    def valid_length(self, length: int) -> int:
        """Length the model processes an input of `length` samples at: the training length with
        `use_train_segment` (a longer input raises ValueError), else `length` itself."""
        if not self.use_train_segment:
            return length
        training_length = self._training_length()
        if length > training_length:
            raise ValueError(
                f"HTDemucs input of {length} samples is longer than the training segment of "
                f"{training_length} samples ({float(self.segment):.2f} s at {self.samplerate} Hz): "
                f"process it in chunks with apply_model(..., split=True), or a --segment no "
                f"longer than {float(self.segment):.2f}")
        return training_length

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separates `mix` [B, audio_channels, T] into [B, len(sources), audio_channels, T]."""
        length = mix.shape[-1]
        if self.use_train_segment and self.training:
            self.segment = Fraction(length, self.samplerate)
        elif self.use_train_segment:
            mix = F.pad(mix, (0, self.valid_length(length) - length))
        padded_length = mix.shape[-1]

        z = self._spec(mix)
        x = self._magnitude(z).to(mix.device)
        batch, _, freqs, frames = x.shape
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (1e-5 + std)
        meant = mix.mean(dim=(1, 2), keepdim=True)
        stdt = mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)

        x, xt, skips = self._encode(x, xt)
        x, xt = self._bottleneck(x, xt)
        x, xt = self._decode(x, xt, skips)

        num_sources = len(self.sources)
        x = x.view(batch, num_sources, -1, freqs, frames)
        x = x * std[:, None] + mean[:, None]
        device = x.device
        if device.type == "mps":  # no complex support on MPS
            x = x.cpu()
        x = self._ispec(self._mask(z, x), padded_length).to(device)
        xt = xt.view(batch, num_sources, -1, padded_length)
        x = x + xt * stdt[:, None] + meant[:, None]
        return x[..., :length]

    def _encode(self, x: torch.Tensor, xt: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor,
                                                                    tp.Dict[str, list]]:
        """Runs both encoders, returning the bottlenecks and the skips/lengths for decoding."""
        skips: tp.Dict[str, list] = {"x": [], "xt": [], "len": [], "len_t": []}
        for index, encode in enumerate(self.encoder):
            skips["len"].append(x.shape[-1])
            inject = None
            if index < len(self.tencoder):
                skips["len_t"].append(xt.shape[-1])
                tenc = self.tencoder[index]
                xt = tenc(xt)
                if tenc.empty:  # a bare conv whose output joins the last frequency layer
                    inject = xt
                else:
                    skips["xt"].append(xt)
            x = encode(x, inject)
            if index == 0 and self.freq_emb is not None:
                bins = torch.arange(x.shape[-2], device=x.device)
                emb = self.freq_emb(bins).t()[None, :, :, None].expand_as(x)
                x = x + self.freq_emb_scale * emb
            skips["x"].append(x)
        return x, xt, skips

    def _bottleneck(self, x: torch.Tensor,
                    xt: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Cross transformer between the frequency bottleneck [B, C, Fr, T] and the time one
        [B, C, T'], with the optional 1x1 channel projections around it."""
        if self.crosstransformer is None:
            return x, xt
        if self.bottom_channels:
            x = self.channel_upsampler(x.flatten(2)).unflatten(2, x.shape[2:])
            xt = self.channel_upsampler_t(xt)
        x, xt = self.crosstransformer(x, xt)
        if self.bottom_channels:
            x = self.channel_downsampler(x.flatten(2)).unflatten(2, x.shape[2:])
            xt = self.channel_downsampler_t(xt)
        return x, xt

    def _decode(self, x: torch.Tensor, xt: torch.Tensor,
                skips: tp.Dict[str, list]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Runs both decoders; the time decoder joins once the layers are shared no more."""
        offset = self.depth - len(self.tdecoder)
        for index, decode in enumerate(self.decoder):
            x, pre = decode(x, skips["x"].pop(-1), skips["len"].pop(-1))
            if index < offset:
                continue
            tdec = self.tdecoder[index - offset]
            length_t = skips["len_t"].pop(-1)
            if tdec.empty:
                assert pre.shape[2] == 1, pre.shape
                xt, _ = tdec(pre[:, :, 0], None, length_t)
            else:
                xt, _ = tdec(xt, skips["xt"].pop(-1), length_t)
        assert not any(skips.values()), "unused skip connections"
        return x, xt
