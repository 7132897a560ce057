"""How much a forward pass on one core slows down while a decode worker keeps another core busy.

The extraction stage hides decoding and compression on the cores the forward pass leaves idle;
that is free only where those cores are really independent. On a VM whose virtual CPUs share a
physical core (or a host that shares them out) it is not, and no pipeline can reach the bare
forward there. Subject: ``Backbone.encode`` of one batch on core 0 while a child process on core 1
decodes and prepares the demo photos in a loop, as an extraction job's decode worker does
(``pipeline.extract.prepare``). Baseline: the same passes with core 1 idle. Alternating, in one
process; prints the per-pair ratio alone / beside the decoder.

The child is forked once and paused between pairs (an event): forking shares the parent's memory
copy-on-write, so the parent's first pass after a fork faults in every page it writes (85,000
pages, about 0.3 s per pass here), which a fork per pair would count as interference.

Usage: ``.venv/bin/python benchmarks/core_interference.py [--pairs 6] [--passes 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import torch

from pipeline.backbones import BackboneSpec, load_backbone
from pipeline.decode import ImageLimits
from pipeline.demo import IMAGE_SUFFIXES, TRUNCATED, build_demo_images
from pipeline.extract import prepare
from pipeline.memory import retain_freed_memory
from pipeline.views import ViewSpec


def decode_forever(photos: list[Path], core: int, busy: Event) -> None:
    """A decode worker's work on `core` while `busy` is set, until killed."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    backbone = load_backbone(BackboneSpec("efficientnet_lite0", "random", ("blocks.3",)))
    views, limits = ViewSpec(count=2), ImageLimits()
    files = [(p.name, p.read_bytes()) for p in photos]
    while True:
        for key, data in files:
            busy.wait()
            prepare(data, key, {"b": backbone.prepare}, views, limits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if os.cpu_count() < args.threads + 1:
        raise SystemExit(f"needs {args.threads + 1} cores, this machine has {os.cpu_count()}")
    retain_freed_memory()
    os.sched_setaffinity(0, set(range(args.threads)))
    torch.set_num_threads(args.threads)
    spec = BackboneSpec("efficientnet_lite0", "random", ("blocks.3", "blocks.5", "bn2"))
    backbone = load_backbone(spec)
    x = torch.randn(32, 3, *backbone.input_hw)
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_images(tmp)
        photos = sorted(p for p in Path(tmp).glob("*/*")
                        if p.suffix in IMAGE_SUFFIXES and p.name != TRUNCATED[1])  # fmt: skip

        def seconds() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for _ in range(args.passes):
                    backbone.encode(x)
            return time.perf_counter() - start

        context = multiprocessing.get_context("fork")
        busy = context.Event()
        worker = context.Process(target=decode_forever, args=(photos, args.threads, busy),
                                 daemon=True)  # fmt: skip
        worker.start()
        seconds()  # warm-up, and the copy-on-write faults of the fork
        print(f"{'pair':>4} {'alone s':>8} {'beside decoder s':>17} {'alone/beside':>13}")
        ratios = []
        for pair in range(args.pairs):
            alone = seconds()
            busy.set()
            time.sleep(1.0)  # past its model build (first pair), decoding
            beside = seconds()
            busy.clear()
            time.sleep(0.1)  # its current photo is done
            ratios.append(alone / beside)
            print(f"{pair:>4} {alone:>8.2f} {beside:>17.2f} {alone / beside:>12.3f}x")
    worker.kill()
    print(f"median alone / beside the decoder: {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
