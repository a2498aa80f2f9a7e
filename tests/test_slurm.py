"""Scale-out, end to end: `dora grid toy` on a real one-node Slurm cluster, and `torchrun`.

The cluster (tools/slurm_local.py: munged, slurmctld and slurmd from Debian's packages, 2 CPUs) is
started once for the module and stopped afterwards, also when a test fails. The tests run in
order, as a user would: launch the grid (one job is cancelled with `scancel` after its first
epoch), look at the table, relaunch the cancelled job (it resumes from its checkpoint), restart
and cancel the grid, make one job fail. Every wait has a timeout.

Run with `make test-slurm` (needs root; the packages are installed with apt-get when missing).
"""
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import time
import typing as tp

import pytest

from demucs.grids import toy
from tools.slurm_local import LocalSlurm, SlurmError, free_port, missing_requirements

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = toy.TINY["epochs"]
VICTIM_EPOCHS = toy.LONG_EPOCHS  # the seed=43 XP, cancelled after its first epoch
DONE_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
SCHEDULED = re.compile(r"Scheduled job (\d+) for sheep (\w+)/(.*)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A small toy MusDB where `dset=toy` looks for it (data/toy_musdb), so that the jobs don't race to
# generate the default one: 2 train, 2 validation and 2 test songs of 5 s.
TOY_SET = dict(tracks=4, valid_tracks=2, test_tracks=2, seconds=5.0, seed=0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> tp.Iterator[LocalSlurm]:
    problems = missing_requirements()
    if problems:
        pytest.skip("cannot start a local Slurm cluster: " + "; ".join(problems))
    # 2 CPUs: the grid's 3 one-CPU jobs cannot all run at once, so one of them pends.
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Folder the grid is launched from: `outputs/` and `data/toy_musdb` are relative to it."""
    from demucs.toy_musdb import generate
    folder = tmp_path_factory.mktemp("grid")
    generate(folder / "data" / "toy_musdb", **TOY_SET)
    return folder


def dora_grid(cluster: LocalSlurm, workdir: Path, *flags: str, patterns: tp.Sequence[str] = (),
              stdin: str = "", timeout: float = 120) -> str:
    """`dora grid toy PATTERNS -p PARTITION --no_monitoring FLAGS` from `workdir`; returns its
    output without colors."""
    env = cluster.env()
    env.update(OMP_NUM_THREADS="1", DORA_PACKAGE="demucs", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "dora", "grid", "toy", *patterns, "-p", cluster.partition,
               "--no_monitoring", *flags]
    proc = subprocess.run(command, cwd=workdir, env=env, input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    output = ANSI.sub("", proc.stdout)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def scheduled_jobs(output: str) -> tp.Dict[str, str]:
    """{XP signature: job id} from the `Scheduled job ...` lines of `dora grid`."""
    return {match.group(2): match.group(1) for match in SCHEDULED.finditer(output)}


def table_row(output: str, sig: str) -> str:
    rows = [line for line in output.splitlines() if f" {sig} " in line]
    assert len(rows) == 1, f"no table row for {sig} in:\n{output}"
    return rows[0]


def xp_folder(workdir: Path, sig: str) -> Path:
    return workdir / "outputs" / "xps" / sig


def read_history(workdir: Path, sig: str) -> tp.List[dict]:
    """The XP's history, empty while it does not exist (or is being rewritten)."""
    try:
        return json.loads((xp_folder(workdir, sig) / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


class StateRecorder:
    """Polls `squeue` and records, for each job, the sequence of states it went through."""

    def __init__(self, cluster: LocalSlurm, job_ids: tp.Iterable[str]):
        self.cluster = cluster
        self.states: tp.Dict[str, tp.List[str]] = {job_id: [] for job_id in job_ids}

    def poll(self) -> None:
        jobs = self.cluster.jobs()
        for job_id, sequence in self.states.items():
            state = jobs.get(job_id, ("MISSING", ""))[0]
            if not sequence or sequence[-1] != state:
                sequence.append(state)
            if state == "PENDING":
                self.cluster.check_schedulable(job_id)

    def wait(self, condition: tp.Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if condition():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                   f"states so far: {self.states}")
            time.sleep(0.3)

    def last(self, job_id: str) -> str:
        return self.states[job_id][-1]

    def all_done(self) -> bool:
        return all(self.last(job_id) in DONE_STATES for job_id in self.states)


@pytest.fixture(scope="module")
def grid_run(cluster, workdir) -> dict:
    """Launch the grid; `scancel` the `seed=43` XP after its first epoch; wait for every job."""
    output = dora_grid(cluster, workdir)
    jobs = scheduled_jobs(output)
    assert len(jobs) == 3, output
    victim = next(sig for sig, name in _names(output).items() if "seed=43" in name)
    recorder = StateRecorder(cluster, jobs.values())
    recorder.wait(lambda: len(read_history(workdir, victim)) >= 1, 240,
                  f"the first epoch of {victim}")
    assert recorder.last(jobs[victim]) == "RUNNING", recorder.states
    cluster.run(["scancel", jobs[victim]])
    history_at_cancel = read_history(workdir, victim)
    recorder.wait(recorder.all_done, 300, "every job of the grid to end")
    return dict(jobs=jobs, names=_names(output), victim=victim, states=recorder.states,
                history_at_cancel=history_at_cancel)


def _names(output: str) -> tp.Dict[str, str]:
    return {match.group(2): match.group(3) for match in SCHEDULED.finditer(output)}


def test_jobs_go_through_pending_running_completed(grid_run):
    states = grid_run["states"]
    finished = [sig for sig in grid_run["jobs"] if sig != grid_run["victim"]]
    for sig in finished:
        sequence = states[grid_run["jobs"][sig]]
        assert sequence[-1] == "COMPLETED" and "RUNNING" in sequence, states
    # only 2 CPUs for 3 jobs: one of them waited for a CPU before running
    assert any(states[grid_run["jobs"][sig]][:3] == ["PENDING", "RUNNING", "COMPLETED"]
               for sig in finished), states
    assert states[grid_run["jobs"][grid_run["victim"]]][-1] == "CANCELLED", states


def test_history_and_checkpoints_under_xps(grid_run, workdir):
    for sig in grid_run["jobs"]:
        folder = xp_folder(workdir, sig)
        assert (folder / "checkpoint.th").is_file() and (folder / "best.th").is_file()
        history = read_history(workdir, sig)
        if sig == grid_run["victim"]:
            assert 1 <= len(history) < VICTIM_EPOCHS
        else:
            assert len(history) == EPOCHS and "nsdr" in history[-1]["test"]


def test_grid_again_shows_the_table_with_metrics(grid_run, cluster, workdir):
    output = dora_grid(cluster, workdir)
    assert not scheduled_jobs(output), "done or cancelled XPs must not be relaunched"
    for sig, job_id in grid_run["jobs"].items():
        row = table_row(output, sig)
        assert f" {job_id} " in row
        if sig == grid_run["victim"]:
            assert " CAN " in row
        else:
            nsdr = read_history(workdir, sig)[-1]["test"]["nsdr"]
            assert " COM " in row and f"{nsdr:.2f}" in row, row


def test_cancelled_job_relaunched_resumes_from_checkpoint(grid_run, cluster, workdir):
    victim = grid_run["victim"]
    output = dora_grid(cluster, workdir, "--retry")
    relaunched = scheduled_jobs(output)
    assert list(relaunched) == [victim], output
    recorder = StateRecorder(cluster, relaunched.values())
    recorder.wait(recorder.all_done, 240, f"the relaunched job of {victim}")
    assert recorder.last(relaunched[victim]) == "COMPLETED", recorder.states
    history = read_history(workdir, victim)
    assert len(history) == VICTIM_EPOCHS
    before = grid_run["history_at_cancel"]
    assert history[:len(before)] == before, "epochs done before scancel must be kept, not redone"
    log = xp_folder(workdir, victim) / "submitit" / f"{relaunched[victim]}_0_log.out"
    assert "Loading checkpoint" in log.read_text()


def test_grid_cancel_cancels_running_jobs(grid_run, cluster, workdir):
    output = dora_grid(cluster, workdir, "--clear", stdin="y\n")  # restart all from scratch
    jobs = scheduled_jobs(output)
    assert len(jobs) == 3, output
    recorder = StateRecorder(cluster, jobs.values())
    recorder.wait(lambda: "RUNNING" in {recorder.last(job) for job in jobs.values()}, 120,
                  "a restarted job to run")
    output = dora_grid(cluster, workdir, "--cancel")
    for sig, job_id in jobs.items():
        assert f"Canceling job {job_id} for sheep {sig}" in output
    recorder.wait(recorder.all_done, 60, "the cancelled jobs to end")
    assert all(recorder.last(job) == "CANCELLED" for job in jobs.values()), recorder.states
    assert any("RUNNING" in sequence for sequence in recorder.states.values())
    grid_run["cancelled"] = jobs


def test_failed_job_shows_failure_and_log_path(grid_run, cluster, workdir):
    sig = next(sig for sig, name in grid_run["names"].items() if "htdemucs" in name)
    (xp_folder(workdir, sig) / "checkpoint.th").write_bytes(b"not a checkpoint")
    jobs = scheduled_jobs(dora_grid(cluster, workdir, "--retry", "--replace_done",
                                    patterns=["htdemucs"]))
    assert list(jobs) == [sig]
    recorder = StateRecorder(cluster, jobs.values())
    recorder.wait(recorder.all_done, 180, "the job with a damaged checkpoint to end")
    assert recorder.last(jobs[sig]) == "FAILED", recorder.states
    row = table_row(dora_grid(cluster, workdir), sig)
    log = xp_folder(workdir, sig) / "submitit" / f"{jobs[sig]}_0_log.out"
    shown = re.search(r"FAILED, log: (\S+)", row)
    assert " FAI " in row and shown, row
    assert Path(shown.group(1)).resolve() == log.resolve()
    assert "checkpoint.th" in log.read_text()


def test_job_that_can_never_run_is_reported(cluster, monkeypatch):
    from demucs.grids.toy import job_note
    too_many = cluster.cpus + 1
    proc = cluster.run(["sbatch", "--parsable", f"--cpus-per-task={too_many}",
                        "--output=/dev/null", "--wrap", "true"])
    job_id = proc.stdout.strip()
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(SlurmError, match=f"job {job_id} can never run.*PartitionConfig"):
            while time.monotonic() < deadline:
                cluster.check_schedulable(job_id)
                time.sleep(0.3)
        for key in ("SLURM_CONF", "PATH"):
            monkeypatch.setenv(key, cluster.env()[key])
        assert job_note("PENDING", job_id, None) == \
            "never starts (PartitionConfig): request exceeds the partition"
    finally:
        cluster.run(["scancel", job_id], check=False)


def test_torchrun_two_nodes_without_slurm(workdir):
    """What docs/training.md shows for multi-node without Slurm: one `torchrun` per node (here
    both on this machine, CPU, gloo), each starting `dora run` with its share of the workers."""
    from demucs.grids.toy import TINY, TINY_DEMUCS
    from demucs.train import main
    # batch_size is split between the workers; each share must hold a remix group (2)
    argv = main.value_to_argv([TINY, TINY_DEMUCS, {"epochs": 2, "batch_size": 4}])
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", DORA_PACKAGE="demucs", PYTHONPATH=str(ROOT))
    nodes = []
    for node_rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc_per_node=1", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", "-m", "dora", "run", *argv]
        log = open(workdir / f"torchrun_{node_rank}.log", "w+")
        nodes.append((subprocess.Popen(command, cwd=workdir, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    try:
        for process, _ in nodes:
            process.wait(timeout=300)
    finally:
        for process, log in nodes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    outputs = [(workdir / f"torchrun_{rank}.log").read_text() for rank in range(2)]
    for (process, _), output in zip(nodes, outputs):
        assert process.returncode == 0, output[-4000:]
    assert "Distributed init: 0/2" in outputs[0] and "Distributed init: 1/2" in outputs[1]
    sig = main.get_xp(argv).sig
    history = read_history(workdir, sig)
    assert len(history) == 2 and "nsdr" in history[-1]["test"]
    assert (xp_folder(workdir, sig) / "best.th").is_file()


def test_stop_ends_the_daemons_and_the_running_jobs(tmp_path):
    """Teardown leaves nothing behind, even with a job still running."""
    if missing_requirements():
        pytest.skip("cannot start a local Slurm cluster: " + "; ".join(missing_requirements()))
    cluster = LocalSlurm(tmp_path / "slurm", cpus=1)
    cluster.start()
    try:
        job_id = cluster.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out",
                              "--wrap", "sleep 600"]).stdout.strip()
        recorder = StateRecorder(cluster, [job_id])
        recorder.wait(lambda: recorder.last(job_id) == "RUNNING", 30, "the sleep job to run")
        daemons = cluster.daemon_pids()
        assert sorted(daemons) == ["munged", "slurmctld", "slurmd"]
        assert cluster.leftover_pids(), "the job's processes carry the cluster's SLURM_CONF"
    finally:
        cluster.stop()
    assert not [pid for pid in daemons.values() if Path(f"/proc/{pid}").exists()]
    assert cluster.leftover_pids() == []
