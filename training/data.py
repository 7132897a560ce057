"""Training pairs from a store: which arrays, which rows, in which order, for which rank.

Everything a run could trip over later (an incomplete store, a missing array, another spec version,
too few pairs) is checked in `open_training_data`, before any model is built.  Then the order of
the pairs is a pure function of (seed, epoch), cut into global batches of which every rank reads
its own part; a position in that order is (epoch, items consumed), so a run resumes mid-epoch
exactly, and the DataLoader's workers read ahead through the store's shard-aware reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from storage_specs.datasets import PairDataset
from storage_specs.layout import StoreError
from storage_specs.provenance import redact_url
from storage_specs.reader import FeatureStore
from storage_specs.split import RULE, heldout_mask

# What the training record copies from the arrays (the model must be usable without the store).
FEATURE_ATTRS = ("backbone", "layer", "weights", "preprocessing", "stride", "dtype")
TARGET_ATTRS = ("size", "interpolation", "vae", "scaling_factor")


@dataclass
class TrainingData:
    """The pairs of one run: arrays to read, training and held-out rows, views, store facts."""

    url: str
    arrays: dict[str, str]  # item name -> array path: features, then mean/logvar or pixels
    target_kind: str  # "latents" or "pixels"
    train_rows: np.ndarray
    heldout_rows: np.ndarray
    views: list[int]
    feature_shape: tuple[int, ...]  # [C, y, x]
    target_shape: tuple[int, ...]  # [C, H, W]
    channel_stats: dict
    scaling_factor: float | None
    record: dict  # what the training record says about the store and the split

    def dataset(self, rows: np.ndarray | None = None) -> PairDataset:
        rows = self.train_rows if rows is None else rows
        return PairDataset(self.url, self.arrays, rows=rows, views=self.views)

    def to_model_space(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion model's x0: a latent sample (fresh noise per use) or pixels in [-1, 1]."""
        if self.target_kind == "pixels":
            return batch["pixels"].float() / 127.5 - 1.0
        mean, logvar = batch["mean"].float(), batch["logvar"].float()
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.scaling_factor


def _target_arrays(store: FeatureStore, target: str) -> dict[str, str]:
    kind, name = target.split("/")
    if kind == "pixels":
        return {"pixels": store.require(f"pixels/{name}/rgb").path}
    return {stat: store.require(f"latents/{name}/{stat}").path for stat in ("mean", "logvar")}


def _require_complete(store: FeatureStore) -> None:
    if not store.complete:
        pending = (store.root.attrs.get("summary") or {}).get("pending_groups")
        raise StoreError(
            f"store '{store.url}' is not complete (pending groups: {pending or 'not finalized'}): "
            "finish `snakemake extract_features encode_latents` first"
        )


def _attrs(arr, keys: tuple[str, ...]) -> dict:
    return {key: arr.attrs.get(key) for key in keys}


def open_training_data(url: str, spec: dict) -> TrainingData:
    """The run's pairs, or StoreError naming what is wrong with the store for this config."""
    store = FeatureStore(url)  # refuses other spec versions
    _require_complete(store)
    features = store.require(spec["features"])
    if not features.attrs.get("channel_stats"):
        raise StoreError(f"{spec['features']} in '{url}' has no channel_stats")
    arrays = {"features": features.path, **_target_arrays(store, spec["target"])}
    target = store.root[arrays.get("pixels") or arrays["mean"]]
    count = store.root.attrs["views"]["count"]
    views = list(range(count)) if spec["views"] is None else list(spec["views"])
    if max(views) >= count:
        raise StoreError(f"config training.views: {views} out of range, the store has {count}")
    samples = store.samples()
    held = heldout_mask(samples["key"], spec["heldout"]["fraction"], spec["heldout"]["salt"])
    train_rows = np.flatnonzero(samples["valid"] & ~held)
    heldout_rows = np.flatnonzero(samples["valid"] & held)
    n_pairs = len(train_rows) * len(views)
    if n_pairs < spec["batch_size"]:
        raise StoreError(f"'{url}' has {n_pairs} training pairs, fewer than one batch "
                         f"(training.batch_size {spec['batch_size']})")  # fmt: skip
    kind = target.path.split("/")[0]
    record = {
        "url": redact_url(url),
        "store_id": store.root.attrs.get("store_id"),  # the same store wherever it is moved
        "spec": store.root.attrs["featinv_spec"],
        "n_samples": store.n_samples,
        "features": {"path": features.path, **_attrs(features, FEATURE_ATTRS)},
        "target": {"kind": kind, "paths": sorted(p for n, p in arrays.items() if n != "features"),
                   "shape": list(target.shape[2:]), **_attrs(target, TARGET_ATTRS)},
        "views": views,
        "store_views": dict(store.root.attrs["views"]),
        "split": {"rule": RULE, **spec["heldout"], "n_train_samples": len(train_rows),
                  "n_heldout_samples": len(heldout_rows), "n_train_pairs": n_pairs},
    }  # fmt: skip
    return TrainingData(
        url=url,
        arrays=arrays,
        target_kind=kind,
        train_rows=train_rows,
        heldout_rows=heldout_rows,
        views=views,
        feature_shape=tuple(features.shape[2:]),
        target_shape=tuple(target.shape[2:]),
        channel_stats=features.attrs["channel_stats"],
        scaling_factor=target.attrs.get("scaling_factor"),
        record=record,
    )


@dataclass(frozen=True)
class Position:
    """Where a run is in its stream of pairs: the epoch and the items of it already consumed."""

    epoch: int = 0
    offset: int = 0


class EpochBatches(torch.utils.data.Sampler):
    """One rank's batches of item indices, from `start` on, `count` of them.

    Epoch `e` is a permutation of the items seeded by (seed, e), cut into global batches of
    `batch_size x world` items (the rest of an epoch is dropped); rank `r` takes the r-th slice of
    each.  Positions are counted in items, so a run may resume with another number of ranks.
    """

    def __init__(self, n_items: int, batch_size: int, world: int, rank: int, seed: int,
                 start: Position, count: int):  # fmt: skip
        self.n_items, self.batch_size, self.world, self.rank = n_items, batch_size, world, rank
        self.seed, self.start, self.count = seed, start, count
        if n_items < self.global_batch:
            raise StoreError(f"{n_items} training pairs are fewer than one global batch "
                             f"({batch_size} x {world} processes)")  # fmt: skip

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def _rolled(self, position: Position) -> Position:
        """The same position, moved to the next epoch when this one has no whole batch left."""
        if position.offset + self.global_batch > self.n_items:
            return Position(position.epoch + 1, 0)
        return position

    def advance(self, position: Position, batches: int) -> Position:
        """The position after `batches` more global batches (what `__iter__` would reach)."""
        position = self._rolled(position)
        left = (self.n_items - position.offset) // self.global_batch
        if batches < left:
            return Position(position.epoch, position.offset + batches * self.global_batch)
        per_epoch = self.n_items // self.global_batch
        epochs, batches = divmod(batches - left, per_epoch)
        return Position(position.epoch + 1 + epochs, batches * self.global_batch)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        position, order = self.start, (None, None)
        for _ in range(self.count):
            position = self._rolled(position)
            if order[0] != position.epoch:
                order = (position.epoch, self.permutation(position.epoch))
            first = position.offset + self.rank * self.batch_size
            yield order[1][first : first + self.batch_size].tolist()
            position = Position(position.epoch, position.offset + self.global_batch)
