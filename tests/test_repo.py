"""Model repositories: local files with checksums, bags from yaml, remote download errors."""
import hashlib
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from demucs.apply import BagOfModels, apply_model
from demucs.demucs import Demucs
from demucs.repo import (AnyModelRepo, BagOnlyRepo, LocalRepo, ModelLoadingError, RemoteRepo,
                         check_checksum)
from demucs.states import save_with_checksum, serialize_model

SOURCES = ["drums", "bass", "other", "vocals"]


def _tiny_package(seed: int) -> dict:
    torch.manual_seed(seed)
    model = Demucs(SOURCES, channels=4, depth=2, segment=1.)
    return serialize_model(model, {"seed": seed}, half=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    torch.save(_tiny_package(0), tmp_path / "aaaa0000.th")
    save_with_checksum(_tiny_package(1), tmp_path / "bbbb1111.th")
    (tmp_path / "pair.yaml").write_text(
        "models: ['aaaa0000', 'bbbb1111']\n"
        "weights: [[1., 0., 2., 1.], [3., 1., 1., 0.]]\n"
        "segment: 0.5\n")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_check_checksum(tmp_path: Path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"demucs")
    check_checksum(path, hashlib.sha256(b"demucs").hexdigest()[:8])
    with pytest.raises(ModelLoadingError, match="invalid checksum for file .*file.bin"):
        check_checksum(path, "00000000")


def test_local_repo_finds_plain_and_checksummed_files(repo: Path):
    local = LocalRepo(repo)
    assert sorted(local.list_model()) == ["aaaa0000", "bbbb1111"]
    model = local.get_model("bbbb1111")
    assert isinstance(model, Demucs) and model.sources == SOURCES
    with pytest.raises(ModelLoadingError, match="could not find pre-trained model zzz"):
        local.get_model("zzz")


def test_local_repo_detects_corruption_and_duplicates(repo: Path):
    checksummed = next(repo.glob("bbbb1111-*.th"))
    checksummed.write_bytes(checksummed.read_bytes() + b"tampered")
    with pytest.raises(ModelLoadingError, match="invalid checksum"):
        LocalRepo(repo).get_model("bbbb1111")
    torch.save(_tiny_package(2), repo / "bbbb1111.th")
    with pytest.raises(ModelLoadingError,
                       match="duplicate pre-trained models for signature bbbb1111"):
        LocalRepo(repo)


def test_bag_yaml_applies_per_source_weights(repo: Path):
    local = LocalRepo(repo)
    bag = AnyModelRepo(local, BagOnlyRepo(repo, local)).get_model("pair")
    assert isinstance(bag, BagOfModels)
    assert [model.segment for model in bag.models] == [0.5, 0.5]
    mix = torch.randn(1, 2, 30000, generator=torch.Generator().manual_seed(0))
    out = apply_model(bag, mix, shifts=0)
    first, second = (apply_model(model, mix, shifts=0) for model in bag.models)
    weights = torch.tensor([[1., 0., 2., 1.], [3., 1., 1., 0.]])[:, None, :, None, None]
    expected = (weights[0] * first + weights[1] * second) / weights.sum(0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_any_repo_lists_models_and_bags(repo: Path):
    local = LocalRepo(repo)
    any_repo = AnyModelRepo(local, BagOnlyRepo(repo, local))
    assert sorted(any_repo.list_model()) == ["aaaa0000", "bbbb1111", "pair"]
    assert any_repo.has_model("pair") and not any_repo.has_model("nope")
    with pytest.raises(ModelLoadingError, match="nope is neither a single pre-trained model"):
        any_repo.get_model("nope")


def test_bad_bag_yaml_is_reported(repo: Path):
    (repo / "broken.yaml").write_text("weights: [[1, 1, 1, 1]]\n")
    local = LocalRepo(repo)
    with pytest.raises(ModelLoadingError, match="broken.yaml must be a mapping with a `models`"):
        BagOnlyRepo(repo, local).get_model("broken")


def test_remote_repo_offline_message(tmp_path: Path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = "https://example.invalid/demucs/hybrid_transformer/955717e8-8726e21a.th"
    remote = RemoteRepo({"955717e8": url})
    assert remote.has_model("955717e8")
    with pytest.raises(ModelLoadingError) as info:
        remote.get_model("955717e8")
    assert url in str(info.value) and "--repo" in str(info.value)
    with pytest.raises(ModelLoadingError, match="signature 12345678"):
        remote.get_model("12345678")


def test_remote_repo_uses_the_hub_cache(tmp_path: Path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    cached = save_with_checksum(_tiny_package(0), tmp_path / "checkpoints" / "aaaa0000.th")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    remote = RemoteRepo({"aaaa0000": f"https://example.invalid/x/{cached.name}"})
    assert isinstance(remote.get_model("aaaa0000"), Demucs)


def test_local_repo_reads_safetensors_packages(repo: Path):
    """A `--repo` folder may hold models in the hub's `.safetensors` layout, next to `.th` ones."""
    from demucs.states import save_safetensors
    package = _tiny_package(3)
    save_safetensors(package, repo / "cccc2222.safetensors")
    model = LocalRepo(repo).get_model("cccc2222")
    assert isinstance(model, Demucs)
    for key, value in package["state"].items():
        assert torch.equal(model.state_dict()[key], value)
    save_safetensors(package, repo / "aaaa0000.safetensors")
    with pytest.raises(ModelLoadingError, match="aaaa0000.safetensors and aaaa0000.th|"
                                                "aaaa0000.th and aaaa0000.safetensors"):
        LocalRepo(repo)
