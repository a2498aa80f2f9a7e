"""The Dora grids: `dora grid NAME --dry_run --init` from the repository root lists the upstream
XP signatures, `dora info -f SIG` then shows their hyper-parameters, and the explorer summarises
a history into the grid table."""
import functools
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import tarfile
import typing as tp

import pytest

from demucs.grids import _xps
from demucs.grids._explorers import MyExplorer

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_GRIDS = ROOT.parent / "shared" / "reference" / "grid_signatures.json"
PUBLISHED_XPS = ROOT.parent / "shared" / "reference" / "released_xps.json"

# Signatures named in docs/training.md, with the grid that launches them.
DOCUMENTED = {
    "mdx": ["9357e12e", "e312f349", "81de367c", "80a68df8"],
    "mdx_extra": ["c24d4b58", "3d21764b", "2cfe4564", "b141dad5"],
    "mmi": ["955717e8", "75fc33f5"],
    "mmi_ft": ["f7e0c4bc", "d12395a8", "92cfc3b6", "04573f0d"],
}
# Dataset groups the grids' XPs use (owned by the data module); signatures depend on their values.
DSET_GROUPS = ["musdb44", "extra44", "extra_test", "extra_mmi_goodclean", "auto_mus",
               "auto_extra_test", "aetl", "sdx23_bleeding", "sdx23_labelnoise"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TABLE_ROW = re.compile(r"^\s*\d+\s.*\s([0-9a-f]{8})\s")


def run_dora(args: tp.List[str], dora_dir: Path) -> str:
    """Run the `dora` command from the repository root (package found there, as for users),
    with its XP folder redirected to `dora_dir`; returns its output without colours."""
    env = dict(os.environ, _DORA_TEST_PATH=str(dora_dir), PYTHONWARNINGS="ignore")
    env.pop("DORA_PACKAGE", None)
    proc = subprocess.run([sys.executable, "-m", "dora", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    output = ANSI.sub("", proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"dora {' '.join(args)} failed:\n{output}"
    return output


@pytest.fixture(scope="module")
def dset_groups() -> None:
    folder = ROOT / "conf" / "dset"
    missing = [name for name in DSET_GROUPS if not (folder / f"{name}.yaml").exists()]
    if missing:
        pytest.skip(f"dataset groups not there yet: conf/dset/{{{','.join(missing)}}}.yaml")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, dset_groups) -> tp.Callable[[str], tp.Tuple[tp.List[str], Path]]:
    """`dry_run(grid)` -> (signatures listed by `dora grid GRID --dry_run --init`, dora dir).

    `mmi` goes through the `dora` command run from the repository root, as users do (this also
    checks that Dora finds the package there); the other grids use the same code in-process,
    which spares a Python start-up per grid.
    """
    @functools.lru_cache(maxsize=None)
    def run(grid: str) -> tp.Tuple[tp.List[str], Path]:
        dora_dir = tmp_path_factory.mktemp(f"dora_{grid}")
        if grid == "mmi":
            output = run_dora(["grid", grid, "--dry_run", "--init"], dora_dir)
            listed = [match.group(1) for line in output.splitlines()
                      if (match := TABLE_ROW.match(line))]
        else:
            listed = _run_grid_in_process(grid, dora_dir)
        return listed, dora_dir
    return run


def _run_grid_in_process(grid: str, dora_dir: Path) -> tp.List[str]:
    import importlib
    from dora.grid import RunGridArgs, run_grid
    from demucs.train import main

    explorer = importlib.import_module(f"demucs.grids.{grid}").explorer
    original = main.dora.dir
    main.dora.dir = dora_dir
    try:
        args = RunGridArgs(dry_run=True, init=True, monitor=False, silent=True)
        return [sheep.xp.sig for sheep in run_grid(main, explorer, grid, args=args)]
    finally:
        main.dora.dir = original


@pytest.mark.parametrize("grid", ["mdx", "mmi", "mmi_ft", pytest.param(
    "mdx_extra", marks=pytest.mark.slow)])
def test_grid_lists_the_documented_signatures(dry_run, grid):
    listed, dora_dir = dry_run(grid)
    assert set(DOCUMENTED[grid]) <= set(listed), f"{grid} listed {listed}"
    registered = sorted(path.parent.name for path in (dora_dir / "xps").glob("*/.argv.json"))
    assert registered == sorted(listed), "--init must register exactly the listed XPs"


@pytest.mark.slow
@pytest.mark.parametrize("grid, count", [("repro", 12), ("sdx23", 2)])
def test_grids_without_reference_signatures_run(dry_run, grid, count):
    listed, _ = dry_run(grid)
    assert len(set(listed)) == count


@pytest.mark.parametrize("grid", ["mdx", "mmi", "mmi_ft"])
def test_grid_matches_upstream_listing(dry_run, grid):
    if not UPSTREAM_GRIDS.exists():
        pytest.skip(f"{UPSTREAM_GRIDS} (upstream's grid listings) is not available")
    expected = json.loads(UPSTREAM_GRIDS.read_text())[grid]
    listed, _ = dry_run(grid)
    assert listed == expected


def test_info_shows_the_htdemucs_hyper_parameters(dry_run):
    _, dora_dir = dry_run("mmi")
    output = run_dora(["info", "-f", "955717e8"], dora_dir)
    assert "Sheep(955717e8" in output
    for override in ['model="htdemucs"', "htdemucs.bottom_channels=512", "htdemucs.t_layers=5",
                     "htdemucs.dconv_mode=3", "dset.segment=10", "dset=extra_mmi_goodclean",
                     "batch_size=32", "htdemucs.t_dropout=0.02"]:
        assert f"'{override}'" in output, f"{override} missing from:\n{output}"


# ---- published MDX 2021 XPs (in-process, no Hydra) ----

def test_track_a_models_are_fine_tuned_from_the_mdx_grid_xps():
    assert [_xps.parent_of(sig) for sig in _xps.TRACK_A] == DOCUMENTED["mdx"]
    for sig in _xps.TRACK_A:
        overrides = _xps.overrides_of(sig)
        assert overrides["dset"] == "auto_mus" and overrides["epochs"] == 4


def test_track_b_genealogy_ends_at_the_mdx_extra_roots():
    assert [_xps.root_of(sig) for sig in _xps.TRACK_B] == ["3d21764b", "c24d4b58", "b141dad5",
                                                           "2cfe4564"]
    assert _xps.root_of("3d21764b") == "3d21764b"
    assert _xps.parent_of("e51eebcc") == "269b2268"
    # a stage overrides its parent's values rather than appending to them
    assert _xps.overrides_of("e51eebcc")["seed"] == 1492
    assert _xps.overrides_of("269b2268")["seed"] == 44


def test_unknown_published_signature_is_named_in_the_error():
    with pytest.raises(KeyError, match="0badc0de is not one of the published MDX 2021 XPs"):
        _xps.overrides_of("0badc0de")


def test_mmi_ft_weights_are_one_hot():
    from demucs.grids.mmi_ft import one_hot
    assert [one_hot(index) for index in range(4)] == [
        [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


# ---- signatures computed in-process ----

@pytest.fixture
def main(tmp_path, dset_groups):
    """The training entry point with its XP folder redirected to `tmp_path`."""
    from demucs.train import main
    original = main.dora.dir
    main.dora.dir = tmp_path
    yield main
    main.dora.dir = original


def test_changed_default_is_reported_with_the_signature(main):
    overrides = dict(_xps.overrides_of("9357e12e"), seed=44)
    with pytest.raises(RuntimeError, match="XP 9357e12e now give signature [0-9a-f]{8}"):
        _xps.checked_argv(main, overrides, "9357e12e")


def test_refine_needs_the_finished_quantized_parent(main):
    from demucs.grids.mdx_refine import finished_quantized_parent
    argv = main.value_to_argv(_xps.overrides_of("9357e12e"))
    with pytest.raises(RuntimeError, match=r"has 0 of its 360 epochs.*dora grid mdx"):
        finished_quantized_parent(argv, 1e-4)
    quantized = main.get_xp(argv + ["quant.diffq=0.0001"])
    quantized.folder.mkdir(parents=True)
    quantized.history.write_text(json.dumps([{}] * 360))
    assert finished_quantized_parent(argv, 1e-4) == quantized.sig == "3ab079dc"


@pytest.mark.slow
def test_every_published_xp_keeps_its_signature(main):
    for sig, overrides in _xps.XPS.items():
        _xps.checked_argv(main, overrides, sig)
    if PUBLISHED_XPS.exists():
        for sig, argv in json.loads(PUBLISHED_XPS.read_text()).items():
            assert main.get_xp(argv).sig == sig, f"published argv of {sig}"


# ---- outputs.tar.gz ----

@pytest.mark.slow
def test_outputs_tarball_makes_info_work_for_documented_signatures(tmp_path):
    from tools.make_outputs import build
    tarball = tmp_path / "outputs.tar.gz"
    sigs = build(tarball)
    documented = [sig for sigs_ in DOCUMENTED.values() for sig in sigs_]
    assert set(documented + _xps.TRACK_A + _xps.TRACK_B) <= set(sigs)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path, filter="data")
    for sig in ["81de367c", "0d19c1c6", "e51eebcc", "f7e0c4bc"]:
        assert f"Sheep({sig}" in run_dora(["info", "-f", sig], tmp_path / "outputs")


def test_tarball_layout(tmp_path):
    from tools.make_outputs import write_tarball
    for sig in ["9357e12e", "81de367c"]:
        (tmp_path / "xps" / sig).mkdir(parents=True)
        (tmp_path / "xps" / sig / ".argv.json").write_text(json.dumps([f"seed={sig[:2]}"]))
    write_tarball(tmp_path / "xps", ["9357e12e", "81de367c", "9357e12e"], tmp_path / "o.tgz")
    write_tarball(tmp_path / "xps", ["81de367c", "9357e12e"], tmp_path / "again.tgz")
    assert (tmp_path / "o.tgz").read_bytes() == (tmp_path / "again.tgz").read_bytes()
    with tarfile.open(tmp_path / "o.tgz") as tar:
        names = tar.getnames()
        assert json.load(tar.extractfile("outputs/xps/81de367c/.argv.json")) == ["seed=81"]
        assert {member.mtime for member in tar.getmembers()} == {0}
    assert names == ["outputs", "outputs/xps", "outputs/xps/81de367c",
                     "outputs/xps/81de367c/.argv.json", "outputs/xps/9357e12e",
                     "outputs/xps/9357e12e/.argv.json"]


# ---- explorer ----

def _epoch(loss: float, best: float, reco: float, nsdr: float, test: tp.Optional[dict] = None):
    valid = {"loss": loss, "best": best, "reco": reco, "reco_drums": reco + 1, "nsdr": nsdr,
             "nsdr_drums": nsdr + 1, "main": {"loss": loss}}
    metrics = {"train": {"loss": 2 * loss, "reco": 2 * reco}, "valid": valid}
    if test is not None:
        metrics["test"] = test
    return metrics


def test_explorer_summarises_best_epochs():
    history = [
        _epoch(loss=0.3, best=0.3, reco=0.3, nsdr=4.0),
        _epoch(loss=0.2, best=0.2, reco=0.25, nsdr=5.0, test={"nsdr": 5.5}),
        _epoch(loss=0.4, best=0.2, reco=0.35, nsdr=6.0),
    ]
    summary = MyExplorer(lambda launcher: None).process_history(history)
    assert summary["train"] == {"epoch": 3, "loss": 0.8, "reco": 0.7}
    valid = summary["valid"]
    assert valid["reco"] == 0.35 and valid["breco"] == 0.25 and valid["bmain"] == 0.2
    # the b_* columns come from epoch 2, the best one, not from the last epoch
    assert valid["b_nsdr"] == 5.0 and valid["b_nsdr_drums"] == 6.0 and valid["b_drums"] == 1.25
    assert summary["test"] == {"nsdr": 5.5}


def test_explorer_columns():
    metrics = MyExplorer(lambda launcher: None).get_grid_metrics()
    assert [group.key for group in metrics] == ["train", "valid", "test"]
    assert [leaf.key for leaf in metrics[1].groups] == [
        "penalty", "ms", "reco", "breco", "b_nsdr", "b_nsdr_drums", "b_nsdr_bass",
        "b_nsdr_other", "b_nsdr_vocals"]
    assert [leaf.key for leaf in metrics[2].groups] == ["nsdr", "sdr_med"]
