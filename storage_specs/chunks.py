"""Shard-aware random access: many (sample, view) chunks of one array per call.

Plain zarr reads a chunk of a sharded array by first fetching the shard's index, every time, one
chunk after another.  Training reads random batches, so this reader keeps every shard index it has
read in one table (a batch's lookups are one numpy indexing), reads nearby chunks of a shard as one
byte range (local files synchronously with `os.pread`; object stores concurrently through zarr's
store), then checks each chunk's crc32c and decodes it straight into the batch.  Decoding is
shared by the caller and helper threads (the codecs release the GIL), part by part, so a helper
that gets no core (a busy machine, DataLoader workers on every core) costs nothing but its wake-up.
The decoders are numcodecs', chosen by the array's codec metadata (`storage_specs.shard_codec`);
chains without one (e.g. the quantize serializer) fall back to zarr's per-chunk reads.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from storage_specs.layout import shard_key
from storage_specs.shard_codec import EMPTY, ChunkCodecs

MAX_GAP = 1 << 20  # bytes of unwanted data worth reading to save an object store request
LOCAL_GAP = 0  # locally a read costs less than copying unwanted bytes: only touching chunks merge
THREADS = min(8, len(os.sched_getaffinity(0)))  # default decoding threads, the caller's included
PER_PART = 8  # chunks decoded per turn: the threads take turns until none is left
Range = tuple[int, int, int | None]  # shard, start, stop (stop None: the last -start bytes)


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """This process's decoding threads (a forked DataLoader worker starts its own)."""
    return ThreadPoolExecutor(max(THREADS - 1, 1), thread_name_prefix="featinv-decode")


class ChunkReader:
    """Batched reads of `arr[row, view]` chunks (one sample-view each, as SPEC.md lays out)."""

    def __init__(self, arr: zarr.Array, threads: int = THREADS):
        self.arr = arr
        self.threads = threads
        self.store = arr.store_path.store
        self.chunk_shape = arr.chunks[2:]
        self.dtype = arr.dtype
        self.shard_rows = arr.shards[0]  # zarr computes `shards` anew at every access
        n_shards = -(-arr.shape[0] // self.shard_rows)
        # Offset and size of every chunk, filled shard by shard (untouched pages of zeros are free).
        self.table = np.zeros((n_shards, *arr.shards[:2], 2), np.uint64)
        self.loaded = np.zeros(n_shards, bool)
        self.codecs = ChunkCodecs.of(arr)
        # A chunk per sample-view (prefix tokens keep one chunk per shard: zarr reads those).
        self.fast = self.codecs is not None and arr.chunks[:2] == (1, 1)
        # Local files are read directly: zarr's store API costs an event-loop round trip per call,
        # more than reading the bytes (RESULTS.md, section 3).
        self.local_root = str(self.store.root) if isinstance(self.store, LocalStore) else None
        self.max_gap = MAX_GAP if self.local_root is None else LOCAL_GAP

    async def _get(self, shard: int, start: int, stop: int | None) -> bytes:
        """Bytes of one range of a shard object through the store (b"": no such object)."""
        request = SuffixByteRequest(-start) if stop is None else RangeByteRequest(start, stop)
        try:
            buf = await self.store.get(
                shard_key(self.arr, shard), default_buffer_prototype(), request
            )
        except OSError:
            if stop is not None:
                raise
            return b""  # an object shorter than the suffix asked for: reported as a bad index
        return buf.to_bytes() if buf is not None else b""

    def _read_local(self, ranges: list[Range]) -> list[bytes]:
        """Bytes of each range from the shard files, each file opened once (b"": no such file)."""
        out = []
        for shard, group in itertools.groupby(ranges, key=lambda r: r[0]):
            try:
                fd = os.open(os.path.join(self.local_root, shard_key(self.arr, shard)), os.O_RDONLY)
            except FileNotFoundError:
                out.extend(b"" for _ in group)
                continue
            try:
                for _, start, stop in group:
                    if stop is None:
                        size = os.fstat(fd).st_size
                        start, stop = max(size + start, 0), size
                    out.append(os.pread(fd, stop - start, start))
            finally:
                os.close(fd)
        return out

    def _read_ranges(self, ranges: list[Range]) -> list[bytes]:
        """Bytes of each range: local files in place, object stores all at once, concurrently."""
        if self.local_root is not None:
            return self._read_local(ranges)
        return sync(self._get_all(ranges))

    async def _get_all(self, ranges: list[Range]) -> list[bytes]:
        return await asyncio.gather(*(self._get(*r) for r in ranges))

    def _load_indexes(self, shards: np.ndarray) -> None:
        size = self.table[0].nbytes + 4
        raws = self._read_ranges([(int(shard), -size, None) for shard in shards])
        for shard, raw in zip(shards, raws, strict=True):
            if len(raw) != size or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise OSError(f"{self.arr.path} shard {shard}: missing or corrupt shard index")
            self.table[shard] = np.frombuffer(raw[:-4], "<u8").reshape(self.table.shape[1:])
            self.loaded[shard] = True

    def _pairs(self, items: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
        """Items as an `[n, 2]` array of (row, view), IndexError naming one out of range."""
        pairs = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        bad = (pairs < 0).any(axis=1) | (pairs >= self.arr.shape[:2]).any(axis=1)
        if bad.any():
            row, view = pairs[bad][0]
            raise IndexError(
                f"{self.arr.path}: (row {row}, view {view}) out of {self.arr.shape[:2]}"
            )
        return pairs

    def _chunks(self, pairs: np.ndarray) -> list[memoryview | None]:
        """Each chunk's stored bytes, checksum included (None: never written).

        Chunks of one shard that lie within `max_gap` bytes of each other are read as one range:
        on object stores a random batch from a small store costs few requests, from a large one
        about one per chunk, all concurrent.
        """
        shards, local = np.divmod(pairs[:, 0], self.shard_rows)
        self._load_indexes(np.unique(shards[~self.loaded[shards]]))
        entries = self.table[shards, local, pairs[:, 1]]
        written = np.flatnonzero(entries[:, 0] != EMPTY)
        starts = entries[written, 0].astype(np.int64)
        stops = starts + entries[written, 1].astype(np.int64)
        order = np.lexsort((starts, shards[written]))  # chunks of a shard never overlap
        shard, start, stop = shards[written][order], starts[order], stops[order]
        first = np.ones(len(order), bool)
        first[1:] = (shard[1:] != shard[:-1]) | (start[1:] - stop[:-1] > self.max_gap)
        heads = np.flatnonzero(first)
        run_start = start[heads]
        ranges = zip(shard[heads].tolist(), run_start.tolist(),
                     np.maximum.reduceat(stop, heads).tolist(), strict=True)  # fmt: skip
        blobs = [memoryview(blob) for blob in self._read_ranges(list(ranges))]
        run = np.cumsum(first) - 1
        out: list[memoryview | None] = [None] * len(pairs)
        for pos, r, lo, hi in zip(written[order].tolist(), run.tolist(),
                                  (start - run_start[run]).tolist(),
                                  (stop - run_start[run]).tolist(), strict=True):  # fmt: skip
            out[pos] = blobs[r][lo:hi]
        return out

    def _where(self, pair: np.ndarray) -> str:
        return f"{self.arr.path} row {pair[0]} view {pair[1]}"

    def _decode_all(
        self, chunks: list, pairs: np.ndarray, out: np.ndarray, which: np.ndarray
    ) -> None:
        for pos in which.tolist():
            if chunks[pos] is None:
                out[pos] = self.arr.fill_value  # a skipped row
            else:
                self.codecs.decode(chunks[pos], out[pos], self._where(pairs[pos]))

    def fetch(self, items: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Encoded payloads of the chunks, checked (what `read` decodes), e.g. to time the codec."""
        pairs = self._pairs(items)
        chunks = self._chunks(pairs)
        return [
            None if c is None else bytes(self.codecs.payload(c, self._where(p)))
            for c, p in zip(chunks, pairs, strict=True)
        ]

    def read(self, items: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
        """`[len(items), *per_view_shape]` for (row, view) pairs, in the order given."""
        pairs = self._pairs(items)
        out = np.empty((len(pairs), *self.chunk_shape), self.dtype)
        if not len(pairs):
            return out
        if not self.fast:
            return np.stack([self.arr[row, view] for row, view in pairs.tolist()])
        chunks = self._chunks(pairs)
        n_parts = -(-len(pairs) // PER_PART)
        parts = iter(np.array_split(np.arange(len(pairs)), n_parts))

        def decode_parts() -> None:  # until no part is left (next() on a list is atomic)
            for part in parts:
                self._decode_all(chunks, pairs, out, part)

        helpers = [
            _pool(os.getpid()).submit(decode_parts) for _ in range(min(self.threads, n_parts) - 1)
        ]
        try:
            decode_parts()
        finally:  # a helper that no core ran meanwhile has nothing left to do: it is cancelled
            for helper in helpers:
                if not helper.cancel():
                    helper.result()  # raises its checksum error
        return out
