"""`python3 -m tools.demo` (`make demo`): each step's outputs and printed figures, with the quick
setup in a temporary folder; the baselines and report helpers against hand computations. The full
demo (minutes of training) is marked slow."""
import contextlib
import io
import json
from pathlib import Path
import re
import typing as tp

import numpy as np
import pytest
import soundfile
import torch

from tools import demo as demo_tool
from tools.demo import FULL, QUICK, STEPS, Demo, baselines, verdict
from tools.machine import cpu_kind
from tools.test_pretrained import score_table
from demucs.evaluate import BASELINES, oracle_mask
from demucs.toy_musdb import MIXTURE, SOURCES

FLOAT = r"(-?\d+\.\d+)"


def run_demo(*argv: str) -> tp.Tuple[int, str]:
    """Exit code and printed report of `python -m tools.demo ARGV` (commands' output aside)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo_tool.main(list(argv))
    return code, out.getvalue()


def score_row(report: str, name: str) -> tp.List[float]:
    """The 4 per-source nSDRs and their mean printed on the row `name` of the score table."""
    match = re.search(rf"^{re.escape(name)}\s+" + r"\s+".join([FLOAT] * 5) + "$", report,
                      re.MULTILINE)
    assert match, f"no score row {name!r} in:\n{report}"
    return [float(value) for value in match.groups()]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tp.Tuple[Path, str]:
    """The quick demo, run once in a fresh folder: (folder, printed report)."""
    workdir = tmp_path_factory.mktemp("demo")
    code, report = run_demo("--quick", "--workdir", str(workdir))
    assert code == 0, report
    return workdir, report


def signature(report: str) -> str:
    match = re.search(r"^XP ([0-9a-f]{8}), (\d+) epochs", report, re.MULTILINE)
    assert match, report
    return match.group(1)


def test_quick_demo_prints_every_step_and_real_commands(quick_demo):
    _, report = quick_demo
    for number, (title, _) in enumerate(STEPS, start=1):
        assert f"[{number}/{len(STEPS)}] {title}" in report
    sig = signature(report)
    assert "$ dora -P demucs run dset=toy dset.toy.tracks=3" in report
    assert f"$ python -m tools.export {sig} -o release_models" in report
    assert f"$ demucs --repo ./release_models -n {sig} 'data/toy_musdb/test/" in report
    assert f"$ python -m tools.test_pretrained --repo ./release_models -n {sig} dset=toy" in report


def test_quick_demo_trains_exports_and_separates(quick_demo):
    workdir, report = quick_demo
    sig = signature(report)
    history = json.loads((workdir / "outputs" / "xps" / sig / "history.json").read_text())
    assert len(history) == 1 and "test" in history[0]
    assert f"test nSDR (best state): {history[0]['test']['nsdr']:.2f} dB" in report
    assert (workdir / "release_models" / f"{sig}.th").stat().st_size > 0
    tracks = sorted((workdir / "data" / "toy_musdb" / "test").iterdir())
    length = soundfile.info(str(tracks[0] / f"{MIXTURE}.wav")).frames
    for source in SOURCES:
        stem = soundfile.info(str(workdir / "separated" / sig / MIXTURE / f"{source}.wav"))
        assert (stem.frames, stem.channels) == (length, 2)


def test_quick_demo_prints_the_model_beside_every_baseline(quick_demo):
    workdir, report = quick_demo
    sig = signature(report)
    expected = baselines(Demo(workdir, QUICK))
    rows = {key: score_row(report, label) for key, label in BASELINES.items()}
    for key, printed in rows.items():
        values = [expected[key][f"nsdr_{source}"] for source in SOURCES] + [expected[key]["nsdr"]]
        assert printed == pytest.approx(values, abs=0.006)
    model = score_row(report, f"model {sig}")
    assert model[-1] == pytest.approx(np.mean(model[:4]), abs=0.01)
    assert rows["oracle_mask"][-1] > rows["oracle_gain"][-1] > rows["equal_split"][-1]
    assert rows["oracle_mask"][-1] > model[-1]
    assert verdict(model[-1], rows["equal_split"][-1]).split(" by ")[0].split(" (")[0] in report
    assert "mixture baseline" not in report


def test_quick_demo_ends_with_its_time_and_cpu(quick_demo):
    _, report = quick_demo
    last = report.strip().splitlines()[-1]
    assert re.fullmatch(rf"Demo done in \d+ s on .+ \({re.escape(cpu_kind())}, \d+ cores usable, "
                        r"load average [\d.]+, [\d.]+, [\d.]+\)\.", last), last


def test_generation_step_reuses_an_existing_set(tmp_path, capsys):
    demo = Demo(tmp_path, QUICK)
    demo_tool.run(demo, STEPS[:1])
    first = capsys.readouterr().out
    assert "[1/1] Generate the toy MusDB" in first and "Generated." in first
    assert "train/: 3 tracks" in first and "test/: 1 tracks" in first
    demo_tool.run(demo, STEPS[:1])
    assert "Already present" in capsys.readouterr().out


def test_training_config_describes_the_generated_set():
    demo = Demo(Path("unused"), QUICK)
    assert demo.toy_settings["toy"]["tracks"] == 3 and demo.toy_settings["toy"]["seed"] == 42
    assert demo.train_argv[:2] == ["dset=toy", "dset.toy.tracks=3"]
    assert Demo(Path("unused")).train_argv[0] == "dset=toy" and "model=htdemucs" in FULL.train


def test_steps_after_training_need_a_trained_xp(tmp_path):
    with pytest.raises(demo_tool.DemoError, match="training step"):
        demo_tool.export_xp(Demo(tmp_path, QUICK))


def write_song(folder: Path, stems: tp.Dict[str, np.ndarray]
               ) -> tp.Tuple[tp.Dict[str, np.ndarray], np.ndarray]:
    """A MusDB-layout song of `stems` and their sum as mixture, in 16-bit wavs (musdb reads
    16-bit samples); returns the stems and mixture as written, read back in float64."""
    folder.mkdir(parents=True)
    files = {**stems, MIXTURE: sum(stems.values())}
    for name, audio in files.items():
        soundfile.write(folder / f"{name}.wav", audio, 44100, subtype="PCM_16")
    written = {name: soundfile.read(str(folder / f"{name}.wav"))[0] for name in files}
    return {source: written[source] for source in stems}, written[MIXTURE]


def hand_nsdr(stem: np.ndarray, estimate: np.ndarray) -> float:
    return 10 * np.log10(((stem ** 2).sum() + 1e-7) / (((stem - estimate) ** 2).sum() + 1e-7))


def test_baselines_match_hand_computation(tmp_path):
    """The demo's baselines on two songs: mixture/4, the least-squares gain of the mixture and
    the ideal ratio mask (`oracle_mask`, tested in test_evaluate), scored per song and averaged
    per source, then over sources."""
    rng = np.random.default_rng(0)
    expected = {key: {source: [] for source in SOURCES} for key in BASELINES}
    test_dir = tmp_path / "data" / "toy_musdb" / "test"
    for name in ["A - a", "B - b"]:
        stems = {source: scale * rng.standard_normal((1000, 2))
                 for source, scale in zip(SOURCES, [0.1, 0.2, 0.05, 0.3])}
        stems, mixture = write_song(test_dir / name, stems)
        masked = oracle_mask(torch.from_numpy(np.stack(list(stems.values()))).transpose(1, 2),
                             torch.from_numpy(mixture).t()).transpose(1, 2).numpy()
        for (source, stem), stem_masked in zip(stems.items(), masked):
            gain = (stem * mixture).sum() / (mixture ** 2).sum()
            expected["equal_split"][source].append(hand_nsdr(stem, mixture / 4))
            expected["oracle_gain"][source].append(hand_nsdr(stem, gain * mixture))
            expected["oracle_mask"][source].append(hand_nsdr(stem, stem_masked))
    result = baselines(Demo(tmp_path, QUICK))
    for key in BASELINES:
        for source in SOURCES:
            mean = np.mean(expected[key][source])
            assert result[key][f"nsdr_{source}"] == pytest.approx(mean, abs=1e-6)
        overall = np.mean([np.mean(values) for values in expected[key].values()])
        assert result[key]["nsdr"] == pytest.approx(overall, abs=1e-6)
    assert result["oracle_gain"]["nsdr"] > result["equal_split"]["nsdr"]


def test_score_table_and_verdict():
    scores = {f"nsdr_{source}": float(index) for index, source in enumerate(SOURCES)}
    scores["nsdr"] = 1.5
    table = score_table({"model x": scores, "equal split": scores}, SOURCES)
    assert score_row(table, "model x") == [0, 1, 2, 3, 1.5]
    assert "BEATS the equal split" in verdict(2.0, 1.0) and "by 1.00 dB" in verdict(2.0, 1.0)
    assert "does NOT beat the equal split (-1.00 dB" in verdict(0.0, 1.0)


@pytest.mark.slow
def test_rerun_reuses_the_finished_xp(quick_demo):
    workdir, first = quick_demo
    code, again = run_demo("--quick", "--workdir", str(workdir))
    assert code == 0 and signature(again) == signature(first)
    assert "Already present" in again
    label = BASELINES["equal_split"]
    assert score_row(again, label) == score_row(first, label)


@pytest.mark.slow
def test_full_demo_model_beats_the_equal_split(tmp_path):
    code, report = run_demo("--workdir", str(tmp_path))
    assert code == 0, report
    model = score_row(report, f"model {signature(report)}")
    assert model[-1] > score_row(report, BASELINES["equal_split"])[-1] + 0.5
    assert "BEATS the equal split" in report
