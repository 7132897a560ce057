"""What the benchmarks share to leave their measurements machine-readable (`--json PATH`).

docs/scaling.md is computed from these files (`benchmarks/scaling.py`), never typed in, so each
file says what made it: the command line, the date, the machine and the package versions.
Imported by the scripts of this folder as `record` (a script's folder is first on `sys.path`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage_specs.chunks import ChunkReader
from storage_specs.provenance import provenance


def write_result(path: str | None, benchmark: str, results: dict) -> None:
    """`results` under a header naming the run, at `path` (nothing without `--json`)."""
    if path is None:
        return
    run = provenance({})
    header = {
        "benchmark": benchmark,
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "date": run["created"],
        "machine": {"cpus": os.cpu_count(), "python": run["python"], **run["packages"]},
        "git_revision": run["git_revision"],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**header, "results": results}, indent=1) + "\n")
    print(f"results written to {path}")


@contextmanager
def counted_requests() -> Iterator[Counter]:
    """Count the shard reader's object requests and bytes in this process while the block runs.

    Object stores bill and throttle per request, so what scales a trainer's load on S3 is the
    requests per batch (one per run of nearby chunks of a shard, plus each shard index once per
    process), not the bytes alone.  Keys: `<array path>:index|chunks` -> requests, and the same
    with `:bytes` appended -> bytes received.
    """
    original = ChunkReader._get
    counts: Counter = Counter()

    async def counting(self: ChunkReader, shard: int, start: int, stop: int | None) -> bytes:
        data = await original(self, shard, start, stop)
        key = f"{self.arr.path}:{'index' if stop is None else 'chunks'}"
        counts[key] += 1
        counts[f"{key}:bytes"] += len(data)
        return data

    ChunkReader._get = counting
    try:
        yield counts
    finally:
        ChunkReader._get = original
