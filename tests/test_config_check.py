"""demucs.config_check: the checks a training config goes through before `dora run` starts."""
from pathlib import Path
import subprocess
import sys

from omegaconf import OmegaConf
import pytest

from demucs.config_check import ConfigError, check_config, quiet_hydra, xp_signature
from tests.training_helpers import ROOT, dora_env

BASE = OmegaConf.create({
    "epochs": 360, "batch_size": 64, "seed": 42, "model": "demucs", "weights": [1., 1.],
    "optim": {"lr": 3e-4, "amp": None},
    "augment": {"flip": True, "scale": {"proba": 1.0}, "remix": {"proba": 1.0, "group_size": 4}},
    "dset": {"wav": None, "segment": 11, "shift": 1},
    "continue_from": None, "continue_pretrained": None})
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


def _problem(cfg, **context) -> str:
    with pytest.raises(ConfigError) as error:
        check_config(cfg, BASE, MODELS, **context)
    return str(error.value)


@pytest.mark.parametrize("batch_size,workers,message", [
    (2, 1, "batch_size=2 is not a multiple of augment.remix.group_size=4, the size of the groups "
           "whose stems are remixed: set batch_size to a multiple of 4, or "
           "augment.remix.group_size to a divisor of 2, or augment.remix.proba=0"),
    (6, 4, "batch_size=6 must be divisible by the number of workers (4): set batch_size to a "
           "multiple of 4"),
    (8, 4, "batch_size=8 (2 for each of 4 workers) is not a multiple of "
           "augment.remix.group_size=4, the size of the groups whose stems are remixed: set "
           "batch_size to a multiple of 16"),
])
def test_batch_size_must_split_into_the_workers_and_the_remix_groups(batch_size, workers,
                                                                     message):
    """Issue 27: batch_size=2 with the default remix groups of 4 passed the check, then stopped
    after the first batch in `Remix`."""
    assert _problem(_with(batch_size=batch_size), world_size=workers).startswith(message)


def test_batch_sizes_that_split_pass():
    check_config(_with(batch_size=16), BASE, MODELS, world_size=4)
    check_config(_with(batch_size=2, augment__remix__proba=0), BASE, MODELS)  # no remixing
    check_config(_with(batch_size=6, augment__remix__group_size=3), BASE, MODELS, world_size=2)


def test_shift_must_leave_some_of_the_segment():
    """Such examples are cropped to nothing: without the check, training ran on empty tensors."""
    assert _problem(_with(dset__shift=11)) == (
        "dset.shift=11 must be smaller than dset.segment=11: the random shift augmentation cuts "
        "training examples to segment - shift seconds, which would leave nothing to train on; "
        "lower dset.shift or raise dset.segment")
    check_config(_with(dset__shift=10.5), BASE, MODELS)
    check_config(_with(dset__segment=None), BASE, MODELS)  # whole tracks


def test_numeric_looking_signatures_are_found_among_the_xps(tmp_path, monkeypatch):
    """Hydra reads 955717e8 (the released htdemucs's signature) as a float: the XP folder it
    stands for is found among the XPs, read the same way."""
    from demucs.train import main
    monkeypatch.setattr(main.dora, "dir", tmp_path)
    names = ["955717e8", "12345678", "1e400000", "0badcafe"]
    for name in names:
        (tmp_path / "xps" / name).mkdir(parents=True)
    parsed = {name: main.get_xp([f"continue_from={name}"]).cfg.continue_from for name in names}
    assert isinstance(parsed["955717e8"], float)
    assert {name: xp_signature(value, tmp_path / "xps")
            for name, value in parsed.items()} == {name: name for name in parsed}
    with pytest.raises(FileNotFoundError, match=r"read as the number 1200000000.0 .* no XP "
                                                r"folder matches it .* quote the signature"):
        xp_signature(12e8, tmp_path / "xps")


def test_a_numeric_continue_from_must_match_one_xp_unless_the_xp_resumes(tmp_path):
    xps = tmp_path / "xps"
    (xps / "955717e8").mkdir(parents=True)
    own = xps / "ab12cd34"
    check_config(_with(continue_from=955717e8), BASE, MODELS, xp_folder=own)
    problem = _problem(_with(continue_from=12e8), xp_folder=own)
    assert problem.startswith("continue_from was read as the number 1200000000.0 (Hydra parses "
                              "signatures such as 955717e8 as numbers) and no XP folder matches "
                              f"it in {xps}: quote the signature")
    own.mkdir()
    (own / "checkpoint.th").write_bytes(b"")  # it resumes: continue_from is not used
    check_config(_with(continue_from=12e8), BASE, MODELS, xp_folder=own)
    assert "continue_from=True is not an XP signature" in _problem(_with(continue_from=True))


def test_a_numeric_continue_pretrained_says_to_quote_it():
    assert _problem(_with(continue_pretrained=955717e8)) == (
        "continue_pretrained=95571700000000.0 was read as a float (Hydra parses signatures such "
        "as 955717e8 as numbers): quote the name, e.g. continue_pretrained=\"'955717e8'\"")


def test_dora_run_with_a_batch_the_remix_groups_cannot_split_stops_before_training(tmp_path):
    """The issue 27 story: `dora run dset=toy model=htdemucs htdemucs.channels=8 batch_size=2`
    (remix groups of 4) started training, failed after the first batch and left its XP folder.
    It now stops with status 2 before anything is made: no XP folder, no toy dataset."""
    outputs, toy = tmp_path / "outputs", tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, "-m", "dora", "run", "dset=toy", f"dset.musdb={toy}", "model=htdemucs",
         "htdemucs.channels=8", "batch_size=2"], cwd=ROOT, env=dora_env(outputs),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("demucs.train: invalid config: batch_size=2 is not a multiple "
                                  "of augment.remix.group_size=4")
    assert "Traceback" not in proc.stderr
    assert not Path(outputs, "xps").exists() and not toy.exists()


def test_the_workers_of_dora_run_d_split_the_batch(monkeypatch, capsys):
    """Each worker `dora run -d` starts composes the XP with WORLD_SIZE set: a batch that does
    not split is refused there, before the XP folder is made."""
    from demucs.train import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        main.get_xp(["batch_size=6", "augment.remix.group_size=2"])
    assert exit_.value.code == 2
    assert "batch_size=6 (3 for each of 2 workers) is not a multiple of " \
        "augment.remix.group_size=2" in capsys.readouterr().err
    main.get_xp(["batch_size=8", "augment.remix.group_size=2"])


@pytest.mark.parametrize("changes,message", [
    (dict(lora__rank=-1), "lora.rank=-1 must be at least 0"),
    (dict(lora__rank=1.5), "lora.rank=1.5 must be a whole number"),
    (dict(lora__alpha=0), "lora.alpha=0 must be a number greater than 0, or null"),
    (dict(lora__alpha="big"), "lora.alpha='big' must be a number greater than 0"),
    (dict(lora__targets=["linear", "lstm"]),
     "lora.targets=['linear', 'lstm'] must be a non-empty list of linear, attention, conv"),
    (dict(lora__targets=[]), "lora.targets=[] must be a non-empty list"),
    (dict(lora__rank=4, quant__diffq=1e-4), "lora.rank=4 cannot be combined with quant.diffq"),
    (dict(lora__rank=4, quant__qat=8), "lora.rank=4 cannot be combined with quant.qat"),
    (dict(optim__freeze=["encoder.*", 3]), "optim.freeze=['encoder.*', 3] must list parameter"),
    (dict(continue_pretrained="base", continue_sources_init=["guitar"]),
     "continue_sources_init=['guitar'] must map each new source to the checkpoint source"),
    (dict(continue_pretrained="base", continue_sources_init={"guitar": 1}),
     "continue_sources_init={'guitar': 1} must map"),
    (dict(continue_sources_init={"guitar": "other"}),
     "continue_sources_init is set without continue_pretrained"),
    (dict(continue_pretrained="base", continue_from="ab12cd34"),
     "continue_pretrained=base and continue_from=ab12cd34 both name where the XP starts"),
])
def test_fine_tuning_settings_are_checked(changes, message):
    assert message in _problem(_with(**changes))


def test_fine_tuning_settings_that_work_pass():
    check_config(_with(lora__rank=4, lora__alpha=8, lora__targets=["linear", "conv"],
                       optim__freeze=["encoder.*"], continue_pretrained="base",
                       continue_sources_init={"guitar": "other"}), BASE, MODELS)


def test_the_model_check_runs_last_and_only_on_sound_values():
    calls = []

    def model_check(cfg, base):
        calls.append(cfg.epochs)
        return ["optim.freeze pattern 'nothing.*' matches no parameter"]

    assert _problem(_with(epochs="x"), model_check=model_check).startswith("epochs='x'")
    assert calls == []
    assert _problem(BASE, model_check=model_check) == \
        "optim.freeze pattern 'nothing.*' matches no parameter"
    assert calls == [360]


@pytest.fixture(scope="module")
def eight_channel_base(tmp_path_factory) -> Path:
    """A folder holding `base.th`, a tiny 4-source HTDemucs with 8 channels at 44.1 kHz, and
    `pair.yaml`, a bag of two of them."""
    import torch
    from demucs.htdemucs import HTDemucs
    from demucs.states import serialize_model
    repo = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    model = HTDemucs(["drums", "bass", "other", "vocals"], channels=8, depth=2, nfft=64,
                     t_layers=1, t_heads=1, samplerate=44100, segment=4)
    torch.save(serialize_model(model, {}), repo / "base.th")
    (repo / "pair.yaml").write_text("models: [base, base]\n")
    return repo


def test_dora_run_against_the_checkpoints_architecture_stops_before_training(
        tmp_path, eight_channel_base):
    """Issue 28: `htdemucs.channels=16` against an 8-channel base used to end in a 400-line
    size-mismatch traceback once training had started; it stops with status 2, naming both
    values, before the XP folder exists."""
    outputs, toy = tmp_path / "outputs", tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, "-m", "dora", "run", "dset=toy", f"dset.musdb={toy}", "model=htdemucs",
         "htdemucs.channels=16", "continue_pretrained=base",
         f"pretrained_repo={eight_channel_base}"], cwd=ROOT, env=dora_env(outputs),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(
        "demucs.train: invalid config: htdemucs.channels=16 contradicts continue_pretrained=base, "
        "whose channels is 8: leave htdemucs.channels out")
    assert "Traceback" not in proc.stderr
    assert not Path(outputs, "xps").exists() and not toy.exists()


@pytest.mark.parametrize("overrides,message", [
    (["model=hdemucs"], "model=hdemucs: continue_pretrained=base is a HTDemucs (model=htdemucs); "
                        "leave model out or set model=htdemucs"),
    (["dset.channels=1"], "dset.channels=1 contradicts continue_pretrained=base, whose "
                          "audio_channels is 2"),
    (["htdemucs.depth=3", "htdemucs.t_layers=2"], "htdemucs.depth=3 contradicts"),
    (["dset.sources=[drums,guitar]", "weights=[1,1]", "continue_sources_init={guitar:piano}"],
     "continue_sources_init initialises 'guitar' from 'piano', which the checkpoint does not "
     "have"),
    (["optim.freeze=[encoders.*]"], "freeze pattern 'encoders.*' matches no parameter of "
                                    "HTDemucs; close names: encoder.*"),
    (["lora.rank=2", "optim.freeze=[*]"], "optim.freeze=['*'] leaves no parameter to train"),
    (["continue_pretrained=missing"], "continue_pretrained=missing: "),
    (["continue_pretrained=pair"], "continue_pretrained=pair is a bag of 2 models; fine-tuning "
                                   "starts from a single model"),
])
def test_what_only_the_model_shows_is_refused_before_the_xp_folder(
        overrides, message, eight_channel_base, tmp_path, monkeypatch, capsys):
    from demucs.train import main
    monkeypatch.setattr(main.dora, "dir", tmp_path)
    argv = ["continue_pretrained=base", f"pretrained_repo={eight_channel_base}", *overrides]
    with pytest.raises(SystemExit) as exit_:
        main.get_xp(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "xps").exists()


def test_restating_the_checkpoints_settings_passes(eight_channel_base, tmp_path, monkeypatch):
    from demucs.train import main
    monkeypatch.setattr(main.dora, "dir", tmp_path)
    main.get_xp(["continue_pretrained=base", f"pretrained_repo={eight_channel_base}",
                 "model=htdemucs", "htdemucs.channels=8", "htdemucs.t_dropout=0.1",
                 "optim.freeze=[encoder.*]", "lora.rank=2"])
