"""How a stage's shards are cut into jobs: one Snakemake `extract_shard` job (and one marker in
work_dir) per run of shards of a group.  Light on purpose: Snakemake's own process imports it to
name the markers of a plan, and should not pay for torch and timm to do so."""

from __future__ import annotations

from itertools import pairwise

JOB_SAMPLES = 2048  # per extraction job, about (Snakemake rule extract_shard, run_all)


def shard_batches(n_shards: int, shard_size: int) -> list[tuple[int, int]]:
    """The shards of a group as contiguous (first, last) runs, one job each: as few jobs as
    JOB_SAMPLES per job allows (at least a shard each), of near-equal sizes; the same for a
    given store on every run.  A job's own costs (process and model start, decode workers, the
    first pass over fresh memory: about half a second here) vanish in a job of this size,
    whatever the shard size; each shard still commits on its own."""
    per_job = max(1, JOB_SAMPLES // shard_size)
    jobs = -(-n_shards // per_job)
    bounds = [job * n_shards // jobs for job in range(jobs + 1)]
    return [(first, stop - 1) for first, stop in pairwise(bounds)]
