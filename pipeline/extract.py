"""Extract one shard for one backbone group: decode -> transform -> forward -> write -> commit.

Images are read and decoded once, in DataLoader worker processes that overlap with the forward
passes, and transformed once per backbone.  Rows are kept in memory and each array's shard is
written in one go (zarr's write unit), then the commit record is written last: a shard is either
committed and complete, or absent and redone whole by the next run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.backbones import Backbone, BackboneSpec, LayerTaps, load_backbone
from pipeline.decode import ImageLimits, SkipSample, decode_image
from pipeline.sources import read_items
from storage_specs.layout import (
    STORAGE_DTYPES,
    StoreError,
    feature_path,
    open_root,
    prefix_path,
    read_commit,
    shard_range,
    write_commit,
    write_shard,
)


def prepare(data: bytes | Exception, transforms: dict[str, Callable], limits: ImageLimits) -> dict:
    """One input as per-backbone tensors, or why it is skipped (the one bad-sample policy)."""
    try:
        if isinstance(data, Exception):
            raise SkipSample(f"unreadable: {type(data).__name__}: {data}".splitlines()[0])
        image = decode_image(data, limits)
        inputs = {}
        for name, transform in transforms.items():
            try:
                inputs[name] = transform(image)
            except Exception as exc:  # a transform bug must not kill the shard
                raise SkipSample(f"preprocessing for {name} failed: {exc}") from exc
    except SkipSample as exc:
        return {"inputs": None, "height": 0, "width": 0, "error": str(exc)}
    return {"inputs": inputs, "height": image.height, "width": image.width, "error": ""}


class ShardImages(IterableDataset):
    """The shard's inputs in row order; worker k of W takes rows k, k+W, ... so that the
    DataLoader's round-robin yields rows in order and batches are the same on every run."""

    def __init__(self, uris: list[str], transforms: dict[str, Callable], limits: ImageLimits):
        self.uris, self.transforms, self.limits = uris, transforms, limits

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rows = range(worker, len(self.uris), n_workers)
        for i, data in read_items([self.uris[row] for row in rows]):
            yield {"row": rows[i], **prepare(data, self.transforms, self.limits)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """Round to the store's precision (see STORAGE_DTYPES for bf16)."""
    if dtype == "bf16":
        values = values.to(torch.bfloat16)
    return values.float().cpu().numpy().astype(STORAGE_DTYPES[dtype])


def planned_arrays(root, backbone: Backbone) -> list[str]:
    """The store arrays of a backbone's layers (prefix tokens only exist for token models)."""
    paths = []
    for layer in backbone.spec.layers:
        spatial, prefix = (
            feature_path(backbone.spec.name, layer),
            prefix_path(backbone.spec.name, layer),
        )
        if spatial not in root:
            raise StoreError(f"{spatial} is not in the store: run the plan step first")
        paths += [spatial] + ([prefix] if prefix in root else [])
    return paths


class ShardWriter:
    """In-memory rows of every array of the shard, written to the store in one go per array."""

    def __init__(self, root, backbones: list[Backbone], n_rows: int, dtype: str):
        self.root, self.dtype = root, dtype
        self.buffers = {
            path: np.zeros((n_rows, *root[path].shape[1:]), root[path].dtype)
            for backbone in backbones
            for path in planned_arrays(root, backbone)
        }

    def put(self, path: str, rows: list[int], values: torch.Tensor) -> None:
        stored = to_storage(values, self.dtype)
        if not np.isfinite(stored).all():
            peak = values.abs().max().item()
            raise StoreError(
                f"{path}: values are not finite at {self.dtype} (max |x| = {peak:.3g}); "
                "use dtype fp32 or bf16"
            )
        self.buffers[path][rows] = stored

    def flush(self, shard: int) -> None:
        for path, buffer in self.buffers.items():
            write_shard(self.root[path], shard, buffer)


def run_batch(backbones: list[Backbone], batch: list[dict], writer: ShardWriter, autocast) -> None:
    rows = [sample["row"] for sample in batch]
    for backbone in backbones:
        name = backbone.spec.name
        device = next(backbone.model.parameters()).device
        x = torch.stack([sample["inputs"][name] for sample in batch]).to(device)
        with torch.inference_mode(), autocast(device):
            outputs = LayerTaps(backbone.model, backbone.spec.layers)(x)
        for layer, (grid, prefix) in outputs.items():
            writer.put(feature_path(name, layer), rows, grid)
            if prefix is not None:
                writer.put(prefix_path(name, layer), rows, prefix)


def autocast_for(mode: str | bool) -> Callable:
    if not mode:
        return lambda device: torch.autocast(device.type, enabled=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return lambda device: torch.autocast(device.type, dtype=dtype)


def extract_shard(config: dict, group: str, shard: int, progress: bool = True) -> dict:
    """Extract and commit one shard of one backbone group; returns its commit record.

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
    specs = [BackboneSpec.from_config(e) for e in config["backbones"] if e["group"] == group]
    if not specs:
        raise StoreError(f"no backbones in group '{group}'")
    backbones = [load_backbone(spec, config["seed"], str(device)) for spec in specs]
    writer = ShardWriter(root, backbones, stop - start, config["dtype"])
    meta = _run(config, backbones, root["samples/source"][start:stop].tolist(), writer, progress)
    writer.flush(shard)
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


def _run(config: dict, backbones: list[Backbone], uris: list[str], writer, progress) -> dict:
    limits = ImageLimits(**config["image_limits"])
    transforms = {b.spec.name: b.transform for b in backbones}
    loader = DataLoader(
        ShardImages(uris, transforms, limits),
        batch_size=None,
        num_workers=config["num_workers"],
        prefetch_factor=2 * config["batch_size"] if config["num_workers"] else None,
    )
    autocast = autocast_for(config["autocast"])
    meta = {"height": [0] * len(uris), "width": [0] * len(uris), "error": [""] * len(uris)}
    batch: list[dict] = []
    bar = tqdm(total=len(uris), unit="img", disable=not progress, desc="extract")
    for sample in loader:
        row = sample["row"]
        for field in meta:
            meta[field][row] = sample[field]
        if sample["inputs"] is not None:
            batch.append(sample)
        else:
            bar.update()
        if len(batch) == config["batch_size"]:
            run_batch(backbones, batch, writer, autocast)
            bar.update(len(batch))
            batch = []
    if batch:
        run_batch(backbones, batch, writer, autocast)
        bar.update(len(batch))
    bar.close()
    return meta
