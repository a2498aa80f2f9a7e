"""A single-node Slurm cluster on this machine, for trying `dora grid` and for the Slurm tests.

Everything lives in one folder: a generated `slurm.conf`, a munge key and socket, the controller's
state, the node's spool, the logs. The daemons (munged, slurmctld, slurmd) run in the foreground
as children of this process and are stopped by `LocalSlurm.stop()`, which also ends the jobs that
are still running. Process tracking needs no cgroups (`proctrack/linuxproc`, `task/none`), and
the partition is CPU-only.

The cluster runs without an accounting database (no slurmdbd), so `sacct`, which submitit and
Dora call to learn the state of jobs, would fail. `LocalSlurm.env()` therefore puts first on PATH a
small `sacct` that answers the same `JobID|State|NodeList` query from the controller's own job
table (`squeue --states=all`), where finished jobs stay for `MinJobAge` seconds.

Needs root and Debian's `slurm-wlm` and `munge` packages (`install_packages()` installs them).

Command line:
    python3 -m tools.slurm_local check                # exit status 1 and why when it cannot start
    python3 -m tools.slurm_local start /tmp/cluster   # prints the `export` lines to use it
    python3 -m tools.slurm_local stop /tmp/cluster
"""
import argparse
import logging
import os
from pathlib import Path
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as tp

from demucs.grids.toy import UNSCHEDULABLE_REASONS

logger = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")
PARTITION = "local"
SACCT_SHIM = '''#!{python}
"""sacct stand-in for a cluster without accounting: answers `-o JobID,State,NodeList
--parsable2 -j ID...` from `squeue --states=all` (see tools/slurm_local.py)."""
import subprocess, sys
ids = [sys.argv[i + 1] for i, arg in enumerate(sys.argv[:-1]) if arg in ("-j", "--jobs")]
print("JobID|State|NodeList")
if ids:
    proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids),
                           "-o", "%i|%T|%N"], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
'''


class SlurmError(RuntimeError):
    """The local cluster could not be started, or a job can never run on it."""


def missing_requirements() -> tp.List[str]:
    """Why the local cluster cannot start here (empty when it can): not root, or missing programs
    that cannot be installed."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (the daemons run as root and write their own spool dirs)")
    absent = [name for name in DAEMONS + ("sbatch",) if shutil.which(name) is None]
    if absent and shutil.which("apt-get") is None:
        problems.append(f"programs {absent} are missing and apt-get is not available "
                        f"to install {' '.join(PACKAGES)}")
    return problems


def install_packages(timeout: float = 600) -> None:
    """Install Debian's Slurm and munge packages when a daemon is missing (needs root)."""
    if all(shutil.which(name) for name in DAEMONS + ("sbatch", "squeue")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    logger.info("Installing %s with apt-get", " ".join(PACKAGES))
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmError(f"`{' '.join(command)}` failed ({proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition: tp.Callable[[], bool], timeout: float, what: str,
                interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class LocalSlurm:
    """One-node Slurm cluster rooted at `root`.

    Args:
        root: folder holding the configuration, state, spool dirs and logs (created).
        cpus: CPUs the node offers (default: all of this machine's).
        memory_mb: memory the node offers, in MB (default: 90% of this machine's).
    """

    def __init__(self, root: tp.Union[str, Path], cpus: tp.Optional[int] = None,
                 memory_mb: tp.Optional[int] = None):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb or int(0.9 * _machine_memory_mb())
        self.node = socket.gethostname().split(".")[0]
        self.partition = PARTITION
        self._processes: tp.Dict[str, subprocess.Popen] = {}

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def log(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    def env(self, base: tp.Optional[tp.Mapping[str, str]] = None) -> tp.Dict[str, str]:
        """Environment that points the Slurm commands (and the jobs) at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def write_config(self) -> None:
        """Create the folders, the munge key, `slurm.conf` and the `sacct` stand-in."""
        for folder in ["munge", "state", "spool", "log", "run", "bin"]:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(self._slurm_conf())
        shim = self.bin_dir / "sacct"
        shim.write_text(SACCT_SHIM.format(python=sys.executable))
        os.chmod(shim, 0o755)

    def _slurm_conf(self) -> str:
        settings = {
            "ClusterName": "demucslocal",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "run" / "slurmctld.pid",
            "SlurmdPidFile": self.root / "run" / "slurmd.pid",
            "SlurmctldLogFile": self.log("slurmctld"),
            "SlurmdLogFile": self.log("slurmd"),
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU_Memory",
            "SchedulerType": "sched/builtin",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "MinJobAge": 3600,  # finished jobs stay visible to squeue (and the sacct stand-in)
            # seconds between SIGTERM and SIGKILL on scancel or time limit (submitit jobs ignore
            # SIGTERM, so a cancelled job goes on training for that long)
            "KillWait": 1,
            "SlurmdParameters": "config_overrides",  # the node offers `cpus`, whatever it has
            "MailProg": "/bin/true",
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 60,
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                     f"RealMemory={self.memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={self.node} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 60) -> None:
        """Write the configuration and start munged, slurmctld and slurmd; returns once the node
        accepts jobs. On any failure the daemons already started are stopped again."""
        problems = missing_requirements()
        if problems:
            raise SlurmError("cannot start a local Slurm cluster: " + "; ".join(problems))
        install_packages()
        self.write_config()
        try:
            self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={self.root / 'munge' / 'munge.key'}",
                                   f"--pid-file={self.root / 'run' / 'munged.pid'}",
                                   f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                                   f"--log-file={self.log('munged')}"])
            _wait_until(self.munge_socket.exists, timeout, "the munge socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            _wait_until(self._node_is_ready, timeout, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise
        logger.info("Local Slurm cluster up in %s (partition %s, %d CPUs, %d MB)",
                    self.root, self.partition, self.cpus, self.memory_mb)

    def _spawn(self, name: str, command: tp.List[str]) -> None:
        output = open(self.root / "log" / f"{name}.stdout", "ab")
        self._processes[name] = subprocess.Popen(
            command, env=self.env(), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
        output.close()

    def daemon_pids(self) -> tp.Dict[str, int]:
        """{name: pid} of the daemons this object started that are still running."""
        return {name: process.pid for name, process in self._processes.items()
                if process.poll() is None}

    def _check_daemons_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise SlurmError(f"{name} exited with code {process.returncode}; see "
                                 f"{self.log(name)} and {self.root / 'log' / (name + '.stdout')}")

    def _node_is_ready(self) -> bool:
        self._check_daemons_alive()
        proc = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        state = proc.stdout.strip().rstrip("*~#")
        return proc.returncode == 0 and state in {"idle", "mix", "alloc"}

    def run(self, command: tp.List[str], check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(command, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"`{' '.join(command)}` failed ({proc.returncode}): "
                             f"{proc.stderr.strip()}")
        return proc

    def jobs(self) -> tp.Dict[str, tp.Tuple[str, str]]:
        """{job id: (state, pending reason)} of every job the controller knows, finished too."""
        proc = self.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r"])
        jobs = {}
        for line in proc.stdout.splitlines():
            job_id, state, reason = line.split("|", 2)
            jobs[job_id] = (state, reason)
        return jobs

    def check_schedulable(self, job_id: str) -> None:
        """Raise `SlurmError` when `job_id` pends for a reason that waiting cannot resolve."""
        state, reason = self.jobs().get(job_id, ("", ""))
        if state == "PENDING" and reason in UNSCHEDULABLE_REASONS:
            raise SlurmError(f"job {job_id} can never run on partition {self.partition} "
                             f"({self.cpus} CPUs, {self.memory_mb} MB): pending with reason "
                             f"{reason}. Lower its CPU/memory request (slurm section of the "
                             "config, or the grid's launcher.slurm_).")

    def stop(self, timeout: float = 30) -> None:
        """Cancel the remaining jobs, stop the daemons and end every process they left behind."""
        if "slurmctld" in self._processes and self._processes["slurmctld"].poll() is None:
            self.run(["scancel", "--full", f"--partition={self.partition}"], check=False)
            try:
                _wait_until(self._no_active_job, timeout / 2, "jobs to end", interval=0.5)
            except (TimeoutError, SlurmError, subprocess.SubprocessError) as error:
                logger.warning("Stopping the cluster with jobs still active: %s", error)
        for name in reversed(DAEMONS):
            process = self._processes.pop(name, None)
            if process is not None:
                _terminate(process, timeout / 4)
        for pid in self.leftover_pids():
            _kill_quietly(pid)

    def detach(self) -> None:
        """Let the daemons outlive this process: their pids go to `run/<daemon>.child`, for
        `stop_detached` (used by the command line, whose `start` returns at once)."""
        for name, process in self._processes.items():
            (self.root / "run" / f"{name}.child").write_text(str(process.pid))
        self._processes.clear()

    def stop_detached(self, timeout: float = 30) -> None:
        """Stop a cluster started (then detached) by another process: cancel the jobs, send
        SIGTERM to the daemons named in `run/<daemon>.child`, end what they left behind."""
        self.run(["scancel", "--full", f"--partition={self.partition}"], check=False)
        for name in reversed(DAEMONS):
            pid_file = self.root / "run" / f"{name}.child"
            if pid_file.exists():
                _stop_pid(int(pid_file.read_text()), timeout / 4)
                pid_file.unlink()
        for pid in self.leftover_pids():
            _kill_quietly(pid)

    def _no_active_job(self) -> bool:
        return all(state not in {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}
                   for state, _ in self.jobs().values())

    def leftover_pids(self) -> tp.List[int]:
        """Processes (job steps, slurmstepd) whose environment points at this cluster."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids


def _machine_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmError("MemTotal not found in /proc/meminfo")


def _terminate(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL if `pid` is still alive after `timeout` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        _wait_until(lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), timeout,
                    f"process {pid} to exit")
    except TimeoutError:
        _kill_quietly(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _export_lines(cluster: LocalSlurm) -> str:
    env = cluster.env({})
    return "\n".join(f"export {key}={env[key]}" for key in ("SLURM_CONF", "PATH")).replace(
        f"PATH={cluster.bin_dir}{os.pathsep}", f"PATH={cluster.bin_dir}{os.pathsep}$PATH")


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser("tools.slurm_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "start", "stop"])
    parser.add_argument("root", type=Path, nargs="?",
                        help="folder of the cluster's config, state and logs")
    parser.add_argument("--cpus", type=int, help="CPUs of the node (default: all)")
    parser.add_argument("--memory_mb", type=int, help="memory of the node in MB (default: 90%%)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "check":
        problems = missing_requirements()
        print("; ".join(problems) or "a local Slurm cluster can start here")
        sys.exit(1 if problems else 0)
    if args.root is None:
        parser.error(f"{args.action} needs the cluster folder (ROOT)")
    cluster = LocalSlurm(args.root, cpus=args.cpus, memory_mb=args.memory_mb)
    if args.action == "start":
        cluster.start()
        cluster.detach()
        print(_export_lines(cluster))
    else:
        cluster.stop_detached()


if __name__ == "__main__":
    main()
