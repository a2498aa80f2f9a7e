"""Untrusted model files: crafted pickles are never executed, checksums are enforced, corrupted or
truncated downloads never enter the torch hub cache, and files already in that cache (which the
user may have placed there) are used as found and never deleted (no network: the download
function of torch.hub is replaced by one writing the bytes a faulty network would give)."""
import hashlib
import io
import logging
from pathlib import Path
import time
import typing as tp

import pytest
import torch

from demucs import network
from demucs.api import LoadModelError, Separator, save_audio
from demucs.demucs import Demucs
from demucs.pretrained import get_model
from demucs.repo import LocalRepo, ModelLoadingError, RemoteRepo
from demucs.separate import main as separate_main
from demucs.states import (CorruptPackageError, UnsafeCheckpointError, load_model,
                           serialize_model)

SOURCES = ["drums", "bass", "other", "vocals"]
SIG = "aaaa0000"


class _CreatesFileWhenUnpickled:
    """Pickles as `open(path, "w")`: unpickling it unsafely creates `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _tiny_package() -> dict:
    torch.manual_seed(0)
    return serialize_model(Demucs(SOURCES, channels=4, depth=2, segment=1.), {}, half=False)


def _serialized(content: tp.Any, zip_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def _checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


# Where the payload hides in the file: the whole file, the training arguments, a state entry,
# the model class itself; and the legacy (non zip) torch format.
def _payload_whole(canary: Path) -> bytes:
    return _serialized(_CreatesFileWhenUnpickled(canary))


def _payload_training_args(canary: Path) -> bytes:
    package = _tiny_package()
    package["training_args"] = {"lr": 0.1, "hook": _CreatesFileWhenUnpickled(canary)}
    return _serialized(package)


def _payload_state(canary: Path) -> bytes:
    package = _tiny_package()
    package["state"]["extra"] = _CreatesFileWhenUnpickled(canary)
    return _serialized(package)


def _payload_klass(canary: Path) -> bytes:
    package = _tiny_package()
    package["klass"] = _CreatesFileWhenUnpickled(canary)
    return _serialized(package)


def _payload_legacy(canary: Path) -> bytes:
    package = _tiny_package()
    package["training_args"] = _CreatesFileWhenUnpickled(canary)
    return _serialized(package, zip_format=False)


PAYLOADS = {"whole": _payload_whole, "training_args": _payload_training_args,
            "state": _payload_state, "klass": _payload_klass, "legacy": _payload_legacy}


def _load_model_file(folder: Path, data: bytes, hub: Path) -> None:
    path = folder / f"{SIG}.th"
    path.write_bytes(data)
    load_model(path)


def _local_repo(folder: Path, data: bytes, hub: Path) -> None:
    (folder / f"{SIG}-{_checksum(data)}.th").write_bytes(data)  # a valid checksum: no help
    LocalRepo(folder).get_model(SIG)


def _pretrained_get_model(folder: Path, data: bytes, hub: Path) -> None:
    (folder / f"{SIG}.th").write_bytes(data)
    get_model(SIG, repo=folder)


def _remote_repo(folder: Path, data: bytes, hub: Path) -> None:
    _remote(data, hub).get_model(SIG)


def _separator(folder: Path, data: bytes, hub: Path) -> None:
    (folder / f"{SIG}.th").write_bytes(data)
    Separator(SIG, repo=folder, device="cpu")


def _cli(folder: Path, data: bytes, hub: Path) -> None:
    (folder / f"{SIG}.th").write_bytes(data)
    save_audio(torch.zeros(2, 4410), folder / "song.wav", samplerate=44100)  # inputs must exist
    separate_main(["-n", SIG, "--repo", str(folder), "-o", str(folder / "out"), "-d", "cpu",
                   str(folder / "song.wav")])


ENTRY_POINTS = {"load_model": (_load_model_file, UnsafeCheckpointError),
                "LocalRepo": (_local_repo, UnsafeCheckpointError),
                "get_model": (_pretrained_get_model, UnsafeCheckpointError),
                "RemoteRepo": (_remote_repo, UnsafeCheckpointError),
                "Separator": (_separator, LoadModelError),
                "CLI": (_cli, SystemExit)}


def _remote(data: bytes, hub: Path, downloads: tp.Optional[tp.List[bytes]] = None) -> RemoteRepo:
    """A RemoteRepo for `SIG`, named after the checksum of `data`, whose downloads write
    `downloads` one after the other (default: `data`) into the hub cache. Use with the `hub`
    fixture, which restores torch.hub's download function."""
    queue = list(downloads) if downloads is not None else [data]

    def fake_download(url: str, dst: str, hash_prefix=None, progress=True) -> None:
        Path(dst).write_bytes(queue.pop(0))

    torch.hub.download_url_to_file = fake_download
    return RemoteRepo({SIG: f"https://example.invalid/demucs/{SIG}-{_checksum(data)}.th"})


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty torch hub folder, the network reachable; torch.hub's download function is
    restored after the test."""
    folder = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(folder))
    monkeypatch.setattr(torch.hub, "download_url_to_file", torch.hub.download_url_to_file)
    monkeypatch.setattr(network, "unreachable_reason", lambda url: None)
    return folder


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path: Path, hub: Path,
                                                            entry: str, payload: str):
    canary = tmp_path / "pwned"
    data = PAYLOADS[payload](canary)
    folder = tmp_path / "models"
    folder.mkdir()
    load, error = ENTRY_POINTS[entry]
    with pytest.raises(error) as info:
        load(folder, data, hub)
    assert not canary.exists()
    if error is not SystemExit:
        assert "allow-list" in str(info.value) or "safely" in str(info.value)


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payloads_are_live(tmp_path: Path, payload: str):
    """The crafted files really run code when unpickled without the allow-list."""
    canary = tmp_path / "pwned"
    torch.load(io.BytesIO(PAYLOADS[payload](canary)), weights_only=False)
    assert canary.exists()


def test_cli_reports_the_refused_model(tmp_path: Path, hub: Path, caplog):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(SystemExit) as info:
        _cli(folder, _payload_training_args(tmp_path / "pwned"), hub)
    assert info.value.code == 1
    assert "outside the allow-list: io.open" in caplog.text
    assert not (tmp_path / "pwned").exists()


def test_malicious_bag_yaml_is_refused(tmp_path: Path):
    canary = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(
        f"models: !!python/object/apply:builtins.open ['{canary}', 'w']\n")
    with pytest.raises(ModelLoadingError, match="evil.yaml is not a valid bag yaml"):
        get_model("evil", repo=tmp_path)
    assert not canary.exists()


def test_bag_weights_summing_to_zero_are_refused(tmp_path: Path):
    (tmp_path / "zero.yaml").write_text(f"models: ['{SIG}', '{SIG}']\n"
                                        "weights: [[1, 0, 1, 1], [1, 0, 1, 1]]\n")
    with pytest.raises(ModelLoadingError, match="zero.yaml: the `weights` of a source sum to 0"):
        get_model("zero", repo=tmp_path)


def _tamper_append(data: bytes) -> bytes:
    return data + b"\0"


def _tamper_flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def _tamper_truncate(data: bytes) -> bytes:
    return data[:len(data) // 3]


def _tamper_empty(data: bytes) -> bytes:
    return b""


TAMPERINGS = {"append": _tamper_append, "flip": _tamper_flip, "truncate": _tamper_truncate,
              "empty": _tamper_empty}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_local_repo_refuses_tampered_files_and_keeps_them(tmp_path: Path, tampering: str):
    data = _serialized(_tiny_package())
    path = tmp_path / f"{SIG}-{_checksum(data)}.th"
    bad = TAMPERINGS[tampering](data)
    path.write_bytes(bad)
    with pytest.raises(ModelLoadingError, match=f"invalid checksum for file .*{path.name}"):
        LocalRepo(tmp_path).get_model(SIG)
    assert path.read_bytes() == bad  # the user's own file is reported, never deleted
    path.write_bytes(data)
    assert isinstance(LocalRepo(tmp_path).get_model(SIG), Demucs)


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_corrupted_download_never_enters_the_cache(hub: Path, tampering: str):
    data = _serialized(_tiny_package())
    remote = _remote(data, hub, downloads=[TAMPERINGS[tampering](data), data])
    cached = hub / "checkpoints" / f"{SIG}-{_checksum(data)}.th"
    with pytest.raises(ModelLoadingError, match="truncated or corrupted .* it was not kept"):
        remote.get_model(SIG)
    assert not list(cached.parent.iterdir())
    assert isinstance(remote.get_model(SIG), Demucs)  # the next try downloads it again
    assert cached.read_bytes() == data


def _no_download(url: str, dst: str, hash_prefix=None, progress=True) -> None:
    raise AssertionError(f"a file in the cache must be used, yet {url} was downloaded")


@pytest.mark.parametrize("tampering", ["append", "flip"])
def test_mismatching_cache_entry_is_used_with_a_warning(hub: Path, tampering: str, caplog):
    """A file in the torch hub cache whose content does not match its name is used as found
    (as the official Demucs does) with a warning naming it; it is neither deleted nor replaced."""
    data = _serialized(_tiny_package())
    remote = _remote(data, hub)
    torch.hub.download_url_to_file = _no_download
    cached = hub / "checkpoints" / f"{SIG}-{_checksum(data)}.th"
    cached.parent.mkdir(parents=True)
    tampered = TAMPERINGS[tampering](data)
    cached.write_bytes(tampered)
    with caplog.at_level(logging.WARNING, logger="demucs.repo"):
        try:
            remote.get_model(SIG)
        except ModelLoadingError as error:  # a flipped byte may break the file's structure
            assert str(cached) in str(error) and "left in place" in str(error)
    assert f"{cached} does not match the checksum in its name" in caplog.text
    assert cached.read_bytes() == tampered


@pytest.mark.parametrize("tampering", ["truncate", "empty"])
def test_unreadable_cache_entry_is_reported_and_kept(hub: Path, tampering: str):
    data = _serialized(_tiny_package())
    remote = _remote(data, hub)
    torch.hub.download_url_to_file = _no_download
    cached = hub / "checkpoints" / f"{SIG}-{_checksum(data)}.th"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(TAMPERINGS[tampering](data))
    with pytest.raises(ModelLoadingError, match="left in place: delete it to download"):
        remote.get_model(SIG)
    assert cached.read_bytes() == TAMPERINGS[tampering](data)


def test_user_file_without_checksum_in_the_cache_is_used(hub: Path):
    data = _serialized(_tiny_package())
    torch.hub.download_url_to_file = _no_download
    cached = hub / "checkpoints" / f"{SIG}.th"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    remote = RemoteRepo({SIG: f"https://example.invalid/demucs/{SIG}.th"})
    assert isinstance(remote.get_model(SIG), Demucs)
    assert cached.read_bytes() == data


def test_offline_download_fails_at_once_without_trying(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(network, "unreachable_reason",
                        lambda url: "cannot resolve example.invalid")
    remote = RemoteRepo({SIG: f"https://example.invalid/demucs/{SIG}-0123abcd.th"})
    start = time.monotonic()
    with pytest.raises(ModelLoadingError) as info:
        remote.get_model(SIG)
    assert time.monotonic() - start < 1
    message = str(info.value)
    assert f"{SIG}-0123abcd.th" in message and "cannot resolve example.invalid" in message
    assert "--repo" in message and str(tmp_path / "hub" / "checkpoints") in message


def test_interrupted_download_leaves_nothing_in_the_cache(hub: Path):
    data = _serialized(_tiny_package())
    remote = _remote(data, hub)

    def broken_download(url: str, dst: str, hash_prefix=None, progress=True) -> None:
        Path(dst).write_bytes(data[:100])
        raise ConnectionResetError("connection reset by peer")

    torch.hub.download_url_to_file = broken_download
    with pytest.raises(ModelLoadingError, match="could not download model aaaa0000"):
        remote.get_model(SIG)
    assert not list((hub / "checkpoints").iterdir())


def test_unverifiable_corrupted_download_is_removed(hub: Path):
    """Without a checksum in the URL, a download that does not parse is not kept either."""
    data = _serialized(_tiny_package())

    def truncated_download(url: str, dst: str, hash_prefix=None, progress=True) -> None:
        Path(dst).write_bytes(data[:len(data) // 2])

    torch.hub.download_url_to_file = truncated_download
    remote = RemoteRepo({SIG: f"https://example.invalid/demucs/{SIG}.th"})
    with pytest.raises(ModelLoadingError, match="truncated or corrupted .* it was not kept"):
        remote.get_model(SIG)
    assert not list((hub / "checkpoints").iterdir())


@pytest.mark.parametrize("tampering", ["truncate", "empty"])
def test_load_model_names_a_truncated_file(tmp_path: Path, tampering: str):
    path = tmp_path / "model.th"
    path.write_bytes(TAMPERINGS[tampering](_serialized(_tiny_package())))
    with pytest.raises(CorruptPackageError, match=f"{path} is truncated, corrupted"):
        load_model(path)
