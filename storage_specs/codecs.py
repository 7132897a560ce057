"""Chunk codecs of feature arrays: the lossless chain, or a lossy one with a stated error bound.

Lossless fp16 stops at about 0.45x of raw fp32 bytes on dense layers; smaller stores need lossy
codecs, and a lossy store is only usable when its error is bounded and recorded.  Measured on real
efficientnet_lite0 maps (benchmarks/RESULTS.md, section 4):

- ``bitround`` (numcodecs ``BitRound`` + the lossless chain) is standard, readable by any
  zarr-python with numcodecs, and bounds the relative error of every value, but it keeps sign and
  exponent bits: 0.28-0.32x at 0.7-1.3e-2 on dense layers.
- ``quantize`` (``QuantizeCodec`` + zstd) gets to about 0.20x at a relative L2 error of 1e-2 on
  dense layers (0.03x on sparse ones) because it spends bits where an L2 bound needs them: one
  uniform step per chunk (uniform error is what minimises bits for a given L2 error), chosen per
  chunk as the largest that keeps the chunk's own error in bound, then a prediction of each integer
  from its decoded neighbours (the maps are spatially smooth: the residuals need 0.3-0.5 bits per
  value less than the integers, -10% bytes).  Per-channel min/max scaling spends bits on
  low-range channels that an L2 bound does not need (uint7: 0.22-0.26x at 0.9-1.1e-2).

Lossless chains (benchmarks/RESULTS.md, section 2), chosen per array by its data:

- ``planar`` (default): byte-shuffle, then blosc zstd level 1 with one blosc block per byte plane,
  so the noisy low-mantissa plane and the structured sign/exponent plane are entropy-coded apart
  (one zstd stream mixing both costs 5-13%).  Smallest on dense maps (linear bottlenecks, ViT
  tokens, latents): 0.93-1.03x the best of blosc {byte, bit}-shuffle x {clevel 5, 9}, encoding
  1.3-8x faster than blosc clevel 5 bit-shuffle; level 3 where it saves more than 0.3% and
  still encodes as fast as that chain (maps of random-weight ViTs and ConvNeXts).  Level 5 runs
  that chain's own zstd level and its speed sits near it (0.85-1.5x its encode time on the arrays
  measured): a timed choice between them would differ from one plan of the same data to the
  next, so it is not a candidate.
- ``none``: zstd level 9 without shuffle.  Smallest of the standard chains on sparse maps
  (post-ReLU: runs of zero values), where splitting the planes codes every zero twice.
- ``sparse``: featinv-codecs' ``featinv.sparse`` (a bitmask of the nonzero values, then their byte
  planes, each its own zstd frame): on sparse maps 0.83-0.92x the bytes of the best blosc
  reference at 4-16x the old chain's encode speed, but a reader needs featinv-codecs, so the plan
  considers it only where the config says readers have it (``reader: featinv-codecs``).  At
  level 5 (its top byte plane at zstd 5, the noisy low plane at level 1) it is also a dense map's
  chain where that saves bytes at the old chain's speed: random-weight ConvNeXt stages.0, 1.016x
  the best blosc reference at 1.3x the old chain's encode speed, where planar 3 stores 1.023x
  (no cheaper chain got within 2% there; zstd 5 on both planes ties the old chain's speed).

``choose_lossless`` picks between them by encoding sample chunks: the plan does so for every new
lossless array whose config leaves the chain open (``shuffle: auto``, the default), on the first
samples of its first shard (``pipeline.plan``); an existing array keeps the chain it records.
It also times a chosen chain's encode against the chain of featinv-store/2 on the same chunks and
passes over one that is slower: zstd's speed at a level depends on the data (level 3 is 3.1x
slower than level 1 on the byte planes of efficientnet_lite0's blocks.6, 1.3x on blocks.4), so
bytes alone cannot promise the speed.  It times the CPU time of its own thread, not the wall
clock, so that other work on the machine does not change the choice (the same data then gets
the same chain, and two builds of a store the same bytes, save where two chains tie in speed).

Every chain ends in crc32c, so a flipped bit still fails the read.  ``QuantizeCodec`` lives in
its own distribution, ``featinv-codecs`` (``featinv-codecs/`` in this repository, depending on
numpy, numcodecs and zarr only), so readers decode lossy arrays without installing featinv;
zarr-python finds it through that distribution's ``zarr.codecs`` entry point.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from typing import TYPE_CHECKING

import numcodecs.blosc
import numpy as np
import zarr
from featinv_codecs import READER, QuantizeCodec, SparseCodec
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from storage_specs.shard_codec import ChunkCodecs

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec

ZSTD_LEVEL = 9  # levels 3-22 give the same size on quantized residuals (measured)
MODES = {
    "lossless": ("shuffle", "level", "reader"),
    "bitround": ("keepbits",),
    "quantize": ("rel_l2", "max_abs", "predict"),
}
SHUFFLES = ("planar", "none", "sparse")  # lossless chains, the first where nothing was measured
AUTO = "auto"  # the chain chosen by measurement (choose_lossless), the default
DEFAULT_LEVEL = {"planar": 1, "none": 9, "sparse": 1}  # zstd levels
# Who reads a lossless array: zarr-python with numcodecs (the default), or with featinv-codecs.
READERS = ("zarr", "featinv-codecs")
PLUGIN_READER = READERS[1]
PLUGIN_SHUFFLES = {"sparse"}  # chains only zarr-python with featinv-codecs decodes
# What choose_lossless tries, cheapest encode first: the first encodes faster than the chain of
# featinv-store/2 on every array measured (1.3-8x; benchmarks/RESULTS.md, section 2), the others
# are timed against it on the array's own chunks when they would be chosen (sparse 5 on dense
# maps: 0.74-1.16x its encode time).
CANDIDATES = (("planar", 1), ("sparse", 1), ("planar", 3), ("none", 9), ("sparse", 5))
TOLERANCE = 1.003  # a costlier candidate must save more than 0.3% of the smallest's bytes
TIMING_ROUNDS = 15  # pairs of back-to-back timings, candidate and featinv-store/2's chain
TIMING_BYTES = 500_000  # raw bytes per timing at least (small shards: several passes)
_MANTISSA_BITS = {"float16": 10, "float32": 23, "float64": 52}
# The planar chain's numcodecs.shuffle would warn at every array open: its readers have numcodecs.
warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr", category=UserWarning)


class _PlaneBlosc(BloscCodec):
    """Blosc without shuffle, one block per byte plane of a byte-shuffled chunk.

    The block size depends on the chunk's shape, known only once the array is created; the
    evolved codec is a plain ``BloscCodec``, so the metadata names only standard blosc.
    """

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> BloscCodec:
        plane = int(np.prod(array_spec.shape))  # bytes of one byte plane: one per value
        return BloscCodec(typesize=1, cname="zstd", clevel=self.clevel, shuffle="noshuffle",
                          blocksize=plane)  # fmt: skip


def lossless_compressors(shuffle: str = SHUFFLES[0], level: int | None = None) -> list:
    """The lossless chain of a chunk (``SHUFFLES``) at a zstd ``level``, ending in crc32c."""
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown lossless shuffle {shuffle!r}; accepted: {', '.join(SHUFFLES)}")
    level = DEFAULT_LEVEL[shuffle] if level is None else level
    if shuffle in ("none", "sparse"):
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level must be in 1..22, not {level}")
        codec = ZstdCodec if shuffle == "none" else SparseCodec
        return [codec(level=level), Crc32cCodec()]
    if level not in range(1, 14, 2):  # blosc clevel c runs zstd level 2c - 1 (c <= 7)
        raise ValueError(
            f"planar level must be one of 1, 3, ..., 13 (blosc clevel 1-7), not {level}"
        )
    from zarr.codecs.numcodecs import Shuffle

    return [Shuffle(), _PlaneBlosc(cname="zstd", clevel=(level + 1) // 2), Crc32cCodec()]


def memory_shard(
    data: np.ndarray, compressors: list, chunks: tuple[int, ...] | None = None
) -> tuple[zarr.Array, dict]:
    """An in-memory array laid out like one shard of a feature array (``[sample, view, ...]``, a
    sample-view per chunk unless ``chunks`` says otherwise) with these compressors, and the dict
    that holds its objects."""
    objects: dict = {}
    arr = zarr.create_array(
        zarr.storage.MemoryStore(objects),
        shape=data.shape,
        chunks=chunks or (1, 1, *data.shape[2:]),
        shards=data.shape,
        dtype=data.dtype,
        fill_value=0,
        compressors=compressors,
    )
    return arr, objects


def stored_bytes(data: np.ndarray, compressors: list, chunks: tuple[int, ...] | None = None) -> int:
    """Bytes zarr stores for ``data`` as one shard with these compressors: chunks, their
    checksums and the shard index (not the metadata)."""
    arr, objects = memory_shard(data, compressors, chunks)
    arr[:] = data
    return sum(len(v) for key, v in objects.items() if not key.endswith("zarr.json"))


def spec2_compressors() -> list:
    """The lossless chain of featinv-store/2, blosc zstd clevel 5 (zstd 9) with bit-shuffle: the
    encode speed a chosen chain must match (issue 11)."""
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def choose_lossless(
    data: np.ndarray, chunks: tuple[int, ...] | None = None, reader: str = READERS[0]
) -> dict:
    """The lossless spec for an array whose chunks look like ``data`` (e.g. its first shard): of
    ``CANDIDATES`` that ``reader`` decodes and that encode ``data`` at least as fast as
    featinv-store/2's chain, the cheapest whose bytes are within ``TOLERANCE`` of the fewest.

    Only chains ranked before the first candidate (the fallback) are timed: usually none."""
    *timed, fallback = ranked_chains(data, chunks, reader)
    fast = (c for c in timed if encodes_as_fast(data, lossless_compressors(*c), chunks))
    shuffle, level = next(fast, fallback)
    return {"mode": "lossless", "shuffle": shuffle, "level": level}


def ranked_chains(
    data: np.ndarray, chunks: tuple[int, ...] | None = None, reader: str = READERS[0]
) -> list[tuple[str, int]]:
    """The chains ``choose_lossless`` tries on ``data``, by bytes alone: the cheapest within
    ``TOLERANCE`` of the fewest, then the same among the rest, down to the first candidate."""
    chains = [c for c in CANDIDATES if readable(c[0], reader)]
    sizes = {c: stored_bytes(data, lossless_compressors(*c), chunks) for c in chains}
    ranked = []
    while True:
        fewest = min(sizes[c] for c in chains)
        ranked.append(next(c for c in chains if sizes[c] <= TOLERANCE * fewest))
        if ranked[-1] == chains[0]:
            return ranked
        chains.remove(ranked[-1])


def encodes_as_fast(
    data: np.ndarray, compressors: list, chunks: tuple[int, ...] | None = None
) -> bool:
    """Whether ``compressors`` encode the chunks of ``data`` at least as fast as featinv-store/2's
    chain: numcodecs' own calls, as the extraction job's writer thread makes them (``ChunkCodecs``,
    blosc without its threads), the median of ``TIMING_ROUNDS`` ratios of back-to-back timings of
    this thread's CPU time (other processes taking the cores do not count: under three busy
    loops the wall clock's medians for one array ranged 1.06-1.50, the CPU time's 1.06-1.10)."""
    codecs = [ChunkCodecs.of(memory_shard(data, chain, chunks)[0])
              for chain in (compressors, spec2_compressors())]  # fmt: skip
    pieces = chunk_pieces(data, chunks or (1, 1, *data.shape[2:]))
    passes = math.ceil(TIMING_BYTES / max(data.nbytes, 1))
    ratios = []
    threads, numcodecs.blosc.use_threads = numcodecs.blosc.use_threads, False
    try:
        for round_ in range(TIMING_ROUNDS):
            seconds = [0.0, 0.0]
            for i in (0, 1) if round_ % 2 == 0 else (1, 0):
                start = time.thread_time()
                for _ in range(passes):
                    for piece in pieces:
                        codecs[i].encode(piece)
                seconds[i] = time.thread_time() - start
            ratios.append(seconds[0] / seconds[1])
    finally:
        numcodecs.blosc.use_threads = threads
    return statistics.median(ratios) <= 1


def chunk_pieces(data: np.ndarray, chunks: tuple[int, ...]) -> list[np.ndarray]:
    """The chunks of ``data`` as a grid of ``chunks`` cuts it (edge chunks unpadded)."""
    grid = [range(0, n, c) for n, c in zip(data.shape, chunks, strict=True)]
    cuts = (tuple(slice(o, o + c) for o, c in zip(origin, chunks, strict=True))
            for origin in itertools.product(*grid))  # fmt: skip
    return [np.ascontiguousarray(data[cut]) for cut in cuts]


def readable(shuffle: str, reader: str) -> bool:
    """Whether ``reader`` (of ``READERS``) decodes the lossless chain ``shuffle``."""
    return reader == PLUGIN_READER or shuffle not in PLUGIN_SHUFFLES


def needs_choice(spec: dict) -> bool:
    """Whether a config's ``compression:`` entry leaves the lossless chain to measurement."""
    return spec.get("mode", "lossless") == "lossless" and spec.get("shuffle", AUTO) == AUTO


def compression_codecs(spec: dict, dtype: str) -> dict:
    """`zarr.create_array` keyword arguments for a config's ``compression:`` entry, plus ``attrs``.

    ``spec`` is ``{"mode": "lossless"}`` (default; optional ``"shuffle"`` of ``SHUFFLES``, zstd
    ``"level"`` and ``"reader"`` of ``READERS``, which the chain must suit; ``"auto"``, or no
    shuffle, stands for the first of ``SHUFFLES`` here: the plan measures the chain before it
    creates an array, see ``needs_choice``),
    ``{"mode": "bitround", "keepbits": N}`` or
    ``{"mode": "quantize", "rel_l2": 0.01}`` / ``{"mode": "quantize", "max_abs": A}``; ``dtype``
    the storage dtype (``float16``, ``float32``).  The caller pops ``attrs`` (what was asked, the
    stated bound and what a reader needs) and stores it as the array's ``compression`` attribute.
    """
    spec = {"mode": "lossless", **spec}
    mode = spec["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown compression mode {mode!r}; accepted: {', '.join(MODES)}")
    unknown = set(spec) - {"mode", *MODES[mode]}
    if unknown:
        raise ValueError(
            f"compression mode {mode!r} takes {list(MODES[mode])}, not {sorted(unknown)}"
        )
    name = np.dtype(dtype).name
    if mode != "lossless" and name not in _MANTISSA_BITS:
        raise ValueError(f"lossy compression applies to float arrays, not {dtype}")
    serializer = BytesCodec(endian="little")
    if mode == "lossless":
        return {"filters": (), "serializer": serializer, **_lossless(spec, name)}
    if mode == "bitround":
        keepbits = int(spec["keepbits"])
        if not 0 < keepbits <= _MANTISSA_BITS[name]:
            raise ValueError(f"keepbits must be in 1..{_MANTISSA_BITS[name]} for {name}")
        from zarr.codecs.numcodecs import BitRound

        with warnings.catch_warnings():  # "not in the zarr v3 spec": known, readers have numcodecs
            warnings.simplefilter("ignore")
            bitround = BitRound(keepbits=keepbits)
        return {
            "filters": (bitround,),
            "serializer": serializer,
            "compressors": lossless_compressors(),
            "attrs": {
                "mode": "bitround",
                "keepbits": keepbits,
                "bound": f"|x' - x| <= 2^-{keepbits + 1} |x| per value (normal numbers)",
                "reader": "zarr-python >= 3.1.3 with numcodecs",
            },
        }
    codec = QuantizeCodec(
        rel_l2=spec.get("rel_l2"), max_abs=spec.get("max_abs"), predict=spec.get("predict", True)
    )
    return {
        "filters": (),
        "serializer": codec,
        "compressors": [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()],
        "attrs": {"mode": "quantize", **codec.to_dict()["configuration"], **codec.bound()},
    }


def _lossless(spec: dict, dtype: str) -> dict:
    """The compressors and attributes of a lossless ``compression:`` entry (``spec``)."""
    if needs_choice(spec) and "level" in spec:
        raise ValueError("a zstd level needs a shuffle (planar, none or sparse), not auto")
    shuffle = spec.get("shuffle", AUTO)
    shuffle = SHUFFLES[0] if shuffle == AUTO else shuffle
    compressors = lossless_compressors(shuffle, spec.get("level"))
    reader = spec.get("reader", PLUGIN_READER if shuffle in PLUGIN_SHUFFLES else READERS[0])
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; accepted: {', '.join(READERS)}")
    if not readable(shuffle, reader):
        raise ValueError(f"shuffle {shuffle} needs reader {PLUGIN_READER}, not {reader}")
    level = spec.get("level", DEFAULT_LEVEL[shuffle])
    attrs = {"mode": "lossless", "shuffle": shuffle, "level": level, "bound": f"exact at {dtype}"}
    if shuffle in PLUGIN_SHUFFLES:
        attrs["reader"] = READER
    return {"compressors": compressors, "attrs": attrs}


def plugin_codecs(codecs: list[dict]) -> set[str]:
    """Names in an array's codec metadata (``metadata.to_dict()["codecs"]``, shards' inner codecs
    included) that zarr-python decodes only with a plugin installed: neither zarr v3 core codecs
    (no dot in the name) nor zarr-python's own ``numcodecs.*`` (``featinv.quantize``)."""
    found = set()
    for codec in codecs:
        name, config = codec["name"], codec.get("configuration", {})
        if "." in name and not name.startswith("numcodecs."):
            found.add(name)
        found |= plugin_codecs([*config.get("codecs", ()), *config.get("index_codecs", ())])
    return found


def measured_error(reference: np.ndarray, stored: np.ndarray) -> dict:
    """Error of stored samples ``[sample, channel, ...]`` against the reference (e.g. fp32).

    ``rel_l2_max``/``rel_l2_mean``: ||x' - x||_2 / ||x||_2 per sample, worst and mean;
    ``max_abs_over_range``: the largest |x' - x| of a channel over that channel's max - min in the
    same sample, worst over all.
    """
    ref = reference.astype(np.float64).reshape(len(reference), reference.shape[1], -1)
    diff = stored.astype(np.float64).reshape(ref.shape) - ref
    norms = np.linalg.norm(ref, axis=(1, 2))
    rel = np.linalg.norm(diff, axis=(1, 2)) / np.where(norms > 0, norms, 1)
    spread = np.ptp(ref, axis=2)
    abs_err = np.abs(diff).max(axis=2)
    over = abs_err / np.maximum(spread, np.finfo(np.float64).tiny)
    return {
        "rel_l2_max": float(rel.max()),
        "rel_l2_mean": float(rel.mean()),
        "max_abs_over_range": float(over.max()),
    }
