"""Training on other stems than MusDB's: 2 and 6 stems, end to end (train, test, export, separate
with the `demucs` command, score with tools.test_pretrained), on tiny MusDB-layout sets."""
import json
from pathlib import Path

import pytest

from demucs.evaluate import MUSDB_STEMS, musdb_setup
from tests.training_helpers import RATE, base_argv, registered_xp, write_tiny_musdb

STEM_SETS = {
    "2 stems": ["vocals", "accompaniment"],
    "6 stems": ["drums", "bass", "guitar", "piano", "other", "vocals"],
}


def test_musdb_setup_of_other_stems():
    setup = musdb_setup(["guitar", "piano"])
    assert setup["sources"] == {"guitar": "guitar.wav", "piano": "piano.wav"}
    assert setup["targets"] == {"guitar": {"guitar": 1}, "piano": {"piano": 1}}
    assert setup["mixture"] == "mixture.wav"
    assert MUSDB_STEMS == {"drums", "bass", "other", "vocals"}


@pytest.mark.parametrize("name", list(STEM_SETS))
def test_any_stems_train_test_export_and_separate(name, tmp_path, dora_dir):
    from demucs.separate import main as separate
    from demucs.train import get_solver
    from tools.export import export
    from tools.test_pretrained import run
    sources = STEM_SETS[name]
    musdb = write_tiny_musdb(tmp_path / "songs", sources)
    stems = [f"dset.sources=[{','.join(sources)}]", f"weights=[{','.join(['1'] * len(sources))}]"]
    xp = registered_xp(base_argv(musdb, epochs=1) + stems)
    with xp.enter():
        get_solver(xp.cfg).train()
    test = json.loads((Path(xp.folder) / "history.json").read_text())[-1]["test"]
    assert {f"nsdr_{source}" for source in sources} | {f"si_sdr_{source}" for source in sources} \
        <= set(test)

    export(xp.sig, tmp_path / "release")
    track = musdb / "test" / "Toy - Test A" / "mixture.wav"
    separate(["-n", xp.sig, "--repo", str(tmp_path / "release"), "-o", str(tmp_path / "out"),
              "-d", "cpu", str(track), "--filename", "{stem}.{ext}"])  # exits only on failure
    written = sorted(path.name for path in (tmp_path / "out" / xp.sig).iterdir())
    assert written == sorted(f"{source}.wav" for source in sources)

    scores = run(xp.sig, tmp_path / "release",
                 [f"dset.musdb={musdb}", f"dset.musdb_samplerate={RATE}", "test.workers=0",
                  "test.sdr=false"])
    assert set(scores) >= {f"nsdr_{source}" for source in sources}
