"""Hybrid Transformer Demucs (v4): the hybrid spectrogram/waveform U-Net of `demucs.hdemucs` with a
cross-domain transformer between the two innermost bottlenecks.

Four frequency layers reduce the 2048 STFT bins to 8 while a parallel waveform branch reduces time
by the same factor; the transformer then mixes both bottlenecks (self-attention within a branch,
cross-attention between them) before both decoders rebuild their outputs, which are summed.
The spectrogram handling and the two U-Nets are HDemucs' (`HybridSpectrogramMixin`,
`HybridUNetMixin`); this module adds the transformer and the training-segment rules.
"""
import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from .demucs import rescale_module
from .hdemucs import HybridSpectrogramMixin, HybridUNetMixin
# Importable from here in Demucs 4.1, whose HTDemucs used them directly.
from .hdemucs import HDecLayer, HEncLayer, MultiWrap, ScaledEmbedding, pad1d  # noqa: F401
from .spec import ispectro, spectro  # noqa: F401
from .wiener import wiener  # noqa: F401
from .utils import capture_init
from .transformer import CrossTransformerEncoder

Segment = tp.Union[int, float, Fraction]


class HTDemucs(HybridSpectrogramMixin, HybridUNetMixin, nn.Module):
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
        self.audio_channels = audio_channels
        self.sources = sources
        self.samplerate = samplerate
        self.segment = segment
        self.use_train_segment = use_train_segment
        self.bottom_channels = bottom_channels
        self._init_spectrogram(nfft, cac, wiener_iters, end_iters, wiener_residual)
        self._build_unets(
            depth=depth, channels=channels, channels_time=channels_time, growth=growth,
            rewrite=rewrite, multi_freqs=multi_freqs, multi_freqs_depth=multi_freqs_depth,
            freq_emb=freq_emb, emb_scale=emb_scale, emb_smooth=emb_smooth,
            kernel_size=kernel_size, time_stride=time_stride, stride=stride, context=context,
            context_enc=context_enc, norm_starts=norm_starts, norm_groups=norm_groups,
            dconv_mode=dconv_mode, dconv_depth=dconv_depth, dconv_comp=dconv_comp,
            dconv_init=dconv_init)
        if rescale:
            rescale_module(self, reference=rescale)

        # Every `t_*` argument, forwarded to the transformer under its own name.
        transformer_options = {name: value for name, value in locals().items()
                               if name.startswith("t_")}
        self._build_transformer(int(channels * growth ** (depth - 1)), transformer_options)

    def _build_transformer(self, channels: int, options: tp.Dict[str, tp.Any]) -> None:
        """Creates the bottleneck's 1x1 channel projections (with `bottom_channels`) and the
        cross transformer on `channels` channels from the constructor's `t_*` options."""
        if self.bottom_channels:
            self.channel_upsampler = nn.Conv1d(channels, self.bottom_channels, 1)
            self.channel_downsampler = nn.Conv1d(self.bottom_channels, channels, 1)
            self.channel_upsampler_t = nn.Conv1d(channels, self.bottom_channels, 1)
            self.channel_downsampler_t = nn.Conv1d(self.bottom_channels, channels, 1)
            channels = self.bottom_channels
        self.crosstransformer: tp.Optional[CrossTransformerEncoder] = None
        if options["t_layers"] > 0:
            renamed = {"t_heads": "num_heads", "t_layers": "num_layers"}
            kwargs = {renamed.get(name, name[len("t_"):]): value
                      for name, value in options.items()}
            self.crosstransformer = CrossTransformerEncoder(dim=channels, **kwargs)

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
        z, x, stats = self._spectrogram_input(mix)
        xt, stats_t = self._time_input(mix)
        x, xt, skips = self._encode(x, xt)
        x, xt = self._bottleneck(x, xt)
        x, xt = self._decode(x, xt, skips)
        out = self._spectrogram_output(z, x, stats, mix.shape[-1])
        return self._add_time_output(out, xt, stats_t)[..., :length]

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
