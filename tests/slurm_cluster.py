"""A throwaway SLURM cluster on this machine, for testing the scripts in slurm/ for real.

Debian's munged, slurmctld and one slurmd per emulated node (n1, n2, ...), all on
127.0.0.1, everything under one folder (but munge's socket, in a short folder of its own
under /tmp), no systemd and no cgroups:

    cluster = LocalSlurm(tmp_dir, nodes=2)
    cluster.start()                          # SkipCluster(reason) when it can't
    job = cluster.sbatch(["slurm/train_multinode.sbatch", "--epochs", "1"], cwd=repo, env=env)
    info = cluster.wait_for(job)             # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    cluster.stop()                           # only the daemons this object started, by pid

By hand (then `export SLURM_CONF=DIR/slurm.conf`; `sbatch`, `srun`, `squeue` work as usual):

    python tests/slurm_cluster.py start /tmp/pets-slurm 2
    python tests/slurm_cluster.py stop /tmp/pets-slurm

Needs root and `apt-get install slurmctld slurmd slurm-client munge`. What was seen to
matter: `proctrack/pgid` (linuxproc leaves strays), `cred_expire=5` (a requeued job starts
again after ~8 s instead of ~2 min), and node names that need not resolve: the scripts
take the head node's address from `scontrol show node` (NodeAddr), never from DNS.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue",
            "scancel", "sinfo")


class SkipCluster(Exception):
    """The cluster can't run here; the message says why (for pytest.skip)."""


def missing_requirements() -> str | None:
    """Why no local SLURM cluster can run here, or None when it can."""
    missing = [name for name in COMMANDS if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found); install it with "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_base_port(count: int) -> int:
    """A base port with `count` free ports after it (checked by binding each)."""
    for _ in range(50):
        base = random.randrange(20000, 40000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise SkipCluster("no free TCP ports for slurmctld and slurmd")


def _command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class LocalSlurm:
    def __init__(self, root: str | Path, nodes: int = 2, kill_wait: int = 30):
        self.root = Path(root).resolve()
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.kill_wait = kill_wait  # seconds between SIGTERM and SIGKILL at a job's end
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}  # what this object started: name -> pid
        self.munge_dir: Path | None = None

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """Extra environment for SLURM commands (and jobs) against this cluster."""
        return {"SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        result = subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    # ------------------------------------------------------------------ start and stop
    def start(self, timeout: float = 30) -> None:
        reason = missing_requirements()
        if reason:
            raise SkipCluster(reason)
        for sub in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged wants o+x on every folder above its socket (pytest's are 0700), and a socket
        # path must stay under ~100 characters: a short folder of its own in /tmp
        munge = self.munge_dir = Path(tempfile.mkdtemp(prefix="pets-munge-", dir="/tmp"))
        munge.chmod(0o711)
        key = munge / "munge.key"
        self.run("mungekey", "-c", "-k", str(key))
        self.run("munged", f"--key-file={key}", f"--socket={munge / 'munge.sock'}",
                 f"--pid-file={munge / 'munged.pid'}", f"--log-file={self.root / 'log/munged.log'}",
                 f"--seed-file={munge / 'munged.seed'}")  # daemonizes once the socket is up
        self.pids["munged"] = int((munge / "munged.pid").read_text())

        port = _free_base_port(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(port))
        self.run("slurmctld", "-i")  # -i: a fresh state folder is fine
        self._remember_pid("slurmctld", self.root / "slurmctld.pid")
        for node in self.nodes:
            self.run("slurmd", "-N", node)
            self._remember_pid(f"slurmd-{node}", self.root / f"slurmd-{node}.pid")

        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).split()
            if states == ["idle"] * len(self.nodes):
                return
            time.sleep(0.25)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))
        self.stop()
        raise RuntimeError(f"the SLURM cluster did not come up in {timeout:.0f} s:\n{logs}")

    def _remember_pid(self, name: str, pid_file: Path, timeout: float = 10) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pid_file.is_file() and pid_file.read_text().strip():
                self.pids[name] = int(pid_file.read_text())
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} wrote no pid file ({pid_file}); see {self.root / 'log'}")

    def _slurm_conf(self, port: int) -> str:
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=pets-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'munge.sock'},cred_expire=5",
            f"SlurmctldPort={port}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root / 'log/slurmctld.log'}",
            f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"KillWait={self.kill_wait}",
            "MinJobAge=3600",  # keep finished jobs visible to scontrol (no accounting here)
        ]
        for i, node in enumerate(self.nodes, start=1):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port + i} "
                         "CPUs=1 RealMemory=4000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons this object started (by pid)."""
        if "slurmctld" in self.pids:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).split()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=10)
                deadline = time.time() + self.kill_wait + 10
                while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False,
                                                          timeout=10).strip():
                    time.sleep(0.25)
        for order in (("slurmd-", "slurmctld"), ("munged",)):  # munged last: the others use it
            started = {name: pid for name, pid in self.pids.items() if name.startswith(order)}
            for name, pid in started.items():
                if _command_of(pid) == name.split("-")[0]:
                    os.kill(pid, signal.SIGTERM)
            deadline = time.time() + 10
            for name, pid in started.items():
                while _command_of(pid) == name.split("-")[0] and time.time() < deadline:
                    time.sleep(0.1)
                if _command_of(pid) == name.split("-")[0]:
                    os.kill(pid, signal.SIGKILL)
                self.pids.pop(name)
        if self.munge_dir is not None and "munged" not in self.pids:
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], *, cwd: str | Path, env: dict[str, str]) -> str:
        """Submit; returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True,
                                text=True, env={**env, **self.env}, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: str, timeout: float = 600, states=("COMPLETED", "FAILED",
                 "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        """The job's record once it reached one of `states`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} "
                           f"after {timeout:.0f} s")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start DIR [NODES] | stop DIR", file=sys.stderr)
        return 2
    cluster = LocalSlurm(argv[1], nodes=int(argv[2]) if len(argv) > 2 else 2)
    if argv[0] == "start":
        try:
            cluster.start()
        except SkipCluster as reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    # stop: the pids from the pid files, each checked to be the daemon it names
    socket_line = re.search(r"AuthInfo=socket=(\S+?)/munge.sock", cluster.conf.read_text())
    cluster.munge_dir = Path(socket_line.group(1))
    for name, pid_file in [*((f"slurmd-{n}", cluster.root / f"slurmd-{n}.pid") for n in
                             [p.stem.removeprefix("slurmd-") for p in cluster.root.glob("slurmd-*.pid")]),
                           ("slurmctld", cluster.root / "slurmctld.pid"),
                           ("munged", cluster.munge_dir / "munged.pid")]:
        if pid_file.is_file():
            cluster.pids[name] = int(pid_file.read_text())
    cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
