"""The guided decoder against pixel optimisation, on the same targets and gradient budget.

Subject: `sampling.guided` (the training-free guided decoder, Shirahama et al., made cheap: few
DDIM steps, time travel, early stop, batched targets) with an unconditional prior our trainer fit
on the store's training split (`condition_dropout: 1.0`).  Baseline: `sampling.pixelopt`
(Mahendran & Vedaldi: the pixels optimised directly, with their TV and alpha-norm priors), given
exactly the backbone gradient evaluations the guided decoder spent on each target.

Targets: real efficientnet_lite0 features of the held-out photos (never seen by the prior), a
mid-layer map (`blocks.3`) and the pooled pre-logits (`bn2`, mean-pooled).  Measured on the final
8-bit images re-extracted as the evaluation does: feature cosine to the target, top-1 agreement
with the original view, the Fréchet distance to the real images in the backbone's pooled space
(pre-logits of every photo of the store, view 0), wall time per image, and the cosine-versus-passes
curve (the best cosine reached within a budget of passes, as the decoder measured it).

Columns of the --images grid: the stored 64 px view, then guided and pixel optimisation for the
map, then for the pooled vector.

Usage (after building the store and the prior, see benchmarks/guided/config.yaml):
    .venv/bin/snakemake encode_latents --cores 2 --configfile benchmarks/guided/config.yaml
    .venv/bin/python -m pipeline.cli train benchmarks/guided/config.yaml
    .venv/bin/python benchmarks/guided_decoding.py [--targets 8] [--plot curve.png]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torchvision.utils import save_image

from pipeline.config import load_config
from sampling import metrics
from sampling.evaluate import original_inputs
from sampling.guided import FeatureDistance
from sampling.guided_run import decode
from sampling.pixelopt import PixelPriors, pixel_optimise
from sampling.priors import load_prior
from sampling.reextract import classify, inputs, recorded_backbone, reextract
from sampling.sample import image_seed
from sampling.sampler import seeded, to_images
from storage_specs.reader import FeatureStore
from training.data import open_training_data

BUDGETS = (25, 50, 100, 200, 400, 800, 1300)
PRE_LOGITS = "features/efficientnet_lite0/bn2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="benchmarks/guided/config.yaml")
    parser.add_argument("--prior", default="models/guided-prior")
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--settings", default="{}", help="JSON overrides of the guided: section")
    parser.add_argument("--plot", help="write the cosine-versus-passes curves to this PNG")
    parser.add_argument("--images", help="write a grid (original, guided, pixelopt) to this PNG")
    parser.add_argument("--kinds", nargs="+", choices=["map", "pooled"], default=["map", "pooled"])
    args = parser.parse_args()

    config = load_config(args.config, "sample")
    overrides = json.loads(args.settings)
    travel = {**config["guided"]["travel"], **overrides.pop("travel", {})}
    spec = {**config["guided"], **overrides, "travel": travel}
    store = FeatureStore(config["store"])
    data = open_training_data(config["store"], {**config["training"], "batch_size": 1})
    rows = data.heldout_rows[: args.targets]
    prior = load_prior(args.prior)
    print(f"prior {args.prior}: {prior.about['kind']} {prior.about.get('mode')}, "
          f"{prior.about.get('steps')} training steps, condition dropout "
          f"{prior.about.get('condition_dropout')}, images {tuple(prior.shape)}; "
          f"{len(rows)} held-out targets; settings {json.dumps(spec)}")  # fmt: skip
    reference = _pooled_real(store)
    photos = torch.from_numpy(store.read_rows("pixels/pixels/rgb", list(rows))[:, 0])
    floor = metrics.frechet_distance(reference, _pooled_real(store, rows))
    curves, columns = {}, [photos]
    kinds = {"map": ("features/efficientnet_lite0/blocks.3", False), "pooled": (PRE_LOGITS, True)}
    for path, pooled in (kinds[k] for k in args.kinds):
        found, images = _compare(store, path, pooled, rows, prior, spec, (reference, photos, floor))
        curves |= found
        columns += images
    if args.plot:
        _plot(curves, args.plot)
    if args.images:
        grid = torch.stack(columns, dim=1).flatten(0, 1)  # rows: targets; columns: methods
        save_image(grid.float() / 255, args.images, nrow=len(columns), padding=1)


def _compare(store, path, pooled, rows, prior, spec, real) -> dict:
    """Both methods on the targets at `path`; beside them, the real photos themselves (`real`:
    every photo's pre-logits, the targets' stored 64 px views, the targets' own Fréchet distance):
    the floor no image set of these targets can go below, but by chance."""
    reference, photos, floor = real
    backbone = recorded_backbone(dict(store.require(path).attrs))
    backbone.model.requires_grad_(False)
    distance = FeatureDistance(backbone)
    maps = torch.from_numpy(store.read_rows(path, list(rows))[:, 0]).float()
    targets = maps.mean(dim=(2, 3)) if pooled else maps
    keys = [str(k) for k in store.samples()["key"][rows]]
    seeds = [image_seed(spec["seed"], key, 0, 0) for key in keys]
    start = time.perf_counter()
    guided = decode(prior, distance, targets, seeds, {**spec, "pooled": pooled}, progress=True)
    guided_s = time.perf_counter() - start
    with torch.no_grad():
        guided_images = to_images(prior.to_image(guided.x0))
    start = time.perf_counter()
    shape = tuple(guided_images.shape[1:])
    priors = PixelPriors.from_config(spec["pixelopt"])
    optimised = pixel_optimise(distance, targets, guided.passes, shape, seeded(seeds), priors)
    pixel_s = time.perf_counter() - start
    optimised_images = to_images(optimised.x0)
    originals, _ = original_inputs(backbone, store, list(rows), [0] * len(rows))
    pre_logits = recorded_backbone(dict(store.require(PRE_LOGITS).attrs))
    kind = f"{path.split('/')[-1]}{' pooled' if pooled else ''}"
    passes = guided.passes.float()
    print(f"\n{kind}: {len(rows)} targets, passes per image mean {passes.mean():.0f} "
          f"(min {passes.min():.0f}, max {passes.max():.0f})")  # fmt: skip
    print(f"{'method':10s} {'cosine':>7s} {'top-1':>6s} {'Fréchet':>8s} {'s/image':>8s}")
    print(f"{'photo':10s} {1:7.3f} {1:6.3f} {floor:8.1f} {'-':>8s}   (the target's own view)")
    for name, images, seconds in (("photo@64", photos, None), ("guided", guided_images, guided_s),
                                  ("pixelopt", optimised_images, pixel_s)):  # fmt: skip
        made = reextract(backbone, images)
        made = made.mean(dim=(2, 3)) if pooled else made
        cosine = metrics.flat_cosine(made, targets).mean().item()
        logits = classify(backbone, inputs(backbone, images))
        top1 = metrics.topk_agreement(classify(backbone, originals), logits, 1).mean().item()
        fd = metrics.frechet_distance(reference, metrics.pooled(reextract(pre_logits, images)))
        per_image = "-" if seconds is None else f"{seconds / len(rows):.2f}"
        print(f"{name:10s} {cosine:7.3f} {top1:6.3f} {fd:8.1f} {per_image:>8s}")
    curves = {f"{kind} guided": guided.trace, f"{kind} pixelopt": optimised.trace}
    print("cosine within a budget of passes (mean over targets; as the decoder measures it):")
    print("  passes   " + " ".join(f"{b:>6d}" for b in BUDGETS))
    for name, trace in curves.items():
        print(f"  {name.split()[-1]:8s} " + " ".join(f"{v:6.3f}" for v in _curve(trace, BUDGETS)))
    return curves, [guided_images, optimised_images]


def _curve(trace: list[list[float]], budgets) -> list[float]:
    """Mean over targets of the best cosine reached within each budget (the last one if the
    target stopped earlier)."""
    return [float(np.mean([t[min(b, len(t)) - 1] for t in trace])) for b in budgets]


def _pooled_real(store, rows=None) -> torch.Tensor:
    """The pre-logits (view 0) of every valid photo of the store, the real images' set, or of
    `rows`."""
    rows = np.flatnonzero(store.samples()["valid"]) if rows is None else rows
    maps = torch.from_numpy(store.read_rows(PRE_LOGITS, list(rows))[:, 0]).float()
    return metrics.pooled(maps)


def _plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, trace in curves.items():  # up to the most passes any target took
        longest = max(map(len, trace))
        budgets = [b for b in np.unique(np.geomspace(1, longest, 40).astype(int))]
        axis.plot(budgets, _curve(trace, budgets), label=name, ls="-" if "guided" in name else "--")
    axis.set_xscale("log")
    axis.set_xlabel("passes per image (backbone gradient evaluations)")
    axis.set_ylabel("feature cosine to the target")
    axis.axhline(0.92, color="grey", lw=0.8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
