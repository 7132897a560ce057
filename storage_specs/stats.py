"""Per-channel statistics of a stored array, computed with dask over whole shards.

The trainer normalises features with them, so they are computed once, over the valid rows, and
kept in the array's attributes (`channel_stats`).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr

CHANNEL_DIMS = ("channel", "latent_channel", "rgb")


def channel_stats(arr: zarr.Array, valid: np.ndarray) -> dict | None:
    """`{mean, std, min, max}` per channel over valid samples, every view and position."""
    rows = np.flatnonzero(valid)
    if not len(rows):
        return None
    dims = arr.metadata.dimension_names
    axis = next(i for i, d in enumerate(dims) if d in CHANNEL_DIMS)
    data = da.from_zarr(arr, chunks=arr.shards)[rows].astype("float64")  # a task per shard
    others = tuple(i for i in range(arr.ndim) if i != axis)
    mean, std, low, high = da.compute(
        data.mean(others), data.std(others), data.min(others), data.max(others)
    )
    return {name: values.tolist() for name, values in
            (("mean", mean), ("std", std), ("min", low), ("max", high))}  # fmt: skip
