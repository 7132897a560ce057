"""Extract one shard for one group: decode -> views -> prepare -> encode -> write -> commit.

Images are read and decoded once, in DataLoader worker processes that overlap with the forward
passes; each encoder of the group (backbones, targets) prepares its inputs for every view of the
sample there.  Rows are kept in memory and each array's shard is written in one go (zarr's write
unit), then the commit record is written last: a shard is either committed and complete, or
absent and redone whole by the next run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.config import with_credentials
from pipeline.decode import ImageLimits, SkipSample, decode_image
from pipeline.encoders import Encoder, load_encoders
from pipeline.sources import read_items
from pipeline.views import ViewSpec, draw_views
from storage_specs.layout import (
    STORAGE_DTYPES,
    StoreError,
    is_lossy,
    open_root,
    read_commit,
    shard_range,
    stored_arrays,
    write_commit,
    write_reference,
    write_shard,
)

Prepare = Callable[[Image.Image, np.ndarray], torch.Tensor]  # (image, views) -> [K, ...]


def prepare(
    data: bytes | Exception,
    key: str,
    encoders: dict[str, Prepare],
    views: ViewSpec,
    limits: ImageLimits,
) -> dict:
    """One input as per-encoder tensors of all its views, or why it is skipped (the one
    bad-sample policy)."""
    try:
        if isinstance(data, Exception):
            raise SkipSample(f"unreadable: {type(data).__name__}: {data}".splitlines()[0])
        image = decode_image(data, limits)
        boxes = draw_views(key, image.height, image.width, views)
        inputs = {}
        for name, fn in encoders.items():
            try:
                inputs[name] = fn(image, boxes)
            except Exception as exc:  # a preprocessing bug must not kill the shard
                raise SkipSample(f"preprocessing for {name} failed: {exc}") from exc
    except SkipSample as exc:
        return {"inputs": None, "views": None, "height": 0, "width": 0, "error": str(exc)}
    return {
        "inputs": inputs,
        "views": boxes,
        "height": image.height,
        "width": image.width,
        "error": "",
    }


class ShardImages(IterableDataset):
    """The shard's inputs in row order; worker k of W takes rows k, k+W, ... so that the
    DataLoader's round-robin yields rows in order and batches are the same on every run."""

    def __init__(
        self,
        uris: list[str],
        keys: list[str],
        encoders: dict[str, Prepare],
        views: ViewSpec,
        limits: ImageLimits,
    ):
        self.uris, self.keys, self.encoders = uris, keys, encoders
        self.views, self.limits = views, limits

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rows = range(worker, len(self.uris), n_workers)
        for i, data in read_items([self.uris[row] for row in rows]):
            row = rows[i]
            yield {"row": row, **prepare(data, self.keys[row], self.encoders, self.views,
                                         self.limits)}  # fmt: skip


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """Round to the store's precision (see STORAGE_DTYPES for bf16)."""
    if dtype == "bf16":
        values = values.to(torch.bfloat16)
    return values.float().cpu().numpy().astype(STORAGE_DTYPES[dtype])


REFERENCE_ROWS = 4  # exact samples kept beside each lossy array (by the job of shard 0)


class ShardWriter:
    """In-memory rows of every array of the group, written to the store in one go per array.

    For lossy arrays, the job of shard 0 also keeps the exact values of its first few samples
    (`reference/...`), so the validator can measure the error that was really committed.
    """

    def __init__(self, root, group: str, shard: int, n_rows: int):
        self.root, self.shard = root, shard
        paths = [p for p in stored_arrays(root) if root[p].attrs["group"] == group]
        if not paths:
            raise StoreError(f"no arrays of group '{group}' in the store: run the plan step first")
        self.buffers = {p: np.zeros((n_rows, *root[p].shape[1:]), root[p].dtype) for p in paths}
        lossy = [p for p in paths if is_lossy(root[p])] if shard == 0 else []
        self.references: dict[str, list] = {p: [] for p in lossy}

    def put(self, path: str, rows: list[int], values: torch.Tensor) -> None:
        dtype = self.root[path].attrs["dtype"]
        stored = to_storage(values, dtype)
        if not np.isfinite(stored).all():
            peak = values.abs().max().item()
            raise StoreError(
                f"{path}: values are not finite at {dtype} (max |x| = {peak:.3g}); "
                "use dtype fp32 or bf16"
            )
        self.buffers[path][rows] = stored
        if path in self.references:
            kept = self.references[path]
            kept += list(zip(rows, values.float().cpu().numpy(), strict=True))
            del kept[REFERENCE_ROWS:]

    def flush(self) -> None:
        for path, buffer in self.buffers.items():
            write_shard(self.root[path], self.shard, buffer)
        for path, kept in self.references.items():
            if kept:
                rows = [int(row) for row, _ in kept]
                write_reference(self.root, path, rows, np.stack([v for _, v in kept]))


def run_batch(encoders: list[Encoder], batch: list[dict], writer: ShardWriter, autocast) -> None:
    """Encode all views of a batch of samples; arrays get rows `[B, K, ...]`."""
    rows = [sample["row"] for sample in batch]
    for encoder in encoders:
        x = torch.cat([sample["inputs"][encoder.name] for sample in batch])
        with torch.inference_mode(), autocast():
            outputs = encoder.encode(x)
        for path, values in outputs.items():
            writer.put(path, rows, values.reshape(len(batch), -1, *values.shape[1:]))


def autocast_for(mode: str | bool, device: torch.device) -> Callable:
    if not mode:
        return lambda: torch.autocast(device.type, enabled=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return lambda: torch.autocast(device.type, dtype=dtype)


def extract_shard(config: dict, group: str, shard: int, progress: bool = True) -> dict:
    """Extract and commit one shard of one group; returns its commit record.

    A shard that is already committed in the store is not redone (resume is a property of the
    store, not of Snakemake's bookkeeping).
    """
    root = open_root(config["store"], mode="r+")
    done = read_commit(root, group, shard)
    if done is not None:
        return done
    start, stop = shard_range(shard, root.attrs["shard_size"], root.attrs["n_samples"])
    torch.set_num_threads(config["threads"])
    device = pick_device(config["device"])
    encoders = load_encoders(config, group, str(device))
    if not encoders:
        raise StoreError(f"no backbones or targets in group '{group}'")
    writer = ShardWriter(root, group, shard, stop - start)
    items = {
        "uris": [with_credentials(u, config["source"]) for u in root["samples/source"][start:stop]],
        "keys": root["samples/key"][start:stop].tolist(),
    }
    views = ViewSpec.from_config(root.attrs["views"])
    meta = _run(config, encoders, items, views, writer, autocast_for(config["autocast"], device),
                progress)  # fmt: skip
    writer.flush()
    record = {
        "group": group,
        "shard": shard,
        "start": start,
        "stop": stop,
        "arrays": sorted(writer.buffers),
        "n_valid": sum(1 for error in meta["error"] if not error),
        **meta,
    }
    write_commit(root, group, shard, record)
    return record


def _run(config: dict, encoders: list[Encoder], items: dict, views: ViewSpec,
         writer: ShardWriter, autocast, progress: bool) -> dict:  # fmt: skip
    n = len(items["uris"])
    dataset = ShardImages(items["uris"], items["keys"], {e.name: e.prepare for e in encoders},
                          views, ImageLimits(**config["image_limits"]))  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=config["num_workers"],
        prefetch_factor=2 * config["batch_size"] if config["num_workers"] else None,
    )
    blank = np.zeros((views.count, 5), np.float32)
    meta = {"height": [0] * n, "width": [0] * n, "error": [""] * n, "views": [blank] * n}
    batch: list[dict] = []
    bar = tqdm(total=n, unit="img", disable=not progress, desc="extract")
    for sample in loader:
        for field in meta:
            if sample[field] is not None:
                meta[field][sample["row"]] = sample[field]
        if sample["inputs"] is None:
            bar.update()
            continue
        batch.append(sample)
        if len(batch) == config["batch_size"]:
            run_batch(encoders, batch, writer, autocast)
            bar.update(len(batch))
            batch = []
    if batch:
        run_batch(encoders, batch, writer, autocast)
        bar.update(len(batch))
    bar.close()
    meta["views"] = [np.asarray(v, np.float32).tolist() for v in meta["views"]]
    return meta
