"""A backbone's forward passes with the extraction job's allocator setting against glibc's default.

Subject: ``pipeline.memory.retain_freed_memory()`` (what every extraction job calls first), then
``Backbone.encode`` on the same batch, again and again. Baseline: the same without that call.
glibc's setting is per process and cannot be put back exactly once changed, so each side runs in
a child process of its own, started alternately (subject, baseline, baseline, subject, ...) so
that drifting load hits both; each child builds the model, runs one untimed pass and times
``--passes`` more. Prints seconds per pass, minor page faults per pass and the median of the
per-pair ratios baseline time / subject time.

Usage: ``.venv/bin/python benchmarks/allocator.py [--backbone efficientnet_lite0]``
``[--layers blocks.3 blocks.5 bn2] [--batch 32] [--threads 1] [--pairs 4] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from record import write_result

from pipeline.backbones import BackboneSpec, load_backbone
from pipeline.memory import retain_freed_memory


def child(args: argparse.Namespace) -> None:
    """Time the passes of one side; print them as JSON."""
    if args.child == "retained" and not retain_freed_memory():
        raise SystemExit("retain_freed_memory: not glibc, nothing to compare")
    torch.set_num_threads(args.threads)
    spec = BackboneSpec(args.backbone, "random", tuple(args.layers))
    backbone = load_backbone(spec)
    x = torch.randn(args.batch, 3, *backbone.input_hw)
    times, faults = [], []
    with torch.inference_mode():
        for _ in range(args.passes + 1):
            start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            backbone.encode(x)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    print(json.dumps({"seconds": times[1:], "faults": faults[1:]}))


def run_side(side: str) -> dict:
    command = [sys.executable, __file__, "--child", side, *sys.argv[1:]]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.3", "blocks.5", "bn2"])
    parser.add_argument("--batch", type=int, default=32, help="inputs per pass (views x images)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=4, help="timed passes per child")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--json", help="also write the per-pair results to this file")
    parser.add_argument("--child", choices=["system", "retained"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"{args.backbone} {' '.join(args.layers)}: batch {args.batch}, threads {args.threads}")
    print(f"{'pair':>4} {'system s/pass':>14} {'retained s/pass':>16} {'faults/pass':>18}"
          f" {'ratio':>7}")  # fmt: skip
    pairs = []
    for pair in range(args.pairs):
        order = ["retained", "system"] if pair % 2 == 0 else ["system", "retained"]
        sides = {side: run_side(side) for side in order}
        seconds = {side: statistics.median(r["seconds"]) for side, r in sides.items()}
        faults = {side: statistics.median(r["faults"]) for side, r in sides.items()}
        ratio = seconds["system"] / seconds["retained"]
        pairs.append({"seconds": seconds, "faults": faults, "ratio": ratio})
        print(f"{pair:>4} {seconds['system']:>14.3f} {seconds['retained']:>16.3f}"
              f" {faults['system']:>8.0f} / {faults['retained']:<7.0f} {ratio:>6.2f}x")  # fmt: skip
    median = statistics.median(p["ratio"] for p in pairs)
    print(f"median of per-pair system / retained time: {median:.2f}x")
    write_result(args.json, "allocator", {"args": vars(args), "pairs": pairs})


if __name__ == "__main__":
    main()
