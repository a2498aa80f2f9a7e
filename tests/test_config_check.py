"""demucs.config_check: the checks a training config goes through before `dora run` starts."""
from omegaconf import OmegaConf
import pytest

from demucs.config_check import ConfigError, check_config, quiet_hydra

BASE = OmegaConf.create({
    "epochs": 360, "batch_size": 64, "seed": 42, "model": "demucs", "weights": [1., 1.],
    "optim": {"lr": 3e-4, "amp": None}, "augment": {"flip": True, "scale": {"proba": 1.0}},
    "dset": {"wav": None, "segment": 11, "shift": 1}})
MODELS = ["demucs", "htdemucs"]


def _with(**changes) -> OmegaConf:
    cfg = OmegaConf.create(OmegaConf.to_container(BASE))
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def test_defaults_and_compatible_values_pass():
    check_config(BASE, BASE, MODELS)
    check_config(_with(dset__segment=7.8, dset__wav="/data", optim__amp="bf16",
                       model="htdemucs", seed=-3), BASE, MODELS)


@pytest.mark.parametrize("changes,message", [
    (dict(epochs="abc"), "epochs='abc' must be a number (default: 360)"),
    (dict(augment__flip="yes"), "augment.flip='yes' must be true or false"),
    (dict(weights=1), "weights=1 must be a list"),
    (dict(model="transformer"), "model=transformer is not a model: use one of demucs, htdemucs"),
    (dict(batch_size=0), "batch_size=0 must be at least 1"),
    (dict(epochs=1.5), "epochs=1.5 must be a whole number"),
    (dict(optim__lr=0.0), "optim.lr=0.0 must be a finite number greater than 0"),
    (dict(optim__lr=float("nan")), "optim.lr=nan must be a finite number"),
    (dict(dset__shift=-1), "dset.shift=-1 must be a finite number at least 0"),
    (dict(augment__scale__proba=1.5), "augment.scale.proba=1.5 must be a probability"),
])
def test_each_problem_is_named(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(_with(**changes), BASE, MODELS)


def test_every_problem_at_once():
    with pytest.raises(ConfigError) as error:
        check_config(_with(epochs="x", batch_size=-1, model="nope"), BASE, MODELS)
    assert str(error.value).count("; ") == 2


def test_quiet_hydra_hides_only_hydra_notices():
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_hydra():
            warnings.warn("version_base=1.1 selects Hydra 1.1 compatibility", UserWarning)
            warnings.warn("Future Hydra versions will no longer change working directory at job "
                          "runtime by default.", UserWarning)
            warnings.warn("something else", UserWarning)
    assert [str(warning.message) for warning in caught] == ["something else"]


@pytest.mark.parametrize("weights,sources", [([1., 1., 1.], ["drums", "bass", "other", "vocals"]),
                                             ([1., 1., 1., 1.], ["drums", "bass"])])
def test_weights_must_give_one_weight_per_source(weights, sources):
    """Issue 30: a `weights` list of another length than `dset.sources` stopped the first batch
    with a tensor size traceback; it is now a config error naming both keys."""
    cfg = _with(weights=weights, dset__sources=sources)
    with pytest.raises(ConfigError) as error:
        check_config(cfg, BASE, MODELS)
    ones = ",".join(["1"] * len(sources))
    assert str(error.value) == (
        f"weights={weights} has {len(weights)} value(s) but dset.sources=[{','.join(sources)}] "
        f"has {len(sources)} stem(s): give one loss weight per stem, e.g. weights=[{ones}]")
    check_config(_with(weights=[1.] * len(sources), dset__sources=sources), BASE, MODELS)
