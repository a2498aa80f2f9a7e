"""Test-set evaluation: MDX nSDR on every test, and the museval (BSS Eval v4) SDR at the end;
the nSDR of three baselines on the same songs (`baseline_scores`: equal split, scalar-gain oracle,
ideal ratio mask).

Each worker separates its share of the MusDB test tracks; the scores are computed in a process pool
(`test.workers`) and gathered on every worker.
"""
from concurrent import futures
from dataclasses import dataclass
import logging
import multiprocessing
from pathlib import Path
import signal
import tempfile
import typing as tp

import musdb
import numpy as np
import torch
from tqdm import tqdm
import yaml

from . import distrib
from .apply import apply_model
from .audio import convert_audio, save_audio
from .utils import DummyPoolExecutor
from .wav import DatasetError, MIXTURE, check_tracks

logger = logging.getLogger(__name__)

# Scores of one track: {source: {metric: [value per frame (or one value for nsdr)]}}.
TrackScores = tp.Dict[str, tp.Dict[str, tp.List[float]]]


@dataclass(frozen=True)
class EvaluationSettings:
    """Where the test set is and how it is separated and scored, read once from the training
    config by `from_config` (config keys in brackets)."""
    musdb: str  # MusDB HQ folder whose test/ is scored [dset.musdb]
    samplerate: int  # rate the test tracks are read at [dset.musdb_samplerate]
    nonhq: tp.Optional[str] = None  # MusDB (non-HQ, stems.mp4) folder used instead [test.nonhq]
    shifts: int = 1  # random shifts of `apply_model` [test.shifts]
    split: bool = True  # separate in segments [test.split]
    overlap: float = 0.25  # [test.overlap]
    workers: int = 2  # scoring processes, 0: in this process [test.workers]
    save: bool = False  # write the separated tracks as mp3 in the XP folder [test.save]

    @classmethod
    def from_config(cls, args: tp.Any) -> "EvaluationSettings":
        """The settings of the training config `args` (`dset.musdb*`, `test.*`)."""
        test = args.test
        return cls(musdb=str(args.dset.musdb), samplerate=int(args.dset.musdb_samplerate),
                   nonhq=test.nonhq, shifts=test.shifts, split=bool(test.split),
                   overlap=test.overlap, workers=test.workers, save=bool(test.save))


def new_sdr(references: torch.Tensor, estimates: torch.Tensor) -> torch.Tensor:
    """MDX-challenge SDR `10 log10((sum ref^2 + eps) / (sum (ref - est)^2 + eps))`, eps = 1e-7.

    Inputs are `[B, S, *, *]` (e.g. `[B, S, T, C]`); the sums run over the last two dimensions,
    giving one score per item and source, `[B, S]`.
    """
    if references.dim() != 4 or estimates.dim() != 4:
        raise ValueError(f"new_sdr needs 4-D tensors, got {tuple(references.shape)} and "
                         f"{tuple(estimates.shape)}")
    delta = 1e-7
    signal = references.square().sum(dim=(2, 3)) + delta
    noise = (references - estimates).square().sum(dim=(2, 3)) + delta
    return 10 * torch.log10(signal / noise)


def si_sdr(references: torch.Tensor, estimates: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al., 2019) of `[B, S, C, T]` estimates, `[B, S]`.

    Each source is taken whole (both channels, the whole track) with its mean removed; the
    reference scaled to best fit the estimate is the target, the rest is the error:
    `10 log10((|a r|^2 + eps) / (|e - a r|^2 + eps))` with `a = <e, r> / (|r|^2 + eps)`. Unlike
    nSDR, a gain on the estimate does not change it.
    """
    if references.shape != estimates.shape or references.dim() != 4:
        raise ValueError(f"si_sdr needs two [B, S, C, T] tensors of one shape, got "
                         f"{tuple(references.shape)} and {tuple(estimates.shape)}")
    refs = references.flatten(2).double()
    ests = estimates.flatten(2).double()
    refs = refs - refs.mean(-1, keepdim=True)
    ests = ests - ests.mean(-1, keepdim=True)
    scale = (refs * ests).sum(-1, keepdim=True) / (refs.square().sum(-1, keepdim=True) + eps)
    target = scale * refs
    error = ests - target
    return 10 * torch.log10((target.square().sum(-1) + eps) / (error.square().sum(-1) + eps))


def eval_track(references: torch.Tensor, estimates: torch.Tensor, win: int, hop: int,
               compute_sdr: bool = True) -> tp.Tuple[tp.Optional[tuple], torch.Tensor]:
    """Score the `[S, C, T]` estimates of one track against its references.

    Returns `(bss_scores, nsdr)`: `bss_scores` is museval's `(SDR, ISR, SIR, SAR)`, each
    `[S, frames]` over `win`-sample windows every `hop` samples (None unless `compute_sdr`), and
    `nsdr` is `[S]`.
    """
    references = references.transpose(1, 2).double()
    estimates = estimates.transpose(1, 2).double()
    nsdr = new_sdr(references.cpu()[None], estimates.cpu()[None])[0]
    if not compute_sdr:
        return None, nsdr
    import museval
    scores = museval.metrics.bss_eval(
        references.numpy(), estimates.numpy(), compute_permutation=False, window=win, hop=hop,
        framewise_filters=False, bsseval_sources_version=False)[:-1]
    return scores, nsdr


# The stems musdb's own setup knows; any other set of stems gets a setup of its own.
MUSDB_STEMS = frozenset({"drums", "bass", "other", "vocals"})


def musdb_setup(sources: tp.Sequence[str]) -> dict:
    """A musdb setup for a MusDB-layout folder with `sources` (e.g. guitar and piano stems):
    each source read from `SOURCE.wav`, each target being that source alone."""
    return {"sample_rate": 44100.0, "mixture": "mixture.wav",
            "sources": {source: f"{source}.wav" for source in sources},
            "stem_ids": {"mixture": 0, **{source: index + 1
                                          for index, source in enumerate(sources)}},
            "targets": {source: {source: 1} for source in sources}}


def _test_set(settings: EvaluationSettings, sources: tp.Sequence[str]) -> musdb.DB:
    """The test tracks, read with musdb: MusDB HQ (`dset.musdb`) or MusDB (`test.nonhq`); a
    folder of other stems than MusDB's is read through `musdb_setup(sources)`."""
    if settings.nonhq is not None:
        return musdb.DB(settings.nonhq, subsets=["test"], is_wav=False)
    if set(sources) <= MUSDB_STEMS:
        return musdb.DB(settings.musdb, subsets=["test"], is_wav=True)
    with tempfile.TemporaryDirectory() as folder:
        setup = Path(folder) / "setup.yaml"
        setup.write_text(yaml.safe_dump(musdb_setup(sources)))
        return musdb.DB(settings.musdb, setup_file=str(setup), subsets=["test"], is_wav=True)


def problems_of_test_set(settings: EvaluationSettings, sources: tp.Sequence[str]) -> tp.List[str]:
    """Why the test set of `settings` cannot score a model separating `sources` ([] when it
    can): no such folder, or songs lacking some of the model's stems (e.g. a six-stem model on
    a four-stem set), unreadable or at another rate than `dset.musdb_samplerate`. Reads headers
    only, so that a test set that cannot work is refused before any separation."""
    if settings.nonhq is not None:
        if Path(settings.nonhq).is_dir():
            return []
        return [f"test.nonhq={settings.nonhq}: folder does not exist"]
    root = Path(settings.musdb) / "test"
    if not root.is_dir():
        return [f"{root}: folder does not exist; set dset.musdb to a folder whose test/ holds "
                "songs as test/<song>/<stem>.wav"]
    advice = (f"the model separates {', '.join(sources)}: set dset.musdb to a folder whose "
              "test/ songs hold one wav per stem of the model")
    return check_tracks(root, [MIXTURE] + list(sources), samplerate=settings.samplerate,
                        advice=advice)


def _separate_track(model: torch.nn.Module, track, settings: EvaluationSettings,
                    device: torch.device,
                    amp: tp.Optional[str] = None) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Separate one MusDB track with `model` on `device`, with the shifts, split and overlap of
    `settings`, read at its sample rate (in the precision `amp` selects, see `apply_model`);
    returns (references, estimates), both `[S, C, T]`."""
    src_rate = settings.samplerate
    mix = torch.from_numpy(track.audio).t().float()
    if mix.dim() == 1:
        mix = mix[None]
    mix = mix.to(device)
    mono = mix.mean(dim=0)
    mean, std = mono.mean(), mono.std()
    # upstream divides by the std itself; the floor only keeps a silent track finite
    mix = (mix - mean) / std.clamp_min(1e-8)
    mix = convert_audio(mix, src_rate, model.samplerate, model.audio_channels)
    estimates = apply_model(model, mix[None], shifts=settings.shifts, split=settings.split,
                            overlap=settings.overlap, amp=amp)[0]
    estimates = (estimates * std + mean).cpu()
    references = torch.stack(
        [torch.from_numpy(track.targets[name].audio).t().float() for name in model.sources])
    if references.dim() == 2:
        references = references[:, None]
    references = convert_audio(references, src_rate, model.samplerate, model.audio_channels)
    return references, estimates


def _save_estimates(model: torch.nn.Module, folder: Path, estimates: torch.Tensor) -> None:
    """Write the `[S, C, T]` estimates of one track as `folder/<source>.mp3`."""
    folder.mkdir(exist_ok=True, parents=True)
    for source, estimate in zip(model.sources, estimates):
        save_audio(estimate, folder / f"{source}.mp3", model.samplerate)


def _score_track(references: torch.Tensor, estimates: torch.Tensor, win: int, hop: int,
                 compute_sdr: bool) -> tp.Tuple[tp.Optional[tuple], torch.Tensor, torch.Tensor]:
    """`eval_track`'s scores of one `[S, C, T]` track, plus its SI-SDR `[S]`."""
    bss, nsdr = eval_track(references, estimates, win=win, hop=hop, compute_sdr=compute_sdr)
    return bss, nsdr, si_sdr(references.cpu()[None], estimates.cpu()[None])[0]


def _track_scores(sources: tp.Sequence[str], result) -> TrackScores:
    bss, nsdr, scale_invariant = result
    scores: TrackScores = {source: {"nsdr": [float(value)], "si_sdr": [float(invariant)]}
                           for source, value, invariant in zip(sources, nsdr, scale_invariant)}
    if bss is not None:
        sdr, isr, sir, sar = bss
        for idx, source in enumerate(sources):
            scores[source].update({"SDR": sdr[idx].tolist(), "SIR": sir[idx].tolist(),
                                   "ISR": isr[idx].tolist(), "SAR": sar[idx].tolist()})
    return scores


def summarize(tracks: tp.Dict[str, TrackScores], sources: tp.Sequence[str]) -> tp.Dict[str, float]:
    """Aggregate per-track scores: for each metric `m`, the per-track median over frames, then
    `m_<src>` (mean over tracks), `m_med_<src>` (median over tracks), and `m`, `m_med` (averaged
    over sources)."""
    result: tp.Dict[str, float] = {}
    first = next(iter(tracks.values()))[sources[0]]
    for metric in first:
        name = metric.lower()
        means, medians = [], []
        for source in sources:
            per_track = [np.nanmedian(tracks[track][source][metric]) for track in tracks]
            means.append(float(np.mean(per_track)))
            medians.append(float(np.median(per_track)))
            result[f"{name}_{source}"] = means[-1]
            result[f"{name}_med_{source}"] = medians[-1]
        # averaged over sources as upstream does (each divided, then added in order), so that
        # the rounding of the overall figures is the official one
        result[name] = sum(value / len(sources) for value in means)
        result[f"{name}_med"] = sum(value / len(sources) for value in medians)
    return result


# The references a model's scores are read against, by key: the equal split (each stem
# estimated as mixture / N: what a model that learned nothing but the stem count does), the
# scalar-gain oracle (each stem as the best multiple of the mixture, knowing the stem: an upper
# bound of what any scalar gain can do, the floor a separating model must clear by far) and the
# ideal ratio mask (the mixture's spectrogram masked knowing the stems: the classic oracle of
# source separation, about what a perfect mask-based model could reach).
BASELINES = {"equal_split": "equal split (mixture/N)",
             "oracle_gain": "oracle gain (best g x mixture)",
             "oracle_mask": "oracle mask (ideal ratio mask)"}
# STFT of the ideal ratio mask: 93 ms windows, 75 % overlap at 44.1 kHz (as SiSEC's oracles).
ORACLE_NFFT = 4096
ORACLE_HOP = 1024


def equal_split(mixture: torch.Tensor, count: int) -> torch.Tensor:
    """The `[C, T]` mixture divided equally among `count` stems, `[count, C, T]`."""
    return (mixture / count).expand(count, *mixture.shape)


def oracle_gain(references: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    """Each `[S, C, T]` reference estimated as `g_s * mixture` with the gain of highest nSDR,
    `g_s = <ref_s, mix> / <mix, mix>` (least squares in closed form; 0 for a silent mixture)."""
    energy = mixture.square().sum()
    if energy == 0:
        return torch.zeros_like(references)
    gains = (references * mixture).sum(dim=(1, 2)) / energy
    return gains[:, None, None] * mixture


def oracle_mask(references: torch.Tensor, mixture: torch.Tensor, nfft: int = ORACLE_NFFT,
                hop: int = ORACLE_HOP) -> torch.Tensor:
    """Each `[S, C, T]` reference estimated by its ideal ratio mask: in every time-frequency bin
    of each channel, the mixture's STFT times the stem's share of the stems' power,
    `|R_s|^2 / sum_j |R_j|^2` (0 where every stem is silent). The STFT pads the track with
    zeros, so a track shorter than a window is masked too. Computed in float32 one channel at a
    time (a 10-minute stereo track of 4 stems holds about 1 GB of spectrograms), returned in
    the mixture's dtype."""
    window = torch.hann_window(nfft)
    length = mixture.shape[-1]

    def stft(signal: torch.Tensor) -> torch.Tensor:
        return torch.stft(signal.float(), nfft, hop, window=window, center=True,
                          pad_mode="constant", return_complex=True)

    channels = []
    for channel in range(mixture.shape[0]):
        powers = stft(references[:, channel]).abs().square()
        masks = powers / powers.sum(0).clamp_min(torch.finfo(powers.dtype).tiny)
        del powers
        masked = masks * stft(mixture[channel])
        channels.append(torch.istft(masked, nfft, hop, window=window, center=True,
                                    length=length))
    return torch.stack(channels, 1).to(mixture.dtype)


def _baseline_estimates(references: torch.Tensor,
                        mixture: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
    """The `[S, C, T]` estimates of each of `BASELINES` for one track."""
    return {"equal_split": equal_split(mixture, len(references)),
            "oracle_gain": oracle_gain(references, mixture),
            "oracle_mask": oracle_mask(references, mixture)}


def baseline_scores(settings: EvaluationSettings,
                    sources: tp.Sequence[str]) -> tp.Dict[str, tp.Dict[str, float]]:
    """nSDR of each of `BASELINES` on the test set of `settings`, for the stems `sources`,
    aggregated as `evaluate` aggregates a model's (`summarize`): `{key: {"nsdr": ...,
    "nsdr_<source>": ..., ...}}`. The tracks are scored as read, in float64, without any model
    or separation: it takes the time of reading the test set."""
    test_set = _test_set(settings, sources)
    if len(test_set) == 0:
        raise FileNotFoundError(f"No test tracks under {settings.nonhq or settings.musdb}/test "
                                "to score the baselines on.")
    tracks: tp.Dict[str, tp.Dict[str, TrackScores]] = {key: {} for key in BASELINES}
    for track in test_set.tracks:
        mixture = torch.from_numpy(track.audio).double().reshape(len(track.audio), -1).t()
        references = torch.stack([
            torch.from_numpy(track.targets[source].audio).double()
            .reshape(len(track.audio), -1).t() for source in sources])
        for key, estimates in _baseline_estimates(references, mixture).items():
            nsdr = new_sdr(references.transpose(1, 2)[None], estimates.transpose(1, 2)[None])[0]
            tracks[key][track.name] = {source: {"nsdr": [float(value)]}
                                       for source, value in zip(sources, nsdr)}
    return {key: summarize(scores, sources) for key, scores in tracks.items()}


def _ignore_interrupts() -> None:
    """Scoring workers leave Ctrl-C to the main process, which stops them: each would otherwise
    print its own KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _scoring_pool(workers: int):
    """Process pool scoring the tracks (in process when `workers` is 0). Workers are spawned:
    forked ones inherit torch's OpenMP thread pool without its threads and hang on their first
    parallel tensor operation."""
    if not workers:
        return DummyPoolExecutor(workers)
    return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_ignore_interrupts)


def evaluate(solver, compute_sdr: bool = False, amp: tp.Optional[str] = None
             ) -> tp.Dict[str, float]:
    """Separate the MusDB test set with `solver.model` and return the aggregated scores
    (`nsdr*` and `si_sdr*` always, `sdr*`, `isr*`, `sir*`, `sar*` when `compute_sdr`). `amp`
    runs the model in mixed precision (see `apply_model`); training tests keep float32.

    Of the solver, only `model`, `device`, `folder` (where `test.save` writes) and
    `settings.evaluation` (an `EvaluationSettings`) are read. A test set that cannot score the
    model (`problems_of_test_set`) raises `DatasetError` before any separation.
    """
    settings: EvaluationSettings = solver.settings.evaluation
    model = solver.model
    problems = problems_of_test_set(settings, model.sources)
    if problems:
        raise DatasetError(problems, context="the test set")
    test_set = _test_set(settings, model.sources)
    if len(test_set) == 0:
        location = settings.nonhq or settings.musdb
        raise FileNotFoundError(f"No MusDB test tracks found under {location}/test: its "
                                "songs go in test/<song>/<stem>.wav.")
    win = hop = int(1. * model.samplerate)
    indexes = range(distrib.rank, len(test_set), distrib.world_size)
    pendings = []
    with _scoring_pool(settings.workers) as pool:
        for index in tqdm(indexes, desc="Eval (separation)", disable=distrib.rank != 0,
                          leave=False):
            track = test_set.tracks[index]
            references, estimates = _separate_track(model, track, settings, solver.device, amp)
            if settings.save:
                _save_estimates(model, Path(solver.folder) / "wav" / track.name, estimates)
            pendings.append((track.name, pool.submit(_score_track, references, estimates,
                                                     win=win, hop=hop, compute_sdr=compute_sdr)))
        tracks = {}
        for name, pending in tqdm(pendings, desc="Eval (scores)", disable=distrib.rank != 0,
                                  leave=False):
            tracks[name] = _track_scores(model.sources, pending.result())
    all_tracks: tp.Dict[str, TrackScores] = {}
    for src in range(distrib.world_size):
        all_tracks.update(distrib.share(tracks, src))
    return summarize(all_tracks, model.sources)
