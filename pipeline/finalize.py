"""Finalise a store once every shard is committed.

Gathers the per-shard commit records into `samples/` (sizes, validity, skip reasons), validates
every chunk, then marks the store complete and writes consolidated metadata (last, so no reader
ever sees a stale consolidated view).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import zarr

from storage_specs.layout import StoreError, n_shards, open_root, read_commit
from storage_specs.validate import validate_store


def _gather(root: zarr.Group) -> dict[str, np.ndarray]:
    """Per-sample fields from the commit records; a sample is valid only if every group used it."""
    n, shard_size = root.attrs["n_samples"], root.attrs["shard_size"]
    fields = {
        "height": np.zeros(n, "int32"),
        "width": np.zeros(n, "int32"),
        "valid": np.ones(n, bool),
        "error": np.full(n, "", dtype=object),
    }
    missing = []
    for group in root.attrs["groups"]:
        for shard in range(n_shards(n, shard_size)):
            record = read_commit(root, group, shard)
            if record is None:
                missing.append(f"{group}/{shard}")
                continue
            rows = slice(record["start"], record["stop"])
            errors = np.asarray(record["error"], dtype=object)
            fields["valid"][rows] &= errors == ""
            fields["error"][rows] = np.where(
                fields["error"][rows] == "", errors, fields["error"][rows]
            )
            fields["height"][rows] = record["height"]
            fields["width"][rows] = record["width"]
    if missing:
        raise StoreError(f"{len(missing)} shard(s) not committed yet: {', '.join(missing[:10])}")
    return fields


def skip_reasons(errors: np.ndarray) -> dict[str, int]:
    """Skip counts by kind of reason (the text before the first colon)."""
    return dict(Counter(str(e).split(":")[0] for e in errors if e))


def finalize_store(url: str, progress: bool = True) -> dict:
    """Write `samples/`, validate, mark complete, consolidate; returns the store's summary attrs."""
    root = open_root(url, mode="r+")
    fields = _gather(root)
    for name, values in fields.items():
        root[f"samples/{name}"][:] = values
    problems = validate_store(url, require_complete=False, progress=progress)
    if problems:
        raise StoreError("store failed validation:\n  " + "\n  ".join(problems))
    summary = {
        "n_valid": int(fields["valid"].sum()),
        "n_skipped": int((~fields["valid"]).sum()),
        "skip_reasons": skip_reasons(fields["error"]),
    }
    root.attrs.update({"summary": summary, "complete": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is a zarr-python extension
        zarr.consolidate_metadata(url, zarr_format=3)
    return summary
