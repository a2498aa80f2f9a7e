"""demucs.finetune: output heads remapped by source name, architecture conflicts, freezing."""
import typing as tp

import pytest
import torch
from torch import nn

from demucs import finetune, states
from demucs.demucs import Demucs
from demucs.finetune import (Conflict, SourceRemapError, architecture_conflicts,
                             freeze_parameters, output_heads, plan_sources, remap_package,
                             remap_sources)
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs

torch.set_num_threads(1)
FOUR = ["drums", "bass", "other", "vocals"]
SIX = ["drums", "bass", "guitar", "piano", "other", "vocals"]
SR = 8000
FAMILIES: tp.Dict[str, tp.Callable[..., nn.Module]] = {
    "demucs": lambda sources, **kw: Demucs(
        sources, **dict(dict(channels=4, depth=2, lstm_layers=1, samplerate=SR, segment=1), **kw)),
    "hdemucs": lambda sources, **kw: HDemucs(
        sources, **dict(dict(channels=4, nfft=256, depth=4, samplerate=SR, segment=1), **kw)),
    "hdemucs_multi_freqs": lambda sources, **kw: HDemucs(
        sources, **dict(dict(channels=4, nfft=256, depth=3, multi_freqs=[0.5],
                             multi_freqs_depth=1, samplerate=SR, segment=1), **kw)),
    "htdemucs": lambda sources, **kw: HTDemucs(
        sources, **dict(dict(channels=8, nfft=256, depth=3, t_layers=1, t_heads=1,
                             bottom_channels=8, samplerate=SR, segment=0.25), **kw)),
}


def _model(family: str, sources: tp.List[str], seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family](sources, **kwargs).eval()


def _separate(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mix = torch.randn(2, 2, 1800)
    with torch.no_grad():
        out = model(mix)
    return dict(zip(model.sources, out.unbind(1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_same_sources_in_another_order_give_the_same_stems(family: str):
    base = _model(family, FOUR)
    shuffled = ["vocals", "drums", "other", "bass"]
    model, plan = remap_sources(base, shuffled)
    assert type(model) is type(base) and model.sources == shuffled
    assert (plan.kept, plan.created, plan.dropped) == (shuffled, {}, [])
    before, after = _separate(base), _separate(model.eval())
    for name in FOUR:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_four_to_six_sources_copy_new_stems_from_other(family: str):
    base = _model(family, FOUR)
    model, plan = remap_sources(base, SIX, {"guitar": "other", "piano": "other"})
    assert plan.created == {"guitar": "other", "piano": "other"} and plan.dropped == []
    before, after = _separate(base), _separate(model.eval())
    for name in FOUR:
        assert torch.equal(after[name], before[name]), name
    for name in ["guitar", "piano"]:
        assert torch.equal(after[name], before["other"]), name
    assert "created: guitar (from other), piano (from other)" in plan.describe()


@pytest.mark.parametrize("family", FAMILIES)
def test_six_to_two_sources_keep_their_stems(family: str):
    base = _model(family, SIX)
    model, plan = remap_sources(base, ["vocals", "piano"])
    assert plan.dropped == ["drums", "bass", "guitar", "other"]
    before, after = _separate(base), _separate(model.eval())
    for name in ["vocals", "piano"]:
        assert torch.equal(after[name], before[name]), name
    # Only the heads were cut: every other tensor is the checkpoint's.
    heads = {f"{head.name}.{kind}" for head in output_heads(base) for kind in ["weight", "bias"]}
    for key, value in model.state_dict().items():
        if key not in heads:
            assert torch.equal(value, base.state_dict()[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_are_exactly_the_tensors_sized_by_the_sources(family: str):
    """What the remapping copies is what changes size with the number of sources."""
    four, six = _model(family, FOUR).state_dict(), _model(family, SIX).state_dict()
    assert four.keys() == six.keys()
    resized = {key for key in four if four[key].shape != six[key].shape}
    heads = {f"{head.name}.{kind}" for head in output_heads(_model(family, FOUR))
             for kind in ["weight", "bias"]}
    assert resized == heads


def test_heads_of_each_family():
    assert output_heads(_model("demucs", FOUR)) == [finetune.OutputHead("decoder.1.3", 2)]
    assert output_heads(_model("hdemucs", FOUR)) == [
        finetune.OutputHead("decoder.3.conv_tr", 4), finetune.OutputHead("tdecoder.2.conv_tr", 2)]
    assert output_heads(_model("hdemucs", FOUR, cac=False, hybrid=False)) == [
        finetune.OutputHead("decoder.3.conv_tr", 2)]
    assert [head.name for head in output_heads(_model("hdemucs_multi_freqs", FOUR))] == [
        "decoder.2.layers.0.conv_tr", "decoder.2.layers.1.conv_tr", "tdecoder.2.conv_tr"]


def test_other_model_classes_are_refused():
    with pytest.raises(SourceRemapError, match="cannot remap the sources of a Linear"):
        output_heads(nn.Linear(2, 2))


def test_a_normalised_output_layer_is_refused():
    with pytest.raises(SourceRemapError, match="decoder.3 normalises its output"):
        output_heads(_model("hdemucs", FOUR, norm_starts=0))


def test_package_remapping_keeps_class_and_kwargs():
    base = _model("htdemucs", FOUR)
    package = states.serialize_model(base, None, half=True)
    model, _ = remap_package(package, SIX)
    assert (list(model._init_args_kwargs[0]), model._init_args_kwargs[1]) == (
        [SIX], package["kwargs"])
    by_name = dict(package, args=[], kwargs=dict(package["kwargs"], sources=FOUR))
    model, _ = remap_package(by_name, SIX)
    assert model._init_args_kwargs == ((), dict(package["kwargs"], sources=SIX))
    # A remapped model is packaged and reloaded like any other.
    reloaded = states.load_model(states.serialize_model(model, None, half=False))
    assert reloaded.sources == SIX


def test_only_training_settings_follow_the_caller():
    """The segment and the transformer's training-only settings may change; an argument that
    shapes the weights may not (it would not fit the checkpoint's)."""
    base = _model("htdemucs", FOUR)
    model, _ = remap_sources(base, SIX, changes={"segment": 2, "t_dropout": 0.1})
    assert model.segment == 2 and model._init_args_kwargs[1]["t_dropout"] == 0.1
    assert model._init_args_kwargs[1]["channels"] == 8
    with pytest.raises(SourceRemapError, match=r"not \['channels'\]: these shape"):
        remap_sources(base, SIX, changes={"channels": 16})


def test_default_init_is_other_and_errors_name_the_sources():
    plan = plan_sources(FOUR, ["piano", "vocals"])
    assert plan.origins == {"piano": "other", "vocals": "vocals"}
    with pytest.raises(SourceRemapError, match=r"new source 'piano'.*has no 'other'.*"
                                               r"drums, bass, vocals"):
        plan_sources(["drums", "bass", "vocals"], ["piano"])
    with pytest.raises(SourceRemapError, match="from 'keys', which the checkpoint does not"):
        plan_sources(FOUR, ["piano"], {"piano": "keys"})
    with pytest.raises(SourceRemapError, match="names 'guitar', which is not one of"):
        plan_sources(FOUR, ["piano"], {"guitar": "other"})
    with pytest.raises(SourceRemapError, match="names 'bass', which the checkpoint has"):
        plan_sources(FOUR, ["bass"], {"bass": "other"})
    with pytest.raises(SourceRemapError, match="repeated: bass"):
        plan_sources(FOUR, ["bass", "bass"])


def test_conflicts_list_contradicting_settings_only():
    kwargs = {"sources": FOUR, "channels": 8, "t_cape_glob_loc_scale": (5000.0, 1.0, 1.4),
              "segment": 10}
    requested = {"channels": 16, "depth": 4, "t_cape_glob_loc_scale": [5000.0, 1.0, 1.4],
                 "segment": 7.8, "t_dropout": 0.1, "nfft": 2048, "not_an_argument": 1}
    # depth 4 is HTDemucs's default (not stored), nfft 2048 is not; segment/dropout are free.
    assert architecture_conflicts(HTDemucs, kwargs, requested) == [
        Conflict("channels", 8, 16), Conflict("nfft", 4096, 2048)]
    assert architecture_conflicts(HTDemucs, kwargs, {}) == []
    assert Conflict("channels", 8, 16).describe() == "channels: checkpoint 8, config 16"


def test_freezing_leaves_frozen_weights_bit_unchanged():
    model = _model("htdemucs", FOUR).train()
    report = freeze_parameters(model, ["encoder.*", "crosstransformer.*"])
    frozen = {name: param.detach().clone() for name, param in model.named_parameters()
              if not param.requires_grad}
    assert set(frozen) == set(report.frozen) and frozen
    assert all(name.startswith(("encoder.", "crosstransformer.")) for name in frozen)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == report.total - sum(v.numel() for v in frozen.values())
    trainable = [param for param in model.parameters() if param.requires_grad]
    before = [param.detach().clone() for param in trainable]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    torch.manual_seed(2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 2, 2000)).square().mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(old, new) for old, new in zip(before, trainable))
    assert "trainable weights:" in report.describe()


def test_a_pattern_matching_nothing_is_refused_with_close_names():
    model = _model("htdemucs", FOUR)
    with pytest.raises(ValueError, match=r"'encoders\.\*' matches no parameter of HTDemucs; "
                                         r"close names: encoder\.\*"):
        freeze_parameters(model, ["encoder.0.*", "encoders.*"])
    assert all(param.requires_grad for param in model.parameters())
