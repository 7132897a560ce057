"""A real SLURM cluster on this machine (Debian's `slurmctld`, and one `slurmd` per node, all on
loopback) in a temporary folder.

For the tests, and for trying `profiles/slurm/` on a laptop:

    python -m tests.slurm_cluster start /tmp/slurm     # prints the env to export
    python -m tests.slurm_cluster stop /tmp/slurm

Two nodes by default, splitting the CPUs, so multi-node jobs (one `srun` task per node) are real.
Nothing outside the folder is touched: the config, state, spool, logs and pid files live there,
authentication is `auth/none` (no munge key), and the client commands (`sbatch`, `srun`, ...) are
wrapped in `<folder>/bin` so they find the config even where SLURM drops `SLURM_CONF` (a job's
nested `srun`). No accounting daemon: `squeue` is the status command, and finished jobs stay
visible for `MinJobAge` seconds, which must exceed three status-check delays of the executor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol", "sacct", "salloc")
DAEMONS = ("slurmctld", "slurmd")
MIN_JOB_AGE = 300  # seconds a finished job stays in squeue: > 3 status-check delays


def unavailable() -> str | None:
    """Why this machine cannot run the test cluster, or None."""
    missing = [name for name in (*DAEMONS, *COMMANDS[:5]) if not shutil.which(name)]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}; "
                "apt-get install slurmctld slurmd slurm-client)")  # fmt: skip
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs, and this process is not root"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(folder: Path, host: str, nodes: int, cpus: int, memory_mb: int) -> str:
    """The smallest slurm.conf that schedules real jobs on this host: cores and memory are
    consumable (`DefMemPerCPU`), so several jobs share a node as on a real cluster; each node is
    a `slurmd -N nN` of its own port."""
    node_lines = "\n".join(
        f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
        f"CPUs={cpus} RealMemory={memory_mb}"
        for i in range(1, nodes + 1)
    )
    return f"""\
ClusterName=featinv-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge={MIN_JOB_AGE}
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
DefMemPerCPU={memory_mb // cpus}
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _wrap_commands(folder: Path, conf: Path) -> Path:
    """`<folder>/bin/<command>` = the real command with this cluster's config."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in COMMANDS:
        real = shutil.which(name)
        if real:
            wrapper = bin_dir / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {real} "$@"\n')
            wrapper.chmod(0o755)
    return bin_dir


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    bin_dir: Path
    host: str

    def env(self) -> dict[str, str]:
        """What a client process needs: the config and the wrapped commands first on PATH."""
        path = f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        return {"SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, *args: str, check: bool = True) -> str:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Queued and running jobs (and finished ones younger than MinJobAge)."""
        out = self.run("squeue", "--noheader", "--states=all", "--format=%i|%j|%T")
        fields = ("id", "name", "state")
        return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]


def start(
    folder: Path, nodes: int = 2, memory_mb: int = 4000, timeout: float = 30.0
) -> SlurmCluster:
    """Configure and start the daemons; returns once every node accepts jobs."""
    if reason := unavailable():
        raise RuntimeError(reason)
    folder = Path(folder).resolve()
    for sub in ("state", *(f"spool-n{i}" for i in range(1, nodes + 1))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    cpus = max((os.cpu_count() or 1) // nodes, 1)
    conf.write_text(_config(folder, host, nodes, cpus, memory_mb))
    cluster = SlurmCluster(folder, conf, _wrap_commands(folder, conf), host)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-c", "-i"], env=env, check=True, timeout=30)
    for i in range(1, nodes + 1):
        subprocess.run(["slurmd", "-N", f"n{i}"], env=env, check=True, timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = cluster.run("sinfo", "--noheader", "--Node", "--format=%t", check=False).split()
        if len(states) == nodes and all(s in ("idle", "mix", "alloc") for s in states):
            return cluster
        time.sleep(0.3)
    stop(folder)
    raise RuntimeError(
        f"the test SLURM nodes did not come up in {timeout:.0f} s (logs in {folder})"
    )


def stop(folder: Path) -> None:
    """Stop the daemons (by their pid files); their jobs end with them."""
    folder = Path(folder).resolve()
    for pid_file in [*folder.glob("slurmd-*.pid"), folder / "slurmctld.pid"]:
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--nodes", type=int, default=2, help="slurmd daemons (default 2)")
    args = parser.parse_args()
    if args.action == "stop":
        stop(args.folder)
        return
    cluster = start(args.folder, args.nodes)
    for name, value in cluster.env().items():
        print(f"export {name}={value}")


if __name__ == "__main__":
    main()
