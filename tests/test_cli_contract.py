"""The user-facing contract of docs/reliability.md: a command that fails prints what was wrong and
what to do (naming the file, option or config key), exits non-zero, prints no Python traceback and
leaves no partial output; one that succeeds writes exactly the outputs it announces.

Covered for the `demucs` command (in process, and as a process where signals and tracebacks
matter), the `Separator` API, `dora run` and the tools.
"""
import errno
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
import typing as tp

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import soundfile
import torch

from demucs.api import LoadAudioError, LoadModelError, Separator, save_audio
from demucs.audio import AudioWriter
from demucs.files import describe_write_error
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.pretrained import SOURCES
from demucs.separate import MP3_BITRATES, main as separate_main
from demucs.states import serialize_model
from tests.training_helpers import base_argv, dora_env, write_tiny_musdb

ROOT = Path(__file__).resolve().parent.parent
SAMPLERATE = 44100


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """`tiny`: a 4-channel HDemucs (the size of upstream's `demucs_unittest`, whose one-channel
    residual branches cannot normalise a single time step); `random`: random bytes."""
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    torch.save(serialize_model(HDemucs(SOURCES, channels=4), {}, half=False), root / "tiny.th")
    (root / "random.th").write_bytes(np.random.default_rng(1).bytes(5000))
    return root


@pytest.fixture
def track(tmp_path) -> Path:
    path = tmp_path / "in" / "song.wav"
    path.parent.mkdir()
    noise = 0.3 * torch.randn(2, SAMPLERATE // 2, generator=torch.Generator().manual_seed(0))
    save_audio(noise, path, SAMPLERATE)
    return path


def _separate(repo: Path, out: Path, *args: tp.Any) -> int:
    """Run the `demucs` command in this process; its exit status."""
    try:
        separate_main(["-n", "tiny", "--repo", str(repo), "-o", str(out), "-d", "cpu",
                       "--shifts", "0", *map(str, args)])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _files(folder: Path) -> tp.List[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def _error_text(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records
                     if record.levelname == "ERROR")


# ------------------------------------------------------------------------------------------------
# The demucs command: outputs planned and checked before any work.


def test_filename_without_stem_is_refused_before_any_work(repo, track, tmp_path, caplog):
    assert _separate(repo, tmp_path / "out", "--filename", "{track}.{ext}", track) == 1
    assert ("stem drums of" in _error_text(caplog)
            and "--filename must contain {stem}" in _error_text(caplog))
    assert not (tmp_path / "out").exists()


def test_same_track_name_in_two_folders_is_refused(repo, track, tmp_path, caplog):
    other = tmp_path / "other" / "song.wav"
    other.parent.mkdir()
    shutil.copy(track, other)
    assert _separate(repo, tmp_path / "out", track, other) == 1
    message = _error_text(caplog)
    assert str(track) in message and str(other) in message and "different --out" in message
    assert not (tmp_path / "out").exists()


def test_same_track_twice_is_separated_once(repo, track, tmp_path, caplog):
    assert _separate(repo, tmp_path / "out", track, track) == 0
    assert "given more than once" in caplog.text
    assert [path.name for path in _files(tmp_path / "out")] == \
        sorted(f"{source}.wav" for source in SOURCES)


def test_output_over_an_input_track_is_refused(repo, track, tmp_path, caplog):
    status = _separate(repo, track.parent.parent, "--two-stems", "vocals", "--other-method",
                       "none", "--filename", "../in/{track}.{ext}", track)
    assert status == 1 and "replacing the input track" in _error_text(caplog)
    assert soundfile.info(str(track)).frames == SAMPLERATE // 2


@pytest.mark.parametrize("bitrate", [-1, 0, 31, 33, 321, 9999])
def test_mp3_bitrate_out_of_range_is_refused(repo, track, tmp_path, caplog, bitrate):
    assert _separate(repo, tmp_path / "out", "--mp3", "--mp3-bitrate", bitrate, track) == 1
    assert f"--mp3-bitrate {bitrate} is not an mp3 bitrate; use one of 32" in _error_text(caplog)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bitrate", [MP3_BITRATES[0], 96, MP3_BITRATES[-1]])
def test_a_listed_mp3_bitrate_is_the_one_written(repo, tmp_path, bitrate):
    seconds = 4
    path = tmp_path / "long.wav"
    save_audio(0.3 * torch.randn(2, seconds * SAMPLERATE), path, SAMPLERATE)
    assert _separate(repo, tmp_path / "out", "--mp3", "--mp3-bitrate", bitrate, "--two-stems",
                     "vocals", "--other-method", "none", path) == 0
    size = (tmp_path / "out" / "tiny" / "long" / "vocals.mp3").stat().st_size
    assert size * 8 / seconds / 1000 == pytest.approx(bitrate, rel=0.05)


def test_unwritable_output_folder_is_found_before_separating(repo, track, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert _separate(repo, blocker / "out", track) == 1
    assert f"{blocker} is a file" in _error_text(caplog)
    assert "Separating track" not in caplog.text


def test_missing_input_is_refused_before_any_work(repo, track, tmp_path, caplog):
    assert _separate(repo, tmp_path / "out", track, tmp_path / "nope.wav") == 1
    assert f"no such file: {tmp_path / 'nope.wav'}" in _error_text(caplog)
    assert not (tmp_path / "out").exists()


def test_list_models_of_a_missing_repo(tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_:
        separate_main(["--list-models", "--repo", str(tmp_path / "MISSING")])
    assert exit_.value.code == 1
    assert "--list-models: model repository" in _error_text(caplog)


@pytest.mark.parametrize("device,message", [
    ("gpu0", "unknown device 'gpu0': use cpu, cuda, cuda:N or mps."),
    ("cuda:99", "cuda"),
    ("mps", "mps"),
    ("xla", "is not supported"),
])
def test_bad_devices_are_refused(repo, track, tmp_path, caplog, device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert _separate(repo, tmp_path / "out", "-d", device, track) == 1
    assert "-d/--device:" in _error_text(caplog) and message in _error_text(caplog)
    with pytest.raises(ValueError, match=device.split(":")[0]):
        Separator("tiny", repo=repo, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch build has CUDA")
def test_cuda_on_a_cpu_build_says_so(repo, track, tmp_path, caplog):
    assert _separate(repo, tmp_path / "out", "-d", "cuda", track) == 1
    assert "CUDA is not available" in _error_text(caplog) and "use -d cpu" in _error_text(caplog)


def test_mps_without_mps_says_so(repo, track, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _separate(repo, tmp_path / "out", "-d", "mps", track) == 1
    assert "MPS is not available" in _error_text(caplog)


@pytest.mark.parametrize("cuda,mps,expected", [
    (True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_default_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    from demucs.backends import default_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert default_device() == expected


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")])
def test_out_of_memory_stops_with_one_message_saying_what_to_change(
        repo, track, tmp_path, caplog, monkeypatch, error):
    from demucs import runner as runner_module

    def run_out_of_memory(*args, **kwargs):
        raise error
    monkeypatch.setattr(runner_module, "run_model", run_out_of_memory)
    second = track.parent / "second.wav"
    second.write_bytes(track.read_bytes())
    assert _separate(repo, tmp_path / "out", "--batch-segments", "4", track, second) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1  # stopped at the first track, with no traceback
    assert f"out of memory on cpu while separating {track}" in errors[0]
    assert "--segment" in errors[0] and "fewer --batch-segments than 4" in errors[0]
    assert not _files(tmp_path / "out")


def test_batch_segments_gives_the_default_output(repo, tmp_path):
    track = tmp_path / "long.wav"  # 2 segments of 1 s, batched in one forward
    save_audio(0.3 * torch.randn(2, 3 * SAMPLERATE // 2,
                                 generator=torch.Generator().manual_seed(2)), track, SAMPLERATE)
    assert _separate(repo, tmp_path / "one", "--float32", "--segment", "1", track) == 0
    assert _separate(repo, tmp_path / "four", "--float32", "--segment", "1",
                     "--batch-segments", "2", track) == 0
    one, four = _files(tmp_path / "one"), _files(tmp_path / "four")
    assert [path.name for path in one] == [path.name for path in four] and one
    for a, b in zip(one, four):
        np.testing.assert_allclose(soundfile.read(a)[0], soundfile.read(b)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_batch_segments_below_one_is_refused(repo, track, tmp_path, caplog, value):
    assert _separate(repo, tmp_path / "out", "--batch-segments", value, track) == 1
    assert f"--batch-segments {value}: give 1 or more" in _error_text(caplog)


def test_onnxruntime_backend_without_the_package_says_how_to_install(
        repo, track, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert _separate(repo, tmp_path / "out", "--backend", "onnxruntime", track) == 1
    assert "pip install 'demucs[onnx]'" in _error_text(caplog)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match=r"pip install 'demucs\[onnx\]'"):
        Separator("tiny", repo=repo, device="cpu", backend="onnxruntime")


def test_random_bytes_as_a_model_are_named(repo, track, tmp_path, caplog):
    status = _separate(repo, tmp_path / "out", "-n", "random", track)
    assert status == 1
    assert "random.th is truncated, corrupted or not a model package" in _error_text(caplog)
    assert "please file an issue" not in caplog.text.lower()


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_tiny_tracks_separate_on_a_small_hybrid_model(repo, tmp_path, length):
    path = tmp_path / "tiny.wav"
    save_audio(0.1 * torch.ones(2, length), path, SAMPLERATE, clip="none")
    assert _separate(repo, tmp_path / "out", path) == 0
    for stem in _files(tmp_path / "out"):
        data, _ = soundfile.read(str(stem))
        assert len(data) == length and np.isfinite(data).all()


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(length=st.integers(1, 4), shifts=st.sampled_from([0, 1]))
def test_tiny_inputs_through_the_api(repo, length, shifts):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=shifts)
    _, stems = separator.separate_tensor(0.1 * torch.randn(2, length), SAMPLERATE)
    assert all(stem.shape == (2, length) and torch.isfinite(stem).all()
               for stem in stems.values())


def test_api_errors_name_the_file(repo, tmp_path):
    with pytest.raises(LoadModelError, match="random.th is truncated, corrupted"):
        Separator("random", repo=repo)
    separator = Separator("tiny", repo=repo, device="cpu")
    with pytest.raises(LoadAudioError, match="nope.wav"):
        separator.separate_audio_file(tmp_path / "nope.wav")


# ------------------------------------------------------------------------------------------------
# Write errors: the path and the cause, nothing left behind.


def _failing_encode(error: BaseException):
    def encode(self, path, fmt):
        Path(path).write_bytes(b"half")
        raise error
    return encode


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EIO, errno.EROFS])
@pytest.mark.parametrize("flags", [[], ["--flac"], ["--mp3"]])
def test_write_errors_name_the_file_and_the_cause(repo, track, tmp_path, caplog, monkeypatch,
                                                  code, flags):
    monkeypatch.setattr(AudioWriter, "encode", _failing_encode(OSError(code, os.strerror(code))))
    assert _separate(repo, tmp_path / "out", *flags, track) == 1
    message = _error_text(caplog)
    assert f"could not write {tmp_path / 'out' / 'tiny' / 'song'}" in message
    assert f"{os.strerror(code)} ({errno.errorcode[code]})" in message
    assert not (tmp_path / "out").exists()


def test_an_error_without_errno_on_a_full_disk_is_called_enospc(tmp_path, monkeypatch):
    monkeypatch.setattr("demucs.files.free_bytes", lambda path: 0)
    message = describe_write_error(RuntimeError("System error."), tmp_path / "x.wav")
    assert message.startswith(f"{tmp_path / 'x.wav'}: No space left on device (ENOSPC")
    monkeypatch.setattr("demucs.files.free_bytes", lambda path: 1 << 30)
    assert describe_write_error(RuntimeError("System error."), tmp_path / "x.wav") == \
        f"{tmp_path / 'x.wav'}: System error."


def test_full_temporary_folder_says_to_set_tmpdir(repo, track, tmp_path, caplog, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("demucs.audio.AudioFile.decode_to_spool", no_space)
    assert _separate(repo, tmp_path / "out", track) == 1
    assert "No space left on device (ENOSPC); set TMPDIR" in _error_text(caplog)


def test_outputs_get_the_mode_of_a_plain_file(repo, track, tmp_path):
    previous = os.umask(0o022)
    try:
        assert _separate(repo, tmp_path / "out", track) == 0
    finally:
        os.umask(previous)
    assert {oct(path.stat().st_mode & 0o777) for path in _files(tmp_path / "out")} == {"0o644"}


# ------------------------------------------------------------------------------------------------
# Interrupts, and no traceback, as a process.


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory) -> Path:
    """A random HTDemucs of the released size (each segment takes seconds on a CPU) and a
    40 s track."""
    root = tmp_path_factory.mktemp("slow")
    torch.manual_seed(0)
    torch.save(serialize_model(HTDemucs(SOURCES), {}, half=False), root / "big.th")
    noise = 0.3 * torch.randn(2, 40 * SAMPLERATE, generator=torch.Generator().manual_seed(0))
    save_audio(noise, root / "long.wav", SAMPLERATE)
    return root


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "demucs.separate", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _wait_for(proc: subprocess.Popen, text: str) -> str:
    """stderr of `proc` up to the first line holding `text`."""
    assert proc.stderr is not None
    seen = ""
    while text not in seen:
        char = proc.stderr.read(1)
        assert char, f"the command ended before printing {text!r}: {seen}"
        seen += char
    return seen


@pytest.mark.parametrize("sig,status,jobs", [(signal.SIGINT, 130, "0"),
                                             (signal.SIGTERM, 143, "2")])
def test_interrupt_mid_segment_stops_at_once(slow_repo, tmp_path, sig, status, jobs):
    proc = _cli("-n", "big", "--repo", str(slow_repo), "-o", str(tmp_path / "out"), "-d", "cpu",
                "-j", jobs, str(slow_repo / "long.wav"), cwd=tmp_path)
    _wait_for(proc, "Separating track")
    time.sleep(3)  # inside the first segments
    sent = time.monotonic()
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - sent
    assert proc.returncode == status
    assert stopped_after < 2, f"stopped {stopped_after:.1f} s after the signal"
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1].startswith("demucs: ")
    assert _files(tmp_path / "out") == []


def test_device_error_as_a_process_has_no_traceback(repo, track, tmp_path):
    proc = _cli("-n", "tiny", "--repo", str(repo), "-o", str(tmp_path / "out"), "-d", "gpu0",
                str(track), cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["error: -d/--device: unknown device 'gpu0': use cpu, "
                                        "cuda, cuda:N or mps."]


# ------------------------------------------------------------------------------------------------
# dora run and the tools.


@pytest.mark.parametrize("override,message", [
    ("foo=1", "unknown key 'foo'"),
    ("epochs=abc", "epochs='abc' must be a number"),
    ("optim.lr=abc", "optim.lr='abc' must be a number"),
    ("batch_size=0", "batch_size=0 must be at least 1"),
    ("epochs=-1", "epochs=-1 must be at least 1"),
    ("epochs=2.5", "epochs=2.5 must be a whole number"),
    ("optim.lr=-1", "optim.lr=-1 must be a finite number greater than 0"),
    ("dset.segment=0", "dset.segment=0 must be a finite number greater than 0"),
    ("model=notamodel", "model=notamodel is not a model: use one of demucs, hdemucs"),
    ("dset=notadset", "Could not find 'dset/notadset' Available options in 'dset':"),
    ("augment.flip=maybe", "augment.flip='maybe' must be true or false"),
    ("weights=3", "weights=3 must be a list"),
    ("augment.codec.proba=2", "augment.codec.proba=2 must be a probability, from 0 to 1"),
])
def test_bad_configs_are_refused_before_any_work(override, message, capsys, tmp_path,
                                                 monkeypatch):
    from demucs.train import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main.get_xp(["dset=toy", override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("demucs.train: invalid config: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "outputs").exists()


def test_documented_configs_pass_the_checks():
    from demucs.train import main
    for argv in [[], ["dset=toy", "model=htdemucs", "htdemucs.channels=8", "epochs=2"],
                 ["model=hdemucs", "hdemucs.channels=32", "optim.lr=1e-4", "batch_size=16"],
                 ["dset.segment=7.8", "dset.shift=0"], ["variant=finetune"]]:
        assert main.get_xp(argv).sig


def test_dora_run_unknown_key_as_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dora", "run", "dset=toy", "foo=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dora_env(tmp_path / "outputs"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert proc.stderr.startswith("demucs.train: invalid config: unknown key 'foo'")
    assert not (tmp_path / "outputs").exists()


def test_custom_musdb_folder_without_valid_tracks_stops_before_training(tmp_path):
    musdb = write_tiny_musdb(tmp_path / "mine")
    for index, folder in enumerate(sorted((musdb / "train").iterdir())):
        folder.rename(folder.with_name(f"My song {index}"))
    proc = subprocess.run([sys.executable, "-m", "dora", "run", *base_argv(musdb)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dora_env(tmp_path / "outputs"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "the valid set is empty" in proc.stderr and "dset.valid_tracks=N" in proc.stderr
    assert "Train Summary" not in proc.stdout + proc.stderr
    assert list((tmp_path / "outputs" / "xps").iterdir()) == []  # no leftover XP folder
    # the hint works: one of the songs is kept for validation
    proc = subprocess.run([sys.executable, "-m", "dora", "run", *base_argv(musdb),
                           "dset.valid_tracks=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dora_env(tmp_path / "outputs"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Validation tracks of" in proc.stdout + proc.stderr


def test_too_few_examples_for_the_batch(tiny_musdb):
    from omegaconf import OmegaConf
    from demucs.training_data import loader_size_problems
    dset = {"full_cv": True, "musdb": str(tiny_musdb), "use_musdb": True, "wav": None}
    args = OmegaConf.create({"batch_size": 64, "dset": dset})
    problems = loader_size_problems(args, 42, 2)
    assert problems == ["the train set has 42 examples, fewer than batch_size=64: set a smaller "
                        "batch_size or add songs"]


def test_export_without_signature_prints_usage(capsys):
    from tools.export import main
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tools.export") and "give the signatures of the XPs" in err


def test_export_of_an_unknown_signature_says_so(capsys, tmp_path, monkeypatch, caplog):
    from tools.export import main
    from tests.training_helpers import use_dora_dir
    use_dora_dir(tmp_path / "outputs", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["deadbeef", "-o", str(tmp_path / "release")])
    assert exit_.value.code == 1
    assert "Cannot export deadbeef" in caplog.text
    assert not (tmp_path / "release").exists()


def test_ctrl_c_in_training_keeps_the_checkpoint_and_says_how_to_resume(tiny_musdb, tmp_path):
    argv = base_argv(tiny_musdb, epochs=1000)
    proc = subprocess.Popen([sys.executable, "-m", "dora", "run", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dora_env(tmp_path / "outputs"))
    _wait_for(proc, "Train | Epoch 3")  # epochs 1 and 2 are saved
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == (
        "demucs.train: interrupted; the last saved checkpoint is kept: run the same command to "
        "resume.")
    folders = list((tmp_path / "outputs" / "xps").iterdir())
    assert len(folders) == 1 and (folders[0] / "checkpoint.th").is_file()


# ------------------------------------------------------------------------------------------------
# Issue 30: ONNX export folders that are not (or no longer) usable, as a process.


def test_broken_onnx_dirs_as_a_process_say_one_line(track, tmp_path):
    """A folder of .onnx files without manifest.json, and an export whose graph was cut short:
    one line naming the folder or file and what to do, status 1, no traceback, no output (no
    model is looked up: the manifest names an HTDemucs, whose graphs need no PyTorch model)."""
    import json
    pytest.importorskip("onnxruntime")
    entry = {"class": "demucs.htdemucs.HTDemucs", "sources": SOURCES, "samplerate": SAMPLERATE,
             "audio_channels": 2, "segment": 1, "pad": "end",
             "graphs": [{"file": "SIG_0.onnx", "input_length": SAMPLERATE, "bytes": 1000}]}
    manifest = {"format": "demucs-onnx", "version": 1, "name": "SIG", "weights": [[1.] * 4],
                "models": [entry]}
    expected = {}
    for name in ["no_manifest", "truncated"]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "SIG_0.onnx").write_bytes(b"\x08" * 10)
    (tmp_path / "truncated" / "manifest.json").write_text(json.dumps(manifest))
    expected["no_manifest"] = (f"error: --onnx-dir: {tmp_path / 'no_manifest'} has no "
                               f"manifest.json (it holds SIG_0.onnx), so it is not an output of "
                               f"python3 -m tools.export_onnx")
    expected["truncated"] = (f"{tmp_path / 'truncated' / 'SIG_0.onnx'} has 10 bytes, not the "
                             f"1000 the export wrote (incomplete or damaged): export it again "
                             f"with python3 -m tools.export_onnx SIG [--repo FOLDER] -o "
                             f"{tmp_path / 'truncated'}")
    for name, first in expected.items():
        proc = _cli("--backend", "onnxruntime", "--onnx-dir", str(tmp_path / name), "-o",
                    str(tmp_path / "out"), "-d", "cpu", str(track), cwd=tmp_path)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(first), err
    assert _files(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------
# Issue 30: every new path says what happened (own data, tools, grids, signals).


import logging  # noqa: E402  (this section's imports; the file's head is shared)

from tests.training_helpers import history, write_track  # noqa: E402


def _solver_of(argv: tp.List[str]):
    """The Solver `dora run ARGV` would train, built in this process (its XP folder made)."""
    from demucs.train import get_solver, main
    xp = main.get_xp(argv)
    Path(xp.folder).mkdir(parents=True, exist_ok=True)
    with xp.enter():
        return get_solver(xp.cfg), xp


def _one_song_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    write_track(root / "train" / "My Song", rng, seconds=3)
    write_track(root / "test" / "Test Song", rng, seconds=2)
    return root


def test_one_song_and_one_valid_track_offers_the_ways_forward(tmp_path, dora_dir):
    """`dset.valid_tracks=1` on a folder of one song said 'must be between 1 and 0'. Now it says
    which ways train on it, and both do: validating on the trained song (said in the log), or
    no validation at all (`dset.valid_tracks=0`: the last state is the best one)."""
    from demucs.wav import DatasetError
    root = _one_song_folder(tmp_path / "one")
    argv = base_argv(root, epochs=1) + ["max_batches=1"]
    with pytest.raises(DatasetError) as error:
        _solver_of(argv + ["dset.valid_tracks=1"])
    (problem,) = error.value.problems
    assert problem.startswith(f"dset.valid_tracks=1 would keep every song of {root / 'train'} "
                              "(1 song) for validation and leave none to train on: ")
    assert "with dset.train_valid=true" in problem and "with dset.valid_tracks=0" in problem
    both, _ = _solver_of(argv + ["dset.valid_tracks=1", "dset.train_valid=true"])
    assert list(both.loaders["train"].dataset.metadata) == ["My Song"]  # trained on, and
    assert list(both.loaders["valid"].dataset.metadata) == ["My Song"]  # validated on
    solver, xp = _solver_of(argv + ["dset.valid_tracks=0"])
    assert solver.loaders["valid"] is None
    with xp.enter():
        solver.train()
    (epoch,) = history(Path(xp.folder))
    assert set(epoch) == {"train", "test"} and (Path(xp.folder) / "best.th").is_file()


@pytest.mark.parametrize("test_folder", ["missing", "empty"])
def test_no_test_set_trains_without_test_scores_and_says_so(tmp_path, dora_dir, caplog,
                                                            test_folder):
    """`dset.wav=F dset.use_musdb=false`, the route the empty-valid-set message suggests, stopped
    on the default dset.musdb's test/ (/checkpoint/...: folder does not exist), and an empty
    test/ stopped after the last epoch. The test set only reports scores (it never changes what
    is trained or kept), so the run goes on without it, saying so once before training."""
    rng = np.random.default_rng(0)
    for split, count in [("train", 2), ("valid", 1)]:
        for index in range(count):
            write_track(tmp_path / "wav" / split / f"song{index}", rng, seconds=3)
    musdb = tmp_path / "nowhere"
    if test_folder == "empty":
        (musdb / "test").mkdir(parents=True)
    argv = [arg for arg in base_argv(musdb, epochs=1) if not arg.startswith("dset.musdb=")]
    argv += [f"dset.musdb={musdb}", f"dset.wav={tmp_path / 'wav'}", "dset.use_musdb=false",
             "max_batches=1"]
    with caplog.at_level(logging.WARNING, logger="demucs.train"):
        solver, xp = _solver_of(argv)
    reason = "does not exist" if test_folder == "missing" else "holds no song folder"
    assert f"No test set: {musdb / 'test'} {reason}. Training goes on without the test scores" \
        in caplog.text
    assert solver.settings.test_set is False
    with xp.enter():
        solver.train()
    (epoch,) = history(Path(xp.folder))
    assert set(epoch) == {"train", "valid"}


def _six_stem_repo(root: Path) -> Path:
    torch.manual_seed(0)
    sources = ["drums", "bass", "guitar", "piano", "other", "vocals"]
    model = HDemucs(sources, channels=4, samplerate=8000)
    root.mkdir()
    torch.save(serialize_model(model, {}, half=False), root / "six.th")
    return root


def test_test_pretrained_refuses_a_test_set_without_the_model_stems(tiny_musdb, tmp_path,
                                                                    dora_dir, caplog,
                                                                    monkeypatch):
    """A six-stem model on a four-stem test set separated for 41 s, then `KeyError: 'guitar'`.
    Now refused before any separation, naming the test folder and the missing stems; and the
    tool no longer leaves an XP folder (an empty TensorBoard run) behind, nor starts with
    Dora's "world_size is 1, skipping init."."""
    from demucs import evaluate as evaluate_module
    from tools import test_pretrained
    monkeypatch.setattr(evaluate_module, "_separate_track",
                        lambda *args, **kwargs: pytest.fail("separated a track"))
    repo = _six_stem_repo(tmp_path / "repo")
    argv = ["-n", "six", "--repo", str(repo), f"dset.musdb={tiny_musdb}",
            "dset.musdb_samplerate=8000", "test.workers=0"]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_:
        test_pretrained.main(argv)
    assert exit_.value.code == 1
    errors = _error_text(caplog)
    assert errors.startswith("tools.test_pretrained: 1 problem(s) found in the test set of six")
    assert f"{tiny_musdb / 'test'}: none of its 2 song folder(s) holds guitar.wav, piano.wav " \
        "(its songs hold bass, drums, mixture, other, vocals): the model separates drums, " \
        "bass, guitar, piano, other, vocals" in errors
    assert "world_size is 1" not in caplog.text
    assert not (dora_dir / "xps").exists() or not any((dora_dir / "xps").iterdir())


@pytest.mark.parametrize("case", ["sources typo", "test rate", "empty train", "no valid folder",
                                  "missing nonhq"])
def test_own_data_mistakes_are_named_before_training(case, tiny_musdb, tmp_path, dora_dir):
    """New paths of issue 30, each stopped before the first batch with one line that names the
    folder, the key and the fix (they were a line per song, a silent wrong test score, a vague
    'No training data', a misleading 'set dset.wav to the right path', a failure at the end)."""
    from demucs.wav import DatasetError
    argv = base_argv(tiny_musdb, epochs=1)
    if case == "sources typo":
        argv += ["dset.sources=[drums,bass,other,vocal]"]
        expected = [f"{tiny_musdb / 'train'}: none of its 4 song folder(s) holds vocal.wav (its "
                    "songs hold bass, drums, mixture, other, vocals): check the spelling in "
                    "dset.sources", f"{tiny_musdb / 'test'}: none of its 2 song folder(s)"]
    elif case == "test rate":  # the test songs are at 8 kHz, read as 44.1 kHz
        argv += ["dset.musdb_samplerate=44100"]
        expected = [f"2 songs of {tiny_musdb / 'test'} (e.g. {tiny_musdb / 'test'}/Toy - Test A/"
                    "mixture.wav): 8000 Hz, but the test set is read as dset.musdb_samplerate="
                    "44100 Hz"]
    elif case == "empty train":
        (tmp_path / "empty" / "train").mkdir(parents=True)
        argv = base_argv(tmp_path / "empty", epochs=1)
        expected = [f"{tmp_path / 'empty' / 'train'} holds no song folder: put each song in a "
                    "folder of its own"]
    elif case == "no valid folder":
        write_track(tmp_path / "wav" / "train" / "song", np.random.default_rng(0), seconds=3)
        argv += [f"dset.wav={tmp_path / 'wav'}", "dset.use_musdb=false"]
        expected = [f"dset.wav={tmp_path / 'wav'} has no valid/ subfolder: dset.wav must hold "
                    "train/<song>/<stem>.wav and valid/<song>/<stem>.wav (e.g. move some songs "
                    f"of {tmp_path / 'wav' / 'train'} into {tmp_path / 'wav' / 'valid'})"]
    else:
        argv += [f"test.nonhq={tmp_path / 'musdb18'}"]
        expected = [f"test.nonhq={tmp_path / 'musdb18'}: folder does not exist"]
    with pytest.raises(DatasetError) as error:
        _solver_of(argv)
    assert len(error.value.problems) == len(expected)
    for line, start in zip(error.value.problems, expected):
        assert line.startswith(start), line
    assert not (dora_dir / "xps" / "checkpoint.th").exists()


@pytest.mark.parametrize("overrides,message", [
    (["weights=[1,1,1]"], "weights=[1, 1, 1] has 3 value(s) but dset.sources=[drums,bass,other,"
                          "vocals] has 4 stem(s): give one loss weight per stem, e.g. "
                          "weights=[1,1,1,1]"),
    (["dset.sources=[drums,bass]"], "weights=[1.0, 1.0, 1.0, 1.0] has 4 value(s) but "
                                    "dset.sources=[drums,bass] has 2 stem(s)"),
])
def test_weights_of_another_length_than_the_sources_are_a_config_error(overrides, message,
                                                                       capsys, tmp_path,
                                                                       monkeypatch):
    """They stopped the first batch with 'The size of tensor a (4) must match ...'."""
    from demucs.train import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main.get_xp(["dset=toy", *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demucs.train: invalid config: {message}"), err


def _fake_slurm(folder: Path, srun: bool) -> Path:
    """`sbatch` (and `srun`) that fail as on a machine with Slurm's programs and no cluster."""
    folder.mkdir()
    for name in ["sbatch", "sacct", "squeue", "scancel"] + (["srun"] if srun else []):
        (folder / name).write_text(f"#!/bin/sh\necho '{name}: fatal: Could not establish a "
                                   "configuration source' >&2\nexit 1\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("installed,first_words", [
    (True, "dora grid toy: Slurm is not configured on this machine (sbatch: fatal: Could not "
           "establish a configuration source), nothing was submitted: "),
    (False, "dora grid toy: Slurm is not installed on this machine (no srun/sbatch on PATH), "
            "nothing was submitted: ")])
def test_dora_grid_without_slurm_says_so_in_one_line(tmp_path, installed, first_words):
    """An 11-frame submitit traceback (`sbatch: fatal: ...`) before."""
    fake = _fake_slurm(tmp_path / "bin", srun=installed)
    env = dict(dora_env(tmp_path / "outputs"), PATH=f"{fake}:/usr/local/bin:/usr/bin:/bin")
    if not installed and shutil.which("srun", path=env["PATH"]):
        pytest.skip("this machine has Slurm installed")
    proc = subprocess.run([sys.executable, "-m", "dora", "grid", "toy"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        first_words + "`dora grid toy --dry_run --init` lists the grid's XPs and registers "
        "their signatures, then `dora run -f SIG` trains one of them on this machine."]


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT),
                                     (signal.SIGTERM, signal.SIGINT)])
def test_repeated_signals_stop_training_with_one_line(tiny_musdb, tmp_path, signals):
    """A second Ctrl-C while `dora run` stops (or the SIGINT `timeout` sends after SIGTERM) gave a
    DataLoader worker traceback. Sent to the whole process group (workers included) 50 ms
    apart: one line, the signal's status, the checkpoint kept, within seconds."""
    argv = base_argv(tiny_musdb, epochs=1000) + ["misc.num_workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "dora", "run", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dora_env(tmp_path / "outputs"), start_new_session=True)
    try:
        _wait_for(proc, "Train | Epoch 3")  # epochs 1 and 2 are saved, loader workers running
        time.sleep(0.3)
        sent = time.monotonic()
        for sig in signals:
            os.killpg(proc.pid, sig)
            time.sleep(0.05)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 15
    status, name = (143, "terminated (SIGTERM)") if signals[0] == signal.SIGTERM else \
        (130, "interrupted")
    assert proc.returncode == status
    assert "Traceback" not in rest and "Exception ignored" not in rest
    assert [line for line in rest.splitlines() if line.startswith("demucs.train")] == [
        f"demucs.train: {name}; the last saved checkpoint is kept: run the same command to "
        "resume."]
    folders = list((tmp_path / "outputs" / "xps").iterdir())
    assert len(folders) == 1 and (folders[0] / "checkpoint.th").is_file()


def test_a_stop_signal_lost_in_a_destructor_is_raised_again(monkeypatch):
    """A signal landing in torch's DataLoader `__del__` (exceptions there are dropped) used to
    leave the run training, deaf to the next signals; `raise_if_stopped`, called by the Solver
    before each batch, raises it again, and later signals are ignored."""
    from demucs.train import StopSignals
    from demucs.utils import Terminated
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    saved = {signum: signal.getsignal(signum)
             for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)
        stops = StopSignals().install()
        stops.raise_if_stopped()  # nothing received: no-op
        with pytest.raises(Terminated):  # what a destructor would drop
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the next ones are ignored
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        with pytest.raises(Terminated):
            stops.raise_if_stopped()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
