"""Start `featinv train` on every process the config asks for: `training.nodes` nodes x
`training.processes_per_node` processes (one per GPU by default).

One process: the trainer runs here.  Several on one node: `accelerate launch` here.  Inside a SLURM
allocation (the `train` rule under profiles/slurm, or `sbatch profiles/slurm/train.sbatch`): one
`srun` task per node, each running `accelerate launch` for its own processes with the node's rank
and the first node as the rendezvous.  The trainer itself is unchanged: accelerate gives every
process its rank, and each reads only its slice of every global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "profiles/slurm/accelerate.yaml"
NODE_STEP = "FEATINV_NODE_STEP"  # set on the srun tasks: "you are one node of the run"


def processes_per_node(spec: dict) -> int:
    return spec["processes_per_node"] or max(spec["gpus"], 1)


def _port(job_id: str | None) -> int:
    """A rendezvous port per SLURM job (two trainings may share a node), else a free one."""
    if job_id:
        return 20000 + int(job_id) % 10000
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scontrol(*args: str) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                          timeout=60)  # fmt: skip
    return done.stdout


def _first_node_address(nodelist: str) -> str:
    """The address of the allocation's first node: SLURM's `NodeAddr` (node names need not
    resolve; `node[01-04]` is expanded by scontrol)."""
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    fields = dict(
        f.split("=", 1) for f in _scontrol("show", "node", "-o", first).split() if "=" in f
    )
    return fields.get("NodeAddr", first)


def accelerate_command(spec: dict, train_args: list[str], env: dict[str, str]) -> list[str]:
    """`accelerate launch` for this node: all processes of the run, this node's rank, the
    rendezvous on the allocation's first node (127.0.0.1 outside SLURM)."""
    nodes, per_node = spec["nodes"], processes_per_node(spec)
    in_slurm = NODE_STEP in env
    host = _first_node_address(env["SLURM_JOB_NODELIST"]) if in_slurm else "127.0.0.1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
        "--num_processes", str(nodes * per_node), "--num_machines", str(nodes),
        "--machine_rank", env.get("SLURM_NODEID", "0") if in_slurm else "0",
        "--main_process_ip", host,
        "--main_process_port", str(_port(env.get("SLURM_JOB_ID") if in_slurm else None)),
    ]  # fmt: skip
    return [*command, "-m", "pipeline.cli", "train", *train_args]


def srun_command(spec: dict, launch_args: list[str]) -> list[str]:
    """One task per node of the allocation, each back in `featinv launch-train` as a node step;
    `--overlap` because the job's own step (Snakemake's) already holds the allocation."""
    nodes = str(spec["nodes"])
    return ["srun", "--overlap", "--nodes", nodes, "--ntasks", nodes, "--ntasks-per-node", "1",
            f"--export=ALL,{NODE_STEP}=1", sys.executable, "-m", "pipeline.cli", "launch-train",
            *launch_args]  # fmt: skip


def plan(spec: dict, launch_args: list[str], env: dict[str, str]) -> list[str] | None:
    """The command to run, or None to train in this process."""
    world = spec["nodes"] * processes_per_node(spec)
    if NODE_STEP in env:
        return accelerate_command(spec, launch_args, env)
    if "SLURM_JOB_ID" in env and (spec["nodes"] > 1 or world > 1):
        return srun_command(spec, launch_args)
    if spec["nodes"] > 1:
        raise ValueError(f"training.nodes: {spec['nodes']} needs a SLURM allocation of as many "
                         "nodes (snakemake --profile profiles/slurm train, or sbatch "
                         "profiles/slurm/train.sbatch CONFIG)")  # fmt: skip
    if world > 1:
        return accelerate_command(spec, launch_args, env)
    return None


def allocation_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without the variables of the step we may be running in (Snakemake runs a job's
    command in an `srun -n1` step, whose SLURM_NNODES is 1): srun then sees the whole
    allocation of SLURM_JOB_ID."""
    keep = {"SLURM_JOB_ID", "SLURM_CONF"}
    return {k: v for k, v in env.items()
            if k in keep or not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}  # fmt: skip


def launch(spec: dict, launch_args: list[str]) -> int | None:
    """Run the planned command (its exit code), or None when training belongs in this process."""
    env = dict(os.environ)
    command = plan(spec, launch_args, env)
    if command is None:
        return None
    print(f"featinv launch-train: {' '.join(command)}", flush=True)
    return subprocess.run(
        command, env=allocation_env(env) if command[0] == "srun" else env
    ).returncode
