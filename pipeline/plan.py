"""Plan a store: list the source, create (or re-check) the store skeleton, report the shard count.

Planning is the only step that lists the source; the listing goes into `samples/`, from where every
extraction job reads its rows, so all jobs agree on which image lives in which row.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from pipeline.backbones import Backbone, BackboneSpec, load_backbone, probe_shapes
from pipeline.config import groups_of, public_config
from pipeline.sources import list_source
from storage_specs.layout import (
    FEATURE_DIMS,
    PREFIX_DIMS,
    STORAGE_DTYPES,
    create_store,
    feature_path,
    n_shards,
    prefix_path,
    require_array,
)

PACKAGES = ("featinv", "torch", "timm", "zarr", "numcodecs", "numpy", "pillow", "fsspec")


def provenance(config: dict) -> dict:
    """Where a store came from; never credentials (URLs redacted, environment not read)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "packages": versions,
        "config": public_config(config),
    }


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def array_attrs(backbone: Backbone, layer: str, kind: str, stride: int, dtype: str) -> dict:
    return {
        "backbone": backbone.spec.name,
        "layer": layer,
        "kind": kind,
        "group": backbone.spec.group,
        "weights": backbone.weights.to_attrs(),
        "pretrained": backbone.weights.pretrained,
        "preprocessing": backbone.preprocessing_attrs(),
        "stride": stride,
        "dtype": dtype,
    }


def plan_store(config: dict) -> dict:
    """Create or re-check the store for `config` (validated); returns what Snakemake needs."""
    listing = list_source(config["source"])
    items = listing.items[: config["limit"]] if config["limit"] else listing.items
    root = create_store(
        config["store"],
        keys=[item.key for item in items],
        sources=[item.uri for item in items],
        labels=[item.label for item in items],
        classes=listing.classes,
        shard_size=config["shard_size"],
        groups=groups_of(config),
        provenance=provenance(config),
    )
    for entry in config["backbones"]:
        _require_backbone_arrays(
            root, load_backbone(BackboneSpec.from_config(entry), config["seed"]), config
        )
    return {
        "store": public_config(config)["store"],
        "n_samples": len(items),
        "n_shards": n_shards(len(items), config["shard_size"]),
        "groups": groups_of(config),
        "ignored": listing.ignored,
    }


def _require_backbone_arrays(root, backbone: Backbone, config: dict) -> None:
    dtype, storage = config["dtype"], STORAGE_DTYPES[config["dtype"]]
    for layer, shape in probe_shapes(backbone).items():
        targets = [
            (feature_path(backbone.spec.name, layer), "spatial", shape["grid"], FEATURE_DIMS)
        ]
        if shape["prefix"]:
            targets.append(
                (
                    prefix_path(backbone.spec.name, layer),
                    "prefix_tokens",
                    shape["prefix"],
                    PREFIX_DIMS,
                )
            )
        for path, kind, per_sample, dims in targets:
            require_array(
                root,
                path,
                per_sample_shape=per_sample,
                dtype=storage,
                dims=dims,
                shard_size=config["shard_size"],
                attrs=array_attrs(backbone, layer, kind, shape["stride"], dtype),
            )
