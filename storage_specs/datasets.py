"""A store as a `torch.utils.data.Dataset` of views: the named arrays of one (sample, view) pair.

This is what the trainer reads: every valid (sample, view) of the chosen rows is one item, and the
feature map and its targets (VAE posterior, pixels) come from the same view.  Reads are batched: one
shard-aware request per array for a whole batch of items, either through `__getitems__` (which the
DataLoader calls with a batch of indices when it batches) or by indexing with a list (a DataLoader
with `batch_size=None` over a batch sampler), which returns the batch already stacked.  It holds no
open handles when pickled, so it works in DataLoader worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from storage_specs.chunks import THREADS, ChunkReader
from storage_specs.layout import StoreError
from storage_specs.reader import FeatureStore


class PairDataset(torch.utils.data.Dataset):
    """Items `{<name>: tensor for each of arrays, "key", "row", "view"}`.

    `arrays` maps item names to array paths, e.g. `{"features": "features/resnet18/layer4",
    "target": "pixels/pixels/rgb"}`; `rows` (default: every valid row) and `views` (default: all)
    choose the items, row-major: item `i` is `(rows[i // len(views)], views[i % len(views)])`.
    """

    def __init__(
        self,
        url: str,
        arrays: Mapping[str, str],
        rows: Sequence[int] | None = None,
        views: Sequence[int] | None = None,
    ):
        self.url, self.arrays = url, dict(arrays)
        store = FeatureStore(url)
        for path in self.arrays.values():
            store.require(path)
        count = store.root.attrs["views"]["count"]
        self.views = list(range(count)) if views is None else [int(v) for v in views]
        if any(not 0 <= v < count for v in self.views):
            raise StoreError(f"views {self.views} out of range: '{url}' has {count} per sample")
        valid = store.root["samples/valid"][:]
        self.rows = np.flatnonzero(valid) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and not valid[self.rows].all():
            raise StoreError(f"rows {self.rows[~valid[self.rows]][:5].tolist()} are not valid")
        self.keys = store.root["samples/key"][:]
        self._readers: dict[str, ChunkReader] | None = None

    def __len__(self) -> int:
        return len(self.rows) * len(self.views)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": None}  # each worker opens its own store

    def _reader(self, path: str) -> ChunkReader:
        if self._readers is None:
            store = FeatureStore(self.url)
            # A DataLoader worker decodes on one thread: the other workers use the other cores.
            threads = 1 if torch.utils.data.get_worker_info() else THREADS
            self._readers = {p: ChunkReader(store.root[p], threads) for p in self.arrays.values()}
        return self._readers[path]

    def item(self, index: int) -> tuple[int, int]:
        """The (row, view) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample, view = divmod(int(index), len(self.views))
        return int(self.rows[sample]), self.views[view]

    def pairs(self, indices: Sequence[int]) -> np.ndarray:
        """The `[len(indices), 2]` (row, view) pairs of items `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        outside = (indices < 0) | (indices >= len(self))
        if outside.any():
            raise IndexError(int(indices[outside][0]))
        sample, view = np.divmod(indices, len(self.views))
        return np.stack([self.rows[sample], np.asarray(self.views, np.int64)[view]], axis=1)

    def read_batch(self, indices: Sequence[int]) -> dict:
        """Items `indices` stacked: `[B, ...]` tensors per array, `row`/`view` tensors, `key`."""
        pairs = self.pairs(indices)
        batch = {
            name: torch.from_numpy(self._reader(path).read(pairs))
            for name, path in self.arrays.items()
        }
        batch["row"], batch["view"] = (torch.from_numpy(pairs[:, i].copy()) for i in (0, 1))
        batch["key"] = self.keys[pairs[:, 0]].tolist()
        return batch

    def __getitems__(self, indices: list[int]) -> list[dict]:
        batch = self.read_batch(indices)
        return [
            {**{name: batch[name][i] for name in self.arrays}, "key": batch["key"][i],
             "row": int(batch["row"][i]), "view": int(batch["view"][i])}
            for i in range(len(indices))
        ]  # fmt: skip

    def __getitem__(self, index: int | Sequence[int]) -> dict:
        """One item, or a whole stacked batch when `index` is a list of indices."""
        if isinstance(index, Sequence | np.ndarray | torch.Tensor):
            return self.read_batch([int(i) for i in index])
        return self.__getitems__([index])[0]
