"""Finalise a store once the shards of the requested groups are committed.

Gathers the per-shard commit records into `samples/` (sizes, views, validity, skip reasons),
validates every chunk of the committed groups, computes per-channel statistics, then marks the
store complete if every planned group is in, and writes consolidated metadata (last, so no reader
ever sees a stale consolidated view; none in the groups above an array whose codec needs a plugin,
so plain zarr still opens the root: `layout.consolidate`).  Features and latents are finalised by
their own Snakemake stages; whichever finishes the store marks it complete.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import zarr

from storage_specs.layout import (
    StoreError,
    consolidate,
    n_shards,
    open_root,
    read_commit,
    stored_arrays,
)
from storage_specs.stats import channel_stats
from storage_specs.validate import validate_store


def committed_groups(root: zarr.Group) -> dict[str, list[dict | None]]:
    """Commit records per planned group, None where a shard is not committed."""
    count = n_shards(root.attrs["n_samples"], root.attrs["shard_size"])
    groups = root.attrs["groups"]
    return {g: [read_commit(root, g, shard) for shard in range(count)] for g in groups}


def _gather(root: zarr.Group, records: list[dict]) -> dict[str, np.ndarray]:
    """Per-sample fields; a sample is valid only if every group could use it."""
    n, k = root.attrs["n_samples"], root.attrs["views"]["count"]
    fields = {
        "height": np.zeros(n, "int32"),
        "width": np.zeros(n, "int32"),
        "valid": np.ones(n, bool),
        "error": np.full(n, "", dtype=object),
        "views": np.zeros((n, k, 5), "float32"),
    }
    seen = np.zeros(n, bool)
    for record in records:
        rows = np.arange(record["start"], record["stop"])
        errors = np.asarray(record["error"], dtype=object)
        fields["valid"][rows] &= errors == ""
        fields["error"][rows] = np.where(fields["error"][rows] == "", errors, fields["error"][rows])
        fields["height"][rows] = record["height"]
        fields["width"][rows] = record["width"]
        used, views = rows[errors == ""], np.asarray(record["views"], "float32")[errors == ""]
        known = seen[used]
        if not np.array_equal(fields["views"][used[known]], views[known]):
            raise StoreError(f"groups disagree on the views of rows {rows[0]}-{rows[-1]}")
        fields["views"][used], seen[used] = views, True
    return fields


def skip_reasons(errors: np.ndarray) -> dict[str, int]:
    """Skip counts by kind of reason (the text before the first colon)."""
    return dict(Counter(str(e).split(":")[0] for e in errors if e))


def finalize_store(url: str, groups: list[str] | None = None, progress: bool = True) -> dict:
    """Gather, validate and summarise the store; `groups` (default: all) must be committed."""
    root = open_root(url, mode="r+")
    commits = committed_groups(root)
    ready = [g for g, records in commits.items() if all(records)]
    missing = [
        f"{g}/{shard}"
        for g in (groups or list(commits))
        for shard, record in enumerate(commits[g])
        if record is None
    ]
    if missing:
        raise StoreError(f"{len(missing)} shard(s) not committed yet: {', '.join(missing[:10])}")
    fields = _gather(root, [record for g in ready for record in commits[g]])
    for name in ("height", "width", "valid", "error"):
        root[f"samples/{name}"][:] = fields[name]
    root["samples/view_box"][:] = fields["views"][..., :4]
    root["samples/view_hflip"][:] = fields["views"][..., 4] > 0
    problems = validate_store(url, require_complete=False, groups=ready, progress=progress)
    if problems:
        raise StoreError("store failed validation:\n  " + "\n  ".join(problems) + "\n"
                         f"`featinv validate --repair {url}` withdraws the commits of missing or "
                         "damaged shards; the next run redoes them")  # fmt: skip
    todo = [
        path
        for path in stored_arrays(root)
        if root[path].attrs["group"] in ready and "channel_stats" not in root[path].attrs
    ]
    for path, stats in channel_stats(url, todo, fields["valid"]).items():
        root[path].attrs["channel_stats"] = stats
    summary = {
        "n_valid": int(fields["valid"].sum()),
        "n_skipped": int((~fields["valid"]).sum()),
        "skip_reasons": skip_reasons(fields["error"]),
        "pending_groups": sorted(set(commits) - set(ready)),
    }
    root.attrs.update({"summary": summary, "complete": len(ready) == len(commits)})
    consolidate(url)
    return summary
