"""A one-node SLURM cluster for the tests (tests/test_slurm.py), from Debian's `slurm-wlm` and `munge` packages.

munged, slurmctld and slurmd run as root in the foreground, as children of the test process, from a slurm.conf in a
temporary directory that also holds the munge key, every socket, state, spool, log and pid file: nothing is read
from or written to /etc/slurm, /etc/munge or /var, and the ports are free ones picked at start. Client commands and
jobs find the cluster through SLURM_CONF (sbatch and srun pass the environment on to the job). The node is this
host with its CPUs, in a partition with OverSubscribe=FORCE so that jobs share them. There is no slurmdbd, so
`sacct` has nothing to say: a job's final state comes from the job-completion log (jobcomp/filetxt).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mpi_util import clean_env

# What the cluster needs: the daemons (slurmctld, slurmd: package slurm-wlm; munged, mungekey: munge) and the clients.
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "salloc", "sinfo", "squeue", "scancel",
            "scontrol")
# Daemons live in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# Below SLURM's default MaxJobId (67043328), with room for the jobs of a session.
MAX_FIRST_JOB_ID = 60_000_000
# Job states a job passes through before it has ended and every process of it is gone.
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING", "STOPPED", "RESIZING"}

SLURM_CONF = """\
ClusterName=ringlet-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
# sbatch --wait polls every 2 s only while 2 < MinJobAge / 2; with the default (300) its sleeps grow to 32 s.
MinJobAge=5
# Job ids go on from one test session to the next, as on a cluster that keeps its state: MPICH names its shared
# memory after the PMI job id (JOBID.STEP), and a segment left in /dev/shm by a killed job of an earlier session
# with the same id breaks MPI_Init of a new one ("Message from rank 1 and tag 7 truncated").
FirstJobId={first_job_id}
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ringlet Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


class SlurmUnavailable(Exception):
    """The mini cluster cannot run on this machine (a program is missing, or not root); the message says why."""


def find_programs() -> dict[str, str]:
    """name -> path of every program in PROGRAMS; raises SlurmUnavailable naming what is missing."""
    found = {name: shutil.which(name, path=SEARCH_PATH) for name in PROGRAMS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SlurmUnavailable(f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the mini SLURM cluster runs munged, slurmctld and slurmd as root; this is not root")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports that nothing listens on now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


class SlurmCluster:
    """A running one-node cluster: `env()` for its clients and jobs, `run()` for a client command, and the final
    state of a job from the completion log. Start it with `start_cluster`; `stop()` ends what it started."""

    def __init__(self, root: Path, programs: dict[str, str]):
        self.root = root
        self.programs = programs
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "log" / "jobcomp.txt"
        self.node = ""  # the node's name, as `slurmd -C` gives it
        self.daemons: dict[str, subprocess.Popen] = {}

    def env(self, **extra) -> dict:
        """The test environment without launcher variables (mpi_util.clean_env), pointed at this cluster."""
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, *args, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a client command (`run("sinfo", "-h")`); raises RuntimeError with its output when it fails."""
        argv = [self.programs.get(args[0], args[0]), *map(str, args[1:])]
        res = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {res.returncode}:\n{res.stdout}{res.stderr}")
        return res

    def logs(self) -> str:
        """The last lines each daemon wrote (in the foreground they log to stderr), for failure messages."""
        return "\n".join(f"--- {name}:\n{_tail(self.root / 'log' / f'{name}.out')}" for name in self.daemons)

    def state(self, job_id: str) -> str:
        """The job's state as squeue shows it (RUNNING, COMPLETING, ...), or "" once it left the queue."""
        res = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        return res.stdout.strip() if res.returncode == 0 else ""

    def wait_ended(self, job_id: str, timeout: float = 60) -> dict:
        """Wait until the job has ended and none of its processes is left (not even COMPLETING); returns its
        completion record: {"JobState": "COMPLETED" | "FAILED" | "CANCELLED" | ..., "ExitCode": "1:0", ...}."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.completion(job_id)
            if record is not None and self.state(job_id) not in LIVE_STATES:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {self.state(job_id) or 'unrecorded'} after {timeout} s\n"
                                   f"{self.logs()}")
            time.sleep(0.2)

    def completion(self, job_id: str) -> dict | None:
        """The job's line of the completion log as a dict, or None while it has none."""
        if not self.jobcomp.exists():
            return None
        for line in self.jobcomp.read_text(errors="replace").splitlines():
            record = dict(re.findall(r"(\w+)=(\S*)", line))
            if record.get("JobId") == str(job_id):
                return record
        return None

    def stop(self) -> None:
        """Cancel every job, wait for their processes to end, then stop slurmd, slurmctld and munged by PID
        (SIGTERM, then SIGKILL after 10 s). Safe to call on a cluster that started only in part."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--user=root", check=False)
            # Each job step's slurmstepd leaves its socket in the spool directory until it ends.
            deadline = time.monotonic() + 15
            spool = self.root / "spool"
            while time.monotonic() < deadline and (self.run("squeue", "-h", check=False).stdout.strip()
                                                   or any(spool.glob(f"{self.node}_*.*"))):
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    with open(cluster.root / "log" / f"{name}.out", "w") as log:
        cluster.daemons[name] = subprocess.Popen([cluster.programs[name], *args], stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=subprocess.STDOUT, env=cluster.env())


def start_cluster(root: Path, timeout: float = 30) -> SlurmCluster:
    """Write the configuration into `root` (an empty directory), start munged, slurmctld and slurmd, and wait until
    `sinfo` shows the node idle. On failure the daemons started so far are stopped and RuntimeError carries their
    logs. Raises SlurmUnavailable where SLURM is missing."""
    programs = find_programs()
    cluster = SlurmCluster(root, programs)
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir()
    # munged insists on a socket directory that everyone may enter, and a key only its owner may read.
    root.chmod(0o755)
    (root / "run").chmod(0o755)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    munge_socket = root / "run" / "munge.socket"
    try:
        subprocess.run([programs["mungekey"], "--create", f"--keyfile={key}"], check=True, capture_output=True,
                       text=True, timeout=30)
        node_line = subprocess.run([programs["slurmd"], "-C"], check=True, capture_output=True, text=True,
                                   timeout=30).stdout.splitlines()[0]
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(e.cmd)} failed: {e.stderr}") from None
    (root / "plugstack.conf").write_text("")  # no SPANK plugins, whatever /etc/slurm/plugstack.conf loads
    cluster.node = re.match(r"NodeName=(\S+)", node_line).group(1)
    ctld_port, slurmd_port = _free_ports(2)
    cluster.conf.write_text(SLURM_CONF.format(root=root, node=cluster.node, node_line=node_line,
                                              munge_socket=munge_socket, ctld_port=ctld_port, slurmd_port=slurmd_port,
                                              first_job_id=int(time.time()) % MAX_FIRST_JOB_ID + 1))
    try:
        _start(cluster, "munged", ["--foreground", f"--socket={munge_socket}", f"--key-file={key}",
                                   f"--log-file={root / 'log' / 'munged.log'}",
                                   f"--pid-file={root / 'run' / 'munged.pid'}",
                                   f"--seed-file={root / 'munge' / 'munged.seed'}"])
        _wait(cluster, lambda: munge_socket.exists(), timeout, "munged to create its socket")
        _start(cluster, "slurmctld", ["-D", "-f", str(cluster.conf)])
        _start(cluster, "slurmd", ["-D", "-f", str(cluster.conf)])
        _wait(cluster, lambda: cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip() == "idle",
              timeout, "sinfo to show the node idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(cluster: SlurmCluster, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                   f"{cluster.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout} s for {what}\n{cluster.logs()}")
        time.sleep(0.1)


@contextlib.contextmanager
def slurm_cluster():
    """A running SlurmCluster in a fresh temporary directory; on exit (also after a failure) every job is
    cancelled, every daemon stopped and the directory removed."""
    root = Path(tempfile.mkdtemp(prefix="ringlet-slurm-"))
    try:
        cluster = start_cluster(root)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
