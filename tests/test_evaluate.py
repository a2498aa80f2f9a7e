"""new_sdr against a hand computation, museval scoring, aggregation, evaluate() on a tiny MusDB."""
import dataclasses
from pathlib import Path
from types import SimpleNamespace

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from demucs.evaluate import EvaluationSettings, equal_split, eval_track, evaluate, new_sdr, \
    oracle_gain, oracle_mask, si_sdr, summarize

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 8000


def nsdr_of(references: torch.Tensor, estimates: torch.Tensor) -> torch.Tensor:
    """new_sdr of `[S, C, T]` tensors, `[S]`."""
    return new_sdr(references.transpose(1, 2)[None], estimates.transpose(1, 2)[None])[0]


def test_equal_split_scores_as_computed_by_hand():
    """Two stems: the first twice the second; mixture/2 is off by half the second stem's
    energy for each, so nSDR = 10 log10(|r|^2 / |r - m/2|^2) per stem."""
    second = torch.tensor([[1., -2., 3.], [0.5, 0., -1.]], dtype=torch.float64)
    references = torch.stack([2 * second, second])
    mixture = references.sum(0)
    estimates = equal_split(mixture, 2)
    assert torch.equal(estimates[0], 1.5 * second) and torch.equal(estimates[1], 1.5 * second)
    energy = float(second.square().sum())
    expected = [10 * np.log10((4 * energy + 1e-7) / (0.25 * energy + 1e-7)),
                10 * np.log10((energy + 1e-7) / (0.25 * energy + 1e-7))]
    assert nsdr_of(references, estimates).tolist() == pytest.approx(expected, rel=1e-12)


def test_oracle_gain_is_the_best_scalar_gain_of_the_mixture():
    torch.manual_seed(0)
    references = torch.randn(3, 2, 100, dtype=torch.float64)
    mixture = references.sum(0)
    best = nsdr_of(references, oracle_gain(references, mixture))
    for step in (-1e-3, 1e-3):  # any other gain scores lower
        gains = (references * mixture).sum(dim=(1, 2)) / mixture.square().sum() + step
        worse = nsdr_of(references, gains[:, None, None] * mixture)
        assert (worse < best).all()
    # a stem that is half the mixture is found exactly: only the 1e-7 floor bounds its nSDR
    half = torch.stack([mixture / 2, mixture / 2])
    assert (nsdr_of(half, oracle_gain(half, mixture)) > 80).all()
    assert torch.equal(oracle_gain(half, torch.zeros_like(mixture)), torch.zeros_like(half))


def test_oracle_mask_separates_what_its_stft_resolves():
    """Two tones far apart in frequency are found almost exactly, where no gain of the mixture
    can; one stem is the mixture itself; silence gives zeros, not NaN."""
    time = torch.arange(2 * 44100, dtype=torch.float64) / 44100
    low = torch.sin(2 * np.pi * 440 * time).expand(2, -1)
    high = 0.5 * torch.sin(2 * np.pi * 5000 * time + 1).expand(2, -1)
    references = torch.stack([low, high])
    mixture = references.sum(0)
    estimates = oracle_mask(references, mixture)
    assert estimates.shape == references.shape and estimates.dtype == torch.float64
    assert (nsdr_of(references, estimates) > 45).all()
    assert (nsdr_of(references, oracle_gain(references, mixture)) < 10).all()
    alone = references[:1]
    assert (nsdr_of(alone, oracle_mask(alone, low)) > 80).all()
    silence = torch.zeros(3, 2, 500, dtype=torch.float64)
    assert torch.equal(oracle_mask(silence, silence[0]), silence)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 9000), stems=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_oracle_mask_keeps_shape_and_sums_to_the_mixture(length, stems, seed):
    """Any length (shorter than a window too): the masks of a bin add up to 1 wherever a stem
    sounds, so the estimates add up to the mixture."""
    generator = torch.Generator().manual_seed(seed)
    references = torch.randn(stems, 2, length, generator=generator, dtype=torch.float64)
    mixture = references.sum(0)
    estimates = oracle_mask(references, mixture)
    assert estimates.shape == references.shape
    assert torch.allclose(estimates.sum(0), mixture, atol=1e-4 * float(mixture.abs().max()))


def test_new_sdr_matches_hand_computation():
    torch.manual_seed(0)
    refs = torch.randn(2, 3, 50, 2)
    ests = refs + 0.3 * torch.randn(2, 3, 50, 2)
    got = new_sdr(refs, ests)
    assert got.shape == (2, 3)
    for b in range(2):
        for s in range(3):
            num = float((refs[b, s] ** 2).sum()) + 1e-7
            den = float(((refs[b, s] - ests[b, s]) ** 2).sum()) + 1e-7
            assert float(got[b, s]) == pytest.approx(10 * np.log10(num / den), rel=1e-5)


def test_new_sdr_perfect_and_silent_cases():
    refs = torch.ones(1, 1, 10, 2)
    assert float(new_sdr(refs, refs)) == pytest.approx(10 * np.log10((20 + 1e-7) / 1e-7), rel=1e-6)
    zeros = torch.zeros(1, 1, 10, 2)
    assert float(new_sdr(zeros, zeros)) == pytest.approx(0.)
    with pytest.raises(ValueError, match="4-D"):
        new_sdr(torch.zeros(3, 4), torch.zeros(3, 4))


def test_si_sdr_matches_hand_computation():
    reference = torch.tensor([1., -1., 1., -1.])  # zero mean
    noise = torch.tensor([1., 1., -1., -1.])  # zero mean, orthogonal to the reference
    estimate = 2 * reference + noise  # target 2r (energy 16), error n (energy 4)
    value = si_sdr(reference.view(1, 1, 1, 4), estimate.view(1, 1, 1, 4))
    assert value.item() == pytest.approx(10 * np.log10(16 / 4), abs=1e-6)


@given(gain=st.floats(0.01, 100), offset=st.floats(-1, 1))
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
def test_si_sdr_ignores_gain_and_offset(gain, offset):
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(2, 3, 2, 500, generator=generator)
    estimates = references + 0.3 * torch.randn(2, 3, 2, 500, generator=generator)
    base = si_sdr(references, estimates)
    assert torch.allclose(si_sdr(references, gain * estimates + offset), base, atol=1e-6)
    assert base.shape == (2, 3)
    with pytest.raises(ValueError, match="si_sdr needs two"):
        si_sdr(references, estimates[..., :-1])


def test_eval_track_bss_scores_shapes_and_nsdr():
    torch.manual_seed(0)
    refs = torch.randn(2, 2, 3 * RATE)
    ests = refs + 0.1 * torch.randn_like(refs)
    bss, nsdr = eval_track(refs, ests, win=RATE, hop=RATE, compute_sdr=True)
    sdr, isr, sir, sar = bss
    assert sdr.shape == (2, 3)
    assert np.all(sdr > 15)
    assert torch.allclose(nsdr, new_sdr(refs.transpose(1, 2)[None].double(),
                                        ests.transpose(1, 2)[None].double())[0])
    assert eval_track(refs, ests, RATE, RATE, compute_sdr=False)[0] is None


def test_summarize_mean_and_median_over_tracks():
    tracks = {
        "a": {"x": {"SDR": [1., 3., np.nan]}, "y": {"SDR": [4.]}},
        "b": {"x": {"SDR": [5.]}, "y": {"SDR": [0., 2.]}},
        "c": {"x": {"SDR": [9.]}, "y": {"SDR": [6.]}},
    }
    result = summarize(tracks, ["x", "y"])
    assert result["sdr_x"] == pytest.approx((2 + 5 + 9) / 3)
    assert result["sdr_med_x"] == pytest.approx(5)
    assert result["sdr_y"] == pytest.approx((4 + 1 + 6) / 3)
    assert result["sdr"] == pytest.approx((result["sdr_x"] + result["sdr_y"]) / 2)
    assert result["sdr_med"] == pytest.approx((5 + 4) / 2)


class QuarterMix(nn.Module):
    """Predicts each source as a quarter of the mixture."""
    sources = SOURCES
    samplerate = RATE
    audio_channels = 2
    segment = 1.

    def forward(self, mix):
        return mix[:, None].expand(-1, len(SOURCES), -1, -1) / len(SOURCES)


def _write_test_set(root: Path) -> dict:
    rng = np.random.default_rng(0)
    stems_by_track = {}
    for name in ["A - a", "B - b"]:
        folder = root / "test" / name
        folder.mkdir(parents=True)
        stems = {src: (0.1 * rng.standard_normal((RATE, 2))).astype(np.float32) for src in SOURCES}
        for src, wav in stems.items():
            sf.write(folder / f"{src}.wav", wav, RATE, subtype="FLOAT")
        sf.write(folder / "mixture.wav", sum(stems.values()), RATE, subtype="FLOAT")
        stems_by_track[name] = stems
    return stems_by_track


def _solver(evaluation: EvaluationSettings, folder: Path) -> SimpleNamespace:
    """The parts of a Solver that `evaluate` uses, with the QuarterMix model."""
    return SimpleNamespace(settings=SimpleNamespace(evaluation=evaluation), model=QuarterMix(),
                           device=torch.device("cpu"), folder=folder)


def _quarter_mix_solver(tmp_path, workers: int, save: bool) -> SimpleNamespace:
    evaluation = EvaluationSettings(musdb=str(tmp_path / "musdb"), samplerate=RATE, shifts=0,
                                    split=False, workers=workers, save=save)
    return _solver(evaluation, tmp_path / "xp")


def test_evaluation_settings_are_read_once_from_the_training_config():
    from demucs.train import main
    cfg = main.get_xp(["dset.musdb=/data/musdb", "dset.musdb_samplerate=8000", "test.shifts=2",
                       "test.split=false", "test.overlap=0.5", "test.workers=0",
                       "test.save=true", "test.nonhq=/data/nonhq"]).cfg
    assert EvaluationSettings.from_config(cfg) == EvaluationSettings(
        musdb="/data/musdb", samplerate=8000, nonhq="/data/nonhq", shifts=2, split=False,
        overlap=0.5, workers=0, save=True)


def test_evaluate_tiny_musdb_against_hand_nsdr(tmp_path):
    stems = _write_test_set(tmp_path / "musdb")
    solver = _quarter_mix_solver(tmp_path, workers=0, save=True)
    result = evaluate(solver, compute_sdr=False)
    expected = {src: [] for src in SOURCES}
    for track in stems.values():
        mix = sum(track.values())
        for src in SOURCES:
            ref = track[src].astype(np.float64)
            num = (ref ** 2).sum() + 1e-7
            den = ((ref - mix / 4) ** 2).sum() + 1e-7
            expected[src].append(10 * np.log10(num / den))
    for src in SOURCES:
        assert result[f"nsdr_{src}"] == pytest.approx(np.mean(expected[src]), abs=2e-3)
        # a quarter of the mixture: SI-SDR is that of the mixture, against a hand computation
        hand = []
        for track in stems.values():
            ref = track[src].astype(np.float64).ravel()
            est = sum(track.values()).astype(np.float64).ravel()
            ref, est = ref - ref.mean(), est - est.mean()
            target = (ref @ est) / (ref @ ref + 1e-8) * ref
            hand.append(10 * np.log10(((target ** 2).sum() + 1e-8)
                                      / (((est - target) ** 2).sum() + 1e-8)))
        assert result[f"si_sdr_{src}"] == pytest.approx(np.mean(hand), abs=2e-3)
    assert "sdr" not in result
    assert (tmp_path / "xp" / "wav" / "A - a" / "vocals.mp3").exists()


def test_evaluate_scores_a_silent_track(tmp_path):
    """The mixture is divided by its std like upstream, floored so that silence stays finite."""
    for name in ["A - a", "B - b"]:
        folder = tmp_path / "musdb" / "test" / name
        folder.mkdir(parents=True)
        for stem in SOURCES + ["mixture"]:
            sf.write(folder / f"{stem}.wav", np.zeros((RATE, 2), np.float32), RATE,
                     subtype="FLOAT")
    result = evaluate(_quarter_mix_solver(tmp_path, workers=0, save=False))
    assert all(result[f"nsdr_{src}"] == 0 for src in SOURCES)


def test_evaluate_reports_missing_test_set(tmp_path):
    (tmp_path / "test").mkdir()
    solver = _solver(EvaluationSettings(musdb=str(tmp_path), samplerate=RATE, workers=0),
                     tmp_path)
    with pytest.raises(FileNotFoundError, match="test tracks"):
        evaluate(solver)


@pytest.mark.timeout(120)
def test_evaluate_scoring_workers_do_not_hang_after_parallel_torch_ops(tmp_path):
    """Regression: forked scoring workers inherited a dead OpenMP pool and hung forever."""
    _write_test_set(tmp_path / "musdb")
    torch.set_num_threads(2)
    assert float(torch.ones(1_000_000).mul(2).sum()) == 2_000_000  # starts the OpenMP threads
    solver = _quarter_mix_solver(tmp_path, workers=2, save=False)
    in_pool = evaluate(solver, compute_sdr=False)
    solver.settings.evaluation = dataclasses.replace(solver.settings.evaluation, workers=0)
    assert in_pool == pytest.approx(evaluate(solver, compute_sdr=False))


class SixStems(QuarterMix):
    """A six-stem model; its forward must never run on a four-stem test set."""
    sources = ["drums", "bass", "guitar", "piano", "other", "vocals"]

    def forward(self, mix):
        raise AssertionError("separated a test set that cannot score this model")


def test_a_test_set_without_the_model_stems_is_refused_before_separating(tmp_path):
    """Issue 30: a six-stem model on a four-stem test set separated every track, then stopped
    with `KeyError: 'guitar'`."""
    from demucs.wav import DatasetError
    _write_test_set(tmp_path / "musdb")
    solver = _quarter_mix_solver(tmp_path, workers=0, save=False)
    solver.model = SixStems()
    with pytest.raises(DatasetError) as error:
        evaluate(solver)
    (problem,) = error.value.problems
    assert problem.startswith(f"{tmp_path / 'musdb' / 'test'}: none of its 2 song folder(s) "
                              "holds guitar.wav, piano.wav (its songs hold bass, drums, mixture, "
                              "other, vocals): the model separates drums, bass, guitar, piano")


def test_a_missing_test_folder_and_another_rate_are_refused_before_separating(tmp_path):
    from demucs.evaluate import problems_of_test_set
    settings = _quarter_mix_solver(tmp_path, workers=0, save=False).settings.evaluation
    assert problems_of_test_set(settings, SOURCES) == [
        f"{tmp_path / 'musdb' / 'test'}: folder does not exist; set dset.musdb to a folder whose "
        "test/ holds songs as test/<song>/<stem>.wav"]
    _write_test_set(tmp_path / "musdb")
    assert problems_of_test_set(settings, SOURCES) == []
    settings = dataclasses.replace(settings, samplerate=44100)
    (problem,) = problems_of_test_set(settings, SOURCES)
    assert f"{RATE} Hz, but the test set is read as dset.musdb_samplerate=44100 Hz" in problem


def test_scoring_workers_leave_ctrl_c_to_the_main_process():
    import signal
    from demucs.evaluate import _ignore_interrupts
    previous = signal.getsignal(signal.SIGINT)
    try:
        _ignore_interrupts()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
