"""Tests of demucs.files: atomic writes, their file mode and the cleanup of stale temporaries."""
import os
import stat

import pytest

from demucs.files import atomic_open, atomic_write, default_file_mode, partial_path, \
    remove_stale_partials


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_renames_on_success(tmp_path, umask_022):
    target = tmp_path / "out.bin"
    with atomic_write(target) as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".out.bin.") and temporary.name.endswith(".partial")
        temporary.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask_022):
    with atomic_open(tmp_path / "a.txt") as file:
        file.write("x")
    with open(tmp_path / "b.txt", "w") as file:
        file.write("x")
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.txt") == 0o644
    assert default_file_mode() == 0o644


def test_atomic_write_follows_another_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        with atomic_open(tmp_path / "private.txt") as file:
            file.write("x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "private.txt") == 0o600


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_open(target) as file:
            file.write("new, but never finished")
            raise error
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_write_refuses_an_empty_block(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_write(tmp_path / "never.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_refuses_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with atomic_open(tmp_path / "x", "r"):
            pass


def test_remove_stale_partials_only_touches_its_own_file(tmp_path):
    target = tmp_path / "stem[1].wav"
    stale = [partial_path(target), partial_path(target)]
    other = partial_path(tmp_path / "stem.wav")
    for path in stale + [other]:
        path.write_bytes(b"")
    assert remove_stale_partials(target) == 2
    assert [path.exists() for path in stale] == [False, False]
    assert other.exists()
    assert remove_stale_partials(tmp_path / "missing" / "x.wav") == 0
