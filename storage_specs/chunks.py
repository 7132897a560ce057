"""Shard-aware random access: many (sample, view) chunks of one array per call.

Plain zarr reads a chunk of a sharded array by first fetching the shard's index, every time, one
chunk after another.  Training reads random batches, so this reader caches each shard index after
its first use, fetches the chunks' byte ranges concurrently (which is what matters on object
storage), and decodes them with numcodecs, verifying each chunk's crc32c.  Arrays with other
codec chains (lossy filters) fall back to zarr's own per-chunk reads.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from storage_specs.layout import shard_key

EMPTY = np.uint64(2**64 - 1)  # the sharding index's marker of a chunk that was never written
MAX_GAP = 1 << 20  # bytes of unwanted data worth reading to save a request
BLOSC = Blosc()  # decoding reads the codec settings from each chunk's own header


class ChunkReader:
    """Batched reads of `arr[row, view]` chunks (one sample-view each, as SPEC.md lays out)."""

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.store = arr.store_path.store
        self.chunk_shape = arr.chunks[2:]
        self.dtype = arr.dtype
        self.indexes: dict[int, np.ndarray] = {}
        self.fast = self._fast_codecs(arr.metadata.to_dict()["codecs"])
        # Local files are read directly: zarr's store API costs a thread hop per range request,
        # more than reading the bytes (RESULTS.md, section 3).
        self.local_root = Path(self.store.root) if isinstance(self.store, LocalStore) else None

    @staticmethod
    def _fast_codecs(codecs: list) -> bool:
        """Whether the chain is the spec's default (bytes -> blosc -> crc32c), decoded here."""
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return False
        inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
        location = codecs[0]["configuration"].get("index_location", "end")
        return inner == ["bytes", "blosc", "crc32c"] and location == "end"

    async def _get(self, shard: int, start: int, stop: int | None) -> bytes:
        """Bytes [start, stop) of a shard object; a negative start without stop is a suffix."""
        key = shard_key(self.arr, shard)
        if self.local_root is not None:
            try:
                with open(self.local_root / key, "rb") as f:
                    f.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                    return f.read(-1 if stop is None else stop - start)
            except FileNotFoundError:
                return b""
        request = SuffixByteRequest(-start) if stop is None else RangeByteRequest(start, stop)
        buf = await self.store.get(key, default_buffer_prototype(), request)
        return buf.to_bytes() if buf is not None else b""

    async def _index(self, shard: int) -> np.ndarray:
        if shard not in self.indexes:
            n_chunks = int(np.prod(self.arr.shards[:2]))
            size = n_chunks * 16 + 4
            try:
                raw = await self._get(shard, -size, None)
            except OSError:  # shorter than an index
                raw = b""
            if len(raw) != size or crc32c.crc32c(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
                raise OSError(f"{self.arr.path} shard {shard}: missing or corrupt shard index")
            self.indexes[shard] = np.frombuffer(raw[:-4], "<u8").reshape((*self.arr.shards[:2], 2))
        return self.indexes[shard]

    async def _fetch(self, items: list[tuple[int, int]]) -> list[bytes | None]:
        """Compressed bytes of each chunk, checksum verified (None: never written).

        Chunks of one shard that lie within MAX_GAP bytes of each other are fetched in one
        request: a random batch from a small store touches few shards, from a large one one
        chunk per request, concurrently either way.
        """
        shards = sorted({row // self.arr.shards[0] for row, _ in items})
        await asyncio.gather(*(self._index(shard) for shard in shards))
        spans = []
        for pos, (row, view) in enumerate(items):
            shard, local = divmod(row, self.arr.shards[0])
            offset, nbytes = self.indexes[shard][local, view]
            if offset != EMPTY:
                spans.append((shard, int(offset), int(offset + nbytes), pos))
        spans.sort()
        runs: list[list[tuple]] = []
        for span in spans:
            if runs and runs[-1][-1][0] == span[0] and span[1] - runs[-1][-1][2] <= MAX_GAP:
                runs[-1].append(span)
            else:
                runs.append([span])
        blobs = await asyncio.gather(
            *(self._get(run[0][0], run[0][1], max(s[2] for s in run)) for run in runs)
        )
        out: list[bytes | None] = [None] * len(items)
        for run, blob in zip(runs, blobs, strict=True):
            for _, start, stop, pos in run:
                raw = blob[start - run[0][1] : stop - run[0][1]]
                if crc32c.crc32c(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
                    row, view = items[pos]
                    raise OSError(f"{self.arr.path} row {row} view {view}: chunk checksum mismatch")
                out[pos] = raw[:-4]
        return out

    def decode(self, raw: bytes | None) -> np.ndarray:
        if raw is None:
            return np.zeros(self.chunk_shape, self.dtype)  # a skipped row: the fill value
        return np.frombuffer(BLOSC.decode(raw), self.dtype).reshape(self.chunk_shape)

    def fetch(self, items: list[tuple[int, int]]) -> list[bytes | None]:
        """Compressed payloads of the chunks (what `read` decodes), e.g. to time the codec."""
        return sync(self._fetch(list(items)))

    def read(self, items: list[tuple[int, int]]) -> np.ndarray:
        """`[len(items), *per_view_shape]` for (row, view) pairs, in the order given."""
        if not items:
            return np.zeros((0, *self.chunk_shape), self.dtype)
        if not self.fast:
            return np.stack([self.arr[row, view] for row, view in items])
        return np.stack([self.decode(raw) for raw in self.fetch(items)])
