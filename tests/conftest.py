"""Shared fixtures: the reference vectors folder and a small generated toy MusDB."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of the official implementation's reference vectors; skips when absent (user checkout)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"reference vectors not found at {GOLDEN} (they live in the team's shared/ folder)")
    return GOLDEN
