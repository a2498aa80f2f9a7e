"""Hybrid Demucs (v3): a spectrogram U-Net and a waveform U-Net that share their innermost layers.

The frequency branch works on the STFT of the mixture (complex-as-channels, or magnitudes
followed by Wiener filtering), the time branch on the waveform; both outputs are summed at the end.
Building blocks (`pad1d`, `ScaledEmbedding`, `HEncLayer`, `HDecLayer`, `MultiWrap`), the spectrogram
plumbing (`HybridSpectrogramMixin`) and the U-Net plan and execution (`HybridUNetMixin`) are shared
with `demucs.htdemucs`.
"""
import math
import typing as tp
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .demucs import DConv, conv_transpose_polyphase, polyphase_applies, rescale_module
from .rounding import fast_cpu_inference
from .spec import ispectro, spectro
from .utils import capture_init
from .wiener import wiener

WIENER_WINDOW_FRAMES = 300
"""Frames filtered at once by `HDemucs._wiener`, to bound memory on long inputs."""


def pad1d(x: torch.Tensor, paddings: tp.Tuple[int, int], mode: str = "constant",
          value: float = 0.) -> torch.Tensor:
    """`F.pad` on the last dimension that also accepts reflect padding wider than the input.

    Reflect padding needs `padding < length`; when the input is too short it is first zero padded
    just enough (on the right preferably), and the remaining padding is reflected.
    """
    length = x.shape[-1]
    left, right = paddings
    if mode == "reflect" and length <= max(left, right):
        extra = max(left, right) - length + 1
        extra_right = min(right, extra)
        extra_left = extra - extra_right
        x = F.pad(x, (extra_left, extra_right))
        left, right = left - extra_left, right - extra_right
    out = F.pad(x, (left, right), mode, value)
    assert out.shape[-1] == length + sum(paddings), (out.shape, length, paddings)
    return out


class ScaledEmbedding(nn.Module):
    """Embedding whose effective learning rate is multiplied by `scale`.

    Weights are stored divided by `scale` and multiplied back on use, so that with Adam the
    embedding moves `scale` times faster than other parameters.

    Args:
        num_embeddings: number of entries.
        embedding_dim: size of each entry.
        scale: learning rate boost.
        smooth: initialise as a normalised cumulative sum, so neighbouring entries are similar
            (used for frequency embeddings).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 10.,
                 smooth: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        if smooth:
            weight = torch.cumsum(self.embedding.weight.data, dim=0)
            counts = torch.arange(1, num_embeddings + 1).to(weight)
            self.embedding.weight.data[:] = weight / counts.sqrt()[:, None]
        self.embedding.weight.data /= scale
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective (scaled) embedding table."""
        return self.embedding.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.scale


def _norm_factory(norm: bool, norm_groups: int) -> tp.Callable[[int], nn.Module]:
    """Builds GroupNorm(norm_groups, dim), or an Identity that keeps the child name in place."""
    if norm:
        return lambda dim: nn.GroupNorm(norm_groups, dim)
    return lambda dim: nn.Identity()


def _dconv_over_freqs(dconv: nn.Module, y: torch.Tensor, freq: bool) -> torch.Tensor:
    """Applies a 1D DConv to [B, C, T], or to [B, C, Fr, T] with frequencies folded in the batch."""
    if not freq:
        return dconv(y)
    batch, channels, freqs, frames = y.shape
    folded = y.permute(0, 2, 1, 3).reshape(-1, channels, frames)
    out = dconv(folded)
    return out.view(batch, freqs, channels, frames).permute(0, 2, 1, 3)


class HEncLayer(nn.Module):
    """One encoder layer of the hybrid U-Net: strided conv, GELU, DConv residual, 1x1 rewrite + GLU.

    Args:
        chin: input channels.
        chout: output channels.
        kernel_size: kernel size (along frequencies for a frequency layer).
        stride: stride (along frequencies for a frequency layer).
        norm_groups: groups of the GroupNorms.
        empty: only keep the first convolution (used by the time branch to join the freq. branch).
        freq: frequency layer (Conv2d over [freq, time]) or time layer (Conv1d).
        dconv: add a DConv residual branch.
        norm: use GroupNorm (otherwise Identity).
        context: context of the rewrite convolution (kernel 1 + 2 * context).
        dconv_kw: keyword arguments of the DConv.
        pad: pad the input by kernel_size // 4 on each side.
        rewrite: add the 1x1 (+context) convolution followed by GLU.
    """

    def __init__(self, chin: int, chout: int, kernel_size: int = 8, stride: int = 4,
                 norm_groups: int = 1, empty: bool = False, freq: bool = True, dconv: bool = True,
                 norm: bool = True, context: int = 0, dconv_kw: tp.Optional[dict] = None,
                 pad: bool = True, rewrite: bool = True):
        super().__init__()
        norm_fn = _norm_factory(norm, norm_groups)
        padding = kernel_size // 4 if pad else 0
        self.freq = freq
        self.kernel_size = kernel_size
        self.stride = stride
        self.empty = empty
        self.norm = norm
        self.pad = padding
        if freq:
            self.conv: nn.Module = nn.Conv2d(chin, chout, [kernel_size, 1], [stride, 1],
                                             [padding, 0])
            conv_class: tp.Type[nn.Module] = nn.Conv2d
        else:
            self.conv = nn.Conv1d(chin, chout, kernel_size, stride, padding)
            conv_class = nn.Conv1d
        if empty:
            return
        self.norm1 = norm_fn(chout)
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            self.rewrite = conv_class(chout, 2 * chout, 1 + 2 * context, 1, context)
            self.norm2 = norm_fn(2 * chout)
        self.dconv: tp.Optional[nn.Module] = None
        if dconv:
            self.dconv = DConv(chout, **(dconv_kw or {}))

    def forward(self, x: torch.Tensor, inject: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encodes `x` ([B, C, Fr, T] or [B, C, T]); `inject` (the time branch) is added after the
        first convolution."""
        if not self.freq and x.dim() == 4:
            batch, _, _, frames = x.shape
            x = x.reshape(batch, -1, frames)
        if not self.freq:
            remainder = x.shape[-1] % self.stride
            if remainder:
                x = F.pad(x, (0, self.stride - remainder))
        y = self.conv(x)
        if self.empty:
            return y
        if inject is not None:
            if inject.shape[-1] != y.shape[-1]:
                raise ValueError(f"injected time branch has {inject.shape[-1]} frames but the "
                                 f"frequency branch has {y.shape[-1]}")
            if inject.dim() == 3 and y.dim() == 4:
                inject = inject[:, :, None]
            y = y + inject
        y = F.gelu(self.norm1(y))
        if self.dconv is not None:
            y = _dconv_over_freqs(self.dconv, y, self.freq)
        if self.rewrite is None:
            return y
        return F.glu(self.norm2(self.rewrite(y)), dim=1)


class HDecLayer(nn.Module):
    """One decoder layer of the hybrid U-Net: skip add, rewrite + GLU, DConv, transposed conv.

    Args:
        chin: input channels.
        chout: output channels.
        last: outermost layer (no GELU on the output).
        kernel_size: kernel size of the transposed convolution.
        stride: stride of the transposed convolution.
        norm_groups: groups of the GroupNorms.
        empty: only keep the transposed convolution (time branch twin of the last freq. layer).
        freq: frequency layer (2D) or time layer (1D).
        dconv: add a DConv residual branch.
        norm: use GroupNorm (otherwise Identity).
        context: context of the rewrite convolution (kernel 1 + 2 * context).
        dconv_kw: keyword arguments of the DConv.
        pad: crop kernel_size // 4 on each side of the output.
        context_freq: the rewrite context also spans frequencies (else only time).
        rewrite: add the rewrite convolution followed by GLU.
    """

    def __init__(self, chin: int, chout: int, last: bool = False, kernel_size: int = 8,
                 stride: int = 4, norm_groups: int = 1, empty: bool = False, freq: bool = True,
                 dconv: bool = True, norm: bool = True, context: int = 1,
                 dconv_kw: tp.Optional[dict] = None, pad: bool = True, context_freq: bool = True,
                 rewrite: bool = True):
        super().__init__()
        norm_fn = _norm_factory(norm, norm_groups)
        self.pad = kernel_size // 4 if pad else 0
        self.last = last
        self.freq = freq
        self.chin = chin
        self.empty = empty
        self.stride = stride
        self.kernel_size = kernel_size
        self.norm = norm
        self.context_freq = context_freq
        if freq:
            self.conv_tr: nn.Module = nn.ConvTranspose2d(chin, chout, [kernel_size, 1],
                                                         [stride, 1])
        else:
            self.conv_tr = nn.ConvTranspose1d(chin, chout, kernel_size, stride)
        self.norm2 = norm_fn(chout)
        if empty:
            return
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            self.rewrite = self._make_rewrite(chin, context, freq, context_freq)
            self.norm1 = norm_fn(2 * chin)
        self.dconv: tp.Optional[nn.Module] = None
        if dconv:
            self.dconv = DConv(chin, **(dconv_kw or {}))

    def _transposed_conv(self, y: torch.Tensor) -> torch.Tensor:
        """`self.conv_tr(y)`, through `conv_transpose_polyphase` for inference on CPU."""
        if fast_cpu_inference(y) and polyphase_applies(self.conv_tr):
            return conv_transpose_polyphase(self.conv_tr, y)
        return self.conv_tr(y)

    @staticmethod
    def _make_rewrite(chin: int, context: int, freq: bool, context_freq: bool) -> nn.Module:
        kernel = 1 + 2 * context
        if not freq:
            return nn.Conv1d(chin, 2 * chin, kernel, 1, context)
        if context_freq:
            return nn.Conv2d(chin, 2 * chin, kernel, 1, context)
        return nn.Conv2d(chin, 2 * chin, [1, kernel], 1, [0, context])

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor],
                length: tp.Optional[int]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Decodes `x` with the encoder's `skip`; `length` is the time length to restore (time
        layers).

        Returns the output and the activation just before the transposed convolution.
        """
        if self.freq and x.dim() == 3:
            batch, _, frames = x.shape
            x = x.view(batch, self.chin, -1, frames)
        if self.empty:
            if skip is not None:
                raise ValueError("an empty HDecLayer takes no skip connection")
            y = x
        else:
            y = x + skip
            if self.rewrite is not None:
                y = F.glu(self.norm1(self.rewrite(y)), dim=1)
            if self.dconv is not None:
                y = _dconv_over_freqs(self.dconv, y, self.freq)
        z = self.norm2(self._transposed_conv(y))
        if self.freq:
            if self.pad:
                z = z[..., self.pad:-self.pad, :]
        else:
            z = z[..., self.pad:self.pad + length]
            assert z.shape[-1] == length, (z.shape[-1], length)
        if not self.last:
            z = F.gelu(z)
        return z, y


class MultiWrap(nn.Module):
    """Splits the frequency axis into bands, each processed by its own copy of a layer.

    Bands are given by `split_ratios` (e.g. [0.25, 0.5] gives 3 bands); each band gets an
    independently re-initialised replica of `layer` (an `HEncLayer` or an `HDecLayer` without norm).

    Args:
        layer: the HEncLayer or HDecLayer to replicate.
        split_ratios: increasing band boundaries, as fractions of the frequency axis.
    """

    def __init__(self, layer: nn.Module, split_ratios: tp.Sequence[float]):
        super().__init__()
        self.split_ratios = split_ratios
        self.layers = nn.ModuleList()
        self.conv = isinstance(layer, HEncLayer)
        if layer.norm or not layer.freq or not layer.pad:
            raise ValueError("MultiWrap needs a frequency layer with padding and without norm")
        if not self.conv and layer.context_freq:
            raise ValueError("MultiWrap needs an HDecLayer built with context_freq=False")
        for _ in range(len(split_ratios) + 1):
            replica = deepcopy(layer)
            if self.conv:
                replica.conv.padding = (0, 0)
            else:
                replica.pad = False
            for module in replica.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            self.layers.append(replica)

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor] = None,
                length: tp.Optional[int] = None):
        """Same call as the wrapped layer: `(x, inject)` for an encoder (no injection supported),
        `(x, skip, length)` for a decoder, which returns `(out, None)`."""
        if self.conv:
            return self._encode(x)
        return self._decode(x, skip)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        freqs = x.shape[2]
        ratios = list(self.split_ratios) + [1]
        start = 0
        outs = []
        for ratio, layer in zip(ratios, self.layers):
            pad = layer.kernel_size // 4
            if ratio == 1:
                limit = freqs
            else:
                limit = int(round(freqs * ratio))
                band = limit - start + (pad if start == 0 else 0)
                frames = round((band - layer.kernel_size) / layer.stride + 1)
                limit = start + (frames - 1) * layer.stride + layer.kernel_size
                if start == 0:
                    limit -= pad
            assert 0 < limit - start and limit <= freqs, (start, limit, freqs)
            y = x[:, :, start:limit, :]
            if start == 0:
                y = F.pad(y, (0, 0, pad, 0))
            if ratio == 1:
                y = F.pad(y, (0, 0, 0, pad))
            outs.append(layer(y))
            start = limit - layer.kernel_size + layer.stride
        return torch.cat(outs, dim=2)

    def _decode(self, x: torch.Tensor, skip: torch.Tensor) -> tp.Tuple[torch.Tensor, None]:
        freqs = x.shape[2]
        ratios = list(self.split_ratios) + [1]
        start = 0
        outs: tp.List[torch.Tensor] = []
        last = self.layers[0].last
        for ratio, layer in zip(ratios, self.layers):
            limit = freqs if ratio == 1 else int(round(freqs * ratio))
            layer.last = True
            out, _ = layer(x[:, :, start:limit], skip[:, :, start:limit], None)
            layer.last = last
            stride = layer.stride
            if outs:
                overlap = out[:, :, :stride] - layer.conv_tr.bias.view(1, -1, 1, 1)
                outs[-1][:, :, -stride:] += overlap
                out = out[:, :, stride:]
            if ratio == 1:
                out = out[:, :, :-stride // 2, :]
            if start == 0:
                out = out[:, :, stride // 2:, :]
            outs.append(out)
            start = limit
        out = torch.cat(outs, dim=2)
        if not last:
            out = F.gelu(out)
        return out, None


Stats = tp.Tuple[torch.Tensor, torch.Tensor]
"""Mean and standard deviation that standardised an input, kept to undo it on the output."""


def _standardize(x: torch.Tensor, dims: tp.Tuple[int, ...]) -> tp.Tuple[torch.Tensor, Stats]:
    """Standardises each batch item of `x` over `dims`; returns it with the (mean, std) used."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (1e-5 + std), (mean, std)


class HybridSpectrogramMixin:
    """Spectrogram side of `HDemucs` and `HTDemucs`: STFT and standardisation of the input,
    masking (complex-as-channels, Wiener filtering or mixture phase) and inverse STFT of the output.

    Mix it in before `nn.Module`: it holds no parameters, buffers or child modules, so the
    state_dict is the model's own. STFT frames are aligned with the time branch (`hybrid`) and
    padded by reflection; HDemucs may switch to spectrogram-only framing (`hybrid=False`) or to
    the legacy zero padding (`hybrid_old=True`) per instance.
    """

    hybrid = True
    hybrid_old = False
    training: bool
    sources: tp.List[str]

    def _init_spectrogram(self, nfft: int, cac: bool, wiener_iters: int, end_iters: int,
                          wiener_residual: bool) -> None:
        """Records the spectrogram options. A hybrid model must filter alike in training and
        evaluation: its time branch learns to complement the training-time output."""
        if self.hybrid and wiener_iters != end_iters:
            raise ValueError(f"{type(self).__name__}: a hybrid model needs wiener_iters == "
                             f"end_iters, got {wiener_iters} and {end_iters}")
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.cac = cac
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        self.wiener_residual = wiener_residual

    def _spectrogram_input(self, mix: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor, Stats]:
        """Spectrogram `z` of `mix` and the standardised input of the frequency branch."""
        z = self._spec(mix)
        x, stats = _standardize(self._magnitude(z).to(mix.device), dims=(1, 2, 3))
        return z, x, stats

    def _spectrogram_output(self, z: torch.Tensor, x: torch.Tensor, stats: Stats,
                            length: int) -> torch.Tensor:
        """Waveforms [B, S, C, length] from the frequency decoder's output `x`: undoes the
        standardisation, turns `x` into source spectrograms against the mixture's `z`, inverts."""
        batch, (freqs, frames) = z.shape[0], z.shape[-2:]
        mean, std = stats
        x = x.view(batch, len(self.sources), -1, freqs, frames)
        x = x * std[:, None] + mean[:, None]
        device = x.device
        if device.type == "mps":  # no complex support on MPS
            x = x.cpu()
        return self._ispec(self._mask(z, x), length).to(device)

    def _spec(self, x: torch.Tensor) -> torch.Tensor:
        """STFT of the mixture without the last bin; for hybrid models the frames are aligned
        with the time branch: exactly ceil(length / hop) of them."""
        hop = self.hop_length
        if not self.hybrid:
            return self._stft(x)[..., :-1, :]
        frames = int(math.ceil(x.shape[-1] / hop))
        pad = hop // 2 * 3
        paddings = (pad, pad + frames * hop - x.shape[-1])
        mode = "constant" if self.hybrid_old else "reflect"
        z = self._stft(pad1d(x, paddings, mode=mode))[..., :-1, :]
        assert z.shape[-1] == frames + 4, (z.shape, x.shape, frames)
        return z[..., 2:2 + frames]

    def _ispec(self, z: torch.Tensor, length: int, scale: int = 0) -> torch.Tensor:
        """Inverse of `_spec`: adds back the last bin (and the side frames), crops to `length`."""
        hop = self.hop_length // (4 ** scale)
        if not self.hybrid:
            return self._istft(F.pad(z, (0, 0, 0, 1)), hop, length)
        z = F.pad(z, (2, 2, 0, 1))  # one pad (a fill and a copy) for the bin and the frames
        if self.hybrid_old:
            x = self._istft(z, hop, hop * int(math.ceil(length / hop)))
            return x[..., :length]
        pad = hop // 2 * 3
        x = self._istft(z, hop, hop * int(math.ceil(length / hop)) + 2 * pad)
        return x[..., pad:pad + length]

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """Complex STFT [..., Fr, T] of the (already padded) mixture; the ONNX export
        (`demucs.onnx_export`) replaces it with a real-valued transform."""
        return spectro(x, self.nfft, self.hop_length)

    def _istft(self, z: torch.Tensor, hop: int, length: int) -> torch.Tensor:
        """Inverse of `_stft` at hop `hop`, giving `length` samples (replaced like `_stft`)."""
        return ispectro(z, hop, length)

    def _magnitude(self, z: torch.Tensor) -> torch.Tensor:
        """Network input from the complex spectrogram [B, C, Fr, T]: real and imaginary parts as
        channels [B, 2C, Fr, T] with cac, else the magnitude."""
        if not self.cac:
            return z.abs()
        batch, channels, freqs, frames = z.shape
        parts = torch.view_as_real(z).permute(0, 1, 4, 2, 3)
        return parts.reshape(batch, channels * 2, freqs, frames)

    def _mask(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Complex source spectrograms [B, S, C, Fr, T] from the network output `m` and the mixture
        spectrogram `z`: direct complex values (cac), Wiener filtering (iterations >= 0) or the
        mixture phase (iterations < 0). `m` is taken in float32: under CUDA's float16 autocast the
        last decoder layer gives float16, whose complex spectrogram the inverse STFT would have
        to take as the experimental complex32."""
        m = m.float()
        if self.cac:
            batch, sources, _, freqs, frames = m.shape
            parts = m.view(batch, sources, -1, 2, freqs, frames).permute(0, 1, 2, 4, 5, 3)
            return torch.view_as_complex(parts.contiguous())
        niters = self.end_iters if self.training else self.wiener_iters
        if niters < 0:
            z = z[:, None]
            return z / (1e-8 + z.abs()) * m
        return self._wiener(m, z, niters)

    def _wiener(self, mag_out: torch.Tensor, mix_stft: torch.Tensor,
                niters: int) -> torch.Tensor:
        """Multichannel Wiener filtering of the estimated magnitudes [B, S, C, Fr, T] against the
        mixture spectrogram [B, C, Fr, T], by windows of `WIENER_WINDOW_FRAMES` frames."""
        dtype = mix_stft.dtype
        batch, sources, channels, freqs, frames = mag_out.shape
        mags = mag_out.permute(0, 4, 3, 2, 1)  # B, T, Fr, C, S
        mix = torch.view_as_real(mix_stft.permute(0, 3, 2, 1))  # B, T, Fr, C, 2
        outs = []
        for item in range(batch):
            pieces = []
            for pos in range(0, frames, WIENER_WINDOW_FRAMES):
                window = slice(pos, pos + WIENER_WINDOW_FRAMES)
                filtered = wiener(mags[item, window], mix[item, window], niters,
                                  residual=self.wiener_residual)
                pieces.append(filtered.transpose(-1, -2))  # T, Fr, C, S, 2
            outs.append(torch.cat(pieces, dim=0))
        out = torch.view_as_complex(torch.stack(outs, 0))
        out = out.permute(0, 4, 3, 2, 1).contiguous()
        if self.wiener_residual:
            out = out[:, :-1]
        assert list(out.shape) == [batch, sources, channels, freqs, frames], out.shape
        return out.to(dtype)


@dataclass
class _Skips:
    """What the encoders leave for the decoders, outermost layer first: the activations of the
    frequency (`freq`) and time (`time`) layers and the lengths of their inputs."""

    freq: tp.List[torch.Tensor] = field(default_factory=list)
    time: tp.List[torch.Tensor] = field(default_factory=list)
    lengths: tp.List[int] = field(default_factory=list)
    lengths_t: tp.List[int] = field(default_factory=list)

    def all_used(self) -> bool:
        return not (self.freq or self.time or self.lengths or self.lengths_t)


def _from_layer(index: int, first: tp.Optional[int]) -> bool:
    """Whether layer `index` is at or past layer `first` (never when `first` is None)."""
    return first is not None and index >= first


@dataclass
class _LayerWidths:
    """Channels of the next encoder layer and frequency bins left, updated layer after layer.

    `chin`/`chout` are the time branch's input/output channels, `chin_z`/`chout_z` those of the
    frequency branch (twice the audio channels at the input with complex-as-channels).
    """
    chin: int
    chin_z: int
    chout: int
    chout_z: int
    freqs: int

    def next_layer(self, growth: float, kernel_size: int, stride: int, freq: bool) -> None:
        """Moves to the next, deeper layer: its input is this layer's output."""
        self.chin, self.chin_z = self.chout, self.chout_z
        self.chout, self.chout_z = int(growth * self.chout), int(growth * self.chout_z)
        if freq:
            self.freqs = 1 if self.freqs <= kernel_size else self.freqs // stride


@dataclass
class _LayerSpec:
    """Options of one layer of the frequency branch and of its time-branch twin."""
    kw: tp.Dict[str, tp.Any]
    time_kw: tp.Dict[str, tp.Any]
    last_freq: bool  # collapses the remaining bins; its time twin is an empty bare conv
    multi_freqs: tp.Optional[tp.Sequence[float]]  # band split of a MultiWrap, None if not wrapped


def _layer_spec(widths: _LayerWidths, *, kernel_size: int, time_stride: int, stride: int,
                norm: bool, rewrite: bool, norm_groups: int, dconv_kw: dict,
                multi_freqs: tp.Optional[tp.Sequence[float]]) -> _LayerSpec:
    """Options of the next layer pair. The layer collapsing the last bins has both branches'
    output width set to the larger one (`widths` is updated)."""
    freq = widths.freqs > 1
    last_freq = freq and widths.freqs <= kernel_size
    kw = {"kernel_size": kernel_size if freq else 2 * time_stride,
          "stride": stride if freq else time_stride, "freq": freq, "pad": True, "norm": norm,
          "rewrite": rewrite, "norm_groups": norm_groups, "dconv_kw": dconv_kw}
    if last_freq:
        kw.update(kernel_size=widths.freqs, pad=False)
        widths.chout_z = max(widths.chout, widths.chout_z)
        widths.chout = widths.chout_z
    time_kw = dict(kw, freq=False, kernel_size=kernel_size, stride=stride, pad=True)
    return _LayerSpec(kw, time_kw, last_freq, multi_freqs or None)


class HybridUNetMixin:
    """Layer plan and execution of the two U-Nets of `HDemucs` and `HTDemucs`.

    Frequency layers divide the STFT bins by `stride` until at most `kernel_size` remain; the next
    layer collapses them to one (its time twin is a bare conv, injected into it) and the layers
    past it are time convolutions shared by both branches. The time U-Net (`tencoder` /
    `tdecoder`) has one layer per frequency layer and exists only for hybrid models. Mix it in
    before `nn.Module`; it adds no parameters of its own.
    """

    hybrid: bool
    audio_channels: int
    sources: tp.List[str]
    cac: bool
    nfft: int

    def _build_unets(self, *, depth: int, channels: int, channels_time: tp.Optional[int],
                     growth: float, rewrite: bool, multi_freqs: tp.Optional[tp.Sequence[float]],
                     multi_freqs_depth: int, freq_emb: float, emb_scale: float, emb_smooth: bool,
                     kernel_size: int, time_stride: int, stride: int, context: int,
                     context_enc: int, norm_starts: int, norm_groups: int, dconv_mode: int,
                     dconv_depth: int, dconv_comp: int, dconv_init: float,
                     dconv_attn: tp.Optional[int] = None,
                     dconv_lstm: tp.Optional[int] = None) -> None:
        """Creates `encoder`, `decoder`, `tencoder`, `tdecoder` and `freq_emb`, registered (and
        randomly initialised) in the order of the official implementation.

        The options are the models' constructor arguments; DConv branches get LocalState attention
        from layer `dconv_attn` on and a BLSTM from layer `dconv_lstm` on (None: never).
        """
        self.depth = depth
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.context = context
        self.freq_emb: tp.Optional[ScaledEmbedding] = None
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        if self.hybrid:
            self.tencoder = nn.ModuleList()
            self.tdecoder = nn.ModuleList()
        dconv_kw = {"depth": dconv_depth, "compress": dconv_comp, "init": dconv_init, "gelu": True}
        chin = self.audio_channels
        widths = _LayerWidths(chin=chin, chin_z=chin * 2 if self.cac else chin,
                              chout=channels_time or channels, chout_z=channels,
                              freqs=self.nfft // 2)
        for index in range(depth):
            spec = _layer_spec(
                widths, kernel_size=kernel_size, time_stride=time_stride, stride=stride,
                norm=index >= norm_starts, rewrite=rewrite, norm_groups=norm_groups,
                dconv_kw=dict(dconv_kw, lstm=_from_layer(index, dconv_lstm),
                              attn=_from_layer(index, dconv_attn)),
                multi_freqs=multi_freqs if index < multi_freqs_depth else None)
            self._add_encoder_layer(spec, widths, dconv=dconv_mode & 1, context=context_enc)
            if index == 0:
                chin = self.audio_channels * len(self.sources)
                widths.chin, widths.chin_z = chin, chin * 2 if self.cac else chin
            self._add_decoder_layer(spec, widths, dconv=dconv_mode & 2, context=context,
                                    last=index == 0)
            widths.next_layer(growth, kernel_size, stride, spec.kw["freq"])
            if index == 0 and freq_emb:
                self.freq_emb = ScaledEmbedding(widths.freqs, widths.chin_z, smooth=emb_smooth,
                                                scale=emb_scale)
                self.freq_emb_scale = freq_emb

    def _add_encoder_layer(self, spec: "_LayerSpec", widths: "_LayerWidths", dconv: int,
                           context: int) -> None:
        """Appends one encoder layer (and its time-branch twin in hybrid models)."""
        enc: nn.Module = HEncLayer(widths.chin_z, widths.chout_z, dconv=dconv, context=context,
                                   **spec.kw)
        if self.hybrid and spec.kw["freq"]:
            self.tencoder.append(HEncLayer(widths.chin, widths.chout, dconv=dconv,
                                           context=context, empty=spec.last_freq,
                                           **spec.time_kw))
        self.encoder.append(MultiWrap(enc, spec.multi_freqs) if spec.multi_freqs else enc)

    def _add_decoder_layer(self, spec: "_LayerSpec", widths: "_LayerWidths", dconv: int,
                           context: int, last: bool) -> None:
        """Prepends the decoder layer mirroring an encoder layer (and its time twin)."""
        dec_kw = dict(spec.kw, context_freq=False) if spec.multi_freqs else spec.kw
        dec: nn.Module = HDecLayer(widths.chout_z, widths.chin_z, dconv=dconv, last=last,
                                   context=context, **dec_kw)
        if spec.multi_freqs:
            dec = MultiWrap(dec, spec.multi_freqs)
        if self.hybrid and spec.kw["freq"]:
            self.tdecoder.insert(0, HDecLayer(widths.chout, widths.chin, dconv=dconv,
                                              empty=spec.last_freq, last=last, context=context,
                                              **spec.time_kw))
        self.decoder.insert(0, dec)

    @staticmethod
    def _time_input(mix: torch.Tensor) -> tp.Tuple[torch.Tensor, Stats]:
        """Standardised input of the time branch, with the statistics to undo it."""
        return _standardize(mix, dims=(1, 2))

    @staticmethod
    def _add_time_output(out: torch.Tensor, xt: torch.Tensor, stats_t: Stats) -> torch.Tensor:
        """Adds the time decoder's output `xt`, de-standardised, to the frequency branch's
        waveforms `out` [B, S, C, T]."""
        mean, std = stats_t
        return (xt.view(out.shape) * std[:, None] + mean[:, None]) + out

    def _encode(self, x: torch.Tensor,
                xt: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor, _Skips]:
        """Runs both encoders on the standardised inputs, returning both innermost activations
        and the skips for `_decode`."""
        skips = _Skips()
        tencoder = self.tencoder if self.hybrid else []
        for index, encode in enumerate(self.encoder):
            skips.lengths.append(x.shape[-1])
            inject = None
            if index < len(tencoder):
                skips.lengths_t.append(xt.shape[-1])
                tenc = tencoder[index]
                xt = tenc(xt)
                if tenc.empty:  # a bare conv whose output joins the last frequency layer
                    inject = xt
                else:
                    skips.time.append(xt)
            x = encode(x, inject)
            if index == 0 and self.freq_emb is not None:
                x = x + self._freq_embedding(x)
            skips.freq.append(x)
        return x, xt, skips

    def _freq_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted frequency embedding added to `x` [B, C, freqs, T] after the first layer, so
        that convolutions can tell frequencies apart. Out of training it is weighted before
        broadcasting over frames ([1, C, freqs, 1]), which spares a full-size multiplication
        (same values); in training it is weighted after, like upstream, whose backward weights
        each frame's gradient before summing them (other roundings otherwise)."""
        bins = torch.arange(x.shape[-2], device=x.device)
        emb = self.freq_emb(bins).t()[None, :, :, None]
        if self.training and torch.is_grad_enabled():
            return self.freq_emb_scale * emb.expand_as(x)
        return self.freq_emb_scale * emb

    def _decode(self, x: torch.Tensor, xt: torch.Tensor,
                skips: _Skips) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Runs both decoders from the innermost `x` and `xt`; the time decoder joins once the
        layers are shared no more (from the activation before the last shared layer's conv)."""
        tdecoder = self.tdecoder if self.hybrid else []
        offset = self.depth - len(tdecoder)
        for index, decode in enumerate(self.decoder):
            x, pre = decode(x, skips.freq.pop(-1), skips.lengths.pop(-1))
            if index < offset:
                continue
            tdec = tdecoder[index - offset]
            length_t = skips.lengths_t.pop(-1)
            if tdec.empty:
                assert pre.shape[2] == 1, pre.shape
                xt, _ = tdec(pre[:, :, 0], None, length_t)
            else:
                xt, _ = tdec(xt, skips.time.pop(-1), length_t)
        assert skips.all_used(), "unused skip connections"
        return x, xt


class HDemucs(HybridSpectrogramMixin, HybridUNetMixin, nn.Module):
    """Hybrid Demucs: a spectrogram U-Net and a waveform U-Net merged at their innermost layers.

    Frequency layers divide the STFT bins by `stride` until at most `kernel_size` bins remain; the
    next layer collapses them to one (its time twin has only a conv, injected into it), and the
    remaining layers are plain time convolutions shared by both branches.

    Args:
        sources: names of the separated sources.
        audio_channels: input/output audio channels.
        channels: initial channels of the frequency branch.
        channels_time: initial channels of the time branch (`channels` if None).
        growth: channel multiplier per layer.
        nfft: STFT size (hop is nfft // 4).
        wiener_iters: Wiener filtering iterations at evaluation (non cac only).
        end_iters: Wiener filtering iterations in training.
        wiener_residual: add a residual source before Wiener filtering.
        cac: complex-as-channels (real/imaginary parts as channels) instead of magnitude masking.
        depth: number of layers.
        rewrite: add 1x1 convolutions + GLU.
        hybrid: add the time branch; without it the model is a spectrogram model only.
        hybrid_old: legacy spectrogram padding (zero padding, and different framing at ispec).
        multi_freqs: band split ratios; the first `multi_freqs_depth` layers then use one replica
            per band (`MultiWrap`).
        multi_freqs_depth: number of layers wrapped by `MultiWrap`.
        freq_emb: weight of the frequency embedding added after the first layer (0 disables it).
        emb_scale: learning rate boost of that embedding.
        emb_smooth: smooth initialisation of that embedding.
        kernel_size: kernel size of frequency layers.
        time_stride: stride of the time layers past the frequency layers (kernel 2 * time_stride).
        stride: stride of frequency layers and of the time branch.
        context: context of decoder rewrite convolutions.
        context_enc: context of encoder rewrite convolutions.
        norm_starts: first layer index using GroupNorm.
        norm_groups: groups of those GroupNorms.
        dconv_mode: 1 = DConv in encoders, 2 = in decoders, 3 = both.
        dconv_depth: layers per DConv.
        dconv_comp: DConv channel compression.
        dconv_attn: first layer index whose DConv has LocalState attention.
        dconv_lstm: first layer index whose DConv has a BLSTM.
        dconv_init: initial LayerScale of DConv.
        rescale: weight rescaling reference at initialisation (0 disables it).
        samplerate: audio sample rate (metadata used by `apply_model`).
        segment: training segment length in seconds (metadata used by `apply_model`).
    """

    @capture_init
    def __init__(self, sources: tp.List[str], audio_channels: int = 2, channels: int = 48,
                 channels_time: tp.Optional[int] = None, growth: float = 2, nfft: int = 4096,
                 wiener_iters: int = 0, end_iters: int = 0, wiener_residual: bool = False,
                 cac: bool = True, depth: int = 6, rewrite: bool = True, hybrid: bool = True,
                 hybrid_old: bool = False, multi_freqs: tp.Optional[tp.Sequence[float]] = None,
                 multi_freqs_depth: int = 2, freq_emb: float = 0.2, emb_scale: float = 10,
                 emb_smooth: bool = True, kernel_size: int = 8, time_stride: int = 2,
                 stride: int = 4, context: int = 1, context_enc: int = 0, norm_starts: int = 4,
                 norm_groups: int = 4, dconv_mode: int = 1, dconv_depth: int = 2,
                 dconv_comp: int = 4, dconv_attn: int = 4, dconv_lstm: int = 4,
                 dconv_init: float = 1e-4, rescale: float = 0.1, samplerate: int = 44100,
                 segment: float = 4 * 10):
        super().__init__()
        if hybrid_old and not hybrid:
            raise ValueError("HDemucs: hybrid_old=True needs hybrid=True")
        self.hybrid = hybrid
        self.hybrid_old = hybrid_old
        self.audio_channels = audio_channels
        self.sources = sources
        self.samplerate = samplerate
        self.segment = segment
        self._init_spectrogram(nfft, cac, wiener_iters, end_iters, wiener_residual)
        self._build_unets(
            depth=depth, channels=channels, channels_time=channels_time, growth=growth,
            rewrite=rewrite, multi_freqs=multi_freqs, multi_freqs_depth=multi_freqs_depth,
            freq_emb=freq_emb, emb_scale=emb_scale, emb_smooth=emb_smooth,
            kernel_size=kernel_size, time_stride=time_stride, stride=stride, context=context,
            context_enc=context_enc, norm_starts=norm_starts, norm_groups=norm_groups,
            dconv_mode=dconv_mode, dconv_depth=dconv_depth, dconv_comp=dconv_comp,
            dconv_init=dconv_init, dconv_attn=dconv_attn, dconv_lstm=dconv_lstm)
        if rescale:
            rescale_module(self, reference=rescale)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separates `mix` [B, audio_channels, T] into [B, len(sources), audio_channels, T]."""
        length = mix.shape[-1]
        z, x, stats = self._spectrogram_input(mix)
        xt, stats_t = self._time_input(mix) if self.hybrid else (mix, None)
        x, _, skips = self._encode(x, xt)
        # No bottleneck: both decoders start from zeros.
        x, xt = self._decode(torch.zeros_like(x), torch.zeros_like(x), skips)
        out = self._spectrogram_output(z, x, stats, length)
        if stats_t is None:
            return out
        return self._add_time_output(out, xt, stats_t)
