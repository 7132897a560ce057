"""The store is the authority over Snakemake's markers in work_dir: after a complete run, a store
that is deleted (on disk), whose bucket is emptied (S3, the loopback moto server) or that is
replaced by another one is rebuilt by the same command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import s3fs
import zarr

from pipeline.markers import stale_reason
from pipeline.plan import plan_store
from storage_specs.validate import validate_store
from tests.conftest import cli, make_config, snakemake, write_config

# One shard of the small collection, one small random backbone: three jobs per run.
CONFIG = {
    "shard_size": 9,
    "backbones": [
        {
            "name": "resnet18",
            "weights": "random",
            "layers": ["layer4"],
            "preprocessing": {"input_size": 64},
        }
    ],
}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store.zarr")
    return f"{request.getfixturevalue('s3_bucket')}/store.zarr"


def _delete(url: str) -> None:
    """Delete the store; on S3 empty its whole bucket, as a user clearing it would."""
    if not url.startswith("s3://"):
        shutil.rmtree(url)
        return
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = url.removeprefix("s3://").split("/")[0]
    fs.rm(fs.find(bucket))
    assert fs.find(bucket) == []
    s3fs.S3FileSystem.clear_instance_cache()  # zarr's client in this process listed the store


def _run(tmp_path) -> str:
    result = snakemake(tmp_path / "config.yaml", tmp_path, "--cores", "2")
    errors = [line for line in result.stderr.splitlines() if line.startswith("featinv: error")]
    assert result.returncode == 0, errors or result.stderr[-3000:]
    s3fs.S3FileSystem.clear_instance_cache()  # listings cached by this process are stale
    return result.stdout + result.stderr


def _complete(url: str) -> str:
    assert validate_store(url) == []
    root = zarr.open_group(url, mode="r")
    assert root.attrs["complete"] is True and len(root.attrs["store_id"]) == 32
    return root.attrs["store_id"]


def test_gone_or_replaced_store_is_rebuilt(small_dir, tmp_path, store):
    """On S3 the store's bucket is emptied; on disk the store is deleted (the markers are then
    stale: the same check as on S3) and replaced by another one at its path, which the next run
    completes under its own store_id."""
    config = make_config(tmp_path, small_dir, store=store, **CONFIG)
    write_config(tmp_path, config)
    out = _run(tmp_path)
    first = _complete(store)
    assert out.count("bytes on disk") == 1  # the summary, once
    (given,) = (tmp_path / "work").glob("*/config.json")  # may hold a source URL's password
    assert given.stat().st_mode & 0o077 == 0

    _delete(store)
    reason = "is gone"
    if not store.startswith("s3://"):
        (work,) = (tmp_path / "work").glob("store.zarr-*")  # the store's markers
        assert stale_reason(work, store) == f"store {store} {reason}"
        plan_store(config)  # another store at the same URL: planned, nothing committed
        reason = "was replaced by another one"
    out = _run(tmp_path)
    assert f"featinv: store {store} {reason}; its markers in " in out
    assert "Nothing to be done" not in out
    assert _complete(store) != first


def test_markers_of_an_older_featinv_are_stale(small_dir, tmp_path):
    """Jobs were runs of 8 shards before they were sized in samples: a plan marker without
    `shard_size` names other jobs than this version runs, so the markers go."""
    config = make_config(tmp_path, small_dir, **CONFIG)
    plan = plan_store(config)
    work = tmp_path / "work"
    work.mkdir()
    (work / "plan.json").write_text(json.dumps(plan))
    assert stale_reason(work, config["store"]) is None
    del plan["shard_size"]
    (work / "plan.json").write_text(json.dumps(plan))
    assert stale_reason(work, config["store"]) == (
        f"the markers of store {config['store']} come from an older featinv"
    )


def _remove(url: str, path: str) -> None:
    """Remove one object or folder of the store, as a user or a failing disk might."""
    if not url.startswith("s3://"):
        target = Path(url) / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.rm(f"{url.removeprefix('s3://')}/{path}", recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_damaged_or_rolled_back_store_is_redone(small_dir, tmp_path, store):
    """Markers ahead of their store do not answer "Nothing to be done": a shard file lost, found
    by `featinv validate`, whose `--repair` withdraws its commit (as a store put back from an older
    copy lacks commits), is redone by the same command, to the same values; so is a deleted array
    folder, whose metadata `--repair` restores from the store's consolidated snapshot."""
    config = make_config(tmp_path, small_dir, store=store, **CONFIG)
    write_config(tmp_path, config)
    _run(tmp_path)
    store_id = _complete(store)
    array = "features/resnet18/layer4"
    values = zarr.open_group(store, mode="r")[array][:]

    _remove(store, f"{array}/c/0/0/0/0/0")
    checked = cli("validate", store, "--repair")
    assert checked.returncode == 1
    assert f"INVALID {array} shard 0 (samples 0-8): shard missing" in checked.stderr
    assert "withdrew 1 commit(s) (commits/main/00000): rerun the pipeline" in checked.stderr
    s3fs.S3FileSystem.clear_instance_cache()
    out = _run(tmp_path)
    assert f"featinv: store {store} lacks 1 job(s) of shards its markers in " in out
    assert _complete(store) == store_id
    assert (zarr.open_group(store, mode="r")[array][:] == values).all()

    _remove(store, "features/resnet18")  # the array's folder and its backbone's
    checked = cli("validate", store, "--repair")
    assert f"INVALID {array}: array missing (committed by group main)" in checked.stderr
    assert "withdrew 1 commit(s) (commits/main/00000)" in checked.stderr
    s3fs.S3FileSystem.clear_instance_cache()
    out = _run(tmp_path)
    assert "Nothing to be done" not in out
    assert _complete(store) == store_id
    assert (zarr.open_group(store, mode="r")[array][:] == values).all()
