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

from pipeline.config import groups_of, public_config, redact_uri, stage_groups
from pipeline.encoders import load_encoders, resolve_views
from pipeline.sources import list_source
from storage_specs.layout import create_store, n_shards, require_array

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


def plan_store(config: dict) -> dict:
    """Create or re-check the store for `config` (validated); returns what Snakemake needs."""
    listing = list_source(config["source"])
    items = listing.items[: config["limit"]] if config["limit"] else listing.items
    root = create_store(
        config["store"],
        keys=[item.key for item in items],
        sources=[redact_uri(item.uri) for item in items],  # credentials stay in the config
        labels=[item.label for item in items],
        classes=listing.classes,
        shard_size=config["shard_size"],
        views=resolve_views(config).to_attrs(),
        groups=groups_of(config),
        provenance=provenance(config),
    )
    for encoder in load_encoders(config):
        for spec in encoder.array_specs(config["dtype"]):
            require_array(root, spec)
    return {
        "store": public_config(config)["store"],
        "n_samples": len(items),
        "n_shards": n_shards(len(items), config["shard_size"]),
        "groups": groups_of(config),
        "stages": {stage: stage_groups(config, stage) for stage in ("features", "latents")},
        "ignored": listing.ignored,
    }
