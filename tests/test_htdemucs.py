"""HTDemucs: structure and checkpoint compatibility, forward/backward, use_train_segment rules."""
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.transformer import CrossTransformerEncoder

SOURCES = ["drums", "bass", "other", "vocals"]
SR = 8000
OFFICIAL_KEYS = Path(__file__).resolve().parent.parent.parent / "shared" / "spec" / \
    "official_state_dict_keys.txt"
RELEASED = dict(dconv_mode=3, depth=4, t_layers=5, bottom_channels=512, t_dropout=0.02)


def tiny(**kwargs) -> HTDemucs:
    """A small HTDemucs on 0.25 s of 8 kHz audio, with the released layer plan (4 frequency
    layers down to 8 bins, 4 time layers, transformer between both bottlenecks)."""
    torch.manual_seed(0)
    base = dict(channels=8, nfft=4096, depth=4, t_layers=2, t_heads=2, bottom_channels=16,
                dconv_mode=3, samplerate=SR, segment=0.25)
    base.update(kwargs)
    return HTDemucs(SOURCES, **base)


def mix(length: int = 2000, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, length, generator=torch.Generator().manual_seed(1))


def test_released_config_parameters_and_keys():
    model = HTDemucs(SOURCES, **RELEASED)
    assert sum(p.numel() for p in model.parameters()) == 41_984_456
    ours = [f"{key} {tuple(value.shape)}" for key, value in model.state_dict().items()]
    if not OFFICIAL_KEYS.exists():
        pytest.skip(f"official key list not found at {OFFICIAL_KEYS}")
    section = OFFICIAL_KEYS.read_text().split("# htdemucs_mmi")[1].split("\n#")[0]
    official = [line for line in section.splitlines()[1:] if line.strip()]
    assert ours == official


def test_children_order_and_shapes():
    model = tiny()
    names = [name for name, _ in model.named_children()]
    assert names == ["encoder", "decoder", "tencoder", "tdecoder", "freq_emb",
                     "channel_upsampler", "channel_downsampler", "channel_upsampler_t",
                     "channel_downsampler_t", "crosstransformer"]
    assert not any(layer.empty for layer in model.tencoder)
    assert model.channel_upsampler.in_channels == 64
    assert model.crosstransformer.layers[0].self_attn.embed_dim == 16


def test_branches_merging_before_the_transformer():
    # nfft 1024: the 4th layer collapses the last 8 bins, its time twin is a bare conv injected
    # into it, and the time decoder restarts from the frequency decoder.
    model = tiny(nfft=1024).eval()
    assert model.tencoder[3].empty and model.tdecoder[0].empty
    with torch.no_grad():
        assert model(mix()).shape == (1, 4, 2, 2000)


def test_unets_follow_the_hdemucs_layer_plan():
    # Both models build their U-Nets with the shared plan: without transformer (and with HDemucs'
    # DConv attention/LSTM starting past the last layer) they hold the same modules, created in the
    # same order, so the same seed gives the same weights, MultiWrap replicas included.
    options = dict(channels=8, nfft=1024, depth=4, dconv_mode=3, dconv_comp=8, dconv_init=1e-3,
                   multi_freqs=[0.5], multi_freqs_depth=2)
    torch.manual_seed(0)
    htdemucs = HTDemucs(SOURCES, t_layers=0, **options).state_dict()
    torch.manual_seed(0)
    hdemucs = HDemucs(SOURCES, dconv_attn=4, dconv_lstm=4, **options).state_dict()
    assert list(htdemucs) == list(hdemucs)
    assert all(torch.equal(htdemucs[key], value) for key, value in hdemucs.items())


def test_no_transformer_without_layers():
    model = tiny(t_layers=0, bottom_channels=0)
    assert model.crosstransformer is None
    assert model.eval()(mix()).shape == (1, 4, 2, 2000)


@pytest.mark.parametrize("options", [
    {}, dict(bottom_channels=0, t_emb="cape", t_cross_first=True),
    dict(cac=False, wiener_iters=1, end_iters=1, t_norm_first=False, t_group_norm=1),
    dict(multi_freqs=[0.5], t_emb="scaled", t_norm_in=False, t_norm_in_group=1),
])
def test_forward_backward_train_mode(options):
    model = tiny(**options).train()
    x = mix(2000, batch=2)
    out = model(x)
    assert out.shape == (2, 4, 2, 2000)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    unused = {name for name, grad in grads.items() if grad is None}
    # post-norm cross layers do not use their third norm (as upstream)
    assert all(".norm3." in name for name in unused) and (not unused) == model_is_pre_norm(model)
    assert all(torch.isfinite(grad).all() for grad in grads.values() if grad is not None)
    assert any(float(p.grad.abs().sum()) > 0 for p in model.crosstransformer.parameters()
               if p.grad is not None)


def model_is_pre_norm(model: HTDemucs) -> bool:
    return model.crosstransformer.layers[0].norm_first


def test_training_records_segment_as_fraction():
    model = tiny().train()
    model(mix(1800))
    assert model.segment == Fraction(1800, SR) and isinstance(model.segment, Fraction)
    assert model.valid_length(1000) == 1800


def test_eval_pads_to_training_segment_and_crops():
    model = tiny(t_dropout=0.1).eval()
    assert model.valid_length(1500) == 2000
    x = mix(1500)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 500)))
    assert out.shape == (1, 4, 2, 1500)
    torch.testing.assert_close(out, padded[..., :1500])
    assert model.segment == 0.25  # evaluation does not change it


def test_eval_refuses_input_longer_than_segment():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"2001 samples.*2000 samples.*split"):
        model(mix(2001))


def test_without_train_segment_any_length_works():
    model = tiny(use_train_segment=False).eval()
    assert model.valid_length(5000) == 5000
    with torch.no_grad():
        assert model(mix(3000)).shape == (1, 4, 2, 3000)
    model.train()(mix(1000))
    assert model.segment == 0.25


def test_sparse_config_constructs_and_auto_sparsity_is_refused():
    model = tiny(t_sparse_self_attn=True, t_sparse_cross_attn=True, t_sparse_attn_window=2)
    assert "crosstransformer.layers.1.cross_attn.q.weight" in model.state_dict()
    assert model.eval()(mix()).shape == (1, 4, 2, 2000)
    auto = tiny(t_sparse_self_attn=True, t_auto_sparsity=True).eval()
    with pytest.raises(NotImplementedError, match="xformers"):
        auto(mix())


def test_make_optim_group_of_transformer():
    model = tiny(t_weight_decay=0.1, t_lr=1e-3)
    assert isinstance(model.crosstransformer, CrossTransformerEncoder)
    group = model.crosstransformer.make_optim_group()
    assert group["weight_decay"] == 0.1 and group["lr"] == 1e-3


def test_rejects_different_wiener_iterations():
    with pytest.raises(ValueError, match="wiener_iters == end_iters"):
        tiny(cac=False, wiener_iters=1, end_iters=0)


def test_golden_forward_matches_official(golden_dir):
    states = pytest.importorskip("demucs.states")
    case = golden_dir / "htdemucs_small"
    model = states.load_model(str(case / "model.th")).eval()
    io = torch.load(case / "io.pt", weights_only=True)
    with torch.no_grad():
        out = model(io["forward_mix"].clone())
    ref = io["forward_out"]
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


def test_package_round_trip_keeps_fraction_segment(tmp_path):
    states = pytest.importorskip("demucs.states")
    model = tiny(segment=Fraction(1, 4)).eval()
    path = tmp_path / "htdemucs.th"
    torch.save(states.serialize_model(model, {"name": "test"}, half=False), path)
    loaded = states.load_model(str(path)).eval()
    assert loaded.segment == Fraction(1, 4) and isinstance(loaded.segment, Fraction)
    with torch.no_grad():
        torch.testing.assert_close(loaded(mix(1900)), model(mix(1900)))
