"""The whole workflow in one process, without Snakemake: plan, extract every shard of every group,
finalize.  For notebooks, tests and benchmarks on small collections; Snakemake runs the same
functions as separate, resumable, parallel jobs (the same runs of shards per job:
`shard_batches`)."""

from __future__ import annotations

from pipeline.extract import extract_shards
from pipeline.finalize import finalize_store
from pipeline.jobs import shard_batches
from pipeline.plan import plan_store


def run_all(config: dict, progress: bool = False) -> str:
    """Build (or resume) the store of a validated `config`; returns its URL."""
    plan = plan_store(config)
    for group in plan["groups"]:
        for first, last in shard_batches(plan["n_shards"], plan["shard_size"]):
            extract_shards(config, group, range(first, last + 1), progress=progress)
    finalize_store(config["store"], progress=progress)
    return config["store"]
