"""The featinv store layout in code (SPEC.md is its prose twin).

Every stage creates, writes and commits through these functions, so no stage invents layout of its
own and readers can rely on one contract.  Writes follow the zarr v3 sharding rules: one job owns
whole shards and writes each in one go; a shard counts only once its commit record exists.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.core.sync import sync

from storage_specs.codecs import compression_codecs, plugin_codecs
from storage_specs.provenance import redact_url

SPEC_VERSION = "featinv-store/3"
# Stores readers still accept: spec 2 differs only in metadata (`featinv migrate` upgrades it).
READABLE_SPECS = ("featinv-store/2", SPEC_VERSION)
# Per-view dimensions of each kind of per-sample array; every one is [sample, view, ...].
KINDS = {
    "features": ("channel", "y", "x"),
    "prefix_tokens": ("token", "channel"),
    "latents": ("latent_channel", "latent_y", "latent_x"),
    "pixels": ("color", "pixel_y", "pixel_x"),
}
# Kinds whose group holds the layers of one backbone, of different shapes: their dimensions are
# named per layer (`blocks.3.channel`), so every group opens as one consistent xarray Dataset.
LAYER_KINDS = ("features", "prefix_tokens")
SAMPLE_FIELDS = ("key", "source", "label", "height", "width", "valid", "error")
VIEW_FIELDS = ("view_box", "view_hflip")

# Storage dtypes. bf16 has no zarr v3 data type yet: values are rounded to bfloat16 and stored as
# float32, whose zeroed low 16 bits bit-shuffle + zstd reduce to almost nothing.
STORAGE_DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "float32", "uint8": "uint8"}


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array as a stage plans it: `<kind>/<encoder>/<name>`, its per-view shape."""

    kind: str
    encoder: str
    name: str
    per_view_shape: tuple[int, ...]
    dtype: str  # a key of STORAGE_DTYPES
    attrs: dict
    compression: dict = field(default_factory=dict)  # config `compression:`; {} = lossless

    @property
    def path(self) -> str:
        return f"{self.kind}/{self.encoder}/{self.name}"

    @property
    def dims(self) -> tuple[str, ...]:
        return array_dims(self.kind, self.name)


def array_dims(kind: str, name: str) -> tuple[str, ...]:
    """The `dimension_names` of the per-sample array `<kind>/<encoder>/<name>`."""
    per_view = KINDS[kind]
    if kind in LAYER_KINDS:
        per_view = tuple(f"{name}.{dim}" for dim in per_view)
    return ("sample", "view", *per_view)


def channel_axis(kind: str) -> int:
    """The axis of a `kind` array that holds channels: the first per-view one, except for prefix
    tokens (`token`, `channel`)."""
    return 3 if kind == "prefix_tokens" else 2


def array_chunks(kind: str, shard_shape: tuple[int, ...]) -> tuple[int, ...]:
    """One sample-view per chunk (a random read touches one chunk), except prefix tokens: a few
    hundred bytes per view, so one chunk per shard keeps index and framing below their data."""
    return shard_shape if kind == "prefix_tokens" else (1, 1, *shard_shape[2:])


class StoreError(RuntimeError):
    """A store that does not match the spec or the run's plan; the message names the part."""


def open_root(url: str, mode: str = "r", consolidated: bool | None = None) -> zarr.Group:
    """Open a store's root group from a path or fsspec URL (credentials: the environment).

    Writers always look at the objects themselves: a consolidated snapshot is stale the moment
    another job commits.  `consolidated=False` does the same for readers (the validator).
    """
    if mode != "r":
        consolidated = False
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3, use_consolidated=consolidated)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as exc:  # nothing, a file
        raise StoreError(f"no featinv store at '{redact_url(url)}'") from exc
    except zarr.errors.ContainsArrayError as exc:
        raise StoreError(f"'{redact_url(url)}' is a zarr array, not a featinv store") from exc


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


def _json_roundtrip(value: Any) -> Any:
    """What zarr gives back for attributes (tuples become lists), to compare like for like."""
    return json.loads(json.dumps(value))


def _require_ours(url: str) -> None:
    """StoreError unless `url` is free for a store or holds one of ours: another zarr store, a
    folder of other files (the source's own, say) or a file would be written into or over."""
    fs, path = fsspec.core.url_to_fs(url)
    where = f"cannot create store '{redact_url(url)}'"
    try:
        if fs.isfile(path):
            raise StoreError(f"{where}: it is a file")
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
    except NotADirectoryError:  # a file on the way to it
        raise StoreError(f"{where}: a part of its path is a file") from None
    except FileNotFoundError:
        return
    if not names:
        return
    if "zarr.json" not in names:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise StoreError(f"{where}: the folder holds other files ({shown}); use a new one")
    root = json.loads(fs.cat_file(f"{path.rstrip('/')}/zarr.json"))
    ours = "featinv_spec" in root.get("attributes", {})
    begun = names == {"zarr.json"} and root.get("node_type") == "group"  # attributes never set
    if not (ours or begun):
        raise StoreError(f"{where}: it holds a zarr store that is not featinv's; use a new one")


def create_store(
    url: str,
    *,
    keys: Sequence[str],
    sources: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    shard_size: int,
    views: dict,
    groups: dict[str, list[str]],
    provenance: dict,
) -> zarr.Group:
    """Create the root and the `samples/` listing, or check an existing store has the same plan.

    Re-running a plan against an existing store is how runs resume, so the listing must match
    exactly: a changed source would silently misalign rows.
    """
    _require_ours(url)
    try:
        root = zarr.open_group(url, mode="a", zarr_format=3, use_consolidated=False)
    except FileNotFoundError as exc:  # e.g. a bucket that does not exist: nothing to create it in
        raise StoreError(f"cannot create store '{url}': {' '.join(str(exc).split())}") from None
    if "featinv_spec" in root.attrs:
        _check_same_plan(root, url, keys, shard_size, views)
        _add_groups(root, groups)
        return root
    n = len(keys)
    root.attrs.update(
        {
            "featinv_spec": SPEC_VERSION,
            "store_id": uuid.uuid4().hex,  # which store this is: another one at the URL differs
            "complete": False,
            "n_samples": n,
            "shard_size": shard_size,
            "views": views,
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
    k = views["count"]
    samples.create_array(
        "view_box", shape=(n, k, 4), chunks=(chunks[0], k, 4), dtype="float32",
        dimension_names=("sample", "view", "box"), attributes={"box": ["x0", "y0", "x1", "y1"]},
    )  # fmt: skip
    samples.create_array(
        "view_hflip", shape=(n, k), chunks=(chunks[0], k), dtype="bool",
        dimension_names=("sample", "view"),
    )  # fmt: skip
    add_sample_coordinate(root)
    for group in groups:
        root.require_group(f"commits/{group}")
    return root


def add_sample_coordinate(root: zarr.Group) -> None:
    """Root array `sample` (the keys, dimension `sample`): xarray makes it the index coordinate of
    every group below (`xarray.open_datatree` inherits coordinates from parents)."""
    keys = root["samples/key"]
    coordinate = root.create_array(
        "sample", shape=keys.shape, chunks=keys.chunks, dtype=str, dimension_names=("sample",),
        overwrite=True,
    )  # fmt: skip
    coordinate[:] = keys[:]


def spec_mismatch(url: str, spec: Any) -> str | None:
    """Why a store of `spec` cannot be written or validated as it is (None: it can)."""
    if spec == SPEC_VERSION:
        return None
    hint = f"; upgrade it with `featinv migrate {url}`" if spec in READABLE_SPECS else ""
    return f"{url}: featinv_spec is {spec!r}, not {SPEC_VERSION!r}{hint}"


def _check_same_plan(
    root: zarr.Group, url: str, keys: Sequence[str], shard_size: int, views: dict
) -> None:
    mismatch = spec_mismatch(url, root.attrs["featinv_spec"])
    if mismatch:
        raise StoreError(mismatch)
    if root.attrs["shard_size"] != shard_size:
        raise StoreError(
            f"store '{url}' was planned with shard_size {root.attrs['shard_size']}, "
            f"config asks for {shard_size}: use a new store"
        )
    if root.attrs["views"] != _json_roundtrip(views):
        raise StoreError(
            f"store '{url}' was planned with views {root.attrs['views']}, config asks for "
            f"{views}: use a new store"
        )
    stored = root["samples/key"][:]
    if len(stored) != len(keys) or any(a != b for a, b in zip(stored, keys, strict=True)):
        raise StoreError(f"source listing changed since store '{url}' was created "
                         f"({_listing_change(list(stored), keys)}): use a new store")  # fmt: skip


def _listing_change(before: Sequence[str], after: Sequence[str]) -> str:
    """ "1 added (cats/new), 2 removed (dogs/a, dogs/b)": how two listings differ, by key."""
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in (("added", added), ("removed", removed)) if keys]  # fmt: skip
    return ", ".join(parts) or "the same keys in another order"


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


def require_array(root: zarr.Group, spec: ArraySpec) -> zarr.Array:
    """Create a per-sample array (`shard_size` samples per shard, chunks by `array_chunks`) or
    check that the existing one is the same."""
    n, k = root.attrs["n_samples"], root.attrs["views"]["count"]
    shape = (n, k, *spec.per_view_shape)
    dtype = STORAGE_DTYPES[spec.dtype]
    codecs = compression_codecs(spec.compression, dtype)
    attrs = {**spec.attrs, "dtype": spec.dtype, "compression": codecs.pop("attrs")}
    if spec.path in root:
        arr = root[spec.path]
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise StoreError(
                f"{spec.path} exists with shape {arr.shape} {arr.dtype}; this run would write "
                f"{shape} {dtype}: use a new store or delete the array"
            )
        stored = {key: value for key, value in arr.attrs.items() if key in attrs}
        if stored != _json_roundtrip(attrs):
            raise StoreError(f"{spec.path} exists with other attributes (weights, preprocessing?)")
        return arr
    shards = (root.attrs["shard_size"], k, *spec.per_view_shape)
    return root.create_array(
        spec.path,
        shape=shape,
        chunks=array_chunks(spec.kind, shards),
        shards=shards,
        dtype=dtype,
        fill_value=0,
        dimension_names=spec.dims,
        attributes=attrs,
        **codecs,
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


def consolidate(url: str) -> None:
    """Write consolidated metadata where every reader can parse it.

    zarr-python parses the whole snapshot when it opens a group, so one array whose codec a reader
    has not installed (``featinv.quantize`` without featinv-codecs) would make the group, samples
    and lossless arrays included, unreadable.  A store of standard codecs is consolidated at the
    root (a remote open is one request); otherwise the groups above such arrays carry no snapshot
    and each of their other subgroups (``samples``, lossless backbones, ...) carries its own.
    """
    root = zarr.open_group(url, mode="r+", zarr_format=3, use_consolidated=False)
    blocked = {
        "/".join(parts[:depth])
        for path in stored_arrays(root)
        if plugin_codecs(root[path].metadata.to_dict()["codecs"])
        for parts in [path.split("/")]
        for depth in range(len(parts))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is a zarr-python extension
        if not blocked:
            zarr.consolidate_metadata(url, zarr_format=3)
            return
        for path in sorted(blocked):
            group = zarr.open_group(url, path=path, mode="r+", use_consolidated=False)
            group.attrs.update({})  # rewritten without an earlier snapshot
            for name, _ in group.groups():
                child = f"{path}/{name}".lstrip("/")
                if child not in blocked:
                    zarr.consolidate_metadata(url, path=child, zarr_format=3)


def is_lossy(arr: zarr.Array) -> bool:
    return arr.attrs.get("compression", {}).get("mode", "lossless") != "lossless"


def reference_path(path: str) -> str:
    """Where the exact (fp32) values of a few samples of a lossy array are kept."""
    return f"reference/{path}"


def write_reference(root: zarr.Group, path: str, rows: list[int], values: np.ndarray) -> None:
    """Keep exact values of `rows` beside a lossy array, so its real error can be measured."""
    root.create_array(
        reference_path(path), data=values.astype("float32"), chunks=values.shape,
        dimension_names=("reference_sample", *root[path].metadata.dimension_names[1:]),
        attributes={"rows": rows},
        overwrite=True,
    )  # fmt: skip


def stored_arrays(root: zarr.Group) -> list[str]:
    """Paths of every per-sample array (`<kind>/<encoder>/<name>`) in the store, sorted."""
    paths = []
    for kind in KINDS:
        if kind in root:
            for encoder, group in sorted(root[kind].groups()):
                paths += [f"{kind}/{encoder}/{name}" for name, _ in sorted(group.arrays())]
    return paths
