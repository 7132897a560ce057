"""Sampling throughput per scheduler and step count, against the feature cosine it reaches.

Subject: `sampling.evaluate.steps_sweep`, the evaluation's own sweep: a trained model's images of
held-out feature maps (one per map, recorded seeds, guidance as FeatInv), timed on sampling alone,
then re-extracted with the store's backbone and compared with the stored maps (flattened cosine).

Baseline: FeatInv's setting, DDIM with 50 steps, measured in the same run; every point reports
its images/s as a ratio to that (these machines are noisy: ratios hold, absolute times do not),
and its cosine next to DDIM-50's.  Each point is run `--repeats` times, alternating, and the median
speed kept.

Usage: `.venv/bin/python benchmarks/sampling_throughput.py [--model models/demo]
[--store stores/demo.zarr] [--maps 16] [--steps 5 10 20 50] [--repeats 3]`
(after `make demo`, which trains models/demo on stores/demo.zarr).
"""

from __future__ import annotations

import argparse
import statistics

from sampling.evaluate import steps_sweep
from sampling.reconstruct import Reconstructor
from sampling.reextract import recorded_backbone
from sampling.sample import image_seed
from storage_specs.datasets import PairDataset
from training.data import open_training_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo")
    parser.add_argument("--store", default="stores/demo.zarr")
    parser.add_argument("--maps", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--schedulers", nargs="+", default=["ddim", "dpm++", "unipc"])
    parser.add_argument("--guidance", type=float, default=1.75)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = Reconstructor.load(args.model)
    data = open_training_data(args.store, model.record["training"])
    rows = data.heldout_rows if len(data.heldout_rows) else data.train_rows
    held = PairDataset(data.url, {"features": data.arrays["features"]}, rows[: args.maps], [0])
    batch = held.read_batch(range(len(held)))
    seeds = [image_seed(0, key, 0, 0) for key in batch["key"]]
    backbone = recorded_backbone(model.record["store"]["features"])
    points = [("ddim", 50)] + [(s, k) for s in args.schedulers for k in args.steps
                               if (s, k) != ("ddim", 50)]  # fmt: skip
    runs = [steps_sweep(model, backbone, batch["features"], seeds, points, args.guidance)
            for _ in range(args.repeats)]  # fmt: skip
    speed = {p: statistics.median(r[i]["images_per_s"] for r in runs) for i, p in enumerate(points)}
    cosine = {p: runs[0][i]["cosine"] for i, p in enumerate(points)}
    base = ("ddim", 50)
    print(f"{len(batch['key'])} held-out {model.features_path} maps, model {args.model} "
          f"({model.mode}), guidance {args.guidance}, median of {args.repeats}")  # fmt: skip
    print(f"{'scheduler':10s} {'steps':>5s} {'images/s':>9s} {'x DDIM-50':>9s} {'cosine':>7s}")
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        print(f"{point[0]:10s} {point[1]:5d} {speed[point]:9.2f} "
              f"{speed[point] / speed[base]:9.2f} {cosine[point]:7.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
