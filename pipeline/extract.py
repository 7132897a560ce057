"""Extract shards of one group: decode -> views -> prepare -> encode -> write -> commit.

One job extracts a contiguous run of shards (`pipeline.jobs`): its decode workers start once, on
the encoders' preprocessing (which needs no weights), and its models load meanwhile.  Images are
read and decoded once, in DataLoader worker processes that overlap with the forward passes; each
encoder of the group (backbones, targets) prepares its inputs for every view of the sample there.
A writer thread rounds each batch's rows to the storage dtype and compresses them as soon as the
forward has made them (`pipeline.shard_writer`) and, once a shard is whole, stores each array's
shard as one object (zarr's write unit), then the shard's commit record: a shard is either
committed and complete, or absent and redone whole by the next run.  The job keeps the memory it
frees (`pipeline.memory`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.config import with_credentials
from pipeline.decode import ImageLimits, SkipSample, decode_image, decode_jpegs, jpeg_size
from pipeline.encoders import Encoder, load_encoders, load_prepares
from pipeline.memory import retain_freed_memory
from pipeline.shard_writer import ShardWriter
from pipeline.sources import read_items
from pipeline.views import ViewSpec, draw_views
from storage_specs.layout import (
    StoreError,
    open_root,
    read_commit,
    shard_range,
    stored_arrays,
    write_commit,
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
        if isinstance(data, SkipSample):  # over the size limit: left unread
            raise data
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
    """The job's inputs in row order, in runs of `run` consecutive rows: worker k of W takes runs
    k, k+W, ... so that the DataLoader's round-robin yields them in order and batches are the
    same on every run.  A run leaves its worker as one tensor per encoder (`pack`)."""

    def __init__(
        self,
        uris: list[str],
        keys: list[str],
        encoders: dict[str, Prepare],
        views: ViewSpec,
        limits: ImageLimits,
        defer_jpegs: bool = False,
        run: int = 1,
    ):
        self.uris, self.keys, self.encoders = uris, keys, encoders
        self.views, self.limits, self.defer_jpegs, self.run = views, limits, defer_jpegs, run

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n = len(self.uris)
        runs = [range(start, min(start + self.run, n))
                for start in range(worker * self.run, n, n_workers * self.run)]  # fmt: skip
        rows = [row for run in runs for row in run]
        samples = (
            self.sample(rows[i], data)
            for i, data in read_items([self.uris[r] for r in rows], self.limits.max_bytes)
        )
        for run in runs:
            yield pack(list(islice(samples, len(run))))

    def sample(self, row: int, data: bytes | Exception) -> dict:
        key = self.keys[row]
        size = (
            jpeg_size(data, self.limits) if self.defer_jpegs and isinstance(data, bytes) else None
        )
        if size is None:
            return {"row": row, **prepare(data, key, self.encoders, self.views, self.limits)}
        width, height = size  # the job decodes it with its batch on the device (DeviceDecoder)
        views = draw_views(key, height, width, self.views)
        return {"row": row, "inputs": None, "jpeg": data, "key": key, "views": views,
                "height": height, "width": width, "error": ""}  # fmt: skip


def pack(samples: list[dict]) -> dict:
    """Consecutive samples with their inputs concatenated, one tensor per encoder: every tensor
    leaving a worker costs the job a socket round trip for its shared memory (about 6 ms here,
    a sixth of the forward's time per image when each sample sent its own)."""
    full = [sample for sample in samples if sample["inputs"] is not None]
    names = full[0]["inputs"] if full else {}
    inputs = {name: torch.cat([sample["inputs"][name] for sample in full]) for name in names}
    listed = [{**sample, "inputs": sample["inputs"] is not None} for sample in samples]
    return {"samples": listed, "inputs": inputs}


def as_sent(run: dict) -> dict:
    """The DataLoader's collate step for a `pack`ed run: none (its default turns every sample's
    numpy views into a tensor, each one more shared-memory hand-over)."""
    return run


def unpack(run: dict) -> Iterator[dict]:
    """The samples of a `pack`ed run in order, each with its own inputs again (views of the
    run's tensors; every sample has the same number of views)."""
    n = sum(sample["inputs"] for sample in run["samples"])
    parts = {name: x.split(len(x) // n) for name, x in run["inputs"].items()}
    full = iter(range(n))
    for sample in run["samples"]:
        i = next(full) if sample["inputs"] else None
        yield {**sample, "inputs": None if i is None else {k: p[i] for k, p in parts.items()}}


def decodes_on_device(config: dict, device: torch.device) -> bool:
    """JPEGs decoded on the job's GPU (nvJPEG) with their batch, if the config asks; else in the
    decode workers (PIL: the same pixels everywhere; on one H200 with 6 workers also faster)."""
    return config["jpeg_decode"] == "device" and device.type == "cuda"


@dataclass
class DeviceDecoder:
    """Decodes a batch's JPEGs on the job's device and prepares their views there (exactly the
    PIL path's resampling); a JPEG the device cannot decode goes the PIL way, counted."""

    device: torch.device
    encoders: dict[str, Prepare]
    views: ViewSpec
    limits: ImageLimits
    decoded: int = 0
    fallbacks: int = 0

    def __call__(self, batch: list[dict]) -> None:
        """Fill in the inputs of the batch's deferred JPEGs (None if PIL then skips one) and move
        every sample's inputs to the device."""
        jpegs = [sample for sample in batch if sample.get("jpeg") is not None]
        images = decode_jpegs([sample["jpeg"] for sample in jpegs], self.device, self.limits)
        for sample, image in zip(jpegs, images, strict=True):
            inputs = None if image is None else self.prepare(image, sample["views"])
            if inputs is None:  # the PIL path decides (and records why, if it skips)
                self.fallbacks += 1
                sample.update(prepare(sample.pop("jpeg"), sample["key"], self.encoders,
                                      self.views, self.limits))  # fmt: skip
            else:
                self.decoded += 1
                sample["inputs"] = inputs
        for sample in batch:
            if sample["inputs"] is not None:
                sample["inputs"] = {n: x.to(self.device) for n, x in sample["inputs"].items()}

    def prepare(self, image: torch.Tensor, views: np.ndarray) -> dict | None:
        try:
            return {name: fn(image, views) for name, fn in self.encoders.items()}
        except Exception:  # a preprocessing failure on the device: left to the PIL path
            return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"config device: {name}, but this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s)")  # fmt: skip
    return device


def group_arrays(root: zarr.Group, group: str) -> dict[str, zarr.Array]:
    """The group's per-sample arrays by path, opened once per job."""
    arrays = {path: root[path] for path in stored_arrays(root)}
    arrays = {path: arr for path, arr in arrays.items() if arr.attrs["group"] == group}
    if not arrays:
        raise StoreError(f"no arrays of group '{group}' in the store: run the plan step first")
    return arrays


def encode_batch(encoders: list[Encoder], batch: list[dict], autocast) -> dict[str, torch.Tensor]:
    """All views of a batch of samples through every encoder: values `[B, K, ...]` per array."""
    outputs = {}
    for encoder in encoders:
        x = joined([sample["inputs"][encoder.name] for sample in batch])
        with torch.inference_mode(), autocast():
            for path, values in encoder.encode(x).items():
                outputs[path] = values.reshape(len(batch), -1, *values.shape[1:])
    return outputs


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts as one batch: the tensor they are consecutive pieces of when they are (a run from
    a decode worker, `unpack`), a copy otherwise."""
    first, offset = parts[0], parts[0].storage_offset()
    for part in parts:
        same = part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same and part.is_contiguous() and part.storage_offset() == offset):
            return torch.cat(parts)
        offset += part.numel()
    shape = (sum(len(part) for part in parts), *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


def autocast_for(mode: str | bool, device: torch.device) -> Callable:
    if not mode:
        return lambda: torch.autocast(device.type, enabled=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return lambda: torch.autocast(device.type, dtype=dtype)


def extract_shard(config: dict, group: str, shard: int, progress: bool = True) -> dict:
    """Extract and commit one shard of one group; returns its commit record."""
    return extract_shards(config, group, [shard], progress)[0]


def extract_shards(
    config: dict, group: str, shards: Sequence[int], progress: bool = True
) -> list[dict]:
    """Extract and commit shards of one group in one job; returns their commit records.

    Shards already committed in the store are not redone (resume is a property of the store, not
    of Snakemake's bookkeeping), so an interrupted job's rerun does only the rest.
    """
    root = open_root(config["store"], mode="r+")
    records = {shard: read_commit(root, group, shard) for shard in shards}
    todo = [shard for shard, record in records.items() if record is None]
    if todo:
        records |= _extract(config, root, group, todo, progress)
    return [records[shard] for shard in shards]


def _extract(config: dict, root, group: str, shards: list[int], progress: bool) -> dict:
    ranges = [shard_range(s, root.attrs["shard_size"], root.attrs["n_samples"]) for s in shards]
    arrays = group_arrays(root, group)
    retain_freed_memory()  # every batch would fault its activations in afresh
    torch.set_num_threads(config["threads"])
    device = pick_device(config["device"])
    prepares = load_prepares(config, group)
    if not prepares:
        raise StoreError(f"no backbones or targets in group '{group}'")
    views, limits = ViewSpec.from_config(root.attrs["views"]), ImageLimits(**config["image_limits"])
    sources = np.concatenate([root["samples/source"][start:stop] for start, stop in ranges])
    keys = np.concatenate([root["samples/key"][start:stop] for start, stop in ranges])
    decoder = (
        DeviceDecoder(device, prepares, views, limits)
        if decodes_on_device(config, device)
        else None
    )
    dataset = ShardImages([with_credentials(u, config["source"]) for u in sources], keys.tolist(),
                          prepares, views, limits, defer_jpegs=decoder is not None,
                          run=config["batch_size"])  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_size=None,
        collate_fn=as_sent,
        num_workers=config["num_workers"],
        prefetch_factor=2 if config["num_workers"] else None,  # runs: two batches ahead
    )
    runs = iter(loader)  # the decode workers start now, while the job loads its models
    encoders = load_encoders(config, group, str(device))
    changed = [e.name for e in encoders if e.prepare != prepares[e.name]]  # a guard: never yet
    if changed:
        raise StoreError(f"{', '.join(changed)}: preprocessing of the loaded weights differs from "
                         "the architecture's, which the decode workers use")  # fmt: skip
    samples = (sample for run in runs for sample in unpack(run))
    bar = tqdm(total=len(keys), unit="img", disable=not progress, desc="extract")
    job = Job(encoders, config["batch_size"], views.count, autocast_for(config["autocast"], device),
              bar, decoder)  # fmt: skip
    records, committing, offset = {}, None, 0
    with ThreadPoolExecutor(writer_threads(config, device), "featinv-writer") as thread:
        for shard, (start, stop) in zip(shards, ranges, strict=True):
            writer = ShardWriter(root, arrays, shard, stop - start)
            encoded, meta = job.run_shard(islice(samples, stop - start), offset, writer, thread)
            offset += stop - start
            records[shard] = {
                "group": group,
                "shard": shard,
                "start": start,
                "stop": stop,
                "arrays": sorted(writer.buffers),
                "n_valid": sum(1 for error in meta["error"] if not error),
                **meta,
            }
            if committing is not None:
                committing.result()  # at most one shard is written behind the forward
            committing = thread.submit(_commit, writer, encoded, records[shard])
        committing.result()
    bar.close()
    if decoder is not None:
        print(f"featinv: {decoder.decoded} JPEGs decoded on {device}, {decoder.fallbacks} by PIL "
              "after the device could not", file=sys.stderr)  # fmt: skip
    return records


def writer_threads(config: dict, device: torch.device) -> int:
    """Threads that compress the forward's outputs: one beside a forward on the CPU, which needs
    the cores; the job's `threads` beside a GPU, whose forward outruns one thread's zstd."""
    return config["threads"] if device.type == "cuda" else 1


def _commit(writer: ShardWriter, encoded: list[Future], record: dict) -> None:
    """Store the shard, then its commit record: only once every batch is in (commit last)."""
    for batch in encoded:
        batch.result()
    writer.flush()
    write_commit(writer.root, record["group"], record["shard"], record)


@dataclass
class Job:
    """The forward passes of a job's shards, in batches that never cross a shard."""

    encoders: list[Encoder]
    batch_size: int
    n_views: int
    autocast: Callable
    bar: tqdm
    decoder: DeviceDecoder | None = None

    def run_shard(self, samples: Iterable[dict], offset: int, writer: ShardWriter,
                  thread: ThreadPoolExecutor) -> tuple[list[Future], dict]:  # fmt: skip
        """Encode one shard's samples (job rows from `offset`), handing each batch's rows to the
        writer thread; returns those tasks and the shard's per-sample metadata."""
        n = len(next(iter(writer.buffers.values())))
        blank = np.zeros((self.n_views, 5), np.float32)
        meta = {"height": [0] * n, "width": [0] * n, "error": [""] * n, "views": [blank] * n}
        batch: list[dict] = []
        encoded = []
        for sample in samples:
            sample["row"] -= offset
            self.record(meta, sample, blank)
            if sample["inputs"] is None and sample.get("jpeg") is None:
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                encoded += self.run_batch(batch, writer, thread, meta, blank)
                batch = []
        if batch:
            encoded += self.run_batch(batch, writer, thread, meta, blank)
        meta["views"] = [np.asarray(v, np.float32).tolist() for v in meta["views"]]
        return encoded, meta

    def record(self, meta: dict, sample: dict, blank: np.ndarray) -> None:
        """A sample's metadata; a skipped one counts as done (and has no views)."""
        for field in meta:
            if sample[field] is not None:
                meta[field][sample["row"]] = sample[field]
        if sample["error"]:
            meta["views"][sample["row"]] = blank
            self.bar.update()

    def run_batch(self, batch: list[dict], writer: ShardWriter, thread: ThreadPoolExecutor,
                  meta: dict, blank: np.ndarray) -> list[Future]:  # fmt: skip
        if self.decoder is not None:
            self.decoder(batch)
            for sample in batch:
                if sample["inputs"] is None:  # PIL skipped a JPEG the device could not decode
                    self.record(meta, sample, blank)
            batch = [sample for sample in batch if sample["inputs"] is not None]
            if not batch:
                return []
        outputs = encode_batch(self.encoders, batch, self.autocast)
        self.bar.update(len(batch))
        return [thread.submit(writer.add, [sample["row"] for sample in batch], outputs)]
