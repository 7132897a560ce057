"""Statistics, validation and export on a dask.distributed cluster: a LocalCluster of worker
processes, reached by its address as a remote one is, gives what the in-process path gives."""

from __future__ import annotations

import json
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage_specs.compute import dask_client
from storage_specs.export import export_webdataset
from storage_specs.layout import StoreError
from storage_specs.validate import validate_store
from tests.conftest import build_store, cli, make_config
from tests.s3server import ACCESS_KEY, SECRET_KEY

BACKBONES = [
    {"name": "resnet18", "weights": "random", "layers": ["layer2", "layer4"],
     "preprocessing": {"input_size": 64}}
]  # fmt: skip
TARGETS = [{"name": "pixels", "kind": "pixels", "size": 16}]
ARRAYS = ["features/resnet18/layer2", "features/resnet18/layer4", "pixels/pixels/rgb"]


@pytest.fixture(scope="module")
def store(small_dir, tmp_path_factory) -> str:
    """9 photos (one unreadable) in 3 shards, two views, two feature layers and pixels."""
    tmp = tmp_path_factory.mktemp("dask")
    config = make_config(tmp, small_dir, backbones=BACKBONES, targets=TARGETS, views={"count": 2})
    return build_store(config)


@pytest.fixture(scope="module")
def scheduler(s3_server) -> str:
    """A LocalCluster of 2 single-threaded worker processes, started after the S3 environment
    is set (as a remote worker has its own); its address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


def _finalised_stats(store: str) -> dict:
    """The channel statistics finalize wrote, by array."""
    root = zarr.open_group(store, mode="r")
    return {path: root[path].attrs["channel_stats"] for path in ARRAYS}


def _assert_same_stats(stats: dict, expected: dict) -> None:
    assert stats.keys() == expected.keys()
    for path, values in stats.items():
        for name in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(values[name], expected[path][name], rtol=1e-12, atol=0)


def test_stats_equal_the_finalised_ones(store, scheduler, tmp_path):
    finalised = _finalised_stats(store)
    done = cli("stats", store, "--dask-scheduler", scheduler)
    assert done.returncode == 0, done.stderr
    _assert_same_stats(json.loads(done.stdout), finalised)

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    arr = zarr.open_array(copy / ARRAYS[1], mode="r+")
    del arr.attrs["channel_stats"]
    # By default on a LocalCluster of its own.
    done = cli("stats", str(copy), "--array", ARRAYS[1], "--write")
    assert done.returncode == 0 and list(json.loads(done.stdout)) == [ARRAYS[1]], done.stderr
    assert "wrote" in done.stderr
    consolidated = zarr.open_group(str(copy), mode="r")[ARRAYS[1]].attrs  # the refreshed snapshot
    _assert_same_stats(
        {ARRAYS[1]: consolidated["channel_stats"]}, {ARRAYS[1]: finalised[ARRAYS[1]]}
    )


def _corrupt(store: str, tmp_path: Path) -> str:
    """A copy with a flipped bit in a chunk, a torn shard index and a NaN rewrite."""
    copy = tmp_path / "corrupt.zarr"
    shutil.copytree(store, copy)
    for shard, offset in (("features/resnet18/layer4/c/0/0/0/0/0", 100),
                          ("features/resnet18/layer2/c/1/0/0/0/0", -6)):  # fmt: skip
        data = bytearray((copy / shard).read_bytes())
        data[offset] ^= 0x10
        (copy / shard).write_bytes(bytes(data))
    zarr.open_array(copy / "features/resnet18/layer2", mode="r+")[8] = np.nan
    return str(copy)


def test_validate_finds_the_same_problems(store, scheduler, tmp_path):
    broken = _corrupt(store, tmp_path)
    local = validate_store(broken)
    with dask_client(scheduler) as client:
        assert validate_store(store, client=client) == []
        assert validate_store(broken, client=client) == local
    assert [p.split(":")[0] for p in local] == [
        "features/resnet18/layer2 shard 1 (samples 4-7)",
        "features/resnet18/layer2 shard 2 (samples 8-8)",
        "features/resnet18/layer4 shard 0 (samples 0-3)",
    ]
    assert "unreadable" in local[0] and "NaN" in local[1] and "checksum" in local[2]
    scheduler_file = tmp_path / "scheduler.json"  # what `dask scheduler --scheduler-file` writes
    scheduler_file.write_text(json.dumps({"type": "Scheduler", "address": scheduler}))
    done = cli("validate", broken, "--dask-scheduler", str(scheduler_file))
    assert done.returncode == 1
    assert [line for line in done.stderr.splitlines() if "INVALID" in line] == [
        f"INVALID {p}" for p in local
    ]


def _tar_members(tars: list[str]) -> list[tuple[str, bytes]]:
    members = []
    for tar in tars:
        with tarfile.open(tar.removeprefix("file://")) as f:
            members += [(m.name, f.extractfile(m).read()) for m in f.getmembers()]
    return members


def test_export_writes_the_same_samples(store, scheduler, tmp_path):
    features, target = ARRAYS[1], ARRAYS[2]
    size = 60_000  # a store shard holds 2-8 sample-views of about 7 kB: a tar each
    here = export_webdataset(store, str(tmp_path / "here"), features, target, size, False)
    with dask_client(scheduler) as client:
        there = export_webdataset(
            store, str(tmp_path / "there"), features, target, size, False, client
        )
    names = ["00000.tar", "00001.tar", "00002.tar"]
    assert [Path(t).name for t in here] == [Path(t).name for t in there] == names
    members = _tar_members(there)
    assert members == _tar_members(here)
    keys = [name.split(".")[0] for name, _ in members[::3]]
    assert len(keys) == 8 * 2 and keys[:2] == ["animals/chelsea/v0", "animals/chelsea/v1"]


def test_an_export_folder_holds_one_export_whole(store, tmp_path):
    """Tars appear whole under their names; export.json says which tars an export makes and that
    all are written; a rerun (after a kill) rewrites its own folder, another export is refused."""
    features, target = ARRAYS[1], ARRAYS[2]
    out = tmp_path / "out"
    tars = export_webdataset(store, str(out), features, target, 60_000, False)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["tars"] == [Path(t).name for t in tars] and manifest["complete"] is True
    assert sum(manifest["samples"]) == 8 * 2 and manifest["target"] == target
    assert manifest["dtypes"] == {features: "fp16", target: "uint8"}  # as the store records them
    (out / "00001.tar.partial").write_bytes(b"a killed writer's")
    assert export_webdataset(store, str(out), features, target, 60_000, False) == tars
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar",
                                                     "export.json"]  # fmt: skip
    with pytest.raises(ValueError, match=r"holds 3 tar\(s\) of another export \(00000.tar, 00001"):
        export_webdataset(store, str(out), features, None, 60_000, False)
    with pytest.raises(StoreError, match="has no pixels/pixels "):  # a group, not an array
        export_webdataset(store, str(tmp_path / "x"), features, "pixels/pixels", 60_000, False)


def test_stats_and_validation_of_a_store_on_s3(store, scheduler, s3_bucket, s3):
    url = f"{s3_bucket}/store.zarr"
    s3.filesystem().put(f"{store}/", f"{url.removeprefix('s3://')}/", recursive=True)
    stats = cli("stats", url, "--dask-scheduler", scheduler)
    assert stats.returncode == 0, stats.stderr
    _assert_same_stats(json.loads(stats.stdout), _finalised_stats(store))
    valid = cli("validate", url, "--dask-scheduler", scheduler)
    assert valid.returncode == 0 and f"{url}: valid" in valid.stdout
    said = "".join(done.stdout + done.stderr for done in (stats, valid))
    assert ACCESS_KEY not in said and SECRET_KEY not in said


def test_unreachable_scheduler_is_one_line(store):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    done = cli("stats", store, "--dask-scheduler", address)
    assert done.returncode == 2 and not done.stdout
    assert len(done.stderr.strip().splitlines()) == 1 and address in done.stderr
