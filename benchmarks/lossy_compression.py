"""Size, error and decode speed of the lossy chunk codecs on real feature maps.

Why: lossless fp16 stops at about 0.45x of raw fp32 bytes; the goal for a lossy option is
<= 0.20x at a relative L2 error <= 1e-2 per sample, with a stated bound.  This measures every
``storage_specs.codecs`` setting on efficientnet_lite0 (real ImageNet weights) maps of the demo
photos: blocks.3 (dense, 80x14x14), blocks.5 (dense, 192x7x7), bn2 (after ReLU6, 1280x7x7).

Each setting writes the maps into a zarr v3 array with the feature layout (``[sample, view, C, y,
x]`` with one view, a sample per chunk, ``--shard-size`` per shard), then reads it back from a
freshly opened array with plain zarr.

- ratio: ``nbytes_stored()`` (chunks, shard indexes, metadata) over raw fp32 bytes;
- rel L2 max / mean: ||x' - x||_2 / ||x||_2 per sample against the fp32 maps;
- abs/range: the worst |x' - x| of a channel over that channel's max - min in its sample;
- decode MB/s: fp32-equivalent megabytes per second of whole-array reads (median of repeats,
  the settings of a layer taking turns); encode MB/s: the one write.

Rows ``standard ...`` are issue 12's alternative to the ``featinv.quantize`` codec: standard
numcodecs codecs only, which plain zarr-python decodes without installing anything.
``fixedscaleoffset`` (offset 0, one scale for the whole array: its parameters live in the array's
metadata, so no per-chunk step) to int16 (int32 where the range needs it), then byte-shuffle +
zstd or blosc bit-shuffle + zstd.  The scale is the largest that keeps every sample of the whole
array within rel L2 1e-2, chosen knowing all the data: the best case, which a store (whose arrays
are created before any data exists) could only approach.

Rows ``ref: per-channel uintN`` are the obvious alternative (per-channel min/max scaling, not a
codec here), computed in memory for comparison.

Usage: ``.venv/bin/python benchmarks/lossy_compression.py [--repeats 5] [--shard-size 8]
[--json benchmarks/results/lossy_compression.json]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import record
import zarr
from numcodecs import Zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import FixedScaleOffset, Shuffle

from pipeline.demo import demo_feature_maps
from storage_specs.codecs import ZSTD_LEVEL, compression_codecs, measured_error

LAYERS = ("blocks.3", "blocks.5", "bn2")
GOAL_RATIO, GOAL_ERROR = 0.20, 1e-2
STANDARD = ("standard fso+shuffle+zstd", "standard fso+bitshuffle")  # issue 12's alternative
# (label, compression spec or a STANDARD label, storage dtype)
SETTINGS: list[tuple[str, dict | str, str]] = [
    ("lossless fp16", {"mode": "lossless"}, "float16"),
    ("lossless fp32", {"mode": "lossless"}, "float32"),
    *[(f"bitround fp32 k={k}", {"mode": "bitround", "keepbits": k}, "float32") for k in (4, 6, 8)],
    *[
        (f"bitround fp16 k={k}", {"mode": "bitround", "keepbits": k}, "float16")
        for k in (3, 4, 5, 6)
    ],
    *[
        (f"quantize fp32 rel_l2={t}", {"mode": "quantize", "rel_l2": t}, "float32")
        for t in (0.005, 0.01, 0.02)
    ],
    ("quantize fp16 rel_l2=0.01", {"mode": "quantize", "rel_l2": 0.01}, "float16"),
    (
        "quantize fp32 0.01 no-pred",
        {"mode": "quantize", "rel_l2": 0.01, "predict": False},
        "float32",
    ),
    *[(f"{label} fp32", label, "float32") for label in STANDARD],
]
WIDTH = 31  # of the setting column


def standard_step(x: np.ndarray, tol: float = GOAL_ERROR) -> float:
    """The largest step ``1 / scale`` of one ``fixedscaleoffset`` for the whole array that keeps
    every sample's rel L2 <= tol, decoded as numcodecs does (bisection; the error grows with it)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)

    def worst(step: float) -> float:
        decoded = (np.around(flat * (1 / step)) / (1 / step)).astype(x.dtype)
        return float((np.linalg.norm(decoded - flat, axis=1) / norms).max())

    lo, hi = 0.0, float(np.abs(flat).max())
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst(mid) <= tol else (lo, mid)
    return lo


def standard_codecs(label: str, x: np.ndarray, dtype: str) -> dict:
    """`zarr.create_array` keywords of a standard-codec row (see the module docstring)."""
    step = standard_step(x.astype(dtype))
    ints = "int16" if np.abs(x).max() / step < 2**15 - 1 else "int32"
    size = np.dtype(ints).itemsize
    fso = FixedScaleOffset(offset=0, scale=1 / step, dtype=np.dtype(dtype).str, astype=ints)
    if label == STANDARD[0]:
        compressors = [Shuffle(elementsize=size), ZstdCodec(level=ZSTD_LEVEL)]
    else:
        compressors = [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle", typesize=size)]
    return {"filters": [fso], "serializer": BytesCodec(),
            "compressors": [*compressors, Crc32cCodec()],
            "attrs": {"mode": label, "step": step, "astype": ints}}  # fmt: skip


def measure(path: Path, x: np.ndarray, spec: dict | str, dtype: str, shard: int) -> dict:
    """Write, reopen, read back: size, error, encode speed, and the reopened array."""
    if isinstance(spec, dict):
        kwargs = compression_codecs(spec, dtype)
    else:
        kwargs = standard_codecs(spec, x, dtype)
    attrs = kwargs.pop("attrs")
    per_view = x.shape[1:]  # the layout of a one-view feature array (layout.require_array)
    arr = zarr.create_array(
        str(path), shape=(len(x), 1, *per_view), chunks=(1, 1, *per_view),
        shards=(shard, 1, *per_view), dtype=dtype, fill_value=0,
        dimension_names=("sample", "view", "channel", "y", "x"),
        attributes={"compression": attrs}, **kwargs,
    )  # fmt: skip
    start = time.perf_counter()
    arr[:] = x[:, None]
    encode = time.perf_counter() - start
    arr = zarr.open_array(str(path), mode="r")
    return {
        "ratio": arr.nbytes_stored() / (x.size * 4),
        **measured_error(x, arr[:, 0]),
        "encode": x.size * 4 / 1e6 / encode,
        "array": arr,
    }


def decode_speeds(arrays: list[zarr.Array], mb: float, repeats: int) -> list[float]:
    """MB/s of whole-array reads; settings take turns so a busy machine slows all of them alike."""
    times: list[list[float]] = [[] for _ in arrays]
    for _ in range(repeats):
        for arr, spent in zip(arrays, times, strict=True):
            start = time.perf_counter()
            arr[:]
            spent.append(time.perf_counter() - start)
    return [mb / statistics.median(spent) for spent in times]


def per_channel(x: np.ndarray, bits: int) -> dict:
    """Reference, not a codec: per-sample per-channel min/max scaling to ``bits``, then zstd.

    Size counts each chunk's zstd bytes, an fp32 offset and scale per channel, and a crc32c.
    """
    lo, hi = x.min(axis=(2, 3), keepdims=True), x.max(axis=(2, 3), keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / (2**bits - 1), 1.0)
    q = np.rint((x - lo) / scale).astype(np.uint8)
    size = sum(len(Zstd(ZSTD_LEVEL).encode(chunk)) + 8 * x.shape[1] + 4 for chunk in q)
    return {"ratio": size / (x.size * 4), **measured_error(x, q * scale + lo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--json", help="also write the results here (benchmarks/record.py)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
    with tempfile.TemporaryDirectory(prefix="featinv-lossy-") as tmp_dir:
        tmp = Path(tmp_dir)
        features = demo_feature_maps(str(tmp / "demo"), LAYERS)
        n = len(features[LAYERS[0]])
        print(f"efficientnet_lite0, {n} demo photos, {args.shard_size} samples per shard")
        print(
            f"decode/encode: MB/s of fp32-equivalent data; decode: median of {args.repeats} reads"
        )
        meets, results = [], {}
        for layer, x in features.items():
            shape = "x".join(map(str, x.shape[1:]))
            print(f"\n{layer} [{shape}]")
            print(
                f"{'setting':<{WIDTH}} {'ratio':>6} {'rel L2 max':>10} {'mean':>9} "
                f"{'abs/range':>9} {'decode':>7} {'encode':>7}"
            )
            rows = [
                measure(tmp / f"{layer}-{i}.zarr", x, spec, dtype, args.shard_size)
                for i, (_, spec, dtype) in enumerate(SETTINGS)
            ]
            speeds = decode_speeds([r["array"] for r in rows], x.size * 4 / 1e6, args.repeats)
            results[layer] = {}
            for (label, _, _), r, decode in zip(SETTINGS, rows, speeds, strict=True):
                ok = r["ratio"] <= GOAL_RATIO and r["rel_l2_max"] <= GOAL_ERROR
                if ok:
                    meets.append(f"{layer}: {label} ({r['ratio']:.4f}x, {r['rel_l2_max']:.2e})")
                results[layer][label] = {
                    key: r[key] for key in ("ratio", "rel_l2_max", "rel_l2_mean", "encode")
                } | {"decode": decode, "compression": dict(r["array"].attrs["compression"])}
                print(
                    f"{label:<{WIDTH}} {r['ratio']:>6.4f} {r['rel_l2_max']:>10.2e} "
                    f"{r['rel_l2_mean']:>9.2e} {r['max_abs_over_range']:>9.2e} "
                    f"{decode:>7.0f} {r['encode']:>7.0f}{'  <- goal' if ok else ''}"
                )
            for bits in (8, 7):
                r = per_channel(x, bits)
                print(
                    f"{f'ref: per-channel uint{bits}':<{WIDTH}} {r['ratio']:>6.4f} "
                    f"{r['rel_l2_max']:>10.2e} {r['rel_l2_mean']:>9.2e} "
                    f"{r['max_abs_over_range']:>9.2e} {'-':>7} {'-':>7}"
                )
        print(f"\nmeet <= {GOAL_RATIO}x at rel L2 <= {GOAL_ERROR}:")
        print("\n".join(f"  {line}" for line in meets) or "  none")
    record.write_result(args.json, "lossy_compression", {"photos": n, "layers": results})


if __name__ == "__main__":
    main()
