"""The samples store, `featinv-samples/1`: images made from a feature store's maps (SPEC.md).

A zarr v3 group aligned with its source store: entry `i` is source row `rows[i]` (key `keys[i]`),
at each of the source views `views`; `originals` holds the target of that view as an image and
`reconstructions/<method>` the `n` images each method made of its feature map (a sampler and its
baselines, all on the same entries), with `seeds` the seed of every sampled image.  Chunks hold
one entry, checksummed like the feature store's; `done[i]` is set after entry `i` is written
whole, so an interrupted run resumes where it stopped and never keeps half an entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from storage_specs.codecs import lossless_compressors
from storage_specs.layout import StoreError, open_root

SAMPLES_SPEC = "featinv-samples/1"
ENTRY_ARRAYS = ("rows", "keys", "done")
IMAGE_DIMS = ("rgb", "pixel_y", "pixel_x")


def create_samples_store(url: str, *, rows: Sequence[int], keys: Sequence[str],
                         views: Sequence[int], methods: dict[str, dict], image_shape: tuple,
                         attrs: dict) -> zarr.Group:  # fmt: skip
    """Create the store, or open an existing one made with the same plan (else StoreError).

    `methods` maps a name to `{"samples": n, "description": ...}`; `attrs` (source, model,
    sampler settings, provenance) is part of the plan except its `provenance`."""
    plan = json.loads(json.dumps({
        "featinv_spec": SAMPLES_SPEC, "n_entries": len(rows), "views": list(views),
        "image_shape": list(image_shape), "methods": methods, **attrs,
    }))  # fmt: skip
    try:
        root = open_root(url, mode="r+")
    except (StoreError, FileNotFoundError):
        root = None
    if root is not None and "done" in root:
        _check_same_plan(url, root, plan, rows)
        return root
    root = zarr.open_group(url, mode="w", zarr_format=3, attributes=plan)
    _entry_array(root, "rows", np.asarray(rows, dtype=np.int64), "int64")
    _entry_array(root, "keys", np.asarray(keys, dtype=object), str)
    _entry_array(root, "done", np.zeros(len(rows), dtype=bool), "bool")
    v, image = len(views), tuple(image_shape)
    n_max = max(m["samples"] for m in methods.values())
    _per_entry(root, "seeds", (v, n_max), ("view", "sample"), np.int64)
    _per_entry(root, "originals", (v, *image), ("view", *IMAGE_DIMS), np.uint8)
    for name, method in methods.items():
        _per_entry(root, f"reconstructions/{name}", (v, method["samples"], *image),
                   ("view", "sample", *IMAGE_DIMS), np.uint8)  # fmt: skip
    return root


def _check_same_plan(url: str, root: zarr.Group, plan: dict, rows: Sequence[int]) -> None:
    stored = {k: v for k, v in root.attrs.items() if k in plan and k != "provenance"}
    wanted = {k: v for k, v in plan.items() if k != "provenance"}
    changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
    if changed or not np.array_equal(root["rows"][:], np.asarray(rows)):
        what = ", ".join(changed) or "rows"
        raise StoreError(f"'{url}' holds samples made with other settings ({what}): "
                         "delete it or write elsewhere")  # fmt: skip


def _entry_array(root: zarr.Group, name: str, data: np.ndarray, dtype) -> None:
    arr = root.create_array(name, shape=data.shape, dtype=dtype, chunks=(1,),
                            dimension_names=("entry",))  # fmt: skip
    arr[:] = data


def _per_entry(root: zarr.Group, path: str, shape: tuple, dims: tuple, dtype) -> zarr.Array:
    """One chunk per entry (all its views and samples), compressed and checksummed."""
    shape = (root.attrs["n_entries"], *shape)
    return root.create_array(path, shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                             fill_value=0, dimension_names=("entry", *dims),
                             compressors=lossless_compressors())  # fmt: skip


def write_entry(root: zarr.Group, i: int, original: np.ndarray, images: dict[str, np.ndarray],
                seeds: np.ndarray) -> None:  # fmt: skip
    """Entry `i` whole: `original [V, 3, H, W]`, each method's `[V, n, 3, H, W]`, `seeds [V, n]`;
    marked done last."""
    root["originals"][i] = original
    for name, data in images.items():
        root[f"reconstructions/{name}"][i] = data
    root["seeds"][i] = seeds
    root["done"][i] = True


class SamplesStore:
    """A read-only view of a samples store."""

    def __init__(self, url: str):
        self.url, self.root = url, open_root(url, consolidated=False)
        spec = self.root.attrs.get("featinv_spec")
        if spec != SAMPLES_SPEC:
            raise StoreError(f"'{url}' is not a {SAMPLES_SPEC} store (featinv_spec: {spec!r})")
        self.attrs = dict(self.root.attrs)
        self.rows = self.root["rows"][:]
        self.keys = [str(k) for k in self.root["keys"][:]]
        self.views: list[int] = self.attrs["views"]
        self.methods: dict[str, dict] = self.attrs["methods"]

    @property
    def done(self) -> np.ndarray:
        return self.root["done"][:]

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def originals(self) -> np.ndarray:
        return self.root["originals"][:]

    def images(self, method: str) -> np.ndarray:
        """`[entries, views, n, 3, H, W]` uint8 of one method."""
        if method not in self.methods:
            raise StoreError(f"'{self.url}' has no method {method!r} ({', '.join(self.methods)})")
        return self.root[f"reconstructions/{method}"][:]

    def seeds(self) -> np.ndarray:
        return self.root["seeds"][:]


class SamplesRun:
    """The samples stores of one output folder as one: `samples.zarr` (the sampler's), then
    `guided*.zarr` (the guided decoder's), all on the same entries, methods side by side."""

    def __init__(self, folder: str | Path):
        urls = [Path(folder) / "samples.zarr", *sorted(Path(folder).glob("guided*.zarr"))]
        self.stores = [SamplesStore(str(url)) for url in urls if url.exists()]
        if not self.stores:
            raise StoreError(f"'{folder}' holds no samples store: run `featinv sample` (or "
                             "`featinv guided-decode`) first")  # fmt: skip
        first = self.stores[0]
        for other in self.stores[1:]:
            if other.views != first.views or not np.array_equal(other.rows, first.rows):
                raise StoreError(f"'{other.url}' holds other entries than '{first.url}': delete "
                                 "one and rerun it")  # fmt: skip
            theirs, ours = (s.attrs["source"]["features"] for s in (other, first))
            if theirs != ours:
                raise StoreError(f"'{other.url}' decodes {theirs}, '{first.url}' {ours}: "
                                 "evaluate them apart (another sampling.name)")  # fmt: skip
        self.url, self.attrs = first.url, first.attrs
        self.rows, self.keys, self.views = first.rows, first.keys, first.views
        self._owner = {m: store for store in self.stores for m in store.methods}
        self.methods = {m: store.methods[m] for m, store in self._owner.items()}

    @property
    def complete(self) -> bool:
        return all(store.complete for store in self.stores)

    def unfinished(self) -> list[str]:
        return [store.url for store in self.stores if not store.complete]

    def originals(self, entries: int | None = None) -> np.ndarray:
        return self.stores[0].root["originals"][:entries]

    def images(self, method: str, entries: int | None = None,
               samples: int | None = None) -> np.ndarray:  # fmt: skip
        """`[entries, views, n, 3, H, W]` uint8 of one method (the first `entries`/`samples`)."""
        if method not in self.methods:
            raise StoreError(f"'{self.url}' has no method {method!r} ({', '.join(self.methods)})")
        return self._owner[method].root[f"reconstructions/{method}"][:entries, :, :samples]

    def store_of(self, method: str) -> SamplesStore:
        return self._owner[method]


def is_samples_store(url: str) -> bool:
    try:
        return open_root(url, consolidated=False).attrs.get("featinv_spec") == SAMPLES_SPEC
    except StoreError:
        return False


def validate_samples(url: str) -> list[str]:
    """Every problem of a samples store: spec, shapes, unfinished entries, checksums."""
    try:
        store = SamplesStore(url)
    except StoreError as exc:
        return [str(exc)]
    root, n, views = store.root, store.attrs["n_entries"], store.views
    shape = tuple(store.attrs["image_shape"])
    expected = {name: (n,) for name in ENTRY_ARRAYS}
    expected["originals"] = (n, len(views), *shape)
    for name, method in store.methods.items():
        expected[f"reconstructions/{name}"] = (n, len(views), method["samples"], *shape)
    problems = []
    for path, want in expected.items():
        if path not in root:
            problems.append(f"{path}: array missing")
        elif root[path].shape != want:
            problems.append(f"{path}: shape {root[path].shape}, expected {want}")
    if problems:
        return problems
    if not store.complete:
        problems.append(f"done: {int((~store.done).sum())} of {n} entries not written; "
                        "rerun the sampler to finish")  # fmt: skip
    for path in expected:
        try:
            root[path][:]
        except Exception as exc:  # a checksum or decode failure names the array
            problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
    return problems
