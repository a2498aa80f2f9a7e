"""demucs.lora: adapters start at the base model, only they train, merging gives a plain model."""
import copy

import pytest
import torch

from demucs.demucs import Demucs
from demucs.htdemucs import HTDemucs
from demucs.lora import add_adapters, has_adapters, merge_adapters

torch.set_num_threads(1)
SOURCES = ["drums", "bass", "other", "vocals"]


def _tiny(seed: int = 0) -> HTDemucs:
    torch.manual_seed(seed)
    return HTDemucs(SOURCES, channels=8, nfft=256, depth=3, t_layers=2, t_heads=2,
                    bottom_channels=8, samplerate=8000, segment=0.25,
                    t_layer_scale=False)  # no 1e-4 layer scale hiding the transformer's change


def _mix() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 2, 2000)


def _separate(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_mix())


def _train_adapters(model: torch.nn.Module, steps: int = 3) -> None:
    """A few Adam steps on the trainable parameters, towards a random target."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    torch.manual_seed(3)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(_mix()) - 0.1).abs().mean().backward()
        optimizer.step()


def test_adapted_model_starts_equal_to_the_base():
    base = _separate(_tiny())
    model = _tiny()
    add_adapters(model, rank=4, targets=["linear", "attention", "conv"])
    assert torch.equal(_separate(model), base)


def test_only_adapters_train_and_base_weights_stay():
    model = _tiny()
    frozen = {name: value.clone() for name, value in model.state_dict().items()}
    adapted = add_adapters(model, rank=2, alpha=4)
    assert "crosstransformer.layers.0.self_attn.in_proj_weight" in adapted
    assert "crosstransformer.layers.0.self_attn.out_proj.weight" in adapted
    assert "crosstransformer.layers.0.linear1.weight" in adapted
    assert not any(name.startswith(("encoder", "decoder")) for name in adapted)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.endswith(("lora_a", "lora_b")) for name in trainable)
    base = _separate(model)
    _train_adapters(model)
    assert (_separate(model) - base).abs().max() > 1e-4
    merged = merge_adapters(model).state_dict()
    for key in frozen:
        original = key.replace(".weight", ".parametrizations.weight.original").replace(
            ".in_proj_weight", ".parametrizations.in_proj_weight.original")
        stored = model.state_dict().get(original, model.state_dict().get(key))
        assert torch.equal(stored, frozen[key]), key
        assert merged[key].shape == frozen[key].shape


@pytest.mark.parametrize("targets", [["linear", "attention"], ["linear", "attention", "conv"]])
def test_merged_model_is_plain_and_separates_like_the_adapted_one(targets):
    model = _tiny()
    add_adapters(model, rank=4, alpha=8, targets=targets)
    _train_adapters(model)
    adapted = _separate(model)
    assert (adapted - _separate(_tiny())).abs().max() > 1e-4  # so that 1e-5 below means something
    rng = torch.get_rng_state()
    merged = merge_adapters(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(merged) is HTDemucs and not has_adapters(merged) and has_adapters(model)
    fresh = _tiny(seed=5)
    fresh.load_state_dict(merged.state_dict())  # strict: the original names, nothing else
    assert torch.allclose(_separate(fresh), adapted, atol=1e-5, rtol=0)
    assert torch.equal(_separate(model), adapted)  # the adapted model still works


def test_merging_a_copy_leaves_the_original_working():
    """torch's in-place removal of a parametrization would break the deep copies of a model."""
    model = _tiny()
    add_adapters(model, rank=2, targets=["linear", "conv"])
    before = _separate(model)
    merge_adapters(copy.deepcopy(model))
    assert torch.equal(_separate(model), before)


def test_adapted_state_reloads_into_an_adapted_model():
    """What a training checkpoint holds (adapter names) resumes into a fresh adapted model."""
    model = _tiny()
    add_adapters(model, rank=2)
    _train_adapters(model, steps=1)
    resumed = _tiny(seed=7)
    add_adapters(resumed, rank=2)
    resumed.load_state_dict(model.state_dict())
    assert has_adapters(resumed)
    assert torch.equal(_separate(resumed), _separate(model))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rank must be at least 1"):
        add_adapters(_tiny(), rank=0)
    with pytest.raises(ValueError, match=r"LoRA targets \['lstm'\]: choose among"):
        add_adapters(_tiny(), rank=2, targets=["lstm"])
    with pytest.raises(ValueError, match="Demucs has no layer of the kinds"):
        add_adapters(Demucs(SOURCES, channels=4, depth=2), rank=2, targets=["linear"])
