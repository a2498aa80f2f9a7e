"""Shared fixtures: the reference vectors folder and a small generated toy MusDB."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of the official reference vectors; skips when absent (a plain user checkout)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"reference vectors not found at {GOLDEN} "
                    "(they live in the team's shared/ folder)")
    return GOLDEN


# A small toy MusDB: 4 train songs (2 named after MusDB validation tracks) and 2 test songs of 6 s.
TOY_MUSDB = dict(tracks=4, valid_tracks=2, test_tracks=2, seconds=6.0, seed=1234)


@pytest.fixture(scope="session")
def toy_musdb(tmp_path_factory) -> Path:
    """Root of a toy MusDB HQ (`train/`, `test/`, see TOY_MUSDB), generated once per session.

    Shared by every test of the session: read it, never modify it.
    """
    from demucs.toy_musdb import generate
    return generate(tmp_path_factory.mktemp("toy") / "musdb", **TOY_MUSDB)


@pytest.fixture(scope="module")
def tiny_musdb(tmp_path_factory) -> Path:
    """MusDB layout at 8 kHz: 4 train tracks (2 with musdb validation names), 2 test tracks."""
    from tests.training_helpers import write_tiny_musdb
    return write_tiny_musdb(tmp_path_factory.mktemp("tiny_musdb"))


@pytest.fixture
def dora_dir(tmp_path, monkeypatch) -> Path:
    """A fresh Dora output folder for one test (through `_DORA_TEST_PATH`)."""
    from tests.training_helpers import use_dora_dir
    return use_dora_dir(tmp_path / "outputs", monkeypatch)
