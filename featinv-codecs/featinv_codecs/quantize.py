"""``featinv.quantize``: a zarr v3 codec storing float chunks with a stated error bound.

Its own distribution, so that reading a featinv store's lossy arrays needs numpy, numcodecs and
zarr-python only (featinv itself pulls in torch, timm, diffusers and snakemake).  Installing it
registers the codec with zarr-python through the ``zarr.codecs`` entry point; importing it does
too.  Why a custom codec and not standard numcodecs filters: see featinv's
``storage_specs/SPEC.md`` (lossy arrays) and ``benchmarks/RESULTS.md`` section 4.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

from featinv_codecs._version import READER

CODEC_NAME = "featinv.quantize"

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

    Reader-side: not a zarr-python built-in; this distribution's ``zarr.codecs`` entry point (or
    ``import featinv_codecs``) registers it.
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
        return {"bound": f"{text} (x: values at the storage dtype; verified at encode)",
                "reader": READER}  # fmt: skip

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
