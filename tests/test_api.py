"""The Separator API: in-memory and block-wise separation, parameters, errors."""
import io
import os
from pathlib import Path
import random
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from demucs import runner as runner_module
from demucs.api import LoadAudioError, LoadModelError, Separator, list_models
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs
from demucs.pretrained import SOURCES, demucs_unittest
from demucs.states import serialize_model

SAMPLERATE = 44100
torch.set_num_threads(1)  # tiny models: extra threads only add contention


def _save(model, path: Path) -> None:
    torch.save(serialize_model(model, {}, half=False), path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    _save(demucs_unittest(), root / "tiny.th")
    _save(HTDemucs(SOURCES, channels=4, depth=2, t_layers=1, t_heads=1, segment=1,
                   dconv_mode=0), root / "transformer.th")
    (root / "duo.yaml").write_text("models: ['tiny', 'transformer']\n")
    return root


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    time = np.arange(int(1.3 * SAMPLERATE)) / SAMPLERATE
    wav = 0.3 * np.sin(2 * np.pi * 220 * time)[:, None] + 0.05 * rng.standard_normal((len(time), 2))
    path = tmp_path_factory.mktemp("audio") / "song.wav"
    soundfile.write(str(path), wav.astype(np.float32), SAMPLERATE, subtype="FLOAT")
    return path


def test_separate_tensor_keeps_input_and_shapes(repo: Path):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    assert (separator.samplerate, separator.audio_channels) == (SAMPLERATE, 2)
    assert separator.model.sources == SOURCES
    wav = torch.randn(2, 30000, generator=torch.Generator().manual_seed(0))
    original = wav.clone()
    origin, stems = separator.separate_tensor(wav)
    assert torch.equal(wav, original)
    assert torch.equal(origin, original)
    assert list(stems) == SOURCES
    assert all(stem.shape == (2, 30000) for stem in stems.values())


def test_separate_tensor_resamples_and_upmixes(repo: Path):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    origin, stems = separator.separate_tensor(torch.randn(1, 11025), sr=22050)
    assert origin.shape == (2, 22050)
    assert stems["vocals"].shape == (2, 22050)


def test_normalisation_is_undone(repo: Path):
    """Scaling the input scales the output: the model sees the normalised mix either way."""
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    wav = torch.randn(2, 20000, generator=torch.Generator().manual_seed(1))
    _, stems = separator.separate_tensor(wav)
    _, scaled = separator.separate_tensor(3 * wav)
    assert torch.allclose(scaled["bass"], 3 * stems["bass"], atol=1e-4)


def test_file_in_blocks_matches_in_memory(repo: Path, track: Path):
    separator = Separator("duo", repo=repo, device="cpu", shifts=1, overlap=0.3, segment=0.5)
    random.seed(3)
    origin, stems = separator.separate_audio_file(track)
    random.seed(3)
    blocks = list(separator.separate_audio_file_in_blocks(track, block_seconds=0.2))
    assert len(blocks) > 2
    streamed_origin = torch.cat([block for block, _ in blocks], dim=-1)
    assert torch.equal(streamed_origin, origin)
    for name in SOURCES:
        streamed = torch.cat([sources[name] for _, sources in blocks], dim=-1)
        error = (streamed - stems[name]).norm() / stems[name].norm()
        assert error < 1e-4


def test_parameters(repo: Path):
    separator = Separator("transformer", repo=repo, device="cpu")
    with pytest.raises(ValueError, match="segment 2 s is longer than model transformer allows"):
        separator.update_parameter(segment=2)
    with pytest.raises(ValueError, match="overlap"):
        separator.update_parameter(overlap=1.)
    separator.update_parameter(segment=0.5, jobs=2, shifts=0)
    _, stems = separator.separate_tensor(torch.randn(2, 30000))
    assert stems["drums"].shape == (2, 30000)


def test_callback_receives_progress(repo: Path):
    events = []
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0, segment=0.25,
                          callback=events.append, callback_arg={"track": "x"})
    separator.separate_tensor(torch.randn(2, 20000))
    assert events and all(event["track"] == "x" and event["audio_length"] == 20000
                          for event in events)
    assert {event["state"] for event in events} == {"start", "end"}


def test_errors(repo: Path, tmp_path: Path):
    with pytest.raises(LoadModelError, match="nothere"):
        Separator("nothere", repo=repo, device="cpu")
    separator = Separator("tiny", repo=repo, device="cpu")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(LoadAudioError, match="bad.wav"):
        separator.separate_audio_file(bad)
    with pytest.raises(LoadAudioError, match="bad.wav"):
        list(separator.separate_audio_file_in_blocks(bad))


def test_list_models(repo: Path):
    models = list_models(repo)
    assert sorted(models["single"]) == ["tiny", "transformer"]
    assert list(models["bag"]) == ["duo"]
    assert "htdemucs" in list_models()["bag"]


def test_python_m_demucs_api_is_the_demucs_command(repo: Path, track: Path, tmp_path: Path):
    subprocess.run([sys.executable, "-m", "demucs.api", "-n", "tiny", "--repo", str(repo), "-d",
                    "cpu", "-o", str(tmp_path), "--shifts", "0", "--flac", str(track)],
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    written = sorted(p.name for p in (tmp_path / "tiny" / "song").iterdir())
    assert written == sorted(f"{name}.flac" for name in SOURCES)
    bass = tmp_path / "tiny" / "song" / "bass.flac"
    assert soundfile.info(str(bass)).frames == int(1.3 * SAMPLERATE)


def test_importing_the_api_does_not_import_the_command():
    """demucs.separate imports demucs.api, never the reverse: no import circle."""
    probe = "import sys, demucs.api; print('demucs.separate' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_truncated_file_is_refused_in_both_modes(repo: Path, track: Path, tmp_path: Path):
    truncated = tmp_path / "cut.wav"
    data = track.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])  # header still announces the full length
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    with pytest.raises(LoadAudioError, match="cut.wav"):
        separator.separate_audio_file(truncated)
    with pytest.raises(LoadAudioError, match="cut.wav is truncated"):
        list(separator.separate_audio_file_in_blocks(truncated))


def test_amp_is_passed_to_every_segment_and_checked(repo: Path, monkeypatch):
    seen = []
    real_run_model = runner_module.run_model

    def spy(model, mix, amp=None, upstream_order=False):
        seen.append(amp)
        return real_run_model(model, mix, amp, upstream_order)

    monkeypatch.setattr(runner_module, "run_model", spy)
    separator = Separator("duo", repo=repo, device="cpu", shifts=0, amp="bf16")
    wav = torch.randn(2, 30000, generator=torch.Generator().manual_seed(0))
    _, stems = separator.separate_tensor(wav)
    assert seen and set(seen) == {"bf16"}
    assert stems["bass"].dtype == torch.float32
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or None"):
        separator.update_parameter(amp="half")
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or None"):
        Separator("tiny", repo=repo, device="cpu", amp="float16")


def test_segment_batch_runs_segments_together_in_both_modes(
        repo: Path, track: Path, monkeypatch):
    batches = []
    real_run_model = runner_module.run_model

    def spy(model, mix, amp=None, upstream_order=False):
        batches.append(mix.shape[0])
        return real_run_model(model, mix, amp, upstream_order)

    monkeypatch.setattr(runner_module, "run_model", spy)
    separator = Separator("transformer", repo=repo, device="cpu", shifts=0, segment=0.5)
    _, expected = separator.separate_audio_file(track)
    assert set(batches) == {1}
    batches.clear()
    separator.update_parameter(segment_batch=3)
    _, stems = separator.separate_audio_file(track)
    assert max(batches) == 3
    batches.clear()
    blocks = list(separator.separate_audio_file_in_blocks(track))
    assert max(batches) == 3
    streamed = torch.cat([block["vocals"] for _, block in blocks], dim=-1)
    for name in expected:
        assert torch.allclose(stems[name], expected[name], atol=1e-5)
    assert torch.allclose(streamed, expected["vocals"], atol=1e-5)
    with pytest.raises(ValueError, match="segment_batch must be a whole number >= 1"):
        separator.update_parameter(segment_batch=0)
    with pytest.raises(ValueError, match="segment_batch must be a whole number >= 1"):
        Separator("tiny", repo=repo, device="cpu", segment_batch=-1)


def test_compile_model_compiles_every_model_of_a_bag_in_place(repo: Path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    separator = Separator("duo", repo=repo, device="cpu", compile_model=True)
    assert isinstance(separator.model, BagOfModels)
    assert compiled == list(separator.model.models)
    assert not compiled[0] is separator.model


def test_compiled_transformer_model_gives_the_eager_output():
    """torch.compile captures HTDemucs (the dynamo graph, run by the eager backend: generating
    the kernels takes minutes on CPU) and changes no number."""
    torch.manual_seed(0)
    model = HTDemucs(SOURCES, channels=8, depth=2, t_layers=1, t_heads=1, segment=1,
                     dconv_mode=3).eval()
    mix = torch.randn(1, 2, SAMPLERATE)
    with torch.no_grad():
        reference = model(mix)
        torch._dynamo.reset()
        model.compile(backend="eager", fullgraph=True)
        out = model(mix)
    assert torch.allclose(out, reference, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Issue 30: what users pass to the API, as they pass it.


def _pcm16_track(tmp_path: Path) -> tuple:
    """A 16-bit PCM WAV and its samples as int16 [channels, time]."""
    noise = 0.3 * torch.randn(2, 20000, generator=torch.Generator().manual_seed(5))
    pcm = (noise * 32768).round().clamp(-32768, 32767).to(torch.int16)
    path = tmp_path / "pcm16.wav"
    soundfile.write(str(path), pcm.t().numpy(), SAMPLERATE, subtype="PCM_16")
    return path, pcm


def test_separate_tensor_takes_what_upstream_users_pass(repo: Path, tmp_path: Path):
    """float64 (soundfile.read), int16 PCM and NumPy arrays give the separation of the file they
    came from: integer PCM is scaled exactly as the decoders scale it (int16 / 32768)."""
    path, pcm = _pcm16_track(tmp_path)
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    origin, expected = separator.separate_audio_file(path)
    as_read = soundfile.read(str(path))[0].T  # float64 [channels, time]
    for wav in [pcm, pcm.numpy(), torch.from_numpy(as_read), as_read,
                soundfile.read(str(path), dtype="int16")[0].T]:
        ours_origin, stems = separator.separate_tensor(wav)
        assert ours_origin.dtype == torch.float32 and torch.equal(ours_origin, origin)
        for name in SOURCES:  # the file's samples are strided: reductions round differently
            assert torch.allclose(stems[name], expected[name], atol=1e-6), (type(wav), name)


@pytest.mark.parametrize("wav, expected", [
    (torch.tensor([[0, 128, 255]], dtype=torch.uint8), [-1., 0., 127 / 128]),
    (torch.tensor([[-128, 0, 64]], dtype=torch.int8), [-1., 0., 0.5]),
    (np.array([[-2 ** 31, 0, 2 ** 30]], dtype=np.int32), [-1., 0., 0.5]),
    (torch.tensor([[0.25, -0.5, 1.]], dtype=torch.float16), [0.25, -0.5, 1.]),
    (torch.tensor([[0.25, -0.5, 1.]], dtype=torch.bfloat16), [0.25, -0.5, 1.]),
])
def test_integer_pcm_and_other_floats_are_converted(repo: Path, wav, expected):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    origin, stems = separator.separate_tensor(wav)
    assert origin.dtype == torch.float32 and origin[0].tolist() == expected
    assert stems["bass"].dtype == torch.float32 and stems["bass"].shape == (2, 3)


@pytest.mark.parametrize("wav, error, message", [
    (torch.zeros(2, 100, dtype=torch.bool), TypeError,
     r"the audio to separate has dtype torch.bool; give float samples \(float16/32/64, "
     r"bfloat16\) or integer PCM \(int8, uint8, int16, int32\)"),
    (torch.zeros(2, 100, dtype=torch.complex64), TypeError, "has dtype torch.complex64; give"),
    (torch.zeros(2, 100, dtype=torch.int64), TypeError,
     r"torch.int64; .*: divide it by your PCM format's full scale \(e.g. 32768 for 16-bit"),
    (np.zeros((2, 100), dtype=object), TypeError, "is a NumPy array of object; give float"),
    (np.zeros((2, 100), dtype=np.uint16), TypeError, "uint16; give float samples"),
    ([[0.] * 100] * 2, TypeError, r"must be a torch tensor or NumPy array \[channels, time\], "
                                  r"got list"),
    ("song.wav", TypeError, "got str"),
    (torch.zeros(100), ValueError,
     r"must be \[channels, time\], got shape \(100,\); for mono audio \[time\], pass wav\[None\]"),
    (torch.zeros(1, 2, 100), ValueError, r"got shape \(1, 2, 100\); for a batch, separate each"),
    (np.zeros((44100, 2)), ValueError,
     r"has shape \(44100, 2\), which looks like \[time, channels\] \(as soundfile.read "
     r"returns\): pass it transposed, \[channels, time\] \(wav.T\)"),
    (torch.zeros(2, 0), ValueError, r"is empty \(shape \(2, 0\)\): give at least one channel"),
    (torch.zeros(0, 100), ValueError, r"is empty \(shape \(0, 100\)\)"),
])
def test_separate_tensor_refuses_other_inputs_in_one_line(repo: Path, wav, error, message):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    with pytest.raises(error, match=message) as raised:
        separator.separate_tensor(wav)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("sr, error, message", [
    ("44100", TypeError, "sr must be the sample rate of the audio in Hz, a whole number, got "
                         "'44100'"),
    (22050.5, TypeError, "a whole number, got 22050.5"),
    (True, TypeError, "got True"),
    (0, ValueError, "sr must be a positive sample rate in Hz, got 0"),
    (-44100, ValueError, "got -44100"),
])
def test_bad_sample_rates_are_named(repo: Path, sr, error, message):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    with pytest.raises(error, match=message):
        separator.separate_tensor(torch.zeros(2, 100), sr=sr)


def test_whole_float_and_numpy_sample_rates_are_taken(repo: Path):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    for sr in [22050.0, np.int64(22050)]:
        origin, _ = separator.separate_tensor(torch.zeros(2, 1000), sr=sr)
        assert origin.shape == (2, 2000)


def test_a_tensor_that_requires_grad_is_separated_without_warnings(repo: Path):
    import warnings
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    wav = torch.randn(2, 3000, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stems = separator.separate_tensor(wav)
    assert not stems["drums"].requires_grad and wav.grad is None


@pytest.mark.parametrize("given, message", [
    (torch.zeros(2, 100), r"got Tensor: for audio in memory, call separate_tensor\(wav, sr\)"),
    (np.zeros((2, 100)), "got ndarray: for audio in memory, call separate_tensor"),
    (io.BytesIO(b"RIFF"), "got BytesIO: write it to a file first"),
])
def test_separate_audio_file_names_what_it_takes(repo: Path, given, message):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    with pytest.raises(TypeError, match=r"the audio file must be a path \(str or pathlib.Path\), "
                                        + message):
        separator.separate_audio_file(given)
    with pytest.raises(TypeError, match=message):
        next(separator.separate_audio_file_in_blocks(given))


def test_audio_file_paths_as_str_and_bytes(repo: Path, track: Path):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    for path in [str(track), bytes(track)]:
        assert separator.separate_audio_file(path)[1]["bass"].shape[-1] == int(1.3 * SAMPLERATE)


def test_model_typos_and_non_names(repo: Path):
    with pytest.raises(LoadModelError, match=r"tinyy is neither a single pre-trained model nor "
                                             r"a bag of models \(looked in .*\)\. Did you mean "
                                             r"'tiny'\?"):
        Separator("tinyy", repo=repo, device="cpu")
    with pytest.raises(TypeError, match=r"model must be the name of a model or bag \(e.g. "
                                        r"'htdemucs'\), got PosixPath.*; for a model file, pass "
                                        r"its folder as repo and its name \(without .th\)"):
        Separator(repo / "tiny.th", device="cpu")
    with pytest.raises(TypeError, match="got ''"):
        Separator("", repo=repo, device="cpu")


def test_released_name_typo_says_which_was_meant(monkeypatch):
    from demucs import backends
    from demucs.pretrained import ModelLoadingError

    def not_found(name, repo=None):
        raise ModelLoadingError(f"could not load model {name!r}. Looked in:\n- the hub: no")
    monkeypatch.setattr(backends, "get_model", not_found)
    with pytest.raises(LoadModelError) as error:
        Separator("htdemcus", device="cpu")
    assert str(error.value).splitlines()[0] == ("could not load model 'htdemcus' (did you mean "
                                                "'htdemucs'?). Looked in:")


@pytest.mark.parametrize("settings, error, message", [
    (dict(shifts=1.5), TypeError, "shifts must be a whole number, got 1.5"),
    (dict(segment="1"), TypeError, "segment must be a number of seconds or None, got '1'"),
    (dict(overlap="0.5"), TypeError, "overlap must be a number, got '0.5'"),
    (dict(jobs=-1), ValueError, "jobs must be 0 or more, got -1"),
    (dict(onnx_dir="onnx/x"), ValueError, r"onnx_dir is used by the onnxruntime backend only: "
                                          r"add backend='onnxruntime'"),
])
def test_bad_settings_are_refused_before_the_model_is_loaded(monkeypatch, settings, error,
                                                             message):
    from demucs import backends
    monkeypatch.setattr(backends, "get_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(error, match=message):
        Separator("tiny", device="cpu", **settings)


def test_update_parameter_refuses_bad_types_and_keeps_the_settings(repo: Path):
    separator = Separator("tiny", repo=repo, device="cpu", shifts=0)
    with pytest.raises(TypeError, match="segment must be a number of seconds or None"):
        separator.update_parameter(segment="1", shifts=2)
    assert separator._options.shifts == 0 and separator._options.segment is None


def test_stems_returns_only_those_stems_bit_identical_to_a_full_separation(repo: Path, track):
    full = Separator("duo", repo=repo, device="cpu", shifts=1)
    only = Separator("duo", repo=repo, device="cpu", shifts=1, stems=["vocals", "drums"])
    assert only.stems == ["vocals", "drums"]
    wav = torch.randn(2, 30000, generator=torch.Generator().manual_seed(0))
    for separate in ["separate_tensor", "separate_audio_file"]:
        source = wav if separate == "separate_tensor" else track
        random.seed(1)
        _, expected = getattr(full, separate)(source)
        random.seed(1)
        _, stems = getattr(only, separate)(source)
        assert list(stems) == ["vocals", "drums"]
        for name, stem in stems.items():
            assert torch.equal(stem, expected[name])
    only.update_parameter(stems=None)
    assert only.stems == SOURCES


def test_stems_are_checked_against_the_model_before_anything_changes(repo: Path):
    separator = Separator("tiny", repo=repo, device="cpu", stems=["bass"])
    with pytest.raises(ValueError, match="stem 'guitar' is not a source of this model"):
        separator.update_parameter(stems=["guitar"], shifts=3)
    assert separator.stems == ["bass"] and separator._options.shifts == 1
    with pytest.raises(ValueError, match="stem 'piano' is not a source"):
        Separator("tiny", repo=repo, device="cpu", stems=["piano"])
