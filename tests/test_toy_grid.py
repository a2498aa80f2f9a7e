"""The toy grid without a cluster: its XPs, the Slurm request Dora makes of them, the `note` column.

The same grid runs on a real (local) Slurm cluster in tests/test_slurm.py (`make test-slurm`).
"""
from pathlib import Path
import typing as tp

from dora.explore import Herd, Launcher
from dora.shep import Shepherd
import pytest

from demucs.grids import toy


@pytest.fixture
def main(tmp_path, monkeypatch):
    from demucs.train import main
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return main


@pytest.fixture
def herd(main) -> Herd:
    """The grid's XPs and their Slurm configs, as `dora grid toy` collects them."""
    herd = Herd()
    toy.explorer(Launcher(Shepherd(main), main.get_slurm_config(), herd))
    return herd


def _fake_program(folder: Path, name: str, output: str) -> None:
    """A stand-in for a Slurm command that prints `output`."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)


def test_three_tiny_xps_on_the_toy_set(herd):
    assert len(herd.sheeps) == 3
    configs = [sheep.xp.cfg for sheep in herd.sheeps.values()]
    assert [cfg.model for cfg in configs] == ["demucs", "demucs", "htdemucs"]
    assert [cfg.seed for cfg in configs] == [42, 43, 42]
    assert [cfg.epochs for cfg in configs] == [toy.TINY["epochs"], toy.LONG_EPOCHS,
                                               toy.TINY["epochs"]]
    for cfg in configs:
        assert cfg.dset.get("toy") is not None and cfg.dset.samplerate == 8000
        assert cfg.max_batches == toy.TINY["max_batches"]
        # the shift augmentation crops dset.shift seconds off each excerpt
        assert 0 < cfg.dset.shift < cfg.dset.segment


def test_cpu_only_request_with_config_time_cleared_gpu_settings(herd, main):
    base = main.get_slurm_config()
    for slurm in herd.slurm_configs.values():
        assert (slurm.gpus, slurm.cpus_per_task, slurm.mem_per_gpu) == (0, 1, toy.MEMORY_GB)
        assert slurm.constraint == "" and slurm.setup == []
        assert slurm.time == toy.TIME_MINUTES
        assert slurm.partition == base.partition  # from the config / `dora grid -p`


def test_sbatch_script_asks_one_cpu_and_no_gpu(herd, main, tmp_path, monkeypatch):
    _fake_program(tmp_path / "bin", "srun", "")  # submitit refuses to build without srun
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path('/usr/bin')}:{Path('/bin')}")
    slurm = next(iter(herd.slurm_configs.values()))
    executor = Shepherd(main)._get_submitit_executor("toy", tmp_path / "submitit", slurm)
    script = executor._make_submission_file_text("python -m submitit", "uid")
    assert "#SBATCH --cpus-per-task=1\n" in script
    assert f"#SBATCH --mem={toy.MEMORY_GB}GB\n" in script
    assert f"#SBATCH --time={toy.TIME_MINUTES}\n" in script
    assert "--gres" not in script and "module load" not in script
    constraints = [line for line in script.splitlines() if "--constraint" in line]
    assert constraints in ([], ["#SBATCH --constraint=''"]), "no node feature required"


@pytest.mark.parametrize("state, reason, expected", [
    ("FAILED", "", "FAILED, log: /x/1_0_log.out"),
    ("OUT_OF_MEMORY", "", "OUT_OF_MEMORY, log: /x/1_0_log.out"),
    ("PENDING", "PartitionConfig",
     "never starts (PartitionConfig): request exceeds the partition"),
    ("PENDING", "Resources", ""),
    ("RUNNING", "", ""),
    ("COMPLETED", "", ""),
    (None, "", ""),
])
def test_job_note(state: tp.Optional[str], reason: str, expected: str, tmp_path, monkeypatch):
    _fake_program(tmp_path / "bin", "squeue", reason)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert toy.job_note(state, "1", "/x/1_0_log.out") == expected


def test_note_column_without_squeue(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue at all: no note, no crash
    assert toy.job_note("PENDING", "1", None) == ""


def test_explorer_adds_the_note_after_the_metrics():
    groups = toy.explorer.get_grid_metrics()
    assert [group.key for group in groups] == ["train", "valid", "test", "slurm"]
    assert [leaf.key for leaf in groups[-1].groups] == ["note"]
