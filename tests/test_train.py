"""End-to-end training runs (`dora run`) on a tiny MusDB-like set, on CPU.

Covers: each model family trains for 2 epochs and writes history/best/checkpoint; a SIGKILLed run
resumes; a corrupted checkpoint stops the run with a clear message; `continue_from` starts from the
parent's best state, with `variant=finetune`; `get_solver_from_sig`; 2-worker DDP (slow); the
settings and objects `get_solver` builds from the config; allocator tuning by the entry point.
"""
import dataclasses
import os
from pathlib import Path
import signal
import subprocess
import sys
from types import SimpleNamespace
import typing as tp

import numpy as np
import pytest
import torch

from tests.training_helpers import (
    RATE, ROOT, SOURCES, TINY_MODELS, base_argv, dora_env, dora_run, history, registered_xp,
    wait_for_history, write_tiny_musdb, xp_folder)


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_dora_run_trains_each_model(model, tiny_musdb, dora_dir):
    argv = base_argv(tiny_musdb, model)
    proc = dora_run(dora_dir, argv)
    folder = xp_folder(dora_dir, argv)
    metrics = history(folder)
    assert len(metrics) == 2
    for epoch in metrics:
        assert {"loss", "reco", "grad", "reco_vocals"} <= set(epoch["train"])
        assert {"loss", "nsdr", "nsdr_drums", "best", "bname"} <= set(epoch["valid"])
        assert np.isfinite(epoch["train"]["loss"])
    assert "nsdr" in metrics[-1]["test"]
    assert (folder / "checkpoint.th").is_file() and (folder / "best.th").is_file()
    from demucs.states import load_model
    best = load_model(folder / "best.th")
    assert best.sources == SOURCES and best.samplerate == RATE
    assert "Train Summary | Epoch 2" in proc.stdout


def test_sigkill_then_rerun_resumes(tiny_musdb, dora_dir):
    argv = base_argv(tiny_musdb, epochs=3) + ["max_batches=6"]
    folder = xp_folder(dora_dir, argv)
    log = dora_dir.parent / "killed_run.log"
    with open(log, "w") as output:
        proc = subprocess.Popen([sys.executable, "-m", "dora", "run", *argv], cwd=ROOT,
                                env=dora_env(dora_dir), stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for_history(folder, proc, log, epochs=1, timeout=240)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    first_epoch = history(folder)[0]
    rerun = dora_run(dora_dir, argv)
    assert "Loading checkpoint" in rerun.stdout
    assert "Train Summary | Epoch 1 |" in rerun.stdout  # replayed, not retrained
    metrics = history(folder)
    assert len(metrics) == 3
    assert metrics[0] == first_epoch


@pytest.fixture(scope="module")
def finished_xp(tiny_musdb, tmp_path_factory) -> tp.Tuple[Path, tp.List[str], Path]:
    """A finished 2-epoch demucs XP: (dora dir, argv, xp folder)."""
    outputs = tmp_path_factory.mktemp("finished") / "outputs"
    argv = base_argv(tiny_musdb)
    dora_run(outputs, argv)
    from demucs.train import main
    return outputs, argv, outputs / "xps" / main.get_xp(argv).sig


def test_corrupted_checkpoint_is_reported_and_history_kept(finished_xp, tmp_path):
    outputs, argv, folder = finished_xp
    copy = tmp_path / "copy"
    os.makedirs(copy / "xps")
    subprocess.run(["cp", "-r", str(folder), str(copy / "xps")], check=True)
    checkpoint = copy / "xps" / folder.name / "checkpoint.th"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    before = (copy / "xps" / folder.name / "history.json").read_text()
    proc = dora_run(copy, argv, check=False)
    assert proc.returncode != 0
    assert "corrupted or truncated" in proc.stdout
    assert str(checkpoint) in proc.stdout
    assert (copy / "xps" / folder.name / "history.json").read_text() == before


def test_get_solver_from_sig_restores_checkpoint(finished_xp, monkeypatch):
    outputs, argv, folder = finished_xp
    from demucs.train import get_solver_from_sig, main
    monkeypatch.setattr(main.dora, "dir", outputs)
    solver = get_solver_from_sig(folder.name, model_only=True)
    saved = torch.load(folder / "checkpoint.th", weights_only=True)
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, saved["state"][key])
    assert len(solver.history) == 2


def test_continue_from_with_finetune_variant(finished_xp, monkeypatch):
    outputs, argv, folder = finished_xp
    from demucs.train import get_solver, main
    monkeypatch.setattr(main.dora, "dir", outputs)
    child_argv = argv + ["variant=finetune", f"continue_from={folder.name}", "epochs=1"]
    child = main.get_xp(child_argv)
    assert child.cfg.optim.lr == 0.0006 and child.cfg.test.every == 1
    with child.enter():
        solver = get_solver(child.cfg, model_only=True)
    parent = torch.load(folder / "checkpoint.th", weights_only=True)
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, parent["best_state"][key])
    dora_run(outputs, child_argv)
    metrics = history(outputs / "xps" / child.sig)
    assert len(metrics) == 1 and "nsdr" in metrics[0]["test"]


def test_continue_pretrained_loads_a_model_from_a_local_repo(finished_xp, tmp_path, monkeypatch):
    outputs, argv, folder = finished_xp
    from demucs.train import get_solver, main
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / f"{folder.name}.th").write_bytes((folder / "best.th").read_bytes())
    monkeypatch.setattr(main.dora, "dir", outputs)
    xp = main.get_xp(argv + [f"continue_pretrained={folder.name}", f"pretrained_repo={repo}"])
    with xp.enter():
        solver = get_solver(xp.cfg, model_only=True)
    best = torch.load(folder / "checkpoint.th", weights_only=True)["best_state"]
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, best[key])


def test_continue_from_unknown_sig_is_reported(finished_xp, monkeypatch):
    outputs, argv, _ = finished_xp
    from demucs.train import get_solver, main
    monkeypatch.setattr(main.dora, "dir", outputs)
    xp = main.get_xp(argv + ["continue_from=deadbeef"])
    with xp.enter(), pytest.raises(FileNotFoundError, match="continue_from=deadbeef"):
        get_solver(xp.cfg, model_only=True)


def test_a_run_failing_after_its_trackers_started_leaves_no_xp_folder(tiny_musdb, dora_dir):
    """The Solver starts its TensorBoard events before it loads `continue_from`; the "nothing
    saved" cleanup used to know a list of file names, and left such a folder behind."""
    argv = base_argv(tiny_musdb) + ["continue_from=deadbeef"]
    proc = dora_run(dora_dir, argv, check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "demucs.train: continue_from=deadbeef: no checkpoint at" in proc.stdout
    assert list((dora_dir / "xps").iterdir()) == []


def _fake_xp(folder: Path, git_save: bool = False) -> SimpleNamespace:
    return SimpleNamespace(folder=folder, submitit=folder / "submitit",
                           code_folder=folder / "code", dora=SimpleNamespace(git_save=git_save))


@pytest.mark.parametrize("kept", [None, "checkpoint.th", "best.th", "checkpoint_4.th",
                                  "submitit/log.out", "code/train.py"])
def test_a_failed_run_keeps_its_folder_only_when_it_saved_something(tmp_path, kept):
    from demucs.train import remove_if_nothing_saved
    folder = tmp_path / "xps" / "ab12cd34"
    for name in ["train.log", "train.lock", ".argv.json", ".hydra/config.yaml",
                 "tensorboard/events.out.tfevents.1", "wandb/run/files.json", "history.json",
                 kept or "a-new-trackers-file"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    removed = remove_if_nothing_saved(_fake_xp(folder, git_save=True))
    assert removed == (kept is None) and folder.exists() == (kept is not None)
    if kept == "code/train.py":  # Dora's code copy matters only under --git_save
        assert remove_if_nothing_saved(_fake_xp(folder))


@pytest.mark.slow
def test_ddp_two_workers_on_cpu(tiny_musdb, dora_dir):
    argv = base_argv(tiny_musdb, epochs=2) + ["batch_size=4", "augment.remix.group_size=2"]
    proc = dora_run(dora_dir, argv, "-d", "--ddp_workers", "2", timeout=600)
    assert "Distributed init: 0/2" in proc.stdout
    folder = xp_folder(dora_dir, argv)
    assert (folder / "train.lock").read_text() == ""  # rank 0 held the XP lock, then let it go
    metrics = history(folder)
    assert len(metrics) == 2
    losses = [epoch["train"]["loss"] for epoch in metrics]
    assert all(np.isfinite(losses))
    dora_run(dora_dir, argv + ["dummy=single"])
    single_folder = xp_folder(dora_dir, argv + ["dummy=single"])
    reference = [epoch["train"]["loss"] for epoch in history(single_folder)]
    # same data, same model: the curves have the same scale and direction
    assert losses[-1] == pytest.approx(reference[-1], rel=0.5)


def _config(*overrides: str):
    from demucs.train import main
    return main.get_xp(list(overrides)).cfg


def test_get_model_uses_config_section_and_dataset_settings():
    from demucs.train import get_model
    args = _config("model=hdemucs", "hdemucs.channels=4", "dset.segment=3", "dset.channels=1",
                   "dset.sources=[a,b]", "weights=[1,1]")
    model = get_model(args)
    assert type(model).__name__ == "HDemucs"
    assert model.sources == ["a", "b"] and model.audio_channels == 1
    assert model.segment == 12 and model.samplerate == 44100
    assert get_model(_config("model=demucs", "model_segment=44")).segment == 44


def test_get_optimizer_gives_the_transformer_its_own_group():
    from demucs.train import get_model, get_optimizer
    args = _config("model=htdemucs", *TINY_MODELS["htdemucs"], "htdemucs.t_weight_decay=0.05",
                   "htdemucs.t_lr=1e-4", "optim.optim=adamw", "optim.beta2=0.99")
    model = get_model(args)
    optimizer = get_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.AdamW)
    rest, transformer = optimizer.param_groups
    assert transformer["weight_decay"] == 0.05 and transformer["lr"] == 1e-4
    assert rest["lr"] == 3e-4 and rest["betas"] == (0.9, 0.99)
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(transformer["params"]) == len(list(model.crosstransformer.parameters()))


def test_torch_hdemucs_without_torchaudio_says_how_to_install(monkeypatch):
    from demucs.train import TorchHDemucsWrapper
    monkeypatch.setitem(sys.modules, "torchaudio", None)
    monkeypatch.setitem(sys.modules, "torchaudio.models", None)
    with pytest.raises(ImportError, match="torchaudio") as error:
        TorchHDemucsWrapper(sources=SOURCES, samplerate=44100, segment=10)
    assert torch.__version__.split("+")[0] in str(error.value)


def test_missing_soundstretch_fails_before_loading_data(monkeypatch, tmp_path):
    import shutil
    from demucs.train import get_datasets
    monkeypatch.setattr(shutil, "which", lambda name: None)
    args = _config(f"dset.musdb={tmp_path}", "augment.repitch.proba=0.2")
    with pytest.raises(RuntimeError, match="soundstretch.*augment.repitch.proba=0"):
        get_datasets(args)


def test_toy_dataset_is_generated_when_missing(monkeypatch, tmp_path):
    from demucs import toy_musdb, training_data
    calls = []
    monkeypatch.setattr(toy_musdb, "ensure_toy_musdb",
                        lambda path, **kwargs: calls.append((path, kwargs)))
    args = _config("dset=toy", f"dset.musdb={tmp_path / 'toy'}", "dset.toy.tracks=3")
    assert training_data._is_toy_dataset(args)
    training_data._ensure_toy_dataset(args)
    assert calls[0][0] == tmp_path / "toy" and calls[0][1]["tracks"] == 3
    assert not training_data._is_toy_dataset(_config())


def test_misc_show_logs_model_size_and_trains_nothing(caplog, tmp_path, dora_dir):
    """`misc.show` is handled by the entry point (`main`), which returns: no library function
    exits the process."""
    from demucs.train import main, show_model
    args = _config("model=demucs", *TINY_MODELS["demucs"], "misc.show=true")
    with caplog.at_level("INFO"):
        show_model(args)
    assert "Size:" in caplog.text and "Field:" in caplog.text
    argv = base_argv(tmp_path / "nowhere") + ["misc.show=true"]
    xp = main.get_xp(argv)
    main.init_xp(xp)
    with xp.enter():
        main.main(xp.cfg)  # returns: no data read (there is none), no lock, no checkpoint
    assert not (Path(xp.folder) / "checkpoint.th").exists()


def test_dset_toy_generates_the_missing_set_and_trains(tmp_path, dora_dir):
    musdb = tmp_path / "toy_musdb"
    argv = ["dset=toy", f"dset.musdb={musdb}", f"dset.metadata={tmp_path / 'metadata'}",
            "dset.toy.tracks=3", "dset.toy.valid_tracks=1", "dset.toy.test_tracks=1",
            "dset.toy.seconds=2", "dset.segment=1", "dset.shift=0.5", "epochs=1", "batch_size=2",
            "max_batches=1", "misc.num_workers=0", "test.workers=0", "test.sdr=false",
            "augment.repitch.proba=0", "augment.remix.group_size=2", "model=demucs",
            *TINY_MODELS["demucs"]]
    dora_run(dora_dir, argv)
    assert len(list((musdb / "train").iterdir())) == 3
    assert len(history(xp_folder(dora_dir, argv))) == 1


def test_bench_uses_the_released_htdemucs_training_length():
    from demucs.grids.mmi import HTDEMUCS
    from demucs.train import main
    from tools.bench_models import RELEASED_HTDEMUCS_SIG, released_htdemucs_config, training_length
    assert main.get_xp(main.value_to_argv(HTDEMUCS)).sig == RELEASED_HTDEMUCS_SIG
    cfg = released_htdemucs_config()
    assert cfg.htdemucs.bottom_channels == 512 and cfg.htdemucs.t_layers == 5
    assert training_length(cfg) == 343980  # 10 s x 0.88 repitch crop - 1 s shift, at 44.1 kHz


def test_bench_separation_model_has_the_released_segment():
    from fractions import Fraction
    from tools.bench_models import separation_model
    model = separation_model(None)
    assert model.segment == Fraction(39, 5)  # as exported, not the configured 4 x 10 s
    assert model.valid_length(1000) == 343980


def test_wav2_is_appended_with_its_weight(tiny_musdb, tmp_path):
    import shutil
    from demucs.train import get_datasets
    from demucs.wav import get_wav_datasets
    extra = tmp_path / "extra"
    for split, source in [("train", "Toy - One"), ("valid", "Toy - Two")]:
        shutil.copytree(tiny_musdb / "train" / source, extra / split / source)
    musdb_argv = [arg for arg in base_argv(tiny_musdb) if not arg.startswith("model")]
    args = _config(*musdb_argv, f"+dset.wav2={extra}", "+dset.wav2_weight=0.2",
                   "+dset.wav2_valid=true")
    train_set, valid_set = get_datasets(args)
    musdb_train, musdb_valid = get_datasets(_config(*musdb_argv))
    extra_train, extra_valid = get_wav_datasets(_config(*musdb_argv, f"dset.wav={extra}").dset)
    # wav2 gets ~20% of the examples: the main set is repeated (1 / 0.2 - 1) * |wav2| / |main|
    repeats = max(1, round(len(extra_train) / len(musdb_train) * 4))
    assert len(train_set) == repeats * len(musdb_train) + len(extra_train)
    kept = min(len(extra_valid), round(0.2 * len(musdb_valid) / 0.8))
    assert len(valid_set) == len(musdb_valid) + kept


def test_loaders_get_at_most_one_worker_per_usable_cpu(tiny_musdb, dora_dir, monkeypatch):
    from demucs.train import get_solver, main
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    argv = [arg for arg in base_argv(tiny_musdb) if not arg.startswith("misc.num_workers")]
    xp = main.get_xp(argv + ["misc.num_workers=10"])
    Path(xp.folder).mkdir(parents=True, exist_ok=True)
    with xp.enter():
        solver = get_solver(xp.cfg)
    assert [loader.num_workers for loader in solver.loaders.values()] == [2, 2]


# Runs `dora run ARGV...` in this process, reporting each call of the allocator tuning.
TUNING_CHILD = r"""
import sys
import demucs.train
tune = demucs.train.tune_malloc
demucs.train.tune_malloc = lambda: print("tune_malloc ->", tune())
sys.argv = ["dora", "run", *sys.argv[1:]]
from dora.__main__ import main
main()
"""


def test_training_entry_point_tunes_the_allocator(tiny_musdb, dora_dir):
    """`import demucs` leaves the allocator alone: `train.main` tunes it (misc.show stops the run
    right after building the model)."""
    argv = base_argv(tiny_musdb) + ["misc.show=true"]
    proc = subprocess.run([sys.executable, "-c", TUNING_CHILD, *argv], cwd=ROOT,
                          env=dora_env(dora_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("tune_malloc ->") == 1


@pytest.mark.parametrize("overrides, caps", [
    ([], (None, None)), (["max_batches=3"], (3, 3)), (["debug=true"], (1, None)),
    (["max_batches=3", "debug=true"], (1, 3)), (["flag=debug"], (1, 1))])
def test_training_settings_batch_caps(overrides, caps):
    from demucs.train import training_settings
    settings = training_settings(_config(*overrides))
    assert (settings.max_train_batches, settings.max_valid_batches) == caps


def test_training_settings_are_read_once_from_the_config():
    from demucs.train import training_settings
    settings = training_settings(_config("svd=base", "svd.penalty=1e-4", "quant.diffq=3e-4",
                                         "flag=uns", "test.metric=nsdr", "weights=[1,2,3,4]"))
    assert settings.svd_penalty == 1e-4 and "penalty" not in settings.svd
    assert settings.svd["dim"] == 50 and settings.diffq == 3e-4
    assert settings.log_params_without_grad and settings.metric == "nsdr"
    assert settings.weights == (1, 2, 3, 4) and settings.amp is None
    assert training_settings(_config()).diffq == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.epochs = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="optim.loss='huber', expected l1 or mse"):
        training_settings(_config("optim.loss=huber"))


def test_a_signature_read_as_a_number_becomes_the_xp_it_names(dora_dir):
    """`TrainingSettings.continue_from` holds a signature: 955717e8, which Hydra reads as a
    float, is the XP folder of that name."""
    from demucs.train import main, training_settings
    (dora_dir / "xps" / "955717e8").mkdir(parents=True)
    xp = main.get_xp(["continue_from=955717e8"])
    assert isinstance(xp.cfg.continue_from, float)
    with xp.enter():
        assert training_settings(xp.cfg).continue_from == "955717e8"
    assert training_settings(_config("continue_from=ab12cd34")).continue_from == "ab12cd34"


def test_training_parts_follow_the_config():
    from demucs.train import get_model, get_optimizer, get_training_parts
    args = _config("model=demucs", *TINY_MODELS["demucs"], "ema.batch=[0.9,0.99]",
                   "ema.epoch=[0.5]", "augment.flip=false", "augment.scale.proba=0")
    model = get_model(args)
    parts = get_training_parts(model, get_optimizer(model, args), args)
    assert parts.quantizer is None and parts.parallel_model is model
    assert [ema.decay for ema in parts.emas["batch"]] == [0.9, 0.99]
    assert [ema.device for ema in parts.emas["epoch"]] == ["cpu"]
    assert [type(module).__name__ for module in parts.augment] == ["Shift", "Remix"]


FP16_REFUSAL = ("optim.amp=fp16 trains only on CUDA GPUs (it needs loss scaling with "
                "torch.amp.GradScaler); use optim.amp=bf16 on CPU, or leave optim.amp empty")


def test_training_amp_refuses_fp16_off_cuda():
    from demucs.train import training_amp, training_settings
    fp16 = _config("optim.amp=fp16").optim
    with pytest.raises(ValueError) as refusal:
        training_amp(fp16, torch.device("cpu"))
    assert str(refusal.value) == FP16_REFUSAL
    with pytest.raises(ValueError, match="trains only on CUDA GPUs"):
        training_settings(_config("optim.amp=fp16"), torch.device("cpu"))
    assert training_amp(fp16, "cuda") == "fp16"  # no GPU needed to decide
    assert training_amp(_config("optim.amp=bf16").optim, "cpu") == "bf16"
    assert training_amp(_config().optim, "cpu") is None
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or None"):
        training_amp(_config("optim.amp=int8").optim, "cuda")


def test_training_device_follows_cuda_availability(monkeypatch):
    from demucs.train import training_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device() == torch.device("cuda")


def test_only_fp16_gets_a_grad_scaler(monkeypatch):
    from demucs import train
    from demucs.train import get_model, get_optimizer, get_training_parts, make_grad_scaler
    assert make_grad_scaler(None, "cpu") is None and make_grad_scaler("bf16", "cuda") is None
    scaler = make_grad_scaler("fp16", torch.device("cpu"))
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert scaler.get_scale() == 65536.
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or None"):
        make_grad_scaler("fp32", "cpu")
    for amp in ["null", "bf16", "fp16"]:
        args = _config("model=demucs", *TINY_MODELS["demucs"], f"optim.amp={amp}")
        model = get_model(args)
        if amp == "fp16":  # the model is on the CPU here
            with pytest.raises(ValueError, match="trains only on CUDA GPUs"):
                get_training_parts(model, get_optimizer(model, args), args)
        else:
            assert get_training_parts(model, get_optimizer(model, args), args).scaler is None
    # as on a GPU, where training_amp accepts fp16: the parts carry the scaler to the Solver
    monkeypatch.setattr(train, "training_amp", lambda optim, device: optim.get("amp"))
    parts = get_training_parts(model, get_optimizer(model, args), args)
    assert isinstance(parts.scaler, torch.amp.GradScaler)


# ---------------------------------------------------------------- fine-tuning (issue 28)
SIX = ["drums", "bass", "guitar", "piano", "other", "vocals"]
# (sources of the released model, sources of the fine-tuning): new ones start from `other`.
REMAPS = {"4->6": (SOURCES, SIX), "6->2": (SIX, ["vocals", "drums"]),
          "4->4 other names": (SOURCES, ["guitar", "piano", "vocals", "other"])}


def _tiny_kwargs(family: str) -> dict:
    """The constructor arguments of `TINY_MODELS[family]`, at `RATE`, with a 1 s segment."""
    kwargs = {}
    for override in TINY_MODELS[family]:
        key, value = override.split(".", 1)[1].split("=")
        kwargs[key] = int(value)
    return dict(kwargs, samplerate=RATE, segment=1)


def _release(repo: Path, family: str, sources: tp.List[str]) -> torch.nn.Module:
    """Save a random tiny `family` model for `sources` as `repo/base.th`, as tools.export does."""
    from demucs.states import serialize_model
    from demucs.train import _model_classes
    repo.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    model = _model_classes()[family](sources=list(sources), **_tiny_kwargs(family))
    torch.save(serialize_model(model, {}, half=False), repo / "base.th")
    return model.eval()


def _finetune_config(repo: Path, sources: tp.List[str], *overrides: str):
    ones = ",".join("1" * len(sources))
    return _config("continue_pretrained=base", f"pretrained_repo={repo}",
                   f"dset.sources=[{','.join(sources)}]", f"weights=[{ones}]",
                   f"dset.samplerate={RATE}", "model_segment=1", *overrides)


@pytest.mark.parametrize("remap", list(REMAPS))
@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_continue_pretrained_builds_the_checkpoints_model_for_the_sources_by_name(
        family, remap, tmp_path):
    """The model= and architecture keys are not restated: the class, the constructor arguments
    and the weights come from the checkpoint; each output is matched by source name (4->4
    with other names used to load drums as guitar, by position)."""
    from demucs.train import build_model
    old, new = REMAPS[remap]
    base = _release(tmp_path, family, old)
    model = build_model(_finetune_config(tmp_path, new)).eval()
    assert type(model) is type(base) and model.sources == new
    assert model._init_args_kwargs[1]["channels"] == base._init_args_kwargs[1]["channels"]
    torch.manual_seed(1)
    mix = torch.randn(1, 2, 1800)
    with torch.no_grad():
        before = dict(zip(old, base(mix).unbind(1)))
        after = dict(zip(new, model(mix).unbind(1)))
    for source in new:
        origin = source if source in old else "other"
        assert torch.equal(after[source], before[origin]), source


def test_fine_tuning_log_says_what_was_kept_created_dropped_and_trained(tmp_path, caplog):
    from demucs.train import build_model
    _release(tmp_path, "htdemucs", SIX)
    caplog.set_level("INFO")
    build_model(_finetune_config(tmp_path, ["drums", "synth", "vocals"],
                                 "continue_sources_init={synth:piano}", "lora.rank=2",
                                 "optim.freeze=[decoder.*]"))
    assert "sources kept: drums, vocals; created: synth (from piano); dropped: bass, guitar, " \
        "piano, other" in caplog.text
    assert "Low-rank adapters of rank 2 on" in caplog.text
    assert "trainable weights:" in caplog.text


def test_a_relative_pretrained_repo_is_read_from_the_working_directory(tmp_path, monkeypatch):
    """Outside Hydra's run (config check, export) the working directory is where the command
    started; inside it, Hydra's original one (the story test runs it through `dora run`)."""
    from demucs.train import pretrained_repo
    monkeypatch.chdir(tmp_path)
    assert pretrained_repo(_config("pretrained_repo=release_models")) == \
        tmp_path / "release_models"
    assert pretrained_repo(_config()) is None


def test_the_optimizer_gets_only_trainable_parameters():
    from demucs.finetune import count_trainable
    from demucs.train import build_model, get_optimizer
    args = _config("model=htdemucs", *TINY_MODELS["htdemucs"], "lora.rank=2")
    model = build_model(args)
    optimizer = get_optimizer(model, args)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    assert params and all(param.requires_grad for param in params)
    assert sum(param.numel() for param in params) == count_trainable(model)
    assert count_trainable(model) < sum(param.numel() for param in model.parameters()) / 4


@pytest.mark.parametrize("overrides", [
    ["optim.freeze=[encoder.*,crosstransformer.*]"],
    ["lora.rank=2", "lora.targets=[linear,attention,conv]", "optim.freeze=[tencoder.*]"]])
def test_frozen_parameters_stay_bit_unchanged_through_training(overrides, tiny_musdb, dora_dir):
    """After real training steps, every frozen parameter is bit-unchanged in the model, the best
    state and the EMAs (which leave them out: averaging an unchanged value may round it)."""
    from demucs.train import get_solver
    argv = base_argv(tiny_musdb, "htdemucs", epochs=1) + [
        "ema.batch=[0.9]", "ema.epoch=[0.5]", "test.every=100", *overrides]
    xp = registered_xp(argv)
    with xp.enter():
        solver = get_solver(xp.cfg)
        frozen = {name: param.detach().clone() for name, param in solver.model.named_parameters()
                  if not param.requires_grad}
        trained = {name: param.detach().clone()
                   for name, param in solver.model.named_parameters() if param.requires_grad}
        solver.train()
    assert frozen and trained
    state = solver.model.state_dict()
    assert any(not torch.equal(state[name], value) for name, value in trained.items())
    emas = [ema for kind in solver.emas.values() for ema in kind]
    assert len(emas) == 2
    for name, value in frozen.items():
        assert torch.equal(state[name], value), name
        assert torch.equal(solver.best_state[name], value), name
        assert all(name not in ema.state for ema in emas), name
    for ema in emas:
        with ema.swap():
            for name, value in frozen.items():
                assert torch.equal(solver.model.state_dict()[name], value), name


@pytest.fixture(scope="module")
def released_toy(tiny_musdb, tmp_path_factory) -> tp.Tuple[Path, str, Path]:
    """A 4-stem tiny HTDemucs XP trained with `dora run` and written by `tools.export`:
    (dora dir, its signature, the folder holding SIG.th)."""
    root = tmp_path_factory.mktemp("released")
    outputs, repo = root / "outputs", root / "release_models"
    argv = base_argv(tiny_musdb, "htdemucs", epochs=1)
    dora_run(outputs, argv)
    from demucs.train import main
    sig = main.get_xp(argv).sig
    subprocess.run([sys.executable, "-m", "tools.export", sig, "-o", str(repo)], cwd=ROOT,
                   env=dora_env(outputs), check=True, capture_output=True)
    return outputs, sig, repo


def test_dora_run_fine_tunes_an_exported_model_to_six_stems(released_toy, tmp_path, monkeypatch):
    """The issue 28 story: a 4-stem XP exported by tools.export is fine-tuned to 6 stems by
    `dora run` with continue_pretrained (a repo relative to where dora run starts),
    continue_sources_init, optim.freeze and lora.rank, without restating its architecture; the
    XP resumes from its checkpoint with its adapters, and tools.export merges them into an
    ordinary 6-stem package that loads strictly and separates like the adapted model."""
    from demucs.lora import has_adapters, merge_adapters
    from demucs.states import load_model
    from demucs.train import get_solver_from_sig, main
    outputs, sig, repo = released_toy
    six = write_tiny_musdb(tmp_path / "six", SIX)
    argv = [arg for arg in base_argv(six, "htdemucs", epochs=1) if not arg.startswith("htdemucs.")
            and not arg.startswith("model=")] + [
        "dset.sources=[drums,bass,guitar,piano,other,vocals]", "weights=[1,1,1,1,1,1]",
        f"continue_pretrained={sig}", f"pretrained_repo={os.path.relpath(repo, ROOT)}",
        "continue_sources_init={guitar:other}", "optim.freeze=[encoder.*]", "lora.rank=2",
        "ema.batch=[0.9]"]
    proc = dora_run(outputs, argv)
    assert "created: guitar (from other), piano (from other); dropped: none" in proc.stdout
    assert "trainable weights:" in proc.stdout
    monkeypatch.setattr(main.dora, "dir", outputs)
    six_sig = main.get_xp(argv).sig
    folder = outputs / "xps" / six_sig
    assert history(folder)[0]["test"]["nsdr_piano"] is not None
    solver = get_solver_from_sig(six_sig, model_only=True)  # resumes: strict loads
    saved = torch.load(folder / "checkpoint.th", weights_only=True)
    assert has_adapters(solver.model) and solver.model.sources == SIX
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, saved["state"][key]), key
    subprocess.run([sys.executable, "-m", "tools.export", six_sig, "-o", str(tmp_path / "out")],
                   cwd=ROOT, env=dora_env(outputs), check=True, capture_output=True)
    exported = load_model(tmp_path / "out" / f"{six_sig}.th")  # strict load
    assert type(exported).__name__ == "HTDemucs" and not has_adapters(exported)
    solver.model.load_state_dict(saved["best_state"])
    merged = merge_adapters(solver.model)
    for key, value in merged.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value.half().float()), key
    torch.manual_seed(2)
    mix = torch.randn(1, 2, 4000)
    with torch.no_grad():
        assert torch.allclose(merged.eval()(mix), solver.model.eval()(mix), atol=1e-5, rtol=0)
