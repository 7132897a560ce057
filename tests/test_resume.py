"""Interrupted runs resume exactly: no lost, duplicated or half-written samples, same bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import validate_config
from pipeline.extract import extract_shard, extract_shards, joined, pack, unpack
from pipeline.finalize import finalize_store
from pipeline.jobs import JOB_SAMPLES, shard_batches
from pipeline.plan import plan_store
from storage_specs.layout import StoreError
from storage_specs.validate import validate_store
from tests.conftest import build_store, make_config, snakemake, store_objects, write_config


def _commits(store: Path) -> int:
    return len(list(store.glob("commits/main/*/zarr.json")))


def test_killed_snakemake_run_resumes_bitwise(small_dir, tmp_path):
    """Against the same store made uninterrupted, in this process (what each job runs: the same
    bytes as a Snakemake run's, tests/test_slurm.py)."""
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    stores = []
    for where in (reference_dir, resumed_dir):
        where.mkdir()
        config = make_config(where, small_dir, shard_size=2)
        write_config(where, config)
        stores.append(Path(config["store"]))
    build_store(make_config(reference_dir, small_dir, shard_size=2))

    proc = snakemake(
        resumed_dir / "config.yaml", resumed_dir, "--cores", "1", background=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while _commits(stores[1]) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = _commits(stores[1])
    assert 2 <= interrupted < 5, "the run must be killed mid-way"
    assert validate_store(str(stores[1]), check_data=False)  # not finalized: invalid

    # A killed Snakemake leaves its lock behind; --unlock is the documented first step.
    assert snakemake(resumed_dir / "config.yaml", resumed_dir, "--unlock").returncode == 0
    again = snakemake(resumed_dir / "config.yaml", resumed_dir, "--cores", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert validate_store(str(stores[1])) == []
    assert store_objects(str(stores[1])) == store_objects(str(stores[0]))


@pytest.fixture
def one_backbone(small_dir, tmp_path) -> dict:
    return make_config(
        tmp_path,
        small_dir,
        backbones=[{"name": "resnet18", "weights": "random", "layers": ["layer2", "layer4"]}],
    )


def test_torn_shard_is_rewritten_whole(one_backbone, tmp_path):
    config = one_backbone
    reference = make_config(tmp_path / "ref", config["source"], backbones=config["backbones"])
    build_store(reference)

    plan_store(config)
    for shard in range(3):
        extract_shard(config, "main", shard, progress=False)
    store = Path(config["store"])
    # A job killed while writing shard 1: data half written, no commit record.
    shutil.rmtree(store / "commits/main/00001")
    torn = store / "features/resnet18/layer4/c/1/0/0/0/0"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    assert validate_store(str(store), require_complete=False, check_data=False)
    unfinished = validate_store(str(store), check_data=False)  # what `featinv validate` prints
    assert unfinished[0] == "root: store is not complete; run the pipeline to the end"
    assert not any(p.startswith("samples/") for p in unfinished)  # not gathered yet: no noise

    plan_store(config)  # a rerun re-plans: same listing, nothing changes
    committed = (store / "features/resnet18/layer4/c/0/0/0/0/0").stat().st_mtime_ns
    for shard in range(3):
        extract_shard(config, "main", shard, progress=False)
    assert (store / "features/resnet18/layer4/c/0/0/0/0/0").stat().st_mtime_ns == committed
    finalize_store(config["store"], progress=False)
    assert store_objects(str(store)) == store_objects(reference["store"])


def test_changed_source_refuses_to_resume(one_backbone, small_dir, tmp_path):
    config = one_backbone
    plan_store(config)
    fewer = validate_config({**config, "limit": 5})
    with pytest.raises(RuntimeError, match=r"source listing changed .* \(\d+ removed \(\w+/"):
        plan_store(fewer)
    with pytest.raises(RuntimeError, match=r"planned with image_limits .* use a new store"):
        plan_store(validate_config({**config, "image_limits": {"min_side": 1}}))
    with pytest.raises(RuntimeError, match="shard_size 4, config asks for 2"):
        plan_store(validate_config({**config, "shard_size": 2}))


def test_failed_shard_write_stops_the_job_without_committing_it(one_backbone):
    """A shard the writer thread cannot store fails the job (the error is the store's), is not
    committed, and neither is any later shard of the job; the rerun does exactly those."""
    config = one_backbone
    plan_store(config)
    store = Path(config["store"])
    blocker = store / "features/resnet18/layer4/c/1/0/0/0/0"
    (blocker / "x").mkdir(parents=True)  # where shard 1's object goes: a directory, even for root
    with pytest.raises(IsADirectoryError):
        extract_shards(config, "main", [0, 1, 2], progress=False)
    assert sorted(p.parent.name for p in store.glob("commits/main/*/zarr.json")) == ["00000"]
    shutil.rmtree(blocker)
    records = extract_shards(config, "main", [0, 1, 2], progress=False)
    assert [r["shard"] for r in records] == [0, 1, 2] and _commits(store) == 3
    finalize_store(config["store"], progress=False)
    assert validate_store(config["store"]) == []


def test_values_beyond_the_storage_dtype_fail_the_job_in_one_line(small_dir, tmp_path):
    """Features that overflow fp16 (rounded in the writer thread, behind the forward) fail the
    job with the array named, and no shard of the job is committed."""
    entry = {"name": "resnet18", "weights": "random", "layers": ["layer4"],
             "preprocessing": {"std": [1e-6] * 3}}  # fmt: skip
    config = make_config(tmp_path, small_dir, backbones=[entry])
    plan_store(config)
    message = r"^features/resnet18/layer4: values are not finite at fp16 \(max \|x\| = .*bf16$"
    with pytest.raises(StoreError, match=message):
        extract_shards(config, "main", [0, 1], progress=False)
    assert _commits(Path(config["store"])) == 0


@pytest.mark.parametrize("shard_size", [1, 32, 100, 256, 5000])
@pytest.mark.parametrize("n_shards", [1, 7, 64, 65, 1000])
def test_jobs_are_sized_in_samples_whatever_the_shard_size(n_shards, shard_size):
    jobs = shard_batches(n_shards, shard_size)
    assert [first for first, _ in jobs] == [0] + [last + 1 for _, last in jobs[:-1]]
    assert jobs[-1][1] == n_shards - 1
    sizes = [(last - first + 1) * shard_size for first, last in jobs]
    assert max(sizes) <= max(JOB_SAMPLES, shard_size)
    assert len(jobs) == 1 or min(sizes) > JOB_SAMPLES // 2 - shard_size  # near-equal, none tiny


def test_a_batch_of_one_runs_samples_is_that_run_without_a_copy():
    run = pack([{"row": r, "inputs": {"b": torch.full((2, 3), float(r))}} for r in range(3)])
    parts = [sample["inputs"]["b"] for sample in unpack(run)]
    whole = joined(parts)
    assert whole.data_ptr() == run["inputs"]["b"].data_ptr() and torch.equal(
        whole, run["inputs"]["b"]
    )
    tail = joined(parts[1:])
    assert tail.data_ptr() == parts[1].data_ptr() and torch.equal(tail, run["inputs"]["b"][2:])
    gap = joined([parts[0], parts[2]])  # a skipped sample between them: copied, in order
    assert gap.data_ptr() != parts[0].data_ptr() and torch.equal(
        gap, torch.cat([parts[0], parts[2]])
    )


def test_decode_workers_do_not_change_the_store(small_dir, tmp_path):
    """Two decode workers take alternate runs of 3 rows (across shards of 4, a torn photo among
    them) and send each run's inputs as one tensor: the store is the one a job that decodes
    in its own process builds."""
    stores = []
    for workers in (0, 2):
        (tmp_path / str(workers)).mkdir()
        config = make_config(tmp_path / str(workers), small_dir, num_workers=workers, batch_size=3)
        build_store(config)
        stores.append(store_objects(config["store"]))
    assert stores[0] == stores[1]
