"""A store as a `torch.utils.data.Dataset` of (feature map, target, key, view) pairs.

This is what the trainer reads: every valid (sample, view) is one item, the feature map and its
target (VAE latent or pixels) come from the same view, and a batch is read with one shard-aware
batched request per array (`__getitems__`, which the DataLoader calls with a whole batch of
indices).  It holds no open handles when pickled, so it works in DataLoader worker processes.
"""

from __future__ import annotations

import numpy as np
import torch

from storage_specs.chunks import ChunkReader
from storage_specs.reader import FeatureStore


class PairDataset(torch.utils.data.Dataset):
    """Items `{"features", "target", "key", "row", "view"}`; `target` only when one is named."""

    def __init__(self, url: str, features: str, target: str | None = None,
                 views: list[int] | None = None):  # fmt: skip
        self.url, self.features, self.target = url, features, target
        store = FeatureStore(url)
        count = store.root.attrs["views"]["count"]
        self.views = list(range(count)) if views is None else list(views)
        self.rows = np.flatnonzero(store.root["samples/valid"][:])
        self.keys = store.root["samples/key"][:]
        self._readers: dict[str, ChunkReader] | None = None

    def __len__(self) -> int:
        return len(self.rows) * len(self.views)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": None}  # each worker opens its own store

    def _reader(self, path: str) -> ChunkReader:
        if self._readers is None:
            store = FeatureStore(self.url)
            paths = [self.features] + ([self.target] if self.target else [])
            self._readers = {p: ChunkReader(store.root[p]) for p in paths}
        return self._readers[path]

    def _item(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample, view = divmod(index, len(self.views))
        return int(self.rows[sample]), self.views[view]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        items = [self._item(i) for i in indices]
        features = torch.from_numpy(self._reader(self.features).read(items))
        targets = torch.from_numpy(self._reader(self.target).read(items)) if self.target else None
        return [
            {"features": features[i], "key": str(self.keys[row]), "row": row, "view": view,
             **({"target": targets[i]} if targets is not None else {})}
            for i, (row, view) in enumerate(items)
        ]  # fmt: skip

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]
