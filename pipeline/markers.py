"""Snakemake's markers under work_dir, checked against the store they describe.

The store is the authority.  Markers (plan.json, shards/<group>/<first>-<last>.json,
finalized-*.json) that describe a store that is gone (deleted, its bucket emptied) or was replaced
by another one (another `store_id`) are stale: Snakemake would answer "Nothing to be done" and
leave no store.
Removing them makes the run rebuild the store; shards a replacing store has committed are kept
(resume is the store's).  One small read: the root's zarr.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import fsspec

from pipeline.endpoints import unreachable_message
from storage_specs.layout import StoreError


def root_attrs(url: str) -> dict | None:
    """The root attributes of the store at `url`, None when there is no featinv store there."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/zarr.json"))
    except FileNotFoundError:
        return None
    except Exception as exc:
        message = unreachable_message(exc)
        if message is None:
            raise
        raise StoreError(f"cannot check store {url}: {message}") from None
    attrs = meta.get("attributes", {})
    return attrs if "featinv_spec" in attrs else None


def stale_reason(work: Path, url: str) -> str | None:
    """Why the markers under `work` no longer describe the store at `url`; None when they do, or
    when there are none."""
    plan = work / "plan.json"
    if not plan.exists():
        return None
    attrs = root_attrs(url)
    if attrs is None:
        return f"store {url} is gone"
    planned = json.loads(plan.read_text())
    recorded = planned.get("store_id")  # None: markers older than store_id
    if recorded is not None and recorded != attrs.get("store_id"):
        return f"store {url} was replaced by another one"
    if "shard_size" not in planned:  # jobs were runs of 8 shards, now of about JOB_SAMPLES samples
        return f"the markers of store {url} come from an older featinv"
    return None


def remove_markers(work: Path) -> None:
    (work / "plan.json").unlink(missing_ok=True)
    shutil.rmtree(work / "shards", ignore_errors=True)
    for marker in work.glob("finalized-*.json"):
        marker.unlink()


def check_markers(work: Path, url: str, dry_run: bool = False) -> None:
    """Remove stale markers (a dry run only says so), with one line saying why."""
    reason = stale_reason(work, url)
    if reason is None:
        return
    if dry_run:
        print(f"featinv: {reason}; a run (not a dry run) rebuilds it", file=sys.stderr)
        return
    remove_markers(work)
    print(
        f"featinv: {reason}; its markers in {work} are removed and it is rebuilt", file=sys.stderr
    )


def finalized_markers(work: Path) -> dict[str, int]:
    """The finishing stages' markers and their mtimes: compared before and after a run, they say
    whether the run finished a stage (and so should print the store's summary)."""
    return {marker.name: marker.stat().st_mtime_ns for marker in work.glob("finalized-*.json")}
