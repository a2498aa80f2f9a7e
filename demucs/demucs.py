"""Time-domain Demucs (v2/v3): a waveform U-Net with optional residual dilated branches.

Also holds the building blocks reused by the hybrid models (`DConv`, `LocalState`, `BLSTM`) and the
initial weight rescaling (`rescale_conv`, `rescale_module`).
"""
import math
import typing as tp

import julius
import torch
from torch import nn
from torch.nn import functional as F

from .precision import lstm_needs_float32
from .rounding import fast_cpu_inference
from .transformer import LayerScale
from .utils import capture_init, center_trim, unfold


class BLSTM(nn.Module):
    """Bidirectional LSTM over the time of a `[B, C, T]` tensor, projected back to `C` channels.

    Long inputs can be processed as half-overlapping windows of `max_steps` frames, which bounds the
    sequence length seen by the LSTM; only the centre of each window is kept when stitching back.

    Args:
        dim: number of input (and output) channels, also the hidden size of each direction.
        layers: number of stacked LSTM layers.
        max_steps: when set and the input is longer, process windows of that many steps
            (stride `max_steps // 2`).
        skip: add the input to the output (residual connection).
    """

    def __init__(self, dim: int, layers: int = 1, max_steps: tp.Optional[int] = None,
                 skip: bool = False):
        super().__init__()
        if max_steps is not None and max_steps % 4 != 0:
            raise ValueError(f"BLSTM max_steps must be a multiple of 4, got {max_steps}")
        self.max_steps = max_steps
        self.lstm = nn.LSTM(bidirectional=True, num_layers=layers, hidden_size=dim, input_size=dim)
        self.linear = nn.Linear(2 * dim, dim)
        self.skip = skip

    def _recurrent(self, x: torch.Tensor) -> torch.Tensor:
        """Run the LSTM and projection on `[N, C, T]`, returning `[N, C, T]`."""
        steps = x.permute(2, 0, 1)
        if lstm_needs_float32(steps):
            # no oneDNN LSTM kernel for the autocast dtype on this CPU: the recurrence runs in
            # float32, the rest of the model stays in mixed precision
            with torch.autocast("cpu", enabled=False):
                y = self.lstm(steps.float())[0]
        else:
            y = self.lstm(steps)[0]
        return self.linear(y).permute(1, 2, 0)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """Process `x` as overlapping windows and keep the centre part of each one."""
        batch, channels, length = x.shape
        width = self.max_steps
        assert width is not None
        stride = width // 2
        frames = unfold(x, width, stride)
        n_frames = frames.shape[2]
        frames = frames.permute(0, 2, 1, 3).reshape(-1, channels, width)
        frames = self._recurrent(frames).reshape(batch, n_frames, channels, width)
        margin = stride // 2
        pieces = []
        for index in range(n_frames):
            start = 0 if index == 0 else margin
            end = width if index == n_frames - 1 else width - margin
            pieces.append(frames[:, index, :, start:end])
        return torch.cat(pieces, -1)[..., :length]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_steps is not None and x.shape[-1] > self.max_steps:
            out = self._windowed(x)
        else:
            out = self._recurrent(x)
        if self.skip:
            out = out + x
        return out


class LocalState(nn.Module):
    """Local attention with a learnt, per-head preference for nearby time steps.

    Each head adds to its dot-product scores a penalty proportional to the time distance, with a
    decay rate predicted from the query (`ndecay` rates mixed by sigmoid weights), and optionally
    cosine "frequency" terms. A position never attends to itself. The output is residual.

    Args:
        channels: number of input/output channels (must be divisible by `heads`).
        heads: number of attention heads.
        nfreqs: number of periodic (cosine) kernels added to the scores, 0 to disable.
        ndecay: number of distance decay kernels, 0 to disable.
    """

    def __init__(self, channels: int, heads: int = 4, nfreqs: int = 0, ndecay: int = 4):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(
                f"LocalState channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.nfreqs = nfreqs
        self.ndecay = ndecay
        self.content = nn.Conv1d(channels, channels, 1)
        self.query = nn.Conv1d(channels, channels, 1)
        self.key = nn.Conv1d(channels, channels, 1)
        if nfreqs:
            self.query_freqs = nn.Conv1d(channels, heads * nfreqs, 1)
        if ndecay:
            self.query_decay = nn.Conv1d(channels, heads * ndecay, 1)
            # Near-zero weights and a negative bias: the sigmoid starts small, i.e. a wide window.
            self.query_decay.weight.data *= 0.01
            self.query_decay.bias.data[:] = -2
        self.proj = nn.Conv1d(channels + heads * nfreqs, channels, 1)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """Split `[B, C', T]` into `[B, heads, C'/heads, T]`."""
        batch, _, length = y.shape
        return y.view(batch, self.heads, -1, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        positions = torch.arange(length, device=x.device, dtype=x.dtype)
        delta = positions[:, None] - positions[None, :]  # [key t, query s]

        queries = self._heads(self.query(x))
        keys = self._heads(self.key(x))
        scores = torch.einsum("bhct,bhcs->bhts", keys, queries) / keys.shape[2] ** 0.5
        if self.nfreqs:
            periods = torch.arange(1, self.nfreqs + 1, device=x.device, dtype=x.dtype)
            freq_kernel = torch.cos(2 * math.pi * delta / periods.view(-1, 1, 1))
            freq_q = self._heads(self.query_freqs(x)) / self.nfreqs ** 0.5
            scores = scores + torch.einsum("fts,bhfs->bhts", freq_kernel, freq_q)
        if self.ndecay:
            rates = torch.arange(1, self.ndecay + 1, device=x.device, dtype=x.dtype)
            decay_q = torch.sigmoid(self._heads(self.query_decay(x))) / 2
            decay_kernel = -rates.view(-1, 1, 1) * delta.abs() / self.ndecay ** 0.5
            scores = scores + torch.einsum("fts,bhfs->bhts", decay_kernel, decay_q)

        # The diagonal, built by comparison: a boolean torch.eye exports as an ONNX EyeLike
        # operator that ONNX Runtime does not implement for booleans.
        steps = torch.arange(length, device=x.device)
        self_mask = steps[:, None] == steps[None, :]
        scores = scores.masked_fill(self_mask, -100)
        weights = torch.softmax(scores, dim=2)

        content = self._heads(self.content(x))
        result = torch.einsum("bhts,bhct->bhcs", weights, content)
        if self.nfreqs:
            time_signature = torch.einsum("bhts,fts->bhfs", weights, freq_kernel)
            result = torch.cat([result, time_signature], 2)
        return x + self.proj(result.reshape(batch, -1, length))


class DConv(nn.Module):
    """Stack of residual branches with dilated convolutions, used inside each Demucs layer.

    Branch `d`: dilated conv to `channels / compress`, norm, activation, [BLSTM], [LocalState],
    1x1 conv to `2 * channels`, norm, GLU, LayerScale. Each branch output is added to its input.

    Args:
        channels: input/output channels.
        compress: reduction factor of the hidden channels.
        depth: number of residual branches; a negative value means `abs(depth)` branches
            without dilation.
        init: initial LayerScale value.
        norm: use GroupNorm(1) after the convolutions (Identity otherwise, keeping indices).
        attn: insert a `LocalState` attention in each branch.
        heads: number of attention heads.
        ndecay: number of decay kernels of the attention.
        lstm: insert a windowed residual `BLSTM` (2 layers, 200 steps) in each branch.
        gelu: GELU activation if True, ReLU otherwise.
        kernel: kernel size of the dilated convolution (odd).
        dilate: dilate branch `d` by `2 ** d` (only when `depth` is positive).
    """

    def __init__(self, channels: int, compress: float = 4, depth: int = 2, init: float = 1e-4,
                 norm: bool = True, attn: bool = False, heads: int = 4, ndecay: int = 4,
                 lstm: bool = False, gelu: bool = True, kernel: int = 3, dilate: bool = True):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"DConv kernel must be odd, got {kernel}")
        self.channels = channels
        self.compress = compress
        self.depth = abs(depth)
        dilate = dilate and depth > 0
        hidden = int(channels / compress)
        self.layers = nn.ModuleList()
        for index in range(self.depth):
            dilation = 2 ** index if dilate else 1
            branch = self._branch(channels, hidden, kernel, dilation, init, norm, gelu)
            if attn:
                branch.insert(3, LocalState(hidden, heads=heads, ndecay=ndecay))
            if lstm:
                branch.insert(3, BLSTM(hidden, layers=2, max_steps=200, skip=True))
            self.layers.append(nn.Sequential(*branch))

    @staticmethod
    def _branch(channels: int, hidden: int, kernel: int, dilation: int, init: float,
                norm: bool, gelu: bool) -> tp.List[nn.Module]:
        """Modules of one residual branch without the optional attention/LSTM."""
        def make_norm(dim: int) -> nn.Module:
            return nn.GroupNorm(1, dim) if norm else nn.Identity()

        return [
            nn.Conv1d(channels, hidden, kernel, dilation=dilation,
                      padding=dilation * (kernel // 2)),
            make_norm(hidden),
            nn.GELU() if gelu else nn.ReLU(),
            nn.Conv1d(hidden, 2 * channels, 1),
            make_norm(2 * channels),
            nn.GLU(1),
            LayerScale(channels, init),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference = fast_cpu_inference(x)
        for branch in self.layers:
            *body, layer_scale = branch
            if inference:
                # the residual add and the LayerScale in one pass: x + scale * y
                x = torch.addcmul(x, layer_scale.scale[:, None], _inference_branch(body, x))
            else:
                y = x
                for module in body:
                    y = module(y)
                # upstream's two roundings (scale * y, then the add), not addcmul's fused one
                x = x + layer_scale(y)
        return x


def _inference_branch(body: tp.List[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """A DConv branch without its LayerScale, for inference on CPU: the same values as running
    its modules, in fewer and faster passes (`dilated_conv_as_gemm`, `conv1x1_group_norm`)."""
    conv, *middle, conv2, norm2, glu = body
    y = dilated_conv_as_gemm(conv, x)
    for module in middle:
        y = module(y)
    if isinstance(norm2, nn.GroupNorm):
        return glu(conv1x1_group_norm(conv2, norm2, y))
    return glu(norm2(conv2(y)))


def dilated_conv_as_gemm(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a stride-1 convolution padded to keep the length, as one matrix product for
    all kernel taps followed by shifted adds of the taps.

    Why: the first convolution of a DConv branch narrows many channels to a few (48 to 6, kernel
    3), a shape oneDNN runs at about 50 GFLOP/s on CPU; one (taps x channels) product per item
    runs at memory speed and the shifted adds only touch the narrow output (2-4 % of an HTDemucs
    forward). Same values up to float rounding (tests/test_perf_equivalence.py).
    """
    kernel, dilation = conv.kernel_size[0], conv.dilation[0]
    if conv.stride != (1,) or conv.groups != 1 or conv.padding != (dilation * (kernel // 2),):
        raise ValueError("dilated_conv_as_gemm needs a stride-1, ungrouped convolution padded "
                         "by dilation * (kernel // 2) on each side")
    batch, _, frames = x.shape
    out_channels = conv.out_channels
    weight = conv.weight.permute(2, 0, 1).reshape(kernel * out_channels, -1)
    taps = torch.matmul(weight, x).view(batch, kernel, out_channels, frames)
    center = kernel // 2
    out = taps[:, center].clone() if conv.bias is None else taps[:, center] + conv.bias[:, None]
    for tap in range(kernel):
        shift = (tap - center) * dilation  # output frame t reads input frame t + shift
        if shift == 0 or abs(shift) >= frames:
            continue
        if shift > 0:
            out[..., :frames - shift] += taps[:, tap, :, shift:]
        else:
            out[..., -shift:] += taps[:, tap, :, :frames + shift]
    return out


def conv1x1_group_norm(conv: nn.Conv1d, norm: nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
    """`norm(conv(h))` for a 1x1 `conv` and a one-group `norm`, as one grouped convolution.

    Why: in a DConv branch `conv` widens a few hidden channels (e.g. 6) to `2 * channels` (96),
    and the GroupNorm then reads that wide output twice and writes it again. The mean and variance
    of `conv(h)` over channels and time follow from the mean and the Gram matrix of the hidden
    channels of `h` (computed in float64, so no precision is lost), so the normalisation folds
    into per-item weights and biases and the wide output is written once. Same values as the
    modules up to float rounding (tests/test_perf_equivalence.py); inference only.
    """
    if norm.num_groups != 1 or conv.kernel_size != (1,):
        raise ValueError("conv1x1_group_norm needs a 1x1 convolution and a one-group GroupNorm")
    items, hidden, frames = h.shape
    weight = conv.weight[:, :, 0].double()  # [M, K]
    bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    wide = weight.shape[0]
    h64 = h.double()
    mean_h = h64.mean(-1)  # [N, K]
    gram = torch.bmm(h64, h64.transpose(1, 2)) / frames  # [N, K, K]
    mean = mean_h @ weight.mean(0) + bias.mean()  # over channels and time, [N]
    mean_square = ((gram * (weight.t() @ weight)).sum((1, 2)) + 2 * mean_h @ (weight.t() @ bias)
                   + bias @ bias) / wide
    scale = torch.rsqrt(mean_square - mean ** 2 + norm.eps)[:, None]  # [N, 1]
    shift = (bias - mean[:, None]) * scale  # [N, M]
    if norm.affine:
        shift = shift * norm.weight.double() + norm.bias.double()
        scale = scale * norm.weight.double()
    scale = scale.expand(items, wide)
    item_weights = (scale[:, :, None] * weight).to(h.dtype).reshape(items * wide, hidden, 1)
    out = F.conv1d(h.reshape(1, items * hidden, frames), item_weights,
                   shift.reshape(-1).to(h.dtype), groups=items)
    return out.view(items, wide, frames)


def conv_transpose_polyphase(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a `ConvTranspose1d`, or a `ConvTranspose2d` with a `[K, 1]` kernel, whose
    kernel is a multiple of its stride, as an ordinary convolution followed by one interleave.

    Output sample `stride * g + r` only reads the inputs `g, g - 1, ...` through the kernel taps
    `r, r + stride, ...`: the `stride` phases are an ordinary convolution with `stride * chout`
    output channels and `kernel // stride` taps, whose outputs are then interleaved.

    Why: on CPU, oneDNN runs the transposed convolutions of the hybrid decoders slowly and then
    copies their output into a dense tensor; the phase convolution plus interleave is 1.5-2x
    faster (3-4 % of an HTDemucs forward). Same values up to float rounding
    (tests/test_perf_equivalence.py).
    """
    if not polyphase_applies(conv):
        raise ValueError(f"conv_transpose_polyphase needs an unpadded, ungrouped, undilated "
                         f"transposed convolution whose kernel is a multiple of its stride "
                         f"along its first axis, got {conv}")
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    taps = kernel // stride
    chin, chout = conv.in_channels, conv.out_channels
    # phase r, tap j reads input g - (taps - 1) + j through kernel index stride * (taps-1-j) + r
    weight = conv.weight.reshape(chin, chout, taps, stride).flip(2)
    weight = weight.permute(1, 3, 0, 2).reshape(chout * stride, chin, taps)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(stride)
    if isinstance(conv, nn.ConvTranspose2d):
        phases = F.conv2d(x, weight[..., None], bias, padding=(taps - 1, 0))
    else:
        phases = F.conv1d(x, weight, bias, padding=taps - 1)
    batch, _, length, *rest = phases.shape
    phases = phases.view(batch, chout, stride, length, *rest).transpose(2, 3)
    return phases.reshape(batch, chout, length * stride, *rest)


def polyphase_applies(conv: nn.Module) -> bool:
    """Whether `conv_transpose_polyphase` can compute `conv`."""
    if isinstance(conv, nn.ConvTranspose2d):
        if conv.kernel_size[1:] != (1,) or conv.stride[1:] != (1,):
            return False
    elif not isinstance(conv, nn.ConvTranspose1d):
        return False
    return (conv.kernel_size[0] % conv.stride[0] == 0 and conv.groups == 1
            and not any(conv.padding) and not any(conv.output_padding)
            and all(d == 1 for d in conv.dilation) and conv.padding_mode == "zeros")


def rescale_conv(conv: nn.Module, reference: float) -> None:
    """Divide the weight and bias of `conv` by `sqrt(std(weight) / reference)`, in place.

    This brings the initial weight std of every convolution closer to `reference`.
    """
    std = conv.weight.std().detach()
    scale = (std / reference) ** 0.5
    conv.weight.data /= scale
    if conv.bias is not None:
        conv.bias.data /= scale


def rescale_module(module: nn.Module, reference: float) -> None:
    """Apply `rescale_conv` to every (transposed) 1d/2d convolution inside `module`."""
    conv_types = (nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d, nn.ConvTranspose2d)
    for sub in module.modules():
        if isinstance(sub, conv_types):
            rescale_conv(sub, reference)


class Demucs(nn.Module):
    """Waveform-to-waveform source separation U-Net (Demucs v2, and v3 with `dconv_mode`).

    Input `[B, audio_channels, T]`, output `[B, len(sources), audio_channels, T]`.

    Args:
        sources: names of the separated sources (fixes the number of outputs).
        audio_channels: number of input/output audio channels.
        channels: channels of the first encoder layer.
        growth: channel multiplier from one layer to the next.
        depth: number of encoder (and decoder) layers.
        rewrite: add a 1x1 (encoder) / `2 * context + 1` (decoder) conv + GLU in each layer.
        lstm_layers: layers of the bottleneck BLSTM, 0 for none.
        kernel_size: kernel size of the strided (transposed) convolutions.
        stride: stride of the strided (transposed) convolutions.
        context: decoder rewrite conv context on each side.
        gelu: GELU activations if True, ReLU otherwise.
        glu: GLU after the rewrite convs if True (doubling their channels), ReLU otherwise.
        norm_starts: first layer index using GroupNorm (earlier layers use Identity).
        norm_groups: number of GroupNorm groups.
        dconv_mode: bit 1 adds a DConv to the encoder layers, bit 2 to the decoder layers.
        dconv_depth: number of DConv branches.
        dconv_comp: DConv hidden channel reduction.
        dconv_attn: first layer index whose DConv uses LocalState attention.
        dconv_lstm: first layer index whose DConv uses a BLSTM.
        dconv_init: initial DConv LayerScale value.
        normalize: standardise the input by the mono mix mean/std and undo it at the output.
        resample: upsample the input x2 before the U-Net and downsample after.
        rescale: reference std for the initial weight rescaling, 0 to disable.
        samplerate: sample rate the model works at.
        segment: training segment duration in seconds (used by `apply_model` to split).
    """

    @capture_init
    def __init__(self, sources: tp.List[str], audio_channels: int = 2, channels: int = 64,
                 growth: float = 2., depth: int = 6, rewrite: bool = True, lstm_layers: int = 0,
                 kernel_size: int = 8, stride: int = 4, context: int = 1, gelu: bool = True,
                 glu: bool = True, norm_starts: int = 4, norm_groups: int = 4, dconv_mode: int = 1,
                 dconv_depth: int = 2, dconv_comp: float = 4, dconv_attn: int = 4,
                 dconv_lstm: int = 4, dconv_init: float = 1e-4, normalize: bool = True,
                 resample: bool = True, rescale: float = 0.1, samplerate: int = 44100,
                 segment: float = 4 * 10):
        super().__init__()
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.resample = resample
        self.channels = channels
        self.normalize = normalize
        self.samplerate = samplerate
        self.segment = segment
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.skip_scales = nn.ModuleList()

        in_channels = audio_channels
        for index in range(depth):
            layer = _LayerPlan(
                index=index, chin=in_channels, channels=channels,
                chout=in_channels if index > 0 else len(sources) * audio_channels,
                norm=index >= norm_starts, norm_groups=norm_groups, gelu=gelu, glu=glu,
                kernel_size=kernel_size, stride=stride, context=context, rewrite=rewrite,
                dconv_mode=dconv_mode,
                dconv_kw=dict(depth=dconv_depth, init=dconv_init, compress=dconv_comp,
                              attn=index >= dconv_attn, lstm=index >= dconv_lstm))
            self.encoder.append(layer.encoder())
            self.decoder.insert(0, layer.decoder())
            in_channels = channels
            channels = int(growth * channels)

        self.lstm = BLSTM(in_channels, lstm_layers) if lstm_layers else None

        if rescale:
            rescale_module(self, reference=rescale)

    def valid_length(self, length: int) -> int:
        """Smallest input length >= `length` that the strided convolutions process without loss.

        The input is centre padded to this length in `forward`, and the output trimmed back.
        """
        if self.resample:
            length *= 2
        for _ in range(self.depth):
            length = max(1, math.ceil((length - self.kernel_size) / self.stride) + 1)
        for _ in range(self.depth):
            length = (length - 1) * self.stride + self.kernel_size
        if self.resample:
            length = math.ceil(length / 2)
        return int(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        length = int(mix.shape[-1])  # an int also when traced for ONNX, where shapes are tensors
        x = mix
        mean: tp.Union[float, torch.Tensor] = 0.
        std: tp.Union[float, torch.Tensor] = 1.
        if self.normalize:
            mono = mix.mean(dim=1, keepdim=True)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True)
            x = (x - mean) / (1e-5 + std)

        delta = self.valid_length(length) - length
        x = F.pad(x, (delta // 2, delta - delta // 2))
        if self.resample:
            x = julius.resample_frac(x, 1, 2)

        skips = []
        for encode in self.encoder:
            x = encode(x)
            skips.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            skip = center_trim(skips.pop(-1), x)
            x = decode(x + skip)

        if self.resample:
            x = julius.resample_frac(x, 2, 1)
        x = x * std + mean
        x = center_trim(x, length)
        return x.view(x.size(0), len(self.sources), self.audio_channels, x.size(-1))

    def load_state_dict(self, state: tp.Mapping[str, tp.Any], strict: bool = True, **kwargs):
        """Load `state`, first renaming the keys of Demucs 2.0 checkpoints.

        In 2.0 the layer after the activation sat at index 2 of each encoder/decoder Sequential;
        it is at index 3 now, so `{encoder,decoder}.i.2.{weight,bias}` become `....3....` when the
        new key is absent.
        """
        state = dict(state)
        for index in range(self.depth):
            for part in ["encoder", "decoder"]:
                for name in ["bias", "weight"]:
                    old, new = f"{part}.{index}.2.{name}", f"{part}.{index}.3.{name}"
                    if old in state and new not in state:
                        state[new] = state.pop(old)
        return super().load_state_dict(state, strict=strict, **kwargs)


class _LayerPlan:
    """Builds the encoder and decoder Sequential of one Demucs depth level.

    Norms that are disabled are Identity modules so that the indices (hence state_dict keys) of
    the following modules do not depend on `norm_starts`.
    """

    def __init__(self, index: int, chin: int, channels: int, chout: int, norm: bool,
                 norm_groups: int, gelu: bool, glu: bool, kernel_size: int, stride: int,
                 context: int, rewrite: bool, dconv_mode: int, dconv_kw: dict):
        self.index = index
        self.chin = chin
        self.channels = channels
        self.chout = chout
        self.norm = norm
        self.norm_groups = norm_groups
        self.gelu = gelu
        self.glu = glu
        self.kernel_size = kernel_size
        self.stride = stride
        self.context = context
        self.rewrite = rewrite
        self.dconv_mode = dconv_mode
        self.dconv_kw = dconv_kw

    def _norm(self, dim: int) -> nn.Module:
        return nn.GroupNorm(self.norm_groups, dim) if self.norm else nn.Identity()

    def _act(self) -> nn.Module:
        return nn.GELU() if self.gelu else nn.ReLU()

    def _rewrite(self, kernel_size: int, padding: int) -> tp.List[nn.Module]:
        """Conv (doubling the channels with GLU), norm, then GLU or ReLU."""
        scale = 2 if self.glu else 1
        return [
            nn.Conv1d(self.channels, scale * self.channels, kernel_size, padding=padding),
            self._norm(scale * self.channels),
            nn.GLU(dim=1) if self.glu else nn.ReLU(),
        ]

    def _dconv(self) -> nn.Module:
        return DConv(self.channels, **self.dconv_kw)

    def encoder(self) -> nn.Sequential:
        mods = [nn.Conv1d(self.chin, self.channels, self.kernel_size, self.stride),
                self._norm(self.channels), self._act()]
        if self.dconv_mode & 1:
            mods.append(self._dconv())
        if self.rewrite:
            mods += self._rewrite(1, 0)
        return nn.Sequential(*mods)

    def decoder(self) -> nn.Sequential:
        mods: tp.List[nn.Module] = []
        if self.rewrite:
            mods += self._rewrite(2 * self.context + 1, self.context)
        if self.dconv_mode & 2:
            mods.append(self._dconv())
        mods.append(nn.ConvTranspose1d(self.channels, self.chout, self.kernel_size, self.stride))
        if self.index > 0:
            mods += [self._norm(self.chout), self._act()]
        return nn.Sequential(*mods)
