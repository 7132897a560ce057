"""Per-rank read throughput of the trainer's data path, with 1, 2 and 4 ranks reading at once.

Each rank is a process that builds its loader as `training.train.train` does for its rank (the
config's `training` section: `open_training_data`, `TrainingData.dataset`, `EpochBatches` with
its rank and the world size, `make_loader` with the spec's workers and read-ahead) and takes its
batches without training: how fast one rank can be fed, and whether ranks slow each other down.
The ranks of one world start together (a barrier after start-up) and each reads `--batches`
batches of its own slice of every global batch; the first (worker start-up) is not timed.
Worlds alternate within each repeat, in reversed order every other repeat, so that load from
other processes hits them alike; reported: samples/s per rank, their sum, and both over the
single process's rate of the same repeat (medians over repeats).

Also counted, in this process: the reader's requests and bytes per batch on rank 0's first
batches of a world of one (`record.counted_requests`), what S3 request rates scale with.

    .venv/bin/python benchmarks/rank_read_throughput.py [--config config/config.yaml]
        [--target latents/vae] [--worlds 1 2 4] [--batches 400] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Iterable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import torch
import yaml
from record import counted_requests, write_result

from pipeline.config import validate_config
from storage_specs.reader import FeatureStore
from training.data import EpochBatches, Position, open_training_data
from training.train import make_loader

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def sampler(n_items: int, spec: dict, rank: int, world: int, count: int) -> EpochBatches:
    """Rank `rank`'s batches from the start of the run, as the trainer draws them."""
    return EpochBatches(n_items, spec["batch_size"], world, rank, spec["seed"], Position(), count)


def read_as_rank(url: str, spec: dict, rank: int, world: int, batches: int, barrier: Barrier,
                 out: Queue) -> None:  # fmt: skip
    """One rank: its loader, then samples/s over its batches after the first (put on `out`)."""
    dataset = open_training_data(url, spec).dataset()
    loader = make_loader(dataset, sampler(len(dataset), spec, rank, world, batches + 1), spec,
                         torch.device("cpu"))  # fmt: skip
    barrier.wait()
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    n = sum(len(batch["key"]) for batch in iterator)
    out.put((rank, n / (time.perf_counter() - start)))


def run_world(url: str, spec: dict, world: int, batches: int) -> list[float]:
    """Samples/s of each rank of a world of `world` processes reading side by side."""
    ctx = mp.get_context("fork")  # quick to start; each rank still opens the store itself
    barrier, out = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=read_as_rank, args=(url, spec, rank, world, batches, barrier, out))
             for rank in range(world)]  # fmt: skip
    for proc in procs:
        proc.start()
    rates = dict(out.get(timeout=600) for _ in procs)  # a rank that died: no endless wait
    for proc in procs:
        proc.join()
    return [rates[rank] for rank in range(world)]


def requests_per_batch(url: str, spec: dict, batches: int = 20) -> dict[str, dict]:
    """The reader's requests and bytes per batch on rank 0's first batches (cold index cache)."""
    dataset = open_training_data(url, spec).dataset()
    with counted_requests() as requests:
        for batch in sampler(len(dataset), spec, 0, 1, batches):
            dataset[batch]
    return requests.per_batch(batches)


def stored_bytes_per_item(url: str, paths: Iterable[str]) -> dict[str, float]:
    """Mean stored bytes of one (sample, view) chunk per array: what a rank decodes per pair."""
    store = FeatureStore(url)
    info, views = store.describe(), store.root.attrs["views"]["count"]
    return {
        path: info["arrays"][path]["stored_bytes"] / (info["n_valid"] * views) for path in paths
    }


def summarise(rows: list[dict[int, list[float]]]) -> dict[str, dict]:
    """Per world: each rank's and the total samples/s, and both over the single process's rate
    of the same repeat (medians over repeats)."""
    out = {}
    for world in rows[0]:
        ranks = [statistics.median(row[world][r] for row in rows) for r in range(world)]
        out[str(world)] = {
            "per_rank_samples_s": ranks,
            "total_samples_s": statistics.median(sum(row[world]) for row in rows),
            "per_rank_over_single": statistics.median(
                statistics.mean(row[world]) / row[1][0] for row in rows
            ),
            "total_over_single": statistics.median(sum(row[world]) / row[1][0] for row in rows),
            "repeats": [row[world] for row in rows],
        }
    return out


def print_results(results: dict[str, dict], requests: dict[str, dict], batch_size: int) -> None:
    """Rates per world side by side (the machine is noisy: ratios mean more than rates)."""
    print(f"{'world':>5} {'samples/s per rank (median)':<30} {'total':>7} "
          f"{'per rank/single':>15} {'total/single':>12}")  # fmt: skip
    for world, row in results.items():
        ranks = " ".join(f"{r:.0f}" for r in row["per_rank_samples_s"])
        ratios = f"{row['per_rank_over_single']:>14.2f}x {row['total_over_single']:>11.2f}x"
        print(f"{world:>5} {ranks:<30} {row['total_samples_s']:>7.0f} {ratios}")
    print(f"requests per batch of {batch_size} (rank 0 of 1, counted in this process):")
    for path, r in requests.items():
        size = f"{r['bytes_per_request'] / 1e3:6.1f} kB"
        print(f"  {path:<40} {r['requests_per_batch']:6.2f} requests of {size}; "
              f"{r['index_requests']} index reads")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--features", help="default: the config's training.features")
    parser.add_argument("--target", default="latents/vae", help="a feature + latent pair")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, default=400, help="timed batches per rank")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    config = validate_config(yaml.safe_load(args.config.read_text()))
    spec = {**config["training"], "target": args.target}
    spec["features"] = args.features or spec["features"]
    url, worlds = config["store"], sorted({1, *args.worlds})
    data = open_training_data(url, spec)
    loader = {k: spec[k] for k in ("batch_size", "num_workers", "prefetch_factor")}
    settings = {"store": url, "arrays": data.arrays, "n_items": len(data.dataset()),
                "stored_bytes_per_item": stored_bytes_per_item(url, data.arrays.values()),
                "shard_size": FeatureStore(url).shard_size, **loader}  # fmt: skip
    print(f"{url}: {' + '.join(data.arrays.values())}, {settings['n_items']} training pairs")
    print(f"  batch {spec['batch_size']} per rank, {spec['num_workers']} reader worker(s) per "
          f"rank (prefetch {spec['prefetch_factor']}), {args.batches} timed batches per rank, "
          f"{args.repeats} repeats, {mp.cpu_count()} CPUs")  # fmt: skip
    rows = []
    for rep in range(args.repeats):
        order = worlds if rep % 2 == 0 else worlds[::-1]
        rows.append({world: run_world(url, spec, world, args.batches) for world in order})
        rates = [f"world {w}: " + " ".join(f"{r:.0f}" for r in rows[-1][w]) for w in worlds]
        print(f"repeat {rep}: " + " | ".join(rates))
    results, requests = summarise(rows), requests_per_batch(url, spec)
    print_results(results, requests, spec["batch_size"])
    write_result(args.json, "rank_read_throughput",
                 {**settings, "worlds": results, "requests": requests})  # fmt: skip


if __name__ == "__main__":
    main()
