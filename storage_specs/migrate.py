"""Upgrade a `featinv-store/2` store to `featinv-store/3` in place: metadata only, no data moves.

Spec 3 names the dimensions of layer arrays per layer and adds the root `sample` coordinate, so
`xarray.open_datatree` opens every group.  The chunks stay as they are (spec 3 accepts spec 2's
one-sample-view chunks of prefix tokens).  Each step can be repeated, and the version changes
last: an interrupted migration is finished by running it again.
"""

from __future__ import annotations

import json
import warnings

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage_specs.layout import (
    SPEC_VERSION,
    StoreError,
    add_sample_coordinate,
    array_dims,
    consolidate,
    open_root,
    reference_path,
    stored_arrays,
)

FROM_SPEC = "featinv-store/2"


def _set_dimension_names(root: zarr.Group, path: str, dims: tuple[str, ...]) -> None:
    """Rewrite one array's `dimension_names` in its zarr.json (zarr-python has no API for it)."""
    key = root.store_path / f"{path}/zarr.json"
    prototype = default_buffer_prototype()
    meta = json.loads(sync(key.get(prototype=prototype)).to_bytes())
    meta["dimension_names"] = list(dims)
    sync(key.set(prototype.buffer.from_bytes(json.dumps(meta, indent=2).encode())))


def _is_consolidated(url: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open_group(url, mode="r").metadata.consolidated_metadata is not None


def migrate_store(url: str) -> list[str]:
    """Upgrade the store at `url`; returns the arrays whose dimension names changed."""
    root = open_root(url, mode="r+")  # no store there: one line
    consolidated = _is_consolidated(url)  # (rewriting the root's attributes drops the snapshot)
    spec = root.attrs.get("featinv_spec")
    if spec == SPEC_VERSION:
        if root.attrs.get("complete") and not consolidated:  # a run stopped after the flip
            consolidate(url)
        return []
    if spec != FROM_SPEC:
        raise StoreError(f"'{url}' has featinv_spec {spec!r}; featinv migrate upgrades {FROM_SPEC}")
    changed = []
    for path in stored_arrays(root):
        kind, _, name = path.split("/")
        dims = array_dims(kind, name)
        if tuple(root[path].metadata.dimension_names) != dims:
            _set_dimension_names(root, path, dims)
            changed.append(path)
        if reference_path(path) in root:
            _set_dimension_names(root, reference_path(path), ("reference_sample", *dims[1:]))
    add_sample_coordinate(root)
    root.attrs["featinv_spec"] = SPEC_VERSION
    if consolidated:
        consolidate(url)
    return changed
