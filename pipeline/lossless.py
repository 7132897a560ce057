"""The lossless chain of each new array, chosen by measurement on its own first samples.

No fixed chain is smallest on every array (dense maps want their byte planes coded apart, sparse
post-ReLU maps plain zstd, or featinv.sparse where readers have featinv-codecs:
benchmarks/RESULTS.md, section 2), so the plan encodes the first `SAMPLE_ROWS` usable images of
the first shard with every encoder, as the extraction job would, and lets `choose_lossless` pick
each array's chain on those values before it creates the array.
Arrays that exist keep the chain their metadata records: jobs may be writing them.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from itertools import islice

import numpy as np
import torch
import zarr

from pipeline.config import with_credentials
from pipeline.decode import ImageLimits
from pipeline.encoders import Encoder
from pipeline.extract import autocast_for, encode_batch, prepare
from pipeline.shard_writer import to_storage
from pipeline.sources import SourceItem, read_items
from pipeline.views import ViewSpec
from storage_specs.codecs import READERS, choose_lossless, needs_choice
from storage_specs.layout import ArraySpec, array_chunks

SAMPLE_ROWS = 32  # at most: the chunks' sizes, not their count, decide (a chunk per sample-view)


class Collected:
    """What `encode_batch` makes, kept in memory at each array's storage dtype."""

    def __init__(self, dtypes: dict[str, str]):
        self.dtypes, self.rows = dtypes, {path: [] for path in dtypes}

    def put(self, path: str, values: torch.Tensor) -> None:
        if path in self.dtypes:  # arrays whose chain is set need no sample
            self.rows[path].append(to_storage(values, self.dtypes[path]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {path: np.concatenate(parts) for path, parts in self.rows.items() if parts}


def choose_chains(
    root: zarr.Group, specs: list[ArraySpec], encoders: list[Encoder], config: dict,
    items: list[SourceItem],
) -> list[ArraySpec]:  # fmt: skip
    """`specs` with every open lossless chain settled: read from the store for existing arrays,
    measured on the first samples for new ones (`planar` where none of them decodes)."""
    open_ = [spec for spec in specs if needs_choice(spec.compression)]
    stored = {s.path: root[s.path].attrs.get("compression", {}) for s in open_ if s.path in root}
    new = [spec for spec in open_ if spec.path not in stored]
    views = ViewSpec.from_config(root.attrs["views"])  # the views the jobs will render
    values = first_values(config, encoders, items, new, views) if new else {}
    return [_settled(spec, stored, values) for spec in specs]


def _settled(spec: ArraySpec, stored: dict[str, dict], values: dict[str, np.ndarray]) -> ArraySpec:
    if not needs_choice(spec.compression):
        return spec
    if spec.path in stored:  # the chain it was made with (a lossy one fails in require_array)
        made = stored[spec.path]
        if made.get("mode") != "lossless":
            return spec
        chain = {key: made[key] for key in ("mode", "shuffle", "level") if key in made}
        return replace(spec, compression=chain)
    if spec.path not in values:
        return spec
    data, reader = values[spec.path], spec.compression.get("reader", READERS[0])
    chunks = array_chunks(spec.kind, data.shape)
    return replace(spec, compression=choose_lossless(data, chunks, reader))


def first_values(
    config: dict, encoders: list[Encoder], items: list[SourceItem], specs: list[ArraySpec],
    views: ViewSpec,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The stored values (`[sample, view, ...]`) of the first `SAMPLE_ROWS` usable images of the
    first shard, per array path of `specs`; unusable images are skipped as extraction skips them."""
    torch.set_num_threads(config["threads"])
    limits = ImageLimits(**config["image_limits"])
    prepares = {encoder.name: encoder.prepare for encoder in encoders}
    rows = items[: config["shard_size"]]
    uris = [with_credentials(item.uri, config["source"]) for item in rows]
    usable = (
        {"row": i, **prepare(data, rows[i].key, prepares, views, limits)}
        for i, data in read_items(uris, limits.max_bytes)
    )
    samples = list(islice((s for s in usable if s["inputs"] is not None), SAMPLE_ROWS))
    collected = Collected({spec.path: spec.dtype for spec in specs})
    autocast = autocast_for(config["autocast"], torch.device("cpu"))
    for start in range(0, len(samples), config["batch_size"]):
        batch = samples[start : start + config["batch_size"]]
        for path, values in encode_batch(encoders, batch, autocast).items():
            collected.put(path, values)
    if not samples:
        print("featinv: no usable image in the first shard to choose lossless chains on: "
              "planar for every array", file=sys.stderr)  # fmt: skip
    return collected.arrays()
