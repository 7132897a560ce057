"""Check a store against SPEC.md: metadata, shapes, commits, every checksum, finite values.

Returns problems instead of raising on the first one, so a user sees everything that is wrong with
a store in one run; each problem names the array and shard it concerns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

import fsspec
import jsonschema
import numpy as np
import zarr

from storage_specs.codecs import measured_error
from storage_specs.compute import open_array, run_tasks
from storage_specs.layout import (
    SAMPLE_FIELDS,
    VIEW_FIELDS,
    StoreError,
    array_chunks,
    array_dims,
    commit_path,
    consolidate,
    is_lossy,
    n_shards,
    open_root,
    read_commit,
    reference_path,
    shard_exists,
    shard_range,
    spec_mismatch,
    stored_arrays,
)
from storage_specs.provenance import redact_url

if TYPE_CHECKING:
    from distributed import Client


def load_schema() -> dict:
    return json.loads((resources.files("storage_specs") / "store.schema.json").read_text())


class Problem(str):
    """One line of `validate_store`'s answer. A damaged shard of an array, or an array whose folder
    is gone (`shard` None, with the `group` that committed it), also says so in fields:
    `withdraw_damaged` acts on those, not on the wording."""

    array: str | None = None
    shard: int | None = None
    group: str | None = None

    @classmethod
    def of(cls, text: str, array: str, shard: int | None = None, group: str | None = None):
        problem = cls(text)
        problem.array, problem.shard, problem.group = array, shard, group
        return problem


def _schema_problems(attrs: dict, definition: str, where: str) -> list[str]:
    schema = load_schema()
    validator = jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{definition}"})
    return [
        f"{where}: attribute {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(dict(attrs))
    ]


def validate_store(
    url: str,
    check_data: bool = True,
    progress: bool = False,
    require_complete: bool = True,
    groups: list[str] | None = None,
    client: Client | None = None,
) -> list[str]:
    """Every problem found in the store at `url`; empty when it conforms to the spec.

    The finalising step validates before it marks the store complete (`require_complete=False`),
    and only the groups whose shards are all committed (`groups`).  The shards are read where
    `client`'s dask workers run (default: threads here).
    """
    try:
        root = open_root(url, consolidated=False)  # the objects, not a snapshot of them
    except StoreError as exc:
        return [str(exc)]
    mismatch = spec_mismatch(url, root.attrs.get("featinv_spec"))
    if mismatch:
        return [mismatch]
    problems = _schema_problems(root.attrs, "root", "root")
    if problems:
        return problems
    unfinished = require_complete and not root.attrs["complete"]
    if unfinished:
        problems.append("root: store is not complete; run the pipeline to the end")
    groups = list(root.attrs["groups"]) if groups is None else groups
    problems += _sample_problems(root, gathered=not unfinished)
    arrays = [p for p in stored_arrays(root) if root[p].attrs.get("group") in groups]
    problems += [p for path in arrays for p in _array_problems(root, path)]
    problems += _commit_problems(root, arrays, groups)
    if check_data and not problems:
        problems += _data_problems(url, root, arrays, progress, client)
        problems += _lossy_problems(url)
    return problems


class Stages(NamedTuple):
    """A store finished for some stages while others wait: `features` (backbones), `latents`
    (targets); `groups` are the finished groups, which validate like a complete store."""

    finished: list[str]
    pending: list[str]
    groups: list[str]


def pending_stages(url: str) -> Stages | None:
    """The stages of a store whose finishing step left groups pending (its summary's
    `pending_groups`); None for a complete store, an unfinished one, or no store."""
    try:
        root = open_root(url, consolidated=False)
    except StoreError:
        return None
    waiting = set(root.attrs.get("summary", {}).get("pending_groups", []))
    if root.attrs.get("complete") or not waiting:
        return None
    groups: dict[str, set[str]] = {}
    for path in stored_arrays(root):
        stage = "features" if path.split("/")[0] in ("features", "prefix_tokens") else "latents"
        groups.setdefault(stage, set()).add(root[path].attrs["group"])
    pending = sorted(stage for stage, names in groups.items() if names & waiting)
    finished = sorted(set(groups) - set(pending))
    if not finished:
        return None
    return Stages(finished, pending, sorted(set(root.attrs["groups"]) - waiting))


def _sample_problems(root: zarr.Group, gathered: bool) -> list[str]:
    """`gathered`: finalize has filled valid and error (not so in a store said to be unfinished)."""
    if "samples" not in root:
        return ["samples: group missing"]
    problems = _schema_problems(root["samples"].attrs, "samples", "samples")
    n, k = root.attrs["n_samples"], root.attrs["views"]["count"]
    shapes = {**{f: (n,) for f in SAMPLE_FIELDS}, "view_box": (n, k, 4), "view_hflip": (n, k)}
    for field in SAMPLE_FIELDS + VIEW_FIELDS:
        path = f"samples/{field}"
        if path not in root:
            problems.append(f"{path}: array missing")
        elif root[path].shape != shapes[field]:
            problems.append(f"{path}: shape {root[path].shape}, expected {shapes[field]}")
    if not problems:
        valid, error = root["samples/valid"][:], root["samples/error"][:]
        if gathered and any(bool(v) == bool(e) for v, e in zip(valid, error, strict=True)):
            problems.append("samples/error: must be empty exactly for valid samples")
        if "sample" not in root or list(root["sample"][:]) != list(root["samples/key"][:]):
            problems.append("sample: the root coordinate must hold samples/key")
    return problems


def _array_problems(root: zarr.Group, path: str) -> list[str]:
    arr = root[path]
    kind = path.split("/")[0]
    problems = _schema_problems(arr.attrs, kind, path)
    dims = array_dims(kind, path.rsplit("/", 1)[1])
    n, shard_size = root.attrs["n_samples"], root.attrs["shard_size"]
    k = root.attrs["views"]["count"]
    if arr.shape[:2] != (n, k) or arr.ndim != len(dims):
        problems.append(f"{path}: shape {arr.shape} does not have {n} samples x {k} views, {dims}")
        return problems
    if tuple(arr.metadata.dimension_names or ()) != dims:
        problems.append(f"{path}: dimension_names {arr.metadata.dimension_names}, expected {dims}")
    shards = (shard_size, k, *arr.shape[2:])
    chunks = {array_chunks(kind, shards), (1, 1, *arr.shape[2:])}  # the latter: stores from spec 2
    if arr.shards != shards or arr.chunks not in chunks:
        problems.append(f"{path}: chunks {arr.chunks} / shards {arr.shards} break the layout")
    codecs = json.dumps(arr.metadata.to_dict()["codecs"])
    if '"crc32c"' not in codecs.split('"index_codecs"')[0]:
        problems.append(f"{path}: chunks carry no crc32c checksum")
    return problems


def _commit_problems(root: zarr.Group, arrays: list[str], groups: list[str]) -> list[str]:
    problems = []
    n, shard_size = root.attrs["n_samples"], root.attrs["shard_size"]
    for group in groups:
        expected = sorted(p for p in arrays if root[p].attrs["group"] == group)
        gone: set[str] = set()  # committed arrays the store no longer has (deleted folders)
        for shard in range(n_shards(n, shard_size)):
            record = read_commit(root, group, shard)
            where = f"commits/{group}/{shard:05d}"
            if record is None:
                problems.append(f"{where}: shard {shard} of group {group} is not committed")
                continue
            problems += _schema_problems(record, "commit", where)
            if (record.get("start"), record.get("stop")) != shard_range(shard, shard_size, n):
                problems.append(f"{where}: rows {record.get('start')}-{record.get('stop')} wrong")
            committed = record.get("arrays") or []
            gone |= set(committed) - set(expected)
            if sorted(set(committed) & set(expected)) != expected:
                problems.append(f"{where}: commits {committed}, expected {expected}")
        problems += [Problem.of(f"{path}: array missing (committed by group {group})", path,
                                group=group) for path in sorted(gone)]  # fmt: skip
    return problems


# Rounding of the storage dtype on top of a codec's bound (quantize bounds the error against the
# stored dtype; the reference is fp32).
DTYPE_SLACK = {"fp16": 2.0**-11, "fp32": 2.0**-24, "bf16": 2.0**-8}


def lossy_errors(url: str) -> dict[str, dict]:
    """Measured error of every lossy array against its stored exact samples, with its bound."""
    root = open_root(url, consolidated=False)
    report = {}
    for path in stored_arrays(root):
        arr = root[path]
        if not is_lossy(arr) or reference_path(path) not in root:
            continue
        reference = root[reference_path(path)]
        rows = reference.attrs["rows"]
        stored = np.stack([arr[row] for row in rows])
        flat = (-1, *arr.shape[2:])  # every (sample, view) is one sample for the error
        error = measured_error(reference[:].reshape(flat), stored.reshape(flat))
        compression = arr.attrs["compression"]
        if "rel_l2" in compression:
            limit, measured = compression["rel_l2"], error["rel_l2_max"]
        elif "keepbits" in compression:
            limit, measured = 2.0 ** -(compression["keepbits"] + 1), error["rel_l2_max"]
        else:
            limit = compression["max_abs"]
            measured = float(np.abs(reference[:].reshape(flat) - stored.reshape(flat)).max())
        limit += DTYPE_SLACK[arr.attrs["dtype"]]
        report[path] = {**error, "measured": measured, "limit": limit, "rows": rows}
    return report


def _lossy_problems(url: str) -> list[str]:
    return [
        f"{path}: measured error {e['measured']:.3g} exceeds the stated bound {e['limit']:.3g}"
        for path, e in lossy_errors(url).items()
        if e["measured"] > e["limit"]
    ]


def withdraw_damaged(url: str, problems: list[str]) -> list[str]:
    """Withdraw the commits of the shards that `problems` (`validate_store`'s) find missing,
    unreadable or not finite, and mark the store unfinished, so the next run of the pipeline
    redoes exactly those shards and the finishing (its markers follow the store). An array whose
    folder is gone gets its metadata back from the store's consolidated snapshot, and its group's
    commits are all withdrawn. Returns the withdrawn commit records."""
    root = open_root(url, mode="r+")
    n = n_shards(root.attrs["n_samples"], root.attrs["shard_size"])
    damaged = set()
    for problem in problems:
        if getattr(problem, "array", None) is None:
            continue
        if problem.shard is not None:
            damaged.add((root[problem.array].attrs["group"], problem.shard))
        else:
            restore_metadata(url, problem.array)
            damaged |= {(problem.group, shard) for shard in range(n)}
    withdrawn = sorted(commit_path(group, shard) for group, shard in damaged)
    withdrawn = [path for path in withdrawn if path in root]
    for path in withdrawn:
        del root[path]
    if withdrawn:
        root.attrs.update({"complete": False})
        if "summary" in root.attrs:
            del root.attrs["summary"]
        consolidate(url)  # readers of the snapshot see an unfinished store too
    return withdrawn


def restore_metadata(url: str, path: str) -> None:
    """Write back the zarr.json of `path` and of its missing parent groups, as the store's
    consolidated snapshot (the root's, or a group's above lossy arrays) recorded them."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    parts = path.split("/")
    recorded: dict[str, dict] = {}
    for depth in range(len(parts)):  # the snapshots of the root and of each group above `path`
        base = "/".join(parts[:depth])
        try:
            group = json.loads(fs.cat_file("/".join(filter(None, [root, base, "zarr.json"]))))
        except FileNotFoundError:
            continue
        snapshot = (group.get("consolidated_metadata") or {}).get("metadata") or {}
        recorded.update({f"{base}/{key}".lstrip("/"): doc for key, doc in snapshot.items()})
    if path not in recorded:
        raise StoreError(
            f"{redact_url(url)}: {path} is missing and no consolidated metadata of the store "
            "records it: it cannot be restored; rebuild the store"
        )
    for depth in range(1, len(parts) + 1):
        node = "/".join(parts[:depth])
        if not fs.exists(f"{root}/{node}/zarr.json"):
            doc = {key: value for key, value in recorded[node].items()
                   if key != "consolidated_metadata"}  # fmt: skip
            fs.makedirs(f"{root}/{node}", exist_ok=True)  # local folders; nothing on S3
            fs.pipe_file(f"{root}/{node}/zarr.json", json.dumps(doc, indent=2).encode())


def _shards(root: zarr.Group) -> Iterator[tuple[int, int, int]]:
    n, shard_size = root.attrs["n_samples"], root.attrs["shard_size"]
    for shard in range(n_shards(n, shard_size)):
        yield (shard, *shard_range(shard, shard_size, n))


def shard_problems(
    url: str, path: str, shard: int, start: int, stop: int, rows: np.ndarray
) -> list[str]:
    """One task: read one shard of one array (the codecs check the crc32c of each chunk and of the
    shard index) and check the values of its valid `rows` are finite."""
    arr = open_array(url, path)
    where = f"{path} shard {shard} (samples {start}-{stop - 1})"
    if not shard_exists(arr, shard):
        return [Problem.of(f"{where}: shard missing", path, shard)]
    try:
        data = arr[start:stop]
    except Exception as exc:  # codec errors: crc32c mismatch, blosc failure, bad index
        return [Problem.of(f"{where}: unreadable ({type(exc).__name__}: {exc})", path, shard)]
    if np.isfinite(data[rows]).all():
        return []
    return [Problem.of(f"{where}: NaN or Inf values", path, shard)]


def _data_problems(
    url: str, root: zarr.Group, arrays: list[str], progress: bool, client: Client | None
) -> list[str]:
    """Every shard with valid rows of every array, one task each, problems in array/shard order."""
    valid = root["samples/valid"][:]
    calls = [
        (url, path, shard, start, stop, valid[start:stop])
        for path in arrays
        for shard, start, stop in _shards(root)
        if valid[start:stop].any()
    ]
    found = run_tasks(shard_problems, calls, client, "validate", progress)
    return [problem for problems in found for problem in problems]
