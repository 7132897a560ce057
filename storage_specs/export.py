"""Export one feature array (and optionally a target) as webdataset tar shards.

For teams whose loaders speak webdataset: each (valid sample, view) becomes one tar sample with
`features.npy`, `target.npy` (if asked) and `json` metadata.  Nothing is pickled (`.npy` is read
with allow_pickle=False by webdataset's decoder), keys carry no dots, and the store is read shard
by shard, so the export streams at storage speed.
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import webdataset as wds
from tqdm import tqdm

from storage_specs.reader import FeatureStore


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _samples(store: FeatureStore, features: str, target: str | None):
    """Tar samples in row order, reading the store one shard at a time."""
    meta = store.samples()
    for shard in range(store.n_shards):
        values = store.read_shard(features, shard)
        targets = store.read_shard(target, shard) if target else None
        start = shard * store.shard_size
        for i in range(len(values)):
            row = start + i
            if not meta["valid"][row]:
                continue
            for view in range(values.shape[1]):
                info = {
                    "key": str(meta["key"][row]), "row": row, "view": view,
                    "label": int(meta["label"][row]), "source": str(meta["source"][row]),
                    "view_box": meta["view_box"][row, view].tolist(),
                    "view_hflip": bool(meta["view_hflip"][row, view]),
                    "features": features, "target": target,
                }  # fmt: skip
                sample = {"__key__": f"{meta['key'][row]}/v{view}", "json": json.dumps(info),
                          "features.npy": _npy(values[i, view])}  # fmt: skip
                if targets is not None:
                    sample["target.npy"] = _npy(targets[i, view])
                yield sample


def export_webdataset(
    url: str, out: str, features: str, target: str | None = None,
    max_bytes: int = 512 * 2**20, progress: bool = True,
) -> list[str]:  # fmt: skip
    """Write `<out>/00000.tar, 00001.tar, ...` (any fsspec folder); returns the tar URLs."""
    store = FeatureStore(url)
    if not store.complete:
        raise ValueError(f"store '{url}' is not complete; finish the pipeline first")
    for path in filter(None, (features, target)):
        if path not in store.root:
            arrays = ", ".join(store.arrays())
            raise ValueError(f"store '{url}' has no {path}; arrays: {arrays}")
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    tars: list[str] = []
    sink, size = None, 0
    for sample in tqdm(_samples(store, features, target), disable=not progress, unit="sample"):
        if sink is None or size >= max_bytes:
            if sink is not None:
                sink.close()
            tars.append(f"{root.rstrip('/')}/{len(tars):05d}.tar")
            sink, size = wds.TarWriter(fs.open(tars[-1], "wb")), 0
        sink.write(sample)
        size += sum(len(v) for k, v in sample.items() if k != "__key__")
    if sink is not None:
        sink.close()
    return [fs.unstrip_protocol(t) for t in tars]
