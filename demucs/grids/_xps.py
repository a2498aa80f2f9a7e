"""The published MDX 2021 experiments, as override dicts keyed by their Dora signature.

The Track A and Track B models (and the XPs they were fine-tuned from) were trained in stages:
a first training, optionally continued on more data, then fine-tuned on automix data. Each XP
below is its parent's overrides updated with one stage, which gives the same config as the
published command lines (where a repeated key is resolved by its last value). The grids launch
these XPs from here, so they need neither a trained parent nor `outputs.tar.gz`.
"""
import typing as tp

from dora.main import DecoratedMain

Overrides = tp.Dict[str, tp.Any]

EMAS = {"ema.epoch": [0.9, 0.95], "ema.batch": [0.9995, 0.9999]}
SVD_BASE = {"svd": "base", "svd.penalty": 1e-05, "svd.dim": 100, "svd.convtr": True}

# First trainings on MusDB HQ.
TIME_DOMAIN = {
    "demucs.dconv_mode": 1, "test.split": True, "valid_apply": True, "demucs.gelu": True,
    "demucs.dconv_lstm": 4, "demucs.dconv_attn": 4, "demucs.normalize": True,
    "demucs.lstm_layers": 0, "demucs.norm_starts": 4, **EMAS, "demucs.channels": 64, "seed": 43,
    "demucs.rewrite": False, "demucs.norm_groups": 4, "svd": "base2", "svd.penalty": 1e-05,
    "optim.lr": 0.0005,
}
HYBRID = {
    "hdemucs.norm_starts": 999, "hdemucs.cac": False, "test.split": True, "valid_apply": True,
    "model": "hdemucs", "hdemucs.dconv_lstm": 4, **EMAS,
}
HYBRID_NORMS = {"hdemucs.norm_starts": 4, "hdemucs.norm_groups": 4}
HYBRID_CAC = {"hdemucs.hybrid": True, "hdemucs.cac": True}


def extra_test_stage(parent: str) -> Overrides:
    """Continue training `parent` (last state and optimizer) with the MusDB test set added."""
    return {"dset": "extra_test", "continue_best": False, "continue_opt": True,
            "continue_from": parent}


def automix_stage(parent: str, lr: float) -> Overrides:
    """Fine-tune the best state of `parent` on long excerpts of the MusDB automix set."""
    return {"continue_from": parent, **EMAS, "test.every": 1, "test.sdr": False, "epochs": 4,
            "dset.segment": 28, "dset.shift": 2, "batch_size": 16, "dset": "auto_mus",
            "augment.remix.proba": 0, "augment.scale.proba": 0, "augment.shift_same": True,
            "optim.lr": lr}


def automix_extra_stage(parent: str, lr: float) -> Overrides:
    """Longer fine-tuning of `parent` on the automix set built from MusDB and extra tracks."""
    return {**automix_stage(parent, lr), "dset": "auto_extra_test", "max_batches": 500,
            "epochs": 128, "test.every": 300}


def aetl_stage(parent: str) -> Overrides:
    """Last fine-tuning of `parent` on the `aetl` automix set, keeping the best nSDR state."""
    return {"dset": "aetl", "max_batches": 500, "test.metric": "nsdr", "epochs": 128,
            "test.every": 300, "continue_best": True, "continue_from": parent,
            "continue_opt": False, "optim.lr": 0.0001}


XPS: tp.Dict[str, Overrides] = {
    "9357e12e": TIME_DOMAIN,
    "e312f349": {**TIME_DOMAIN, "test.metric": "nsdr", "weights": [1.0, 1.0, 0.1, 0.1]},
    "81de367c": {**HYBRID, "seed": 42, "hdemucs.hybrid_old": True, **SVD_BASE,
                 "optim.lr": 0.0005},
    "80a68df8": {**HYBRID, **HYBRID_CAC, "seed": 43, "hdemucs.multi_freqs": [0.1, 0.3],
                 "hdemucs.multi_freqs_depth": 2},
    # Track B roots, trained with extra data.
    "c24d4b58": {**HYBRID, "seed": 44, "hdemucs.hybrid_old": True, **HYBRID_NORMS, **SVD_BASE,
                 "optim.lr": 0.0005, "dset": "extra44"},
    "3d21764b": {**HYBRID, **HYBRID_CAC, "seed": 44, **HYBRID_NORMS, **SVD_BASE,
                 "dset": "extra44"},
    "2cfe4564": {**HYBRID, **HYBRID_CAC, "seed": 43, **HYBRID_NORMS, **SVD_BASE,
                 "dset": "extra44"},
    "b141dad5": {**HYBRID, "hdemucs.hybrid": True, "seed": 42, **HYBRID_NORMS,
                 "hdemucs.wiener_iters": 0, "hdemucs.cac": False, **SVD_BASE, "dset": "extra44"},
}

# (child, parent, stage) in training order; a child's overrides are its parent's plus the stage.
_STAGES: tp.List[tp.Tuple[str, str, Overrides]] = [
    # Track A: the four initial models fine-tuned on automix.
    ("0d19c1c6", "9357e12e", automix_stage("9357e12e", 0.0001)),
    ("7ecf8ec1", "e312f349", automix_stage("e312f349", 0.0006)),
    ("c511e2ab", "81de367c", automix_stage("81de367c", 0.0006)),
    ("7d865c68", "80a68df8", automix_stage("80a68df8", 0.0006)),
    # Track B genealogies.
    ("76a5c33b", "3d21764b", extra_test_stage("3d21764b")),
    ("269b2268", "76a5c33b", automix_extra_stage("76a5c33b", 0.0006)),
    ("e51eebcc", "269b2268", {**aetl_stage("269b2268"), "seed": 1492}),
    ("1b7b2b14", "c24d4b58", automix_extra_stage("c24d4b58", 0.0006)),
    ("a1d90b5c", "1b7b2b14", aetl_stage("1b7b2b14")),
    ("8e19e553", "b141dad5", extra_test_stage("b141dad5")),
    ("e444734f", "8e19e553", automix_extra_stage("8e19e553", 0.0006)),
    ("5d2d6c55", "e444734f", aetl_stage("e444734f")),
    ("87a4323f", "2cfe4564", extra_test_stage("2cfe4564")),
    ("f435b96e", "87a4323f", automix_extra_stage("87a4323f", 0.0001)),
    ("cfa93e08", "f435b96e", aetl_stage("f435b96e")),
]
for _child, _parent, _stage in _STAGES:
    XPS[_child] = {**XPS[_parent], **_stage}

TRACK_A = ["0d19c1c6", "7ecf8ec1", "c511e2ab", "7d865c68"]
TRACK_B = ["e51eebcc", "a1d90b5c", "5d2d6c55", "cfa93e08"]


def overrides_of(sig: str) -> Overrides:
    """Overrides of the published XP `sig`; KeyError naming the known ones otherwise."""
    try:
        return XPS[sig]
    except KeyError:
        raise KeyError(f"{sig} is not one of the published MDX 2021 XPs "
                       f"({', '.join(sorted(XPS))})") from None


def parent_of(sig: str) -> tp.Optional[str]:
    """Signature of the XP that `sig` was fine-tuned from (`continue_from`), if any."""
    return overrides_of(sig).get("continue_from")


def root_of(sig: str) -> str:
    """First ancestor of `sig`, the XP trained from scratch."""
    while (parent := parent_of(sig)) is not None:
        sig = parent
    return sig


def checked_argv(main: DecoratedMain, overrides: tp.Any, sig: str) -> tp.List[str]:
    """Command-line overrides of the XP `sig`, after checking that they still give that signature.

    A mismatch means a default in conf/ was changed (or a key added to a group file), which
    silently changes what every signature means: it must be reverted rather than ignored.
    """
    argv = main.value_to_argv(overrides)
    actual = main.get_xp(argv).sig
    if actual != sig:
        raise RuntimeError(
            f"The overrides of XP {sig} now give signature {actual}: a default value in conf/ "
            "differs from the one the XP was defined with. Restore the original default (add a "
            "new key instead of changing an existing one).")
    return argv


def mdx_2021_argvs(launcher: tp.Any, main: DecoratedMain, sigs: tp.Sequence[str],
                   base_of: tp.Callable[[str], str]) -> tp.Iterator[tp.List[str]]:
    """Gives `launcher` the MDX 2021 Slurm resources (8 GPUs, 3 days, partition learnlab), then
    yields, for each XP of `sigs`, the checked argv of the XP `base_of(sig)` it starts from."""
    launcher.slurm_(gpus=8, time=3 * 24 * 60, partition="learnlab")
    for sig in sigs:
        base = base_of(sig)
        yield checked_argv(main, overrides_of(base), base)
