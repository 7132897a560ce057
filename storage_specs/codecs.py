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
  tokens, latents): 0.93-1.01x the best of blosc {byte, bit}-shuffle x {clevel 5, 9}, encoding
  1.3-8x faster than blosc clevel 5 bit-shuffle.
- ``none``: zstd level 9 without shuffle.  Smallest on sparse maps (post-ReLU: runs of zero
  values), where splitting the planes codes every zero twice.

``choose_lossless`` picks between them by encoding sample chunks (e.g. an array's first shard).

Every chain ends in crc32c, so a flipped bit still fails the read.  zarr-python finds
``featinv.quantize`` through the package's ``zarr.codecs`` entry point once featinv is installed
(importing this module registers it too); other zarr implementations cannot read it.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_NAME = "featinv.quantize"
ZSTD_LEVEL = 9  # levels 3-22 give the same size on quantized residuals (measured)
MODES = {
    "lossless": ("shuffle",),
    "bitround": ("keepbits",),
    "quantize": ("rel_l2", "max_abs", "predict"),
}
SHUFFLES = ("planar", "none")  # lossless chains, the first is the default
PLANAR_CLEVEL = 1  # blosc clevel 1 = zstd level 1: higher levels cost 1.5-3x time for <= 2% bytes
PLAIN_ZSTD_LEVEL = 9  # sparse maps: 3% smaller than level 1, still faster than the old chain
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
        return BloscCodec(typesize=1, cname="zstd", clevel=PLANAR_CLEVEL, shuffle="noshuffle",
                          blocksize=plane)  # fmt: skip


def lossless_compressors(shuffle: str = SHUFFLES[0]) -> list:
    """The lossless chain of a chunk (``SHUFFLES``), ending in crc32c."""
    if shuffle == "none":
        return [ZstdCodec(level=PLAIN_ZSTD_LEVEL), Crc32cCodec()]
    if shuffle != "planar":
        raise ValueError(f"unknown lossless shuffle {shuffle!r}; accepted: {', '.join(SHUFFLES)}")
    from zarr.codecs.numcodecs import Shuffle

    return [Shuffle(), _PlaneBlosc(), Crc32cCodec()]


def memory_shard(data: np.ndarray, compressors: list) -> tuple[zarr.Array, dict]:
    """An in-memory array laid out like one shard of a feature array (``[sample, view, ...]``, a
    sample-view per chunk) with these compressors, and the dict that holds its objects."""
    objects: dict = {}
    arr = zarr.create_array(
        zarr.storage.MemoryStore(objects),
        shape=data.shape,
        chunks=(1, 1, *data.shape[2:]),
        shards=data.shape,
        dtype=data.dtype,
        fill_value=0,
        compressors=compressors,
    )
    return arr, objects


def stored_bytes(data: np.ndarray, compressors: list) -> int:
    """Bytes zarr stores for ``data`` as one shard with these compressors: chunks, their
    checksums and the shard index (not the metadata)."""
    arr, objects = memory_shard(data, compressors)
    arr[:] = data
    return sum(len(v) for key, v in objects.items() if not key.endswith("zarr.json"))


def choose_lossless(data: np.ndarray) -> dict:
    """The lossless spec whose chain stores ``data`` (e.g. an array's first shard) in the fewest
    bytes; ties go to the default."""
    sizes = {shuffle: stored_bytes(data, lossless_compressors(shuffle)) for shuffle in SHUFFLES}
    return {"mode": "lossless", "shuffle": min(SHUFFLES, key=sizes.__getitem__)}


def compression_codecs(spec: dict, dtype: str) -> dict:
    """`zarr.create_array` keyword arguments for a config's ``compression:`` entry, plus ``attrs``.

    ``spec`` is ``{"mode": "lossless"}`` (default; optional ``"shuffle"``, one of ``SHUFFLES``),
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
        shuffle = spec.get("shuffle", SHUFFLES[0])
        return {
            "filters": (),
            "serializer": serializer,
            "compressors": lossless_compressors(shuffle),
            "attrs": {"mode": "lossless", "shuffle": shuffle, "bound": f"exact at {name}"},
        }
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


_HEADER = struct.Struct("<2sBBd4hI")  # magic, version, predicted, step, coefficients, escapes
_MAGIC, _VERSION, _SCALE = b"FQ", 1, 256  # prediction coefficients are integers / 256
_ESCAPE = 255
Coef = tuple[int, int, int, int]
_NO_PREDICTION: Coef = (0, 0, 0, 0)


@dataclass(frozen=True)
class QuantizeCodec(ArrayBytesCodec):
    """``featinv.quantize``: a float chunk as integers on a uniform grid, with a bounded error.

    Encoding a chunk ``x``: choose the step ``s`` (the largest that meets the bound, verified on
    the decoded values at the array's dtype), ``q = rint(x / s)``, predict each ``q`` over the last
    two axes from its left, upper and upper-left neighbours and their median edge detector
    (JPEG-LS), with integer coefficients fitted to the chunk and kept only where they lower the
    entropy; store the zigzagged residuals as bytes (255 escapes to an int64 list) behind a 24-byte
    header with ``s`` and the coefficients.  Decoding is exact integer arithmetic (anti-diagonal by
    anti-diagonal), then ``q * s`` cast to the dtype.

    Bound, per chunk (one sample in featinv stores), against the values the codec was given:
    ``rel_l2``: ||x' - x||_2 <= rel_l2 * ||x||_2; ``max_abs``: |x' - x| <= max_abs everywhere.
    Either way |x' - x| <= s/2 plus the dtype's rounding of ``q * s``.

    Reader-side: not a zarr-python built-in.  ``import storage_specs.codecs`` registers it (or an
    entry point ``zarr.codecs: featinv.quantize = storage_specs.codecs:QuantizeCodec``).
    """

    is_fixed_size = False

    rel_l2: float | None = None
    max_abs: float | None = None
    predict: bool = True

    def __post_init__(self) -> None:
        if (self.rel_l2 is None) == (self.max_abs is None):
            raise ValueError("featinv.quantize takes exactly one bound: rel_l2 or max_abs")
        if self.rel_l2 is not None and not 0 < self.rel_l2 < 1:
            raise ValueError(f"rel_l2 must be in (0, 1), got {self.rel_l2}")
        if self.max_abs is not None and not self.max_abs > 0:
            raise ValueError(f"max_abs must be > 0, got {self.max_abs}")

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, CODEC_NAME)
        return cls(**config)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        config: dict[str, JSON] = {"predict": self.predict}
        if self.rel_l2 is not None:
            config["rel_l2"] = self.rel_l2
        else:
            config["max_abs"] = self.max_abs
        return {"name": CODEC_NAME, "configuration": config}

    def bound(self) -> dict[str, str]:
        """The stated bound and the reader requirement, for the array's attributes."""
        if self.rel_l2 is not None:
            text = f"per sample ||x' - x||_2 <= {self.rel_l2} ||x||_2"
        else:
            text = f"per value |x' - x| <= {self.max_abs}"
        return {
            "bound": f"{text} (x: values at the storage dtype; verified at encode)",
            "reader": "zarr-python with featinv installed, or storage_specs.codecs imported",
        }

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        if dtype.to_native_dtype().kind != "f":
            raise ValueError(f"featinv.quantize needs a float dtype, not {dtype}")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        x = chunk_array.as_numpy_array()
        return chunk_spec.prototype.buffer.from_bytes(self.encode_array(x))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        dtype = chunk_spec.dtype.to_native_dtype()
        x = decode_array(chunk_bytes.to_bytes(), chunk_spec.shape, dtype)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(x)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def encode_array(self, x: np.ndarray) -> bytes:
        """One chunk to bytes (the codec without zarr around it)."""
        if not np.isfinite(x).all():
            raise ValueError("featinv.quantize cannot store non-finite values")
        ref = x.astype(np.float64)
        step = self._step(ref, x.dtype)
        q = _planes(np.rint(ref / step).astype(np.int64))
        coef = _fit(q) if self.predict else _NO_PREDICTION
        r = _residuals(q, coef) if any(coef) else q
        if any(coef) and _entropy(r) >= _entropy(q):
            coef, r = _NO_PREDICTION, q
        zig = (r << 1) ^ (r >> 63)
        small = np.minimum(zig, _ESCAPE).astype(np.uint8)
        escapes = r[zig >= _ESCAPE].astype("<i8")
        head = _HEADER.pack(_MAGIC, _VERSION, int(any(coef)), step, *coef, escapes.size)
        return head + small.tobytes() + escapes.tobytes()

    def _step(self, x: np.ndarray, dtype: np.dtype) -> float:
        """The largest step whose decoded chunk (at ``dtype``) meets the bound."""
        peak = float(np.abs(x).max(initial=0.0))
        if peak == 0:
            return 1.0
        if self.max_abs is not None:
            step = 2 * self.max_abs
            for _ in range(60):  # shrink only to make room for the dtype's rounding
                if np.abs(_decoded(x, step, dtype) - x).max() <= self.max_abs:
                    return step
                step *= 0.9
            raise ValueError(f"max_abs {self.max_abs} cannot be met at {dtype}")
        tol, norm = self.rel_l2, _norm(x)
        lo, hi, err_lo, err_hi = 0.0, np.inf, 0.0, np.inf  # largest good step, smallest bad one
        step = np.sqrt(12.0) * tol * norm / np.sqrt(x.size)  # uniform rounding error
        for _ in range(20):
            err = _norm(_decoded(x, step, dtype) - x) / norm
            if err <= tol:
                lo, err_lo = step, err
                if err >= 0.99 * tol:
                    break
            else:
                hi, err_hi = step, err
            aim = 0.995 * tol
            if hi < np.inf and lo > 0:  # bracketed: interpolate
                step = lo + (hi - lo) * (aim - err_lo) / (err_hi - err_lo)
            else:  # error grows about linearly with the step
                step *= aim / err if err > 0 else 2.0
        if lo == 0 or peak / lo > 2.0**40:
            raise ValueError(f"rel_l2 {tol} cannot be met at {dtype} with 2^40 levels")
        return lo


def decode_array(data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Bytes of one chunk back to its values (the codec without zarr around it)."""
    magic, version, predicted, step, *coef, n_escapes = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"not a featinv.quantize v{_VERSION} chunk")
    size = int(np.prod(shape))
    small = np.frombuffer(data, np.uint8, size, _HEADER.size)
    zig = small.astype(np.int64)
    r = (zig >> 1) ^ -(zig & 1)
    if n_escapes:
        r[small == _ESCAPE] = np.frombuffer(data, "<i8", n_escapes, _HEADER.size + size)
    q = _planes(r.reshape(shape))
    if predicted:
        q = _unpredict(q, tuple(coef))
    return (q * step).astype(dtype).reshape(shape)


def _decoded(x: np.ndarray, step: float, dtype: np.dtype) -> np.ndarray:
    return (np.rint(x / step) * step).astype(dtype).astype(np.float64)


def _norm(v: np.ndarray) -> float:
    return float(np.sqrt(np.square(v).sum()))


def _planes(q: np.ndarray) -> np.ndarray:
    """``[..., y, x]`` as ``[plane, y, x]``: prediction runs over the last two axes."""
    return q.reshape(-1, *q.shape[-2:]) if q.ndim >= 2 else q.reshape(1, 1, -1)


def _neighbours(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left, upper and upper-left neighbour of every value (0 outside the plane)."""
    pad = np.pad(q, ((0, 0), (1, 0), (1, 0)))
    return pad[:, 1:, :-1], pad[:, :-1, 1:], pad[:, :-1, :-1]


def _terms(left: Any, up: Any, upleft: Any) -> tuple[Any, Any, Any, Any]:
    """The predictor's inputs: the three neighbours and JPEG-LS's median edge detector."""
    med = left + up
    med -= upleft
    np.minimum(med, np.maximum(left, up), out=med)
    np.maximum(med, np.minimum(left, up), out=med)
    return left, up, upleft, med


def _fit(q: np.ndarray) -> Coef:
    """Least-squares prediction coefficients (times 256), shared by all planes of the chunk."""
    cols = np.stack([t.ravel() for t in _terms(*_neighbours(q))], axis=1).astype(np.float64)
    gram, rhs = cols.T @ cols, cols.T @ q.ravel().astype(np.float64)
    if np.linalg.matrix_rank(gram) < len(gram):
        return _NO_PREDICTION
    coef = np.clip(np.rint(np.linalg.solve(gram, rhs) * _SCALE), -32768, 32767)
    return tuple(int(v) for v in coef)  # type: ignore[return-value]


def _predict(terms: tuple[Any, Any, Any, Any], coef: Coef) -> Any:
    left, up, upleft, med = terms
    a, b, c, d = coef
    p = left * a
    p += up * b
    p += upleft * c
    p += med * d
    p += _SCALE // 2
    p >>= 8
    return p


def _residuals(q: np.ndarray, coef: Coef) -> np.ndarray:
    return q - _predict(_terms(*_neighbours(q)), coef)


def _unpredict(r: np.ndarray, coef: Coef) -> np.ndarray:
    """Invert `_residuals` one anti-diagonal at a time (each needs only the ones before)."""
    n, h, w = r.shape
    order, target, neighbours, bounds = _diagonals(h, w)
    rd = r.reshape(n, -1).T[order]  # [position on the diagonals, plane]
    q = np.zeros(((h + 1) * (w + 1), n), np.int64)  # padded planes, position-major, zero border
    for start, stop in itertools.pairwise(bounds):
        p = _predict(_terms(*q[neighbours[:, start:stop]]), coef)
        p += rd[start:stop]
        q[target[start:stop]] = p
    return q.T.reshape(n, h + 1, w + 1)[:, 1:, 1:]


@lru_cache(maxsize=64)
def _diagonals(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plane positions sorted by anti-diagonal, their padded index, neighbours, diagonal bounds."""
    y, x = np.divmod(np.arange(h * w), w)
    order = np.argsort(y + x, kind="stable")
    target = (y[order] + 1) * (w + 1) + x[order] + 1
    neighbours = np.stack([target - 1, target - w - 1, target - w - 2])  # left, up, up-left
    bounds = np.searchsorted((y + x)[order], np.arange(h + w))
    return order, target, neighbours, bounds


def _entropy(r: np.ndarray) -> float:
    """Order-0 entropy (bits) of the byte stream `r` would be stored as."""
    counts = np.bincount(np.minimum((r << 1) ^ (r >> 63), _ESCAPE).ravel(), minlength=256)
    p = counts[counts > 0] / r.size
    return float(-(p * np.log2(p)).sum())


register_codec(CODEC_NAME, QuantizeCodec)
