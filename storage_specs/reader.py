"""Read a featinv store: samples, feature arrays, shard-aware row access, and a summary.

Plain zarr reads a store too (SPEC.md says how); this reader adds what plain zarr does not know:
which rows are valid, where shards begin (a shard read is one request instead of one per chunk),
and the store's own bookkeeping.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import zarr

from storage_specs.layout import (
    READABLE_SPECS,
    SAMPLE_FIELDS,
    VIEW_FIELDS,
    StoreError,
    n_shards,
    open_root,
    shard_exists,
    shard_range,
    stored_arrays,
)


class FeatureStore:
    """A read-only view of one store."""

    def __init__(self, url: str):
        self.url = url
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is an extension
            self.root = open_root(url)
        self.spec = self.root.attrs.get("featinv_spec")
        if self.spec not in READABLE_SPECS:
            raise StoreError(
                f"'{url}' is not a featinv store this reader knows (featinv_spec: {self.spec!r}; "
                f"reads {', '.join(READABLE_SPECS)})"
            )
        self.n_samples: int = self.root.attrs["n_samples"]
        self.shard_size: int = self.root.attrs["shard_size"]
        self.complete: bool = self.root.attrs["complete"]
        self._valid: np.ndarray | None = None  # samples/valid, read on the first shard read

    @property
    def n_shards(self) -> int:
        return n_shards(self.n_samples, self.shard_size)

    @property
    def classes(self) -> list[str]:
        return list(self.root["samples"].attrs["classes"])

    def samples(self) -> dict[str, np.ndarray]:
        """All per-sample fields (key, source, label, height, width, valid, error, view_box,
        view_hflip)."""
        return {f: self.root[f"samples/{f}"][:] for f in SAMPLE_FIELDS + VIEW_FIELDS}

    def arrays(self) -> list[str]:
        """`<kind>/<encoder>/<name>` of every per-sample array."""
        return stored_arrays(self.root)

    def array(self, encoder: str, name: str, kind: str = "features") -> zarr.Array:
        """E.g. `array("resnet18", "layer4")`, `array("vae", "mean", kind="latents")`."""
        return self.require(f"{kind}/{encoder}/{name}")

    def require(self, path: str) -> zarr.Array:
        """The per-sample array at `path`, or a StoreError that lists the store's arrays."""
        if path not in self.arrays():
            raise StoreError(f"{self.url} has no {path} (arrays: {', '.join(self.arrays())})")
        return self.root[path]

    def read_shard(self, path: str, shard: int) -> np.ndarray:
        """All rows of one shard: one object read, the fastest way through a store."""
        start, stop = shard_range(shard, self.shard_size, self.n_samples)
        arr = self.root[path]
        data = arr[start:stop]
        self._require_shard(arr, shard, np.arange(start, stop), data)
        return data

    def read_rows(self, path: str, rows: Sequence[int]) -> np.ndarray:
        """Rows in the order given; rows are grouped by shard so each shard is visited once."""
        rows = np.asarray(rows, dtype=np.int64)
        outside = rows[(rows < 0) | (rows >= self.n_samples)]
        if outside.size:  # named here: past the end, numpy would name a position in a shard
            raise IndexError(f"{self.url}: row {outside[0]} is outside 0..{self.n_samples - 1}")
        arr = self.root[path]
        out = np.empty((len(rows), *arr.shape[1:]), arr.dtype)
        for shard in np.unique(rows // self.shard_size):
            where = np.flatnonzero(rows // self.shard_size == shard)
            start, stop = shard_range(int(shard), self.shard_size, self.n_samples)
            if len(where) * 4 >= stop - start:  # dense: one read of the whole shard
                out[where] = arr[start:stop][rows[where] - start]
            else:  # sparse: one chunk per row
                for i in where:
                    out[i] = arr[int(rows[i])]
            self._require_shard(arr, int(shard), rows[where], out[where])
        return out

    def _require_shard(
        self, arr: zarr.Array, shard: int, rows: np.ndarray, values: np.ndarray
    ) -> None:
        """The shard that `values` of `rows` were read from is there: zarr reads a missing one as
        fill values (zeros). Asked only when valid rows read as all zeros, so a read of a shard
        that is there costs no extra request."""
        if self._valid is None:
            self._valid = self.root["samples/valid"][:]
        valid = self._valid[rows]
        if valid.any() and not values[valid].any() and not shard_exists(arr, shard):
            repair = f"`featinv validate --repair {self.url}`, then rerun the pipeline"
            raise StoreError(f"{self.url}: {arr.path} shard {shard} is missing; {repair}")

    def describe(self) -> dict:
        """Counts, skip reasons and sizes, as `featinv info` prints them."""
        samples = self.samples()
        valid = samples["valid"]
        arrays = {}
        for path in self.arrays():
            arr = self.root[path]
            per_sample = int(np.prod(arr.shape[1:]))
            arrays[path] = {
                "shape": list(arr.shape),
                "dtype": arr.attrs["dtype"],
                "stored_bytes": arr.nbytes_stored(),
                "raw_fp32_bytes": int(valid.sum()) * per_sample * 4,
                "pretrained": arr.attrs.get("pretrained"),
                "group": arr.attrs.get("group"),
            }
        skipped = [
            {"key": k, "source": s, "reason": e}
            for k, s, e, v in zip(
                samples["key"], samples["source"], samples["error"], valid, strict=True
            )
            if not v
        ]
        summary = self.root.attrs.get("summary")  # present once any stage was finalised
        return {
            "url": self.url,
            "spec": self.spec,
            "complete": self.complete,
            "pending_groups": summary["pending_groups"] if summary else None,
            "n_samples": self.n_samples,
            "n_valid": int(valid.sum()) if summary else None,
            "skipped": skipped if summary else None,
            "arrays": arrays,
        }


def open_store(url: str) -> FeatureStore:
    return FeatureStore(url)


def _dims(arrays: dict[str, zarr.Array]) -> dict[str, tuple[str, ...]]:
    """Per-array dimension names for one Dataset: `sample` and `view` are shared; another name
    is prefixed with its array's path only where two arrays give it different sizes."""
    sizes: dict[str, set[int]] = {}
    for arr in arrays.values():
        for dim, size in zip(arr.metadata.dimension_names, arr.shape, strict=True):
            sizes.setdefault(dim, set()).add(size)
    return {
        path: tuple(
            dim if len(sizes[dim]) == 1 or dim in ("sample", "view") else f"{path}/{dim}"
            for dim in arr.metadata.dimension_names
        )
        for path, arr in arrays.items()
    }


def open_dataset(url: str, paths: list[str] | None = None):
    """The store as a lazy `xarray.Dataset` backed by dask (one task per shard).

    Variables: the `samples/` fields, and the per-sample arrays named by their path (all of them
    by default).  Select valid rows with `ds.isel(sample=ds.valid.values)`.
    """
    import dask.array as da
    import xarray as xr

    store = FeatureStore(url)
    arrays = {p: store.root[p] for p in (paths or store.arrays())}
    samples = {f: store.root[f"samples/{f}"] for f in SAMPLE_FIELDS + VIEW_FIELDS}
    variables = {
        name: (arr.metadata.dimension_names, da.from_zarr(arr, chunks=arr.chunks), dict(arr.attrs))
        for name, arr in samples.items()
    }
    for path, dims in _dims(arrays).items():
        arr = arrays[path]
        variables[path] = (dims, da.from_zarr(arr, chunks=arr.shards), dict(arr.attrs))
    attrs = {k: v for k, v in store.root.attrs.items() if k != "provenance"}
    return xr.Dataset(variables, attrs=attrs)
