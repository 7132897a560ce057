"""The chunks of a sharded array encoded and decoded with numcodecs, one plain call each.

zarr-python runs every chunk through its async codec pipeline: about a millisecond of Python per
chunk, holding the GIL, on its event-loop thread.  The store keeps one sample-view per chunk, so a
shard has hundreds of them, and an extraction job's forward passes (which need the GIL between
their ops) wait behind that loop.  For chains made of numcodecs codecs (every lossless chain of the
spec, featinv-codecs' `featinv.sparse` included) `ChunkCodecs` does the same work in plain calls,
and `shard_object` lays a shard out as zarr does (chunks in Morton order, then the index and its
crc32c): the bytes are zarr's own (tested).
Chains it does not know (the lossy quantize serializer) are left to zarr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import crc32c
import numcodecs
import numpy as np
import zarr
from featinv_codecs import Sparse
from numcodecs.abc import Codec
from zarr.core.indexing import morton_order_iter

EMPTY = np.uint64(2**64 - 1)  # the sharding index's marker of a chunk that was never written
INDEX_CODECS = [("bytes", "little"), ("crc32c", None)]  # the sharding index these chains use
BLOSC_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def numcodecs_codec(entry: dict) -> Codec | None:
    """numcodecs' codec for one zarr v3 codec entry (the object zarr itself would call), or None."""
    name, config = entry["name"], entry.get("configuration", {})
    if name.startswith("numcodecs."):  # zarr's numcodecs wrappers carry numcodecs' own config
        try:
            return numcodecs.get_codec({"id": name.removeprefix("numcodecs."), **config})
        except (ValueError, TypeError):
            return None
    if name == "blosc":
        return numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"],
                               shuffle=BLOSC_SHUFFLES[config["shuffle"]],
                               blocksize=config.get("blocksize", 0),
                               typesize=config.get("typesize"))  # fmt: skip
    if name == "zstd":
        return numcodecs.Zstd(level=config.get("level", 0), checksum=config.get("checksum", False))
    if name == "gzip":
        return numcodecs.GZip(level=config.get("level", 5))
    if name == "featinv.sparse":
        return Sparse(elementsize=config["elementsize"], level=config["level"])
    return None


@dataclass(frozen=True)
class ChunkCodecs:
    """A sharded array's chunk chain: numcodecs filters on the array, the bytes codec in native
    order, numcodecs compressors on the bytes, and (as SPEC.md requires) crc32c at the end."""

    filters: list[Codec]
    compressors: list[Codec]
    crc: bool

    @classmethod
    def of(cls, arr: zarr.Array) -> ChunkCodecs | None:
        """The chain of `arr`, if it is sharded with a checked index at the end and every codec
        has a numcodecs equivalent; None for zarr to encode and decode."""
        codecs = arr.metadata.to_dict()["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        config = codecs[0]["configuration"]
        index = [
            (c["name"], c.get("configuration", {}).get("endian")) for c in config["index_codecs"]
        ]
        if config.get("index_location", "end") != "end" or index != INDEX_CODECS:
            return None
        inner = config["codecs"]
        crc = inner[-1]["name"] == "crc32c"
        inner = inner[:-1] if crc else inner
        names = [c["name"] for c in inner]
        if names.count("bytes") != 1:
            return None
        at = names.index("bytes")
        if inner[at].get("configuration", {}).get("endian", sys.byteorder) != sys.byteorder:
            return None
        chain = [numcodecs_codec(c) for i, c in enumerate(inner) if i != at]
        return None if None in chain else cls(chain[:at], chain[at:], crc)

    def encode(self, chunk: np.ndarray) -> bytes:
        """One chunk's stored bytes, checksum included."""
        data = chunk
        for codec in self.filters:
            data = codec.encode(data)
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # zarr's bytes codec
        for codec in self.compressors:
            data = codec.encode(data)
        data = bytes(data)
        return data + crc32c.crc32c(data).to_bytes(4, "little") if self.crc else data

    def payload(self, raw: memoryview, where: str) -> memoryview:
        """The chunk's encoded bytes, once its crc32c matches (OSError naming `where` if not)."""
        if not self.crc:
            return raw
        if crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise OSError(f"{where}: chunk checksum mismatch")
        return raw[:-4]

    def decode(self, raw: memoryview, dest: np.ndarray, where: str) -> None:
        """Check and decode one chunk's stored bytes into `dest`."""
        data = self.payload(raw, where)
        for codec in reversed(self.compressors[1:]):
            data = codec.decode(data)
        if self.compressors:
            self.compressors[0].decode(data, dest)
        else:
            dest[...] = np.frombuffer(data, dest.dtype).reshape(dest.shape)
        for codec in reversed(self.filters):
            dest[...] = np.asarray(codec.decode(dest)).view(dest.dtype).reshape(dest.shape)


def shard_object(chunks: dict[tuple[int, ...], bytes], per_shard: tuple[int, ...]) -> bytes | None:
    """A shard object as zarr writes it: the stored chunks (by their coordinates in the shard's
    grid of `per_shard` chunks) in Morton order, then the index of (offset, length) per chunk and
    its crc32c; None where no chunk holds data (zarr stores no object then)."""
    if not chunks:
        return None
    index = np.full((*per_shard, 2), EMPTY, "<u8")
    parts, offset = [], 0
    for coords in morton_order_iter(per_shard):
        data = chunks.get(coords)
        if data:
            index[coords] = (offset, len(data))
            parts.append(data)
            offset += len(data)
    raw = index.tobytes()
    return b"".join([*parts, raw, crc32c.crc32c(raw).to_bytes(4, "little")])
