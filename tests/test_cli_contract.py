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
    from demucs.api import _default_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert _default_device() == expected


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")])
def test_out_of_memory_stops_with_one_message_saying_what_to_change(
        repo, track, tmp_path, caplog, monkeypatch, error):
    from demucs import apply as apply_module

    def run_out_of_memory(*args, **kwargs):
        raise error
    monkeypatch.setattr(apply_module, "run_model", run_out_of_memory)
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
    from demucs.train import _loader_size_problems
    dset = {"full_cv": True, "musdb": str(tiny_musdb), "use_musdb": True, "wav": None}
    args = OmegaConf.create({"batch_size": 64, "dset": dset})
    problems = _loader_size_problems(args, 42, 2)
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
