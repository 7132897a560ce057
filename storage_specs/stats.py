"""Per-channel statistics of a stored array: one task per shard, merged in shard order.

The trainer normalises features with them, so they are computed once, over the valid rows, and
kept in the array's attributes (`channel_stats`).  Each shard yields its count, mean, sum of
squared deviations, min and max (no sum of squares, which cancels badly), merged pairwise in a fixed
order, so the finalising step and `featinv stats` on any cluster get the same numbers.
"""

from __future__ import annotations

from functools import reduce
from typing import TYPE_CHECKING

import numpy as np

from storage_specs.compute import open_array, run_tasks
from storage_specs.layout import (
    StoreError,
    channel_axis,
    consolidate,
    n_shards,
    open_root,
    shard_range,
    stored_arrays,
)

if TYPE_CHECKING:
    from distributed import Client

Moments = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # n, mean, m2, min, max


def shard_moments(url: str, path: str, start: int, stop: int, rows: np.ndarray) -> Moments:
    """The moments of rows `start + rows` (valid rows of one shard), per channel."""
    arr = open_array(url, path)
    axis = channel_axis(path.split("/")[0])
    values = np.moveaxis(arr[start:stop][rows].astype("float64"), axis, 0)
    values = values.reshape(len(values), -1)
    mean = values.mean(1)
    m2 = ((values - mean[:, None]) ** 2).sum(1)
    return values.shape[1], mean, m2, values.min(1), values.max(1)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise update of count, mean and squared deviations."""
    (na, ma, m2a, lowa, higha), (nb, mb, m2b, lowb, highb) = a, b
    n, delta = na + nb, mb - ma
    mean = ma + delta * (nb / n)
    m2 = m2a + m2b + delta**2 * (na * nb / n)
    return n, mean, m2, np.minimum(lowa, lowb), np.maximum(higha, highb)


def _shard_calls(url: str, path: str, valid: np.ndarray) -> list[tuple]:
    """One `shard_moments` call per shard of `path` with valid rows."""
    size, n = open_array(url, path).shards[0], len(valid)
    calls = []
    for shard in range(n_shards(n, size)):
        start, stop = shard_range(shard, size, n)
        rows = np.flatnonzero(valid[start:stop])
        if len(rows):
            calls.append((url, path, start, stop, rows))
    return calls


def _stats(parts: list[Moments]) -> dict | None:
    if not parts:
        return None
    n, mean, m2, low, high = reduce(merge, parts)
    return {name: _float32_list(values) for name, values in
            (("mean", mean), ("std", np.sqrt(m2 / n)), ("min", low), ("max", high))}  # fmt: skip


def _float32_list(values: np.ndarray) -> list[float]:
    """Float32 precision, written as its shortest decimal: half the JSON of float64 digits, and
    for tiny arrays (prefix tokens) the statistics would otherwise outweigh the data."""
    return [float(str(v)) for v in values.astype(np.float32)]


def channel_stats(
    url: str, paths: list[str], valid: np.ndarray, client: Client | None = None
) -> dict:
    """`{mean, std, min, max}` per channel of each array over valid samples, every view and
    position (None without valid samples); the shards of all arrays are one batch of tasks, run
    where `client`'s workers are (default: threads here)."""
    calls = {path: _shard_calls(url, path, valid) for path in paths}
    parts = iter(run_tasks(shard_moments, [c for cs in calls.values() for c in cs], client))
    return {path: _stats([next(parts) for _ in cs]) for path, cs in calls.items()}


def store_stats(
    url: str, paths: list[str] | None = None, client: Client | None = None, write: bool = False
) -> dict[str, dict | None]:
    """`channel_stats` of a finalised store's arrays (default: all); `write` keeps them in the
    arrays' attributes, as finalising does, and refreshes the consolidated metadata."""
    root = open_root(url, mode="r+" if write else "r", consolidated=False)
    if "summary" not in root.attrs:
        raise StoreError(f"store '{url}' is not finalised: which rows are valid is not known yet")
    arrays = stored_arrays(root)
    unknown = sorted(set(paths or ()) - set(arrays))
    if unknown:
        raise StoreError(f"{url} has no {', '.join(unknown)} (arrays: {', '.join(arrays)})")
    stats = channel_stats(url, paths or arrays, root["samples/valid"][:], client)
    if write:
        for path, values in stats.items():
            root[path].attrs["channel_stats"] = values
        consolidate(url)
    return stats
