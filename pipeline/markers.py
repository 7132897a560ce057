"""Snakemake's markers under work_dir, checked against the store they describe.

The store is the authority.  Markers (plan.json, shards/<group>/<first>-<last>.json,
finalized-*.json) that describe a store that is gone (deleted, its bucket emptied) or was replaced
by another one (another `store_id`) are stale: Snakemake would answer "Nothing to be done" and
leave no store.
Removing them makes the run rebuild the store; shards a replacing store has committed are kept
(resume is the store's).  Markers ahead of their store (a store put back from an older copy, a
commit record deleted, `featinv validate --repair`) are removed one by one: the run redoes those
jobs and the finishing.  Small reads: the root's zarr.json and one listing of commits per group.
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
        raise _one_line(url, exc) from None
    attrs = meta.get("attributes", {})
    return attrs if "featinv_spec" in attrs else None


def _one_line(url: str, exc: Exception) -> Exception:
    message = unreachable_message(exc)
    return exc if message is None else StoreError(f"cannot check store {url}: {message}")


def stale_reason(work: Path, url: str) -> str | None:
    """Why the markers under `work` no longer describe the store at `url`; None when they do, or
    when there are none."""
    if not (work / "plan.json").exists():
        return None
    return _stale(work, url, root_attrs(url))


def _stale(work: Path, url: str, attrs: dict | None) -> str | None:
    if attrs is None:
        return f"store {url} is gone"
    planned = json.loads((work / "plan.json").read_text())
    recorded = planned.get("store_id")  # None: markers older than store_id
    if recorded is not None and recorded != attrs.get("store_id"):
        return f"store {url} was replaced by another one"
    if "shard_size" not in planned:  # jobs were runs of 8 shards, now of about JOB_SAMPLES samples
        return f"the markers of store {url} come from an older featinv"
    return None


def ahead_of_store(work: Path, url: str, attrs: dict) -> tuple[list[Path], str] | None:
    """The markers of jobs and finishing steps the store at `url` (root attributes `attrs`) does
    not have (its commits, its summary), and why; None when the store has them all. For markers
    that are not stale (`stale_reason`)."""
    plan = json.loads((work / "plan.json").read_text())
    committed = _committed_shards(url, list(plan["groups"]))
    behind = [marker for marker in sorted(work.glob("shards/*/*.json"))
              if not _shards_of(marker) <= committed.get(marker.parent.name, set())]  # fmt: skip
    summary = attrs.get("summary")
    redo = {marker.parent.name for marker in behind}
    finalized = [marker for marker in sorted(work.glob("finalized-*.json"))
                 if summary is None or (redo | set(summary["pending_groups"]))
                 & set(plan["stages"][marker.stem.removeprefix("finalized-")])]  # fmt: skip
    if not behind and not finalized:
        return None
    what = f"{len(behind)} job(s) of shards" if behind else "the finishing"
    return behind + finalized, f"store {url} lacks {what} its markers in {work} record"


def _shards_of(marker: Path) -> set[int]:
    first, last = marker.stem.split("-")
    return set(range(int(first), int(last) + 1))


def _committed_shards(url: str, groups: list[str]) -> dict[str, set[int]]:
    """The shards each group has committed: commits/<group>/<shard>/zarr.json, one listing each."""
    fs, path = fsspec.core.url_to_fs(url)
    committed = {}
    for group in groups:
        try:
            records = fs.glob(f"{path.rstrip('/')}/commits/{group}/*/zarr.json")
        except Exception as exc:
            raise _one_line(url, exc) from None
        committed[group] = {int(record.split("/")[-2]) for record in records}
    return committed


def remove_markers(work: Path) -> None:
    (work / "plan.json").unlink(missing_ok=True)
    shutil.rmtree(work / "shards", ignore_errors=True)
    for marker in work.glob("finalized-*.json"):
        marker.unlink()


def check_markers(work: Path, url: str, dry_run: bool = False) -> None:
    """Remove stale markers, or those ahead of the store (a dry run only says so), with one line
    saying why."""
    if not (work / "plan.json").exists():
        return
    attrs = root_attrs(url)  # read once for both checks
    reason = _stale(work, url, attrs)
    if reason is None:
        _remove_ahead(work, url, attrs, dry_run)
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


def _remove_ahead(work: Path, url: str, attrs: dict, dry_run: bool) -> None:
    found = ahead_of_store(work, url, attrs)
    if found is None:
        return
    markers, reason = found
    if dry_run:
        print(f"featinv: {reason}; a run (not a dry run) redoes them", file=sys.stderr)
        return
    for marker in markers:
        marker.unlink()
    print(f"featinv: {reason}; those markers are removed and the run redoes them", file=sys.stderr)
