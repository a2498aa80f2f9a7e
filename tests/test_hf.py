"""Named models from the HuggingFace hub (demucs.hf) and the lookup order of `get_model`, as in
Demucs 4.1: hub and its cache, then the legacy release and the torch hub cache; `--repo` alone.

No test touches the network: the hub cache is a temporary folder filled by `tools.export_hf`,
and every socket connection or name resolution fails the test when offline behaviour is tested.
"""
from fractions import Fraction
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import time
import typing as tp

import pytest
import torch
import yaml

from demucs import hf, network
from demucs.apply import BagOfModels
from demucs.demucs import Demucs
from demucs.htdemucs import HTDemucs
from demucs.pretrained import get_model
from demucs.repo import ModelLoadingError
from demucs.states import serialize_model
from tools.export_hf import CatalogueSource, export_model, install_in_hf_cache, main as export_main

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = Path.home() / ".cache" / "demucs-peer" / "bin" / "python"
SOURCES = ["drums", "bass", "other", "vocals"]
HTDEMUCS_SIG = "955717e8"  # the released htdemucs, `955717e8-8726e21a.th` in files.txt
RELEASED = dict(dconv_mode=3, depth=4, t_layers=5, bottom_channels=512, t_dropout=0.02,
                segment=Fraction(39, 5))
TINY = dict(channels=8, depth=4, t_layers=2, t_heads=2, bottom_channels=16, dconv_mode=3,
            segment=Fraction(39, 5))


def _tiny_package(seed: int) -> dict:
    torch.manual_seed(seed)
    return serialize_model(Demucs(SOURCES, channels=4, depth=2, segment=1.), {"seed": seed},
                           half=False)


def _htdemucs_hub_folder(out: Path, **kwargs) -> Path:
    """The hub folder of `htdemucs` (`htdemucs.yaml`, `955717e8.safetensors`) holding a random
    HTDemucs built with `kwargs`, in half precision as released."""
    models = out / "models"
    models.mkdir()
    torch.manual_seed(0)
    package = serialize_model(HTDemucs(SOURCES, **kwargs), None, half=True)
    torch.save(package, models / f"{HTDEMUCS_SIG}.th")
    (models / "htdemucs.yaml").write_text(f"models: ['{HTDEMUCS_SIG}']\n")
    return export_model(CatalogueSource(models), "htdemucs", out / "hub")


@pytest.fixture(scope="module")
def htdemucs_hub_folder(tmp_path_factory) -> Path:
    """`htdemucs` as the hub serves it, with a small HTDemucs (the released architecture takes
    1.2 s to build on an idle 2-core machine, up to 3 s while other tests run: see
    `test_a_fresh_process_loads_the_released_architecture_in_under_2_s`)."""
    return _htdemucs_hub_folder(tmp_path_factory.mktemp("htdemucs"), **TINY)


@pytest.fixture
def network_attempts(monkeypatch) -> tp.List[str]:
    """No network: every name resolution fails (as on this machine) and is recorded here;
    connecting raises."""
    attempts: tp.List[str] = []

    def unresolvable(host, *args, **kwargs):
        attempts.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_connection(sock, address):
        attempts.append(str(address))
        raise ConnectionRefusedError(f"no network in tests ({address})")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(network, "_answers", {})
    return attempts


@pytest.fixture
def caches(tmp_path: Path, monkeypatch, network_attempts: tp.List[str]) -> Path:
    """Empty HuggingFace and torch hub caches under `tmp_path`, `HF_HUB_OFFLINE=1`, no network
    (see `network_attempts`)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    return tmp_path


def test_hub_repository_names_are_those_of_demucs_4_1():
    assert hf.hf_repo_name("htdemucs") == "HTDemucs"
    assert hf.hf_repo_name("htdemucs_ft") == "HTDemucs-ft"
    assert hf.hf_repo_name("htdemucs_6s") == "HTDemucs-6s"
    assert hf.hf_repo_name("mdx_extra_q") == "Demucs-mdx_extra_q"
    assert hf.hub_repo_id("htdemucs") == "adefossez/HTDemucs"
    assert hf.hub_repo_id("hf://someone/htdemucs_ft") == "someone/HTDemucs-ft"
    assert hf.DEFAULT_NAMESPACE == "adefossez"


@pytest.mark.parametrize("name", ["htdemucs", "hf://htdemucs", "hf://adefossez/htdemucs"])
def test_offline_hub_cache_answers_at_once(caches: Path, htdemucs_hub_folder: Path, name: str,
                                           network_attempts: tp.List[str]):
    install_in_hf_cache(htdemucs_hub_folder, "adefossez/HTDemucs", caches / "hf")
    start = time.monotonic()
    model = get_model(name)
    elapsed = time.monotonic() - start
    assert isinstance(model, BagOfModels) and not model.training
    assert isinstance(model.models[0], HTDemucs) and model.models[0].segment == Fraction(39, 5)
    assert elapsed < 2, f"get_model({name!r}) took {elapsed:.2f} s from the hub cache"
    assert network_attempts == []


def test_no_network_is_detected_and_the_cache_used(caches: Path, htdemucs_hub_folder: Path,
                                                   monkeypatch):
    """Without HF_HUB_OFFLINE, a failed probe sends the lookup to the cache, not to downloads."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(network, "unreachable_reason", lambda url: "cannot resolve the hub")
    install_in_hf_cache(htdemucs_hub_folder, "adefossez/HTDemucs", caches / "hf")
    assert isinstance(get_model("htdemucs"), BagOfModels)


def test_network_probe_fails_fast_without_network(network_attempts: tp.List[str]):
    start = time.monotonic()
    reason = network.unreachable_reason("https://huggingface.co")
    assert time.monotonic() - start < 0.6
    assert reason is not None and "cannot resolve huggingface.co" in reason


def test_network_probe_gives_up_on_a_hanging_resolver(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(5))
    monkeypatch.setattr(network, "_answers", {})
    start = time.monotonic()
    reason = network.unreachable_reason("https://huggingface.co")
    assert time.monotonic() - start < network.PROBE_TIMEOUT + 0.2
    assert reason is not None and "took more than" in reason


def test_empty_caches_give_one_error_listing_every_place(caches: Path,
                                                         network_attempts: tp.List[str]):
    """The legacy release is still probed (4.1.0 tries it whatever HF_HUB_OFFLINE says), which
    fails at once without network; the hub is not."""
    start = time.monotonic()
    with pytest.raises(ModelLoadingError) as info:
        get_model("htdemucs")
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "cannot resolve dl.fbaipublicfiles.com" in message
    assert str(caches / "hf" / "models--adefossez--HTDemucs") in message
    assert str(caches / "torch_hub" / "checkpoints") in message
    for filename in ["htdemucs.yaml", f"{HTDEMUCS_SIG}.safetensors",
                     f"{HTDEMUCS_SIG}-8726e21a.th", "--repo"]:
        assert filename in message
    assert network_attempts == ["dl.fbaipublicfiles.com"]


def test_hf_prefix_never_falls_back(caches: Path):
    with pytest.raises(hf.HubLookupError, match="lacks htdemucs.yaml"):
        get_model("hf://htdemucs")


def test_legacy_torch_hub_cache_answers_when_the_hub_cache_is_empty(caches: Path):
    checkpoints = caches / "torch_hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(_tiny_package(0), checkpoints / "0d19c1c6-0f06f20e.th")  # no checksum match
    model = get_model("0d19c1c6")
    assert isinstance(model, Demucs) and not model.training


def test_hub_is_asked_first_then_the_legacy_release(caches: Path, htdemucs_hub_folder: Path,
                                                    monkeypatch):
    """Online: the hub client is asked for the bag; a hub failure falls back to the release."""
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(network, "unreachable_reason", lambda url: None)
    asked = []

    def download(repo_id: str, filename: str, **kwargs) -> str:
        asked.append(f"{repo_id}/{filename}")
        if repo_id != "adefossez/HTDemucs":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        return str(htdemucs_hub_folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert isinstance(get_model("htdemucs"), BagOfModels)
    assert asked == ["adefossez/HTDemucs/htdemucs.yaml",
                     f"adefossez/HTDemucs/{HTDEMUCS_SIG}.safetensors"]
    checkpoints = caches / "torch_hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(_tiny_package(0), checkpoints / "0d19c1c6-0f06f20e.th")
    assert isinstance(get_model("0d19c1c6"), Demucs)
    assert asked[-1] == "adefossez/Demucs-0d19c1c6/0d19c1c6.yaml"


def test_repo_folder_is_the_only_place_looked_at(caches: Path, htdemucs_hub_folder: Path):
    """A hub folder (yaml + .safetensors) works as `--repo`; the caches are not consulted."""
    install_in_hf_cache(htdemucs_hub_folder, "adefossez/HTDemucs", caches / "hf")
    model = get_model("htdemucs", repo=htdemucs_hub_folder)
    assert isinstance(model, BagOfModels) and isinstance(model.models[0], HTDemucs)
    with pytest.raises(ModelLoadingError, match="neither a single pre-trained model nor a bag"):
        get_model("htdemucs_ft", repo=htdemucs_hub_folder)


def test_corrupted_hub_file_is_reported_and_the_release_tried(caches: Path, caplog):
    folder = caches / "bag"
    folder.mkdir()
    (folder / "htdemucs.yaml").write_text(f"models: ['{HTDEMUCS_SIG}']\n")
    (folder / f"{HTDEMUCS_SIG}.safetensors").write_bytes(b"not a safetensors file")
    install_in_hf_cache(folder, "adefossez/HTDemucs", caches / "hf")
    with pytest.raises(ModelLoadingError) as info:
        get_model("htdemucs")
    assert "cannot be used" in caplog.text
    assert f"{HTDEMUCS_SIG}.safetensors" in str(info.value)


@pytest.fixture
def local_bag(tmp_path: Path) -> Path:
    """A folder with two tiny models and a bag `mybag` weighting them per source."""
    folder = tmp_path / "models"
    folder.mkdir()
    for seed, sig in enumerate(["aaaa0000", "bbbb1111"]):
        torch.save(_tiny_package(seed), folder / f"{sig}.th")
    (folder / "mybag.yaml").write_text(yaml.safe_dump(
        {"models": ["aaaa0000", "bbbb1111"], "weights": [[1, 0, 1, 1], [0, 1, 1, 1]],
         "segment": 2}))
    return folder


def test_export_hf_round_trip_gives_identical_outputs(caches: Path, local_bag: Path):
    out = caches / "release_hf"
    export_main(["--repo", str(local_bag), "--models", "mybag", "aaaa0000", "--out", str(out),
                 "--check", "--hf-cache", str(caches / "hf"), "--namespace", "me"])
    assert sorted(path.name for path in (out / "mybag").iterdir()) == [
        "README.md", "aaaa0000.json", "aaaa0000.safetensors", "bbbb1111.json",
        "bbbb1111.safetensors", "mybag.yaml"]
    assert json.loads((out / "mybag" / "aaaa0000.json").read_text())["training_args"] == {
        "seed": 0}
    mix = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(0))
    from demucs.apply import apply_model
    expected = apply_model(get_model("mybag", repo=local_bag), mix, split=False, shifts=0)
    from_hub = get_model("hf://me/mybag")
    assert from_hub.weights == [[1, 0, 1, 1], [0, 1, 1, 1]]
    torch.testing.assert_close(apply_model(from_hub, mix, split=False, shifts=0), expected,
                               rtol=0, atol=0)
    single = get_model("hf://me/aaaa0000")  # a signature becomes a bag of one
    assert isinstance(single, BagOfModels) and len(single.models) == 1


def test_export_hf_of_a_quantized_model(caches: Path):
    diffq = pytest.importorskip("diffq")
    torch.manual_seed(0)
    model = Demucs(SOURCES, channels=4, depth=2, segment=1.)
    quantizer = diffq.DiffQuantizer(model, min_size=0.01, group_size=8)
    folder = caches / "models"
    folder.mkdir()
    torch.save(serialize_model(model, {}, quantizer=quantizer), folder / "cccc2222.th")
    export_main(["--repo", str(folder), "--models", "cccc2222", "--out", str(caches / "out"),
                 "--check", "--hf-cache", str(caches / "hf")])
    restored = get_model("hf://cccc2222").models[0]
    mix = torch.randn(1, 2, 8000)
    with torch.no_grad():
        torch.testing.assert_close(restored(mix), get_model("cccc2222", repo=folder)(mix))


def test_export_hf_names_an_unknown_model(tmp_path: Path, local_bag: Path):
    with pytest.raises(SystemExit, match="nope is neither a bag"):
        export_main(["--repo", str(local_bag), "--models", "nope", "--out", str(tmp_path)])


def _run_offline(python: Path, code: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=str(cache / "hf"), HF_HUB_OFFLINE="1",
               TORCH_HOME=str(cache / "torch"), PYTHONPATH="")
    return subprocess.run([str(python), "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


_TIMED_LOAD = """
import time, torch
from demucs.pretrained import get_model
for name in ["htdemucs", "hf://htdemucs"]:
    start, cpu = time.monotonic(), time.process_time()
    model = get_model(name)
    print(name, time.monotonic() - start, time.process_time() - cpu, type(model).__name__)
"""


@pytest.mark.slow
def test_a_fresh_process_loads_the_released_architecture_in_under_2_s(tmp_path: Path):
    """The acceptance measure: a new interpreter with HF_HUB_OFFLINE=1 and the released htdemucs
    architecture in its hub cache loads it in under 2 s (nearly all of it building the model, as
    4.1.0 does). The wall time is only asserted on an idle machine (other jobs slow it down
    whatever the lookup does); the CPU time always is, and the default tests check that no
    network attempt is made."""
    folder = _htdemucs_hub_folder(tmp_path, **RELEASED)
    install_in_hf_cache(folder, "adefossez/HTDemucs", tmp_path / "hf")
    result = _run_offline(Path(sys.executable), _TIMED_LOAD, tmp_path, ROOT)
    assert result.returncode == 0, result.stderr
    idle = os.getloadavg()[0] < 1
    for line in result.stdout.splitlines():
        name, wall, cpu, kind = line.split()
        assert kind == "BagOfModels" and float(cpu) < 2, line
        assert float(wall) < 2 or not idle, line
    print(result.stdout)


_PEER_APPLY = """
import sys, torch
from demucs.apply import apply_model
from demucs.pretrained import get_model
model = get_model(sys.argv[1])
mix = torch.load(sys.argv[2])
torch.save(apply_model(model, mix, split=False, shifts=0), sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"no Demucs 4.1.0 peer at {PEER_PYTHON}")
def test_demucs_4_1_reads_the_exported_hub_files(tmp_path: Path, local_bag: Path):
    """The official 4.1.0 (installed apart) loads `tools.export_hf` output from its HF cache
    and separates as this project does."""
    export_main(["--repo", str(local_bag), "--models", "mybag", "--out", str(tmp_path / "out"),
                 "--hf-cache", str(tmp_path / "hf"), "--namespace", "me"])
    mix = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(0))
    torch.save(mix, tmp_path / "mix.th")
    script = tmp_path / "peer_apply.py"
    script.write_text(_PEER_APPLY)
    result = subprocess.run(
        [str(PEER_PYTHON), str(script), "hf://me/mybag", str(tmp_path / "mix.th"),
         str(tmp_path / "peer.th")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
                 PYTHONPATH=""))
    assert result.returncode == 0, result.stderr
    from demucs.apply import apply_model
    ours = apply_model(get_model("mybag", repo=local_bag), mix, split=False, shifts=0)
    torch.testing.assert_close(torch.load(tmp_path / "peer.th"), ours, rtol=1e-5, atol=1e-6)


def test_huggingface_hub_absent_skips_the_hub(caches: Path, monkeypatch):
    """huggingface-hub is a dependency, but without it lookups go to the release as before."""
    monkeypatch.setattr(hf, "hub_available", lambda: False)
    checkpoints = caches / "torch_hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(_tiny_package(0), checkpoints / "0d19c1c6-0f06f20e.th")
    assert isinstance(get_model("0d19c1c6"), Demucs)
    with pytest.raises(ModelLoadingError, match="huggingface-hub is not installed"):
        get_model("htdemucs")


def test_network_probe_goes_through_the_configured_proxy(monkeypatch):
    for name in ["https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"]:
        monkeypatch.delenv(name, raising=False)
    assert network._probe_target("https://huggingface.co") == ("huggingface.co", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert network._probe_target("https://huggingface.co") == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert network._probe_target("https://huggingface.co") == ("huggingface.co", 443)
