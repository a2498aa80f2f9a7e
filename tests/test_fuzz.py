"""Fuzzing the parsers of untrusted text and bytes: the metadata JSON cache, bag yamls, files.txt
and audio headers. Every input either parses or fails with the project's own named exception (or
a ValueError with a message) — never a KeyError, struct.error, IndexError... from inside a
library. Short deterministic runs by default; `slow` runs try many more cases (bounded)."""
import json
from pathlib import Path
import typing as tp

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import pytest
import soundfile
import torch

from demucs.apply import BagOfModels
from demucs.audio import AudioFile, AudioReadError
from demucs.demucs import Demucs
from demucs.catalogue import ROOT_URL, read_release_list
from demucs.repo import BagOnlyRepo, ModelLoadingError, ModelOnlyRepo
from demucs.wav import DatasetError, Wavset, cached_metadata

torch.set_num_threads(1)
SOURCES = ["drums", "bass"]
SAMPLERATE = 8000
COMMON = dict(derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
QUICK = settings(max_examples=25, **COMMON)
LONG = settings(max_examples=400, **COMMON)


def mutations(data: bytes, max_changes: int = 8) -> st.SearchStrategy[bytes]:
    """`data` with a few bytes replaced, a slice deleted or inserted, or cut short."""
    size = max(len(data), 1)

    @st.composite
    def mutate(draw) -> bytes:
        result = bytearray(data)
        for _ in range(draw(st.integers(0, max_changes))):
            kind = draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
            at = draw(st.integers(0, max(len(result) - 1, 0)))
            if kind == "replace" and result:
                result[at] = draw(st.integers(0, 255))
            elif kind == "delete":
                del result[at:at + draw(st.integers(1, 16))]
            elif kind == "insert":
                result[at:at] = draw(st.binary(min_size=1, max_size=16))
            else:
                del result[draw(st.integers(0, size)):]
        return bytes(result)
    return mutate()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda children: (st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8)


# ---------------------------------------------------------------------------------------------
# Metadata JSON cache (demucs/wav.py)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tp.Tuple[Path, dict, str]:
    """Two tiny tracks, and the text of their valid metadata cache."""
    root = tmp_path_factory.mktemp("wav") / "train"
    rng = np.random.default_rng(0)
    for track in ["a", "b"]:
        (root / track).mkdir(parents=True)
        stems = [0.1 * rng.standard_normal((400, 2)) for _ in SOURCES]
        for name, stem in zip(SOURCES, stems):
            soundfile.write(str(root / track / f"{name}.wav"), stem, SAMPLERATE)
        soundfile.write(str(root / track / "mixture.wav"), sum(stems), SAMPLERATE)
    cache = root.parent / "cache.json"
    expected = cached_metadata(cache, {"train": root}, SOURCES)
    return root, expected, cache.read_text()


def _structural_variants(text: str) -> st.SearchStrategy[str]:
    """The valid cache with one entry (at any depth) replaced by an arbitrary JSON value."""
    content = json.loads(text)

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for key, child in node.items():
                yield from paths(child, prefix + (key,))

    all_paths = list(paths(content))[1:]

    @st.composite
    def variant(draw) -> str:
        path = draw(st.sampled_from(all_paths))
        value = draw(JSON_VALUES)
        copy = json.loads(text)
        node = copy
        for key in path[:-1]:
            node = node[key]
        if draw(st.booleans()):
            node[path[-1]] = value
        else:
            del node[path[-1]]
        return json.dumps(copy)
    return variant()


def _check_metadata_cache(dataset, tmp_path_factory, text: str) -> None:
    root, expected, _ = dataset
    cache = tmp_path_factory.mktemp("cache") / "cache.json"
    cache.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        metadata = cached_metadata(cache, {"train": root}, SOURCES)
    except DatasetError:
        return
    # A well formed entry whose files did not change is trusted (not read again); anything
    # else is rebuilt from the audio.
    assert set(metadata["train"]) == set(expected["train"])
    dataset_ = Wavset(root, metadata["train"], SOURCES, samplerate=SAMPLERATE)
    assert all(torch.isfinite(dataset_[index]).all() for index in range(len(dataset_)))


def _cache_inputs(dataset) -> st.SearchStrategy:
    text = dataset[2]
    return st.one_of(_structural_variants(text), mutations(text.encode()), JSON_VALUES.map(
        json.dumps))


@QUICK
@given(data=st.data())
def test_metadata_cache(dataset, tmp_path_factory, data):
    _check_metadata_cache(dataset, tmp_path_factory, data.draw(_cache_inputs(dataset)))


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_metadata_cache_long(dataset, tmp_path_factory, data):
    _check_metadata_cache(dataset, tmp_path_factory, data.draw(_cache_inputs(dataset)))


# ---------------------------------------------------------------------------------------------
# Bag yamls (repo.BagOnlyRepo)


class _TinyModels(ModelOnlyRepo):
    """Two known signatures, each a tiny Demucs; others are missing."""

    def __init__(self):
        torch.manual_seed(0)
        self._model = Demucs(["drums", "bass", "other", "vocals"], channels=4, depth=1)

    def has_model(self, sig: str) -> bool:
        return sig in ("aaaa0000", "bbbb1111")

    def get_model(self, sig: str):
        if not self.has_model(sig):
            raise ModelLoadingError(f"could not find pre-trained model {sig}")
        return self._model

    def list_model(self):
        return {"aaaa0000": "a", "bbbb1111": "b"}


VALID_BAG = ("models: ['aaaa0000', 'bbbb1111']\n"
             "weights: [[1., 0., 2., 1.], [3., 1., 1., 0.]]\n"
             "segment: 0.5\n")


def _yaml_inputs() -> st.SearchStrategy[bytes]:
    structured = st.fixed_dictionaries({}, optional={
        "models": JSON_VALUES | st.lists(st.sampled_from(["aaaa0000", "bbbb1111", "zz"]),
                                         max_size=3),
        "weights": JSON_VALUES | st.lists(st.lists(st.floats(), max_size=5), max_size=3),
        "segment": JSON_VALUES}).map(lambda bag: json.dumps(bag).encode())
    return st.one_of(mutations(VALID_BAG.encode()), structured,
                     st.binary(max_size=64), JSON_VALUES.map(lambda v: json.dumps(v).encode()))


def _check_bag(tmp_path_factory, content: bytes) -> None:
    folder = tmp_path_factory.mktemp("bag")
    (folder / "bag.yaml").write_bytes(content)
    try:
        bag = BagOnlyRepo(folder, _TinyModels()).get_model("bag")
    except ModelLoadingError as error:
        assert "bag.yaml" in str(error) or "pre-trained model" in str(error)
        return
    assert isinstance(bag, BagOfModels) and len(bag.weights) == len(bag.models)


@QUICK
@given(content=_yaml_inputs())
def test_bag_yaml(tmp_path_factory, content: bytes):
    _check_bag(tmp_path_factory, content)


@pytest.mark.slow
@LONG
@given(content=_yaml_inputs())
def test_bag_yaml_long(tmp_path_factory, content: bytes):
    _check_bag(tmp_path_factory, content)


# ---------------------------------------------------------------------------------------------
# files.txt (catalogue.read_release_list)


VALID_FILES = ("root: mdx_final/\n0d19c1c6-0f06f20e.th\n5d2d6c55-db83574e.th\n"
               "# comment\nroot: hybrid_transformer/\n955717e8-8726e21a.th\n")


def _files_inputs() -> st.SearchStrategy[bytes]:
    lines = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(
        ["root:", "root: x/", "#", "", "-", "a-b-c.th", "955717e8-8726e21a.th"])), max_size=8)
    return st.one_of(mutations(VALID_FILES.encode()), st.binary(max_size=64),
                     lines.map(lambda items: "\n".join(items).encode(errors="surrogatepass")))


def _check_files_txt(tmp_path_factory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("files") / "files.txt"
    path.write_bytes(content)
    try:
        models = read_release_list(path)
    except ModelLoadingError as error:
        assert "files.txt" in str(error)
        return
    for sig, url in models.items():
        assert sig and "-" not in sig and url.startswith(ROOT_URL)


@QUICK
@given(content=_files_inputs())
def test_files_txt(tmp_path_factory, content: bytes):
    _check_files_txt(tmp_path_factory, content)


@pytest.mark.slow
@LONG
@given(content=_files_inputs())
def test_files_txt_long(tmp_path_factory, content: bytes):
    _check_files_txt(tmp_path_factory, content)


# ---------------------------------------------------------------------------------------------
# Audio headers (demucs.audio.AudioFile on mutated wav bytes)


def _wav_bytes(subtype: str) -> bytes:
    import io
    buffer = io.BytesIO()
    wav = 0.1 * np.random.default_rng(0).standard_normal((300, 2))
    soundfile.write(buffer, wav, SAMPLERATE, subtype=subtype, format="WAV")
    return buffer.getvalue()


WAVS = {subtype: _wav_bytes(subtype) for subtype in ["PCM_16", "FLOAT"]}


def _header_mutations() -> st.SearchStrategy[bytes]:
    """Mutations concentrated on the 44-byte header (plus a few anywhere)."""
    @st.composite
    def mutate(draw) -> bytes:
        data = bytearray(WAVS[draw(st.sampled_from(sorted(WAVS)))])
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, 60))
            data[at] = draw(st.integers(0, 255))
        return bytes(data)
    return st.one_of(mutate(), mutations(WAVS["PCM_16"], max_changes=3))


def _check_audio(tmp_path_factory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("audio") / "track.wav"
    path.write_bytes(content)
    try:
        audio = AudioFile(path)
        wav = audio.read(streams=0, samplerate=SAMPLERATE, channels=2)
    except AudioReadError as error:
        assert str(path) in str(error)
        return
    assert wav.dim() == 2 and wav.shape[0] == 2
    assert audio.samplerate() > 0 and audio.duration() >= 0


@settings(max_examples=15, **COMMON)
@given(content=_header_mutations())
def test_audio_headers(tmp_path_factory, content: bytes):
    _check_audio(tmp_path_factory, content)


@pytest.mark.slow
@settings(max_examples=150, **COMMON)
@given(content=_header_mutations())
def test_audio_headers_long(tmp_path_factory, content: bytes):
    _check_audio(tmp_path_factory, content)


@pytest.mark.parametrize("rate", [0, 1, 7, 1040195392, 2 ** 32 - 1])
def test_absurd_header_sample_rates(tmp_path_factory, rate: int):
    """Found by the long run: a rate of 1 GHz in the header crashed the resampler."""
    data = bytearray(WAVS["FLOAT"])
    data[24:28] = rate.to_bytes(4, "little")
    _check_audio(tmp_path_factory, bytes(data))
