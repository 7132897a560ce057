"""Export one feature array (and optionally a target) as webdataset tar shards.

For teams whose loaders speak webdataset: each (valid sample, view) becomes one tar sample with
`features.npy`, `target.npy` (if asked) and `json` metadata.  Nothing is pickled (`.npy` is read
with allow_pickle=False by webdataset's decoder), keys carry no dots, and the store is read shard
by shard.  Each tar holds whole consecutive store shards and is one task, so tars are written in
parallel (threads here, or a dask cluster's workers) and read in name order give the samples in
row order, whoever wrote them.  Each tar appears under its name only once whole (written as
`.partial`, then renamed), and `export.json` beside them says which tars an export makes and
whether all are written: a folder of another export is refused, so no stale tar is ever mixed in.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import webdataset as wds

from storage_specs.compute import run_tasks
from storage_specs.layout import SAMPLE_FIELDS, VIEW_FIELDS, shard_range
from storage_specs.provenance import redact_url
from storage_specs.reader import FeatureStore

if TYPE_CHECKING:
    from distributed import Client

SAMPLE_OVERHEAD = 2048  # bytes of a tar sample besides its arrays: headers and json, about
MANIFEST = "export.json"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _shard_samples(
    store: FeatureStore, features: str, target: str | None, shard: int
) -> Iterator[dict]:
    """The tar samples of one store shard, in row then view order."""
    start, stop = shard_range(shard, store.shard_size, store.n_samples)
    meta = {f: store.root[f"samples/{f}"][start:stop] for f in SAMPLE_FIELDS + VIEW_FIELDS}
    values = store.read_shard(features, shard)
    targets = store.read_shard(target, shard) if target else None
    for i in np.flatnonzero(meta["valid"]):
        key = str(meta["key"][i])
        for view in range(values.shape[1]):
            info = {
                "key": key, "row": start + int(i), "view": view,
                "label": int(meta["label"][i]), "source": str(meta["source"][i]),
                "view_box": meta["view_box"][i, view].tolist(),
                "view_hflip": bool(meta["view_hflip"][i, view]),
                "features": features, "target": target,
            }  # fmt: skip
            sample = {"__key__": f"{key}/v{view}", "json": json.dumps(info),
                      "features.npy": _npy(values[i, view])}  # fmt: skip
            if targets is not None:
                sample["target.npy"] = _npy(targets[i, view])
            yield sample


def write_tar(url: str, features: str, target: str | None, shards: list[int], tar: str) -> int:
    """One task: the samples of `shards` into the tar at URL `tar`; returns how many."""
    store = FeatureStore(url)
    count = 0
    fs, path = fsspec.core.url_to_fs(tar)
    with fs.open(f"{path}.partial", "wb") as f, wds.TarWriter(f) as sink:
        for shard in shards:
            for sample in _shard_samples(store, features, target, shard):
                sink.write(sample)
                count += 1
    fs.mv(f"{path}.partial", path)  # whole, or not there under its name
    return count


def plan_tars(store: FeatureStore, paths: list[str], max_bytes: int) -> list[list[int]]:
    """Consecutive store shards with valid rows, grouped into tars of about `max_bytes` at most
    (a bigger shard is a tar of its own); sizes estimated from shapes, nothing read."""
    valid = store.root["samples/valid"][:]
    views = store.root.attrs["views"]["count"]
    per_sample = SAMPLE_OVERHEAD + sum(
        store.root[p].dtype.itemsize * math.prod(store.root[p].shape[2:]) for p in paths
    )
    tars: list[list[int]] = []
    size = math.inf
    for shard in range(store.n_shards):
        start, stop = shard_range(shard, store.shard_size, store.n_samples)
        shard_bytes = int(valid[start:stop].sum()) * views * per_sample
        if not shard_bytes:
            continue
        if size + shard_bytes > max_bytes:
            tars.append([])
            size = 0
        tars[-1].append(shard)
        size += shard_bytes
    return tars


def export_webdataset(
    url: str, out: str, features: str, target: str | None = None,
    max_bytes: int = 512 * 2**20, progress: bool = True, client: Client | None = None,
) -> list[str]:  # fmt: skip
    """Write `<out>/00000.tar, 00001.tar, ...` (any fsspec folder the writers can reach); returns
    the tar URLs.  The tars are written where `client`'s dask workers run (default: threads)."""
    store = FeatureStore(url)
    if not store.complete:
        raise ValueError(f"store '{url}' is not complete; finish the pipeline first")
    paths = [p for p in (features, target) if p]
    for path in paths:
        store.require(path)  # an array: not a group, not samples/
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    if fs.isfile(root):
        raise ValueError(f"export folder '{out}' is a file")
    groups = plan_tars(store, paths, max_bytes)
    names = [f"{i:05d}.tar" for i in range(len(groups))]
    manifest = {"store": redact_url(url), "features": features, "target": target, "tars": names,
                # what the values are: a `.npy` holds bf16 values as float32 (numpy has no bf16)
                "dtypes": {path: store.root[path].attrs["dtype"] for path in paths}}  # fmt: skip
    _claim(fs, root, out, manifest)
    tars = [fs.unstrip_protocol(f"{root}/{name}") for name in names]
    calls = [(url, features, target, shards, tar) for shards, tar in zip(groups, tars, strict=True)]
    counts = run_tasks(write_tar, calls, client, "export", progress)
    _write_manifest(fs, root, {**manifest, "samples": counts, "complete": True})
    return tars


def _claim(fs, root: str, out: str, manifest: dict) -> None:
    """Make `root` this export's folder: empty, or one this same export began (a rerun after a
    kill or failure rewrites it); its manifest says `complete: false` until every tar is written."""
    fs.makedirs(root, exist_ok=True)
    tars = sorted(path.rsplit("/", 1)[-1] for path in fs.glob(f"{root}/*.tar"))
    try:
        before = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        before = None
    same = before is not None and {k: before.get(k) for k in manifest} == manifest
    if tars and not same:
        shown = ", ".join(tars[:3]) + (", ..." if len(tars) > 3 else "")
        raise ValueError(f"export folder '{out}' holds {len(tars)} tar(s) of another export "
                         f"({shown}): use an empty folder")  # fmt: skip
    for partial in fs.glob(f"{root}/*.tar.partial"):  # a killed writer's
        fs.rm(partial)
    _write_manifest(fs, root, {**manifest, "complete": False})


def _write_manifest(fs, root: str, manifest: dict) -> None:
    with fs.open(f"{root}/{MANIFEST}.partial", "w") as f:
        json.dump(manifest, f, indent=1)
    fs.mv(f"{root}/{MANIFEST}.partial", f"{root}/{MANIFEST}")
