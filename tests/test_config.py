"""The Hydra config: every upstream key with its upstream default, and the svd/variant groups.

Dora signatures hash the overrides that differ from these defaults, so a changed default would
silently give the published signatures another meaning: these values are pinned on purpose.
"""
from pathlib import Path
import typing as tp
import warnings

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
import pytest

CONF = Path(__file__).resolve().parent.parent / "conf"

EXPECTED_DEFAULTS: tp.Dict[str, tp.Any] = {
    "dummy": None,
    "dset": {
        "musdb": "/checkpoint/defossez/datasets/musdbhq", "musdb_samplerate": 44100,
        "use_musdb": True, "wav": None, "wav2": None, "segment": 11, "shift": 1,
        "train_valid": False, "full_cv": True, "samplerate": 44100, "channels": 2,
        "normalize": True, "metadata": "./metadata",
        "sources": ["drums", "bass", "other", "vocals"], "valid_samples": None, "backend": None,
    },
    "test": {
        "save": False, "best": True, "workers": 2, "every": 20, "split": True, "shifts": 1,
        "overlap": 0.25, "sdr": True, "metric": "loss", "nonhq": None,
    },
    "epochs": 360, "batch_size": 64, "max_batches": None,
    "optim": {
        "lr": 3e-4, "momentum": 0.9, "beta2": 0.999, "loss": "l1", "optim": "adam",
        "weight_decay": 0, "clip_grad": 0,
    },
    "seed": 42, "debug": False, "valid_apply": True, "flag": None, "save_every": None,
    "weights": [1.0, 1.0, 1.0, 1.0],
    "augment": {
        "shift_same": False, "repitch": {"proba": 0.2, "max_tempo": 12},
        "remix": {"proba": 1, "group_size": 4},
        "scale": {"proba": 1, "min": 0.25, "max": 1.25}, "flip": True,
    },
    "continue_from": None, "continue_pretrained": None, "pretrained_repo": None,
    "continue_best": True, "continue_opt": False,
    "misc": {"num_workers": 10, "num_prints": 4, "show": False, "verbose": False},
    "ema": {"epoch": [], "batch": []},
    "use_train_segment": True, "model_segment": None, "model": "demucs",
    "demucs": {
        "channels": 64, "growth": 2, "depth": 6, "rewrite": True, "lstm_layers": 0,
        "kernel_size": 8, "stride": 4, "context": 1, "gelu": True, "glu": True,
        "norm_groups": 4, "norm_starts": 4, "dconv_depth": 2, "dconv_mode": 1, "dconv_comp": 4,
        "dconv_attn": 4, "dconv_lstm": 4, "dconv_init": 1e-4, "resample": True,
        "normalize": False, "rescale": 0.1,
    },
    "hdemucs": {
        "channels": 48, "channels_time": None, "growth": 2, "nfft": 4096, "wiener_iters": 0,
        "end_iters": 0, "wiener_residual": False, "cac": True, "depth": 6, "rewrite": True,
        "hybrid": True, "hybrid_old": False, "multi_freqs": [], "multi_freqs_depth": 3,
        "freq_emb": 0.2, "emb_scale": 10, "emb_smooth": True, "kernel_size": 8, "stride": 4,
        "time_stride": 2, "context": 1, "context_enc": 0, "norm_starts": 4, "norm_groups": 4,
        "dconv_mode": 1, "dconv_depth": 2, "dconv_comp": 4, "dconv_attn": 4, "dconv_lstm": 4,
        "dconv_init": 1e-3, "rescale": 0.1,
    },
    "torch_hdemucs": {
        "channels": 48, "growth": 2, "nfft": 4096, "depth": 6, "freq_emb": 0.2,
        "emb_scale": 10, "emb_smooth": True, "kernel_size": 8, "stride": 4, "time_stride": 2,
        "context": 1, "context_enc": 0, "norm_starts": 4, "norm_groups": 4, "dconv_depth": 2,
        "dconv_comp": 4, "dconv_attn": 4, "dconv_lstm": 4, "dconv_init": 1e-3,
    },
    "htdemucs": {
        "channels": 48, "channels_time": None, "growth": 2, "nfft": 4096, "wiener_iters": 0,
        "end_iters": 0, "wiener_residual": False, "cac": True, "depth": 4, "rewrite": True,
        "multi_freqs": [], "multi_freqs_depth": 3, "freq_emb": 0.2, "emb_scale": 10,
        "emb_smooth": True, "kernel_size": 8, "stride": 4, "time_stride": 2, "context": 1,
        "context_enc": 0, "norm_starts": 4, "norm_groups": 4, "dconv_mode": 1,
        "dconv_depth": 2, "dconv_comp": 8, "dconv_init": 1e-3, "bottom_channels": 0,
        "t_layers": 5, "t_hidden_scale": 4.0, "t_heads": 8, "t_dropout": 0.0,
        "t_layer_scale": True, "t_gelu": True, "t_emb": "sin", "t_max_positions": 10000,
        "t_max_period": 10000.0, "t_weight_pos_embed": 1.0, "t_cape_mean_normalize": True,
        "t_cape_augment": True, "t_cape_glob_loc_scale": [5000.0, 1.0, 1.4],
        "t_sin_random_shift": 0, "t_norm_in": True, "t_norm_in_group": False,
        "t_group_norm": False, "t_norm_first": True, "t_norm_out": True,
        "t_weight_decay": 0.0, "t_lr": None, "t_sparse_self_attn": False,
        "t_sparse_cross_attn": False, "t_mask_type": "diag", "t_mask_random_seed": 42,
        "t_sparse_attn_window": 400, "t_global_window": 100, "t_sparsity": 0.95,
        "t_auto_sparsity": False, "t_cross_first": False, "rescale": 0.1,
    },
    "svd": {
        "penalty": 0, "min_size": 0.1, "dim": 1, "niters": 2, "powm": False, "proba": 1,
        "conv_only": False, "convtr": False, "bs": 1,
    },
    "quant": {"diffq": None, "qat": None, "min_size": 0.2, "group_size": 8},
    "dora": {"dir": "outputs",
             "exclude": ["misc.*", "slurm.*", "test.reval", "flag", "dset.backend"]},
}
# Keys this project adds to upstream's config. Their defaults keep upstream's behaviour, so the
# signatures of upstream XPs (which never override them) are unchanged.
ADDED_DEFAULTS: tp.Dict[str, tp.Any] = {
    "optim.skip_nonfinite": False,  # skip non-finite batches instead of stopping (docs/reliability)
    "optim.amp": None,  # opt-in bf16 training forward (docs/performance)
    "misc.compile": False,  # opt-in torch.compile of the trained model (docs/performance)
    "misc.tensorboard": True,  # TensorBoard events of every XP (excluded from signatures)
    "misc.wandb": False,  # opt-in Weights & Biases logging
    "misc.wandb_project": "demucs",
    "dset.valid_tracks": None,  # validation songs of a MusDB-layout folder (None: MusDB's 14)
    "augment.repitch.keep_level": False,  # opt-in: repitch without clipping loud examples
    "augment.codec.proba": 0,  # opt-in mp3 round trip of the stems
    "augment.codec.bitrates": [64, 96, 128, 192, 320],
    "augment.eq.proba": 0,  # opt-in random 3-band equalisation of the stems
    "augment.eq.max_db": 6,
    "optim.freeze": [],  # fine-tuning (issue 28): parameter patterns left untrained
    "continue_sources_init": None,  # new stems' initial source with continue_pretrained
    "lora.rank": 0,  # low-rank adapters, off
    "lora.alpha": None,
    "lora.targets": ["linear", "attention"],
}
# Top-level sections among ADDED_DEFAULTS.
ADDED_SECTIONS = {"continue_sources_init", "lora"}
# Keys whose values a signature never depends on (dora.exclude), checked for presence only.
UNHASHED_SECTIONS = {"slurm": {"time", "constraint", "setup"}, "hydra": {"job_logging"}}

EXPECTED_GROUPS = {
    "svd/default.yaml": {},
    "svd/base.yaml": {
        "svd": {"penalty": 0, "min_size": 1, "dim": 50, "niters": 4, "powm": False, "proba": 1,
                "conv_only": False, "convtr": False},
        "optim": {"beta2": 0.9998},
    },
    "svd/base2.yaml": {
        "svd": {"penalty": 0, "min_size": 1, "dim": 100, "niters": 4, "powm": False,
                "proba": 1, "conv_only": False, "convtr": True},
        "optim": {"beta2": 0.9998},
    },
    "variant/default.yaml": {},
    "variant/example.yaml": {"model": "hdemucs", "hdemucs": {"channels": 32}},
    "variant/finetune.yaml": {
        "epochs": 4, "batch_size": 16, "optim": {"lr": 0.0006},
        "test": {"every": 1, "sdr": False}, "dset": {"segment": 28, "shift": 2},
        "augment": {"scale": {"proba": 0}, "shift_same": True, "remix": {"proba": 0}},
    },
}


def _flatten(tree: dict, prefix: str = "") -> tp.Dict[str, tp.Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _typed(value: tp.Any) -> tp.Any:
    """Value with its type, so that 1 and 1.0 (different signatures once overridden) differ."""
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


def _load(relative: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / relative))


@pytest.fixture(scope="module")
def base_config() -> dict:
    config = _load("config.yaml")
    config.pop("defaults")
    return config


def test_every_upstream_key_has_the_upstream_default(base_config):
    actual = _flatten({key: base_config[key] for key in [*EXPECTED_DEFAULTS, *ADDED_SECTIONS]})
    expected = {**_flatten(EXPECTED_DEFAULTS), **ADDED_DEFAULTS}
    assert sorted(actual) == sorted(expected)
    wrong = {key: (actual[key], value) for key, value in expected.items()
             if _typed(actual[key]) != _typed(value)}
    assert not wrong, f"(actual, expected) defaults differ: {wrong}"


def test_no_key_beyond_upstream(base_config):
    extra = set(base_config) - set(EXPECTED_DEFAULTS) - set(UNHASHED_SECTIONS) - ADDED_SECTIONS
    assert not extra, f"keys not in upstream's config: {extra}"
    for section, keys in UNHASHED_SECTIONS.items():
        assert set(base_config[section]) == keys


def test_defaults_list_and_logging():
    defaults = _load("config.yaml")["defaults"]
    assert defaults == ["_self_", {"dset": "musdb44"}, {"svd": "default"},
                        {"variant": "default"}, {"override hydra/hydra_logging": "colorlog"},
                        {"override hydra/job_logging": "colorlog"}]
    formatter = _load("config.yaml")["hydra"]["job_logging"]["formatters"]["colorlog"]
    assert formatter == {"datefmt": "%m-%d %H:%M:%S"}


@pytest.mark.parametrize("relative", sorted(EXPECTED_GROUPS))
def test_group_file(relative):
    text = (CONF / relative).read_text()
    assert text.startswith("# @package _global_\n"), f"{relative} must be a global package"
    content = OmegaConf.to_container(OmegaConf.load(CONF / relative)) or {}
    expected = EXPECTED_GROUPS[relative]
    assert {k: _typed(v) for k, v in _flatten(content).items()} == \
        {k: _typed(v) for k, v in _flatten(expected).items()}


def test_composition_applies_groups_over_defaults():
    """`variant=finetune svd=base2` composes (needs the dset group files as well)."""
    if not (CONF / "dset" / "musdb44.yaml").exists():
        pytest.skip("conf/dset/musdb44.yaml (the default dataset group) is not there yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(str(CONF), version_base="1.1"):
            config = compose("config", ["variant=finetune", "svd=base2", "svd.penalty=1e-5"])
    assert config.epochs == 4 and config.dset.segment == 28 and config.dset.shift == 2
    assert config.augment.remix.proba == 0 and config.augment.shift_same is True
    assert config.svd.dim == 100 and config.svd.convtr is True and config.svd.penalty == 1e-5
    assert config.svd.bs == 1  # untouched keys keep their base default
    assert config.optim.beta2 == 0.9998 and config.optim.lr == 0.0006
