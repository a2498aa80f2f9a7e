"""The model catalogue: the release list (files.txt), bags of the release and of a folder, listing
and locations. Nothing here touches the network (lookups through the hub are in test_hf.py)."""
from pathlib import Path

import pytest
import torch

from demucs.catalogue import (REMOTE_ROOT, ROOT_URL, SOURCES, ModelCatalogue, demucs_unittest,
                              read_release_list)
from demucs.hdemucs import HDemucs
from demucs.repo import ModelLoadingError
from demucs.states import serialize_model

BAGS = ["htdemucs", "htdemucs_ft", "htdemucs_6s", "hdemucs_mmi", "mdx", "mdx_q", "mdx_extra",
        "mdx_extra_q", "repro_mdx_a", "repro_mdx_a_hybrid_only", "repro_mdx_a_time_only"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A `--repo` folder: two tiny models (one with a checksum in its name) and a bag of both."""
    torch.manual_seed(0)
    torch.save(serialize_model(demucs_unittest(), {}), tmp_path / "aaaa0000.th")
    torch.save(serialize_model(demucs_unittest(), {}), tmp_path / "bbbb1111.th")
    (tmp_path / "duo.yaml").write_text("models: [aaaa0000, bbbb1111]\nsegment: 2\n")
    return tmp_path


def test_release_list_is_read_with_its_roots():
    models = read_release_list()
    assert len(models) == 27
    assert models["955717e8"] == ROOT_URL + "hybrid_transformer/955717e8-8726e21a.th"
    assert models["0d19c1c6"] == ROOT_URL + "mdx_final/0d19c1c6-0f06f20e.th"


def test_release_list_skips_comments_and_refuses_duplicates(tmp_path: Path):
    listing = tmp_path / "files.txt"
    listing.write_text("# comment\n\nroot: a/\n11111111-aaaaaaaa.th\n"
                       "root: b/\n22222222-bbbbbbbb.th\n")
    assert read_release_list(listing) == {"11111111": ROOT_URL + "a/11111111-aaaaaaaa.th",
                                          "22222222": ROOT_URL + "b/22222222-bbbbbbbb.th"}
    listing.write_text("11111111-aaaaaaaa.th\n11111111-cccccccc.th\n")
    with pytest.raises(ModelLoadingError, match="11111111 is listed twice"):
        read_release_list(listing)
    listing.write_text("ok-aaaaaaaa.th\nnot a file name\n")
    with pytest.raises(ModelLoadingError, match="line 2 of .*files.txt"):
        read_release_list(listing)


@pytest.mark.parametrize("name", BAGS)
def test_every_released_bag_names_released_models(name: str):
    catalogue = ModelCatalogue()
    bag = catalogue.bag(name)
    assert bag["models"]
    for sig in bag["models"]:
        assert str(catalogue.location(sig)).startswith(ROOT_URL)
    for weights in bag.get("weights") or []:
        assert len(weights) == len(SOURCES)


def test_released_bags_are_read_checked():
    bag = ModelCatalogue().bag("mdx")
    assert bag["weights"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1], [1, 0, 1, 1]]
    assert bag["segment"] == 44


def test_release_listing_and_a_signature_as_a_bag_of_one():
    catalogue = ModelCatalogue()
    listing = catalogue.list_models()
    assert sorted(listing["bag"]) == sorted(BAGS)
    assert listing["bag"]["htdemucs"] == REMOTE_ROOT / "htdemucs.yaml"
    assert catalogue.bag("955717e8") == {"models": ["955717e8"]}
    with pytest.raises(ModelLoadingError, match=r"nope is neither a bag \(nope.yaml\) nor a model "
                                                r"in the release .*bags: hdemucs_mmi, htdemucs"):
        catalogue.bag("nope")
    with pytest.raises(ModelLoadingError, match="no model with signature nope in the release"):
        catalogue.location("nope")


def test_a_folder_lists_loads_and_locates_its_models(folder: Path):
    catalogue = ModelCatalogue(folder)
    assert catalogue.list_models() == {
        "single": {"aaaa0000": folder / "aaaa0000.th", "bbbb1111": folder / "bbbb1111.th"},
        "bag": {"duo": folder / "duo.yaml"}}
    assert catalogue.bag("duo") == {"models": ["aaaa0000", "bbbb1111"], "segment": 2}
    assert catalogue.location("bbbb1111") == folder / "bbbb1111.th"
    duo = catalogue.get_model("duo")
    assert [type(member) for member in duo.models] == [HDemucs, HDemucs] and not duo.training


def test_a_folder_bag_is_checked_as_a_released_one(folder: Path):
    (folder / "bad.yaml").write_text("models: [aaaa0000]\nsegment: -1\n")
    with pytest.raises(ModelLoadingError, match=r"bad.yaml: `segment` must be a positive"):
        ModelCatalogue(folder).bag("bad")


def test_a_missing_folder_is_refused_when_first_used(tmp_path: Path):
    catalogue = ModelCatalogue(tmp_path / "missing")
    assert isinstance(catalogue.get_model("demucs_unittest"), HDemucs)  # needs no folder
    with pytest.raises(ModelLoadingError, match="missing must exist and be a directory"):
        catalogue.list_models()
