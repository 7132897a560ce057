"""The featinv store layout in code (SPEC.md is its prose twin).

Every stage creates, writes and commits through these functions, so no stage invents layout of its
own and readers can rely on one contract.  Writes follow the zarr v3 sharding rules: one job owns
whole shards and writes each in one go; a shard counts only once its commit record exists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

SPEC_VERSION = "featinv-store/1"
FEATURE_DIMS = ("sample", "channel", "y", "x")
PREFIX_DIMS = ("sample", "token", "channel")
SAMPLE_FIELDS = ("key", "source", "label", "height", "width", "valid", "error")

# Storage dtypes. bf16 has no zarr v3 data type yet: values are rounded to bfloat16 and stored as
# float32, whose zeroed low 16 bits bit-shuffle + zstd reduce to almost nothing.
STORAGE_DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "float32"}


class StoreError(RuntimeError):
    """A store that does not match the spec or the run's plan; the message names the part."""


def open_root(url: str, mode: str = "r", consolidated: bool | None = None) -> zarr.Group:
    """Open a store's root group from a path or fsspec URL (credentials: the environment).

    `consolidated=False` looks at the objects themselves, not the consolidated snapshot.
    """
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3, use_consolidated=consolidated)
    except FileNotFoundError as exc:
        raise StoreError(f"no featinv store at '{url}'") from exc


def feature_path(backbone: str, layer: str) -> str:
    return f"features/{backbone}/{layer}"


def prefix_path(backbone: str, layer: str) -> str:
    return f"prefix_tokens/{backbone}/{layer}"


def commit_path(group: str, shard: int) -> str:
    return f"commits/{group}/{shard:05d}"


def shard_range(shard: int, shard_size: int, n_samples: int) -> tuple[int, int]:
    """Rows [start, stop) of one shard; the last shard may be short."""
    start = shard * shard_size
    if start >= n_samples or shard < 0:
        raise StoreError(f"shard {shard} out of range for {n_samples} samples")
    return start, min(start + shard_size, n_samples)


def n_shards(n_samples: int, shard_size: int) -> int:
    return -(-n_samples // shard_size)


def feature_compressors() -> list:
    """Lossless chain of every feature chunk: blosc zstd with bit-shuffle, then crc32c."""
    return [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle"), Crc32cCodec()]


def _json_roundtrip(value: Any) -> Any:
    """What zarr gives back for attributes (tuples become lists), to compare like for like."""
    return json.loads(json.dumps(value))


def create_store(
    url: str,
    *,
    keys: Sequence[str],
    sources: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    shard_size: int,
    groups: dict[str, list[str]],
    provenance: dict,
) -> zarr.Group:
    """Create the root and the `samples/` listing, or check an existing store has the same plan.

    Re-running a plan against an existing store is how runs resume, so the listing must match
    exactly: a changed source would silently misalign rows.
    """
    root = zarr.open_group(url, mode="a", zarr_format=3)
    if "featinv_spec" in root.attrs:
        _check_same_plan(root, url, keys, shard_size)
        _add_groups(root, groups)
        return root
    n = len(keys)
    root.attrs.update(
        {
            "featinv_spec": SPEC_VERSION,
            "complete": False,
            "n_samples": n,
            "shard_size": shard_size,
            "groups": groups,
            "provenance": provenance,
        }
    )
    samples = root.require_group("samples")
    samples.attrs["classes"] = list(classes)
    chunks = (min(shard_size, max(n, 1)),)
    for name, values, dtype in (
        ("key", np.asarray(keys, dtype=object), str),
        ("source", np.asarray(sources, dtype=object), str),
        ("label", np.asarray(labels, dtype="int32"), "int32"),
    ):
        arr = samples.create_array(
            name, shape=(n,), chunks=chunks, dtype=dtype, dimension_names=("sample",)
        )
        arr[:] = values
    for name, dtype, fill in (
        ("height", "int32", 0),
        ("width", "int32", 0),
        ("valid", "bool", False),
        ("error", str, ""),
    ):
        samples.create_array(
            name, shape=(n,), chunks=chunks, dtype=dtype, fill_value=fill,
            dimension_names=("sample",),
        )  # fmt: skip
    for group in groups:
        root.require_group(f"commits/{group}")
    return root


def _check_same_plan(root: zarr.Group, url: str, keys: Sequence[str], shard_size: int) -> None:
    if root.attrs["featinv_spec"] != SPEC_VERSION:
        raise StoreError(f"store '{url}' has spec {root.attrs['featinv_spec']}, not {SPEC_VERSION}")
    if root.attrs["shard_size"] != shard_size:
        raise StoreError(
            f"store '{url}' was planned with shard_size {root.attrs['shard_size']}, "
            f"config asks for {shard_size}: use a new store"
        )
    stored = root["samples/key"][:]
    if len(stored) != len(keys) or any(a != b for a, b in zip(stored, keys, strict=True)):
        raise StoreError(
            f"source listing changed since store '{url}' was created "
            f"({len(stored)} -> {len(keys)} samples): use a new store"
        )


def _add_groups(root: zarr.Group, groups: dict[str, list[str]]) -> None:
    known = dict(root.attrs["groups"])
    for group, backbones in groups.items():
        if group in known and known[group] != list(backbones):
            raise StoreError(
                f"backbone group '{group}' holds {known[group]} in the store, config says "
                f"{list(backbones)}: name the new group differently"
            )
        known[group] = list(backbones)
        root.require_group(f"commits/{group}")
    root.attrs["groups"] = known


def require_array(
    root: zarr.Group,
    path: str,
    *,
    per_sample_shape: tuple[int, ...],
    dtype: str,
    dims: tuple[str, ...],
    shard_size: int,
    attrs: dict,
) -> zarr.Array:
    """Create a per-sample array (a sample per chunk, `shard_size` per shard) or check it."""
    n = root.attrs["n_samples"]
    shape = (n, *per_sample_shape)
    if path in root:
        arr = root[path]
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise StoreError(
                f"{path} exists with shape {arr.shape} {arr.dtype}; this run would write "
                f"{shape} {dtype}: use a new store or delete the array"
            )
        if dict(arr.attrs) != _json_roundtrip(attrs):
            raise StoreError(f"{path} exists with different attributes (weights, preprocessing?)")
        return arr
    return root.create_array(
        path,
        shape=shape,
        chunks=(1, *per_sample_shape),
        shards=(shard_size, *per_sample_shape),
        dtype=dtype,
        fill_value=0,
        compressors=feature_compressors(),
        dimension_names=dims,
        attributes=attrs,
    )


def shard_key(arr: zarr.Array, shard: int) -> str:
    """The store key of one shard object of a per-sample array."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"


def shard_exists(arr: zarr.Array, shard: int) -> bool:
    return sync(arr.store_path.store.exists(shard_key(arr, shard)))


def write_shard(arr: zarr.Array, shard: int, data: np.ndarray) -> None:
    """Write all rows of one shard in one go.

    Any object already there is uncommitted debris of an interrupted job (possibly torn), so it is
    deleted first: zarr would otherwise read it back to merge into, and fail on its checksum.
    """
    start, stop = shard_range(shard, arr.shards[0], arr.shape[0])
    sync(arr.store_path.store.delete(shard_key(arr, shard)))
    arr[start:stop] = data


def write_commit(root: zarr.Group, group: str, shard: int, record: dict) -> None:
    """Mark a shard complete: one new metadata object, written after all of the shard's data."""
    root.create_group(commit_path(group, shard), attributes=record, overwrite=True)


def read_commit(root: zarr.Group, group: str, shard: int) -> dict | None:
    path = commit_path(group, shard)
    try:
        return dict(root[path].attrs)
    except KeyError:
        return None


def feature_arrays(root: zarr.Group) -> list[str]:
    """Paths of every feature and prefix-token array in the store, sorted."""
    paths = []
    for top in ("features", "prefix_tokens"):
        if top not in root:
            continue
        for backbone, group in sorted(root[top].groups()):
            paths += [f"{top}/{backbone}/{name}" for name, _ in sorted(group.arrays())]
    return paths
