"""One shard of every array of the group, built in memory batch by batch and stored whole.

The extraction job's writer threads (one on a CPU, several beside a GPU) call `ShardWriter.add`
with each batch's outputs, distinct rows each, while the forward runs the next batch: the values
are rounded to the storage dtype, checked, and each sample-view's chunk is compressed at once
(`storage_specs.shard_codec`: numcodecs calls that release the GIL, not zarr's per-chunk
event-loop work, which would hold it between the forward's ops).  `flush` stores each array's
shard as one object, zarr's own bytes.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from storage_specs.layout import (
    STORAGE_DTYPES,
    StoreError,
    is_lossy,
    shard_key,
    write_reference,
)
from storage_specs.shard_codec import ChunkCodecs, shard_object

REFERENCE_ROWS = 4  # exact samples kept beside each lossy array (by the job of shard 0)


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """Round to the store's precision (see STORAGE_DTYPES for bf16).  torch rounds to float16
    exactly as numpy does, four times faster."""
    if dtype == "fp16":
        values = values.to(torch.float16)
    elif dtype == "bf16":
        values = values.to(torch.bfloat16).float()
    else:
        values = values.float()
    return values.cpu().numpy().astype(STORAGE_DTYPES[dtype], copy=False)


class EncodedShard:
    """One shard of an array of one sample-view per chunk, each chunk compressed as its row comes
    (`ChunkCodecs`); chunks of fill values only are not stored, as zarr does."""

    def __init__(self, arr: zarr.Array, codecs: ChunkCodecs):
        self.codecs, self.fill = codecs, arr.fill_value
        self.per_shard = tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))
        self.chunks: dict[tuple[int, ...], bytes] = {}
        self.tail = (0,) * (arr.ndim - 2)

    def add(self, rows: np.ndarray, first: int) -> None:
        """Rows `first, first + 1, ...` of the shard (`[row, view, ...]`)."""
        for i, row in enumerate(rows):
            for view, chunk in enumerate(row):
                if not self.is_fill(chunk):
                    self.chunks[(first + i, view, *self.tail)] = self.codecs.encode(chunk)

    def is_fill(self, chunk: np.ndarray) -> bool:
        if self.fill != self.fill:  # NaN
            return bool(np.isnan(chunk).all())
        return bool((chunk == self.fill).all())

    def stored(self) -> bytes | None:
        return shard_object(self.chunks, self.per_shard)


class StagedShard:
    """One shard of an array in any layout or chain, written by zarr into an empty in-memory
    array with `arr`'s metadata: its shard object holds the bytes a write into `arr` would."""

    def __init__(self, arr: zarr.Array, shard: int):
        store = MemoryStore()
        metadata = arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]
        sync(store.set(f"{arr.path}/zarr.json", metadata))
        self.staged = zarr.open_array(store, path=arr.path, mode="r+", zarr_format=3)
        self.shard, self.start = shard, shard * arr.shards[0]
        self.lock = threading.Lock()  # batches may share a chunk (prefix tokens: one per shard)

    def add(self, rows: np.ndarray, first: int) -> None:
        with self.lock:
            self.staged[self.start + first : self.start + first + len(rows)] = rows

    def stored(self) -> bytes | None:
        key = shard_key(self.staged, self.shard)
        data = sync(self.staged.store_path.store.get(key, default_buffer_prototype()))
        return None if data is None else data.to_bytes()


def array_shard(arr: zarr.Array, shard: int) -> EncodedShard | StagedShard:
    """The fastest builder that writes `arr`'s bytes: ours for one sample-view per chunk and a
    numcodecs chain, zarr's otherwise (prefix tokens' one chunk per shard, lossy serializers)."""
    codecs = ChunkCodecs.of(arr)
    one_per_chunk = arr.chunks[:2] == (1, 1) and arr.chunks[2:] == arr.shape[2:]
    return (
        EncodedShard(arr, codecs)
        if codecs is not None and one_per_chunk
        else StagedShard(arr, shard)
    )


class ShardWriter:
    """One shard of every array of the group: rows are rounded and compressed batch by batch
    (`add`, in the writer threads, any number at once) and stored as one object per array
    (`flush`).

    For lossy arrays, the job of shard 0 also keeps the exact values of its first few samples
    (`reference/...`), so the validator can measure the error that was really committed.
    """

    def __init__(self, root, arrays: dict[str, zarr.Array], shard: int, n_rows: int):
        self.root, self.arrays, self.shard = root, arrays, shard
        self.buffers = {p: np.zeros((n_rows, *a.shape[1:]), a.dtype) for p, a in arrays.items()}
        self.shards = {path: array_shard(arr, shard) for path, arr in arrays.items()}
        lossy = [path for path, arr in arrays.items() if is_lossy(arr)] if shard == 0 else []
        self.references: dict[str, list] = {path: [] for path in lossy}
        self.lock = threading.Lock()

    def put(self, path: str, rows: list[int], values: torch.Tensor) -> None:
        dtype = self.arrays[path].attrs["dtype"]
        stored = to_storage(values, dtype)
        if not np.isfinite(stored).all():
            peak = values.abs().max().item()
            raise StoreError(
                f"{path}: values are not finite at {dtype} (max |x| = {peak:.3g}); "
                "use dtype fp32 or bf16"
            )
        self.buffers[path][rows] = stored
        if path in self.references:  # the shard's first rows, whichever batch comes first
            exact = list(zip(rows, values.float().cpu().numpy(), strict=True))
            with self.lock:
                kept = sorted(self.references[path] + exact, key=lambda item: item[0])
                self.references[path] = kept[:REFERENCE_ROWS]

    def add(self, rows: list[int], outputs: dict[str, torch.Tensor]) -> None:
        """Round and compress a batch's consecutive rows (in a writer thread; rows of skipped
        samples between them stay fill values)."""
        for path, values in outputs.items():
            self.put(path, rows, values)
        lo, hi = rows[0], rows[-1] + 1
        for path, shard in self.shards.items():
            shard.add(self.buffers[path][lo:hi], lo)

    def flush(self) -> None:
        """Store each array's shard object whole (one PUT each); a shard with no data deletes
        what an interrupted job may have left there."""
        for path, shard in self.shards.items():
            arr = self.arrays[path]
            key, data = shard_key(arr, self.shard), shard.stored()
            store = arr.store_path.store
            if data is None:
                sync(store.delete(key))
            else:
                sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))
        for path, kept in self.references.items():
            if kept:
                rows = [int(row) for row, _ in kept]
                write_reference(self.root, path, rows, np.stack([v for _, v in kept]))
