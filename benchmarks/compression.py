"""Store size and decode speed of real feature arrays, against raw fp32 and against bare blosc.

Builds a store from the demo collection with the default config (``config/config.yaml``: its
backbones, layers, views, shard size, fp16; lossless; its ``targets`` left out), through the
stage's Python API (plan, extract, finalize).

Size, per array: stored bytes (``nbytes_stored()``: chunks, shard indexes, metadata) over raw fp32
bytes (n_valid x per-sample elements x 4). Lossless with respect to the fp16 the stage stores.
Goal: <= 0.45 per array. For context, the same valid rows are encoded per sample (one chunk) with
other numcodecs Blosc settings, with their encode and decode speed.

Decode speed, per array: every shard read whole through ``FeatureStore.read_shard`` (zarr: shard
index, crc32c, blosc) against pure ``numcodecs.Blosc(zstd, 9, BITSHUFFLE)`` decoding of the same
rows, pre-encoded one chunk (one view of one sample) at a time, in memory. The two alternate over
repeats in one process; the result is the median of per-repeat ratios zarr / blosc samples/s.

Usage: ``.venv/bin/python benchmarks/compression.py [--repeats 5] [--passes 10]``
``[--config PATH] [--targets] [--json PATH]`` (another config's encoders; its targets too;
the measured sizes as JSON for ``benchmarks/scaling.py``)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from numcodecs import Blosc, blosc
from record import write_result

from pipeline.config import validate_config
from pipeline.demo import build_demo_images
from pipeline.extract import extract_shard
from pipeline.finalize import finalize_store
from pipeline.plan import plan_store
from storage_specs.reader import FeatureStore

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
CODECS = {  # name -> numcodecs codec; the first one is what the store uses
    "zstd9-bit": Blosc(cname="zstd", clevel=9, shuffle=Blosc.BITSHUFFLE),
    "zstd9-byte": Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE),
    "zstd5-bit": Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE),
    "zstd5-byte": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
    "lz4-5-bit": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
}
# zarr runs blosc in worker threads, where numcodecs does not use blosc's own threads: same here.
blosc.use_threads = False


def build_store(tmp: Path, config_path: Path, targets: bool) -> FeatureStore:
    config = yaml.safe_load(config_path.read_text())
    if not targets:
        config.pop("targets", None)  # feature arrays only (the VAE target needs a model folder)
    for entry in config["backbones"]:
        entry.pop("compression", None)  # lossless, whatever the config says
    build_demo_images(str(tmp / "demo"))
    config.update(source=str(tmp / "demo"), store=str(tmp / "store.zarr"), device="cpu")
    config = validate_config({**config, "work_dir": str(tmp / "work")})
    plan = plan_store(config)
    for group in plan["groups"]:
        for shard in range(plan["n_shards"]):
            extract_shard(config, group, shard, progress=False)
    finalize_store(config["store"], progress=False)
    return FeatureStore(config["store"])


def timed(fn: Callable[[], object], passes: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - start) / passes


def codec_row(chunks: np.ndarray, codec: Blosc) -> tuple[float, float, float]:
    """(compressed/raw fp32, encode MB/s, decode MB/s) of `[n, chunk]` rows; MB of fp16."""
    start = time.perf_counter()
    encoded = [codec.encode(row) for row in chunks]
    t_enc = time.perf_counter() - start
    t_dec = timed(lambda: [codec.decode(buf) for buf in encoded])
    ratio = sum(len(buf) for buf in encoded) / (chunks.size * 4)
    return ratio, chunks.nbytes / t_enc / 1e6, chunks.nbytes / t_dec / 1e6


def size_record(store: FeatureStore, path: str, arr: dict, metadata: int) -> dict:
    """What `benchmarks/scaling.py` scales one array's size from: the bytes it stored here, its
    per-view shape and dtype, and whose values they were (real or random weights, which VAE)."""
    attrs = store.root[path].attrs
    return {
        "per_view_shape": arr["shape"][2:],
        "dtype": arr["dtype"],
        "pretrained": arr["pretrained"],
        "source": attrs.get("weights", attrs.get("vae", {})).get("source"),
        "stored_bytes": arr["stored_bytes"],
        "metadata_bytes": metadata,
        "raw_fp32_bytes": arr["raw_fp32_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=10, help="reads of all shards per timing")
    parser.add_argument("--config", type=Path, default=CONFIG, help="whose encoders to store")
    parser.add_argument(
        "--targets", action="store_true",
        help="also the config's targets (a VAE needs its folder, e.g. data/demo_vae of make demo)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the sizes per array to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featinv-bench-") as tmp_dir:
        store = build_store(Path(tmp_dir), args.config, args.targets)
        info = store.describe()
        valid = store.samples()["valid"]
        views = store.root.attrs["views"]["count"]
        print(f"{store.n_samples} samples ({info['n_valid']} valid) x {views} views;")
        print(f"  chunk = one view of one sample, shard = {store.shard_size} samples")
        print(f"\n{'array':<44} {'per sample':>10} {'stored/fp32':>11} {'data only':>9}  goal")
        data, sizes = {}, {}
        for path, arr in info["arrays"].items():
            metadata = (Path(store.url) / path / "zarr.json").stat().st_size
            ratio = arr["stored_bytes"] / arr["raw_fp32_bytes"]
            data_only = (arr["stored_bytes"] - metadata) / arr["raw_fp32_bytes"]
            shape = "x".join(map(str, arr["shape"][1:]))
            flag = "<= 0.45 ok" if ratio <= 0.45 else "ABOVE 0.45"
            print(f"{path:<44} {shape:>10} {ratio:>11.3f} {data_only:>9.3f}  {flag}")
            sizes[path] = size_record(store, path, arr, metadata)
            size = int(np.prod(store.root[path].chunks))  # one sample-view per chunk
            shards = [store.read_shard(path, s).reshape(-1, size) for s in range(store.n_shards)]
            data[path] = (shards, np.concatenate(shards).reshape(len(valid), -1, size)[valid])

        cells = {
            path: [codec_row(rows.reshape(-1, rows.shape[-1]), c) for c in CODECS.values()]
            for path, (_, rows) in data.items()
        }
        for i, what in enumerate(("size / raw fp32", "encode MB/s (fp16)", "decode MB/s (fp16)")):
            print(f"\nalternatives, numcodecs on the valid rows' chunks: {what}")
            print(f"{'array':<44} " + " ".join(f"{name:>10}" for name in CODECS))
            for path, row in cells.items():
                fmt = "10.3f" if i == 0 else "10.1f"
                print(f"{path:<44} " + " ".join(f"{cell[i]:{fmt}}" for cell in row))

        print(
            f"\ndecode, median of {args.repeats} repeats: read_shard (zarr) vs pure blosc "
            "zstd5-bit (the spec's chain)"
        )
        print(f"{'array':<44} {'zarr smp/s':>10} {'MB/s':>7} {'blosc smp/s':>11} {'MB/s':>7} ratio")
        codec = CODECS["zstd5-bit"]
        for path, (shards, _) in data.items():
            encoded = [[codec.encode(row) for row in shard] for shard in shards]
            out = [np.empty_like(shard) for shard in shards]
            n, nbytes = store.n_samples, sum(s.nbytes for s in shards)

            def read_zarr(path: str = path) -> None:
                for s in range(store.n_shards):
                    store.read_shard(path, s)

            def read_blosc(encoded: list = encoded, out: list = out) -> None:
                for chunks, dest in zip(encoded, out, strict=True):
                    for i, buf in enumerate(chunks):
                        codec.decode(buf, out=dest[i])

            zarr_t, blosc_t = [], []
            for rep in range(args.repeats):
                order = (read_zarr, read_blosc) if rep % 2 == 0 else (read_blosc, read_zarr)
                times = {fn: timed(fn, args.passes) for fn in order}
                zarr_t.append(times[read_zarr])
                blosc_t.append(times[read_blosc])
            ratio = statistics.median(b / z for z, b in zip(zarr_t, blosc_t, strict=True))
            z, b = statistics.median(zarr_t), statistics.median(blosc_t)
            print(
                f"{path:<44} {n / z:>10.0f} {nbytes / z / 1e6:>7.0f} "
                f"{n / b:>11.0f} {nbytes / b / 1e6:>7.0f} {ratio:.3f}x"
            )
        results = {"config": str(args.config), "n_valid": info["n_valid"], "views": views,
                   "shard_size": store.shard_size, "arrays": sizes}  # fmt: skip
        write_result(args.json, "compression", results)


if __name__ == "__main__":
    main()
