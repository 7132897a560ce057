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
from dataclasses import dataclass, field
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
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": run["python"],
            **run["packages"],
        },
        "git_revision": run["git_revision"],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**header, "results": results}, indent=1) + "\n")
    print(f"results written to {path}")


@dataclass
class Requests:
    """The shard reader's object requests and bytes received, per (array path, kind): `index` (a
    shard index, once per shard and process) or `chunks` (a run of nearby chunks of one shard)."""

    counts: Counter = field(default_factory=Counter)
    nbytes: Counter = field(default_factory=Counter)

    def per_batch(self, batches: int) -> dict[str, dict]:
        """Per array: chunk requests and bytes per batch, bytes per request, index requests."""
        out = {}
        for path in sorted({path for path, _ in self.counts}):
            n, nbytes = self.counts[path, "chunks"], self.nbytes[path, "chunks"]
            out[path] = {
                "requests_per_batch": n / batches,
                "bytes_per_batch": nbytes / batches,
                "bytes_per_request": nbytes / max(n, 1),
                "index_requests": self.counts[path, "index"],
            }
        return out


@contextmanager
def counted_requests() -> Iterator[Requests]:
    """Count the shard reader's requests in this process while the block runs.

    Object stores bill and throttle per request, so what scales a trainer's load on S3 is the
    requests per batch, not the bytes alone.
    """
    original = ChunkReader._read_ranges
    requests = Requests()

    def counting(self: ChunkReader, ranges: list) -> list[bytes]:
        blobs = original(self, ranges)
        for (_, _, stop), data in zip(ranges, blobs, strict=True):
            key = (self.arr.path, "index" if stop is None else "chunks")
            requests.counts[key] += 1
            requests.nbytes[key] += len(data)
        return blobs

    ChunkReader._read_ranges = counting
    try:
        yield requests
    finally:
        ChunkReader._read_ranges = original
