"""Plan a store: list the source, create (or re-check) the store skeleton, report the shard count.

Planning is the only step that lists the source; the listing goes into `samples/`, from where every
extraction job reads its rows, so all jobs agree on which image lives in which row.  It also
settles each new lossless array's chain on the first images (`pipeline.lossless`), before any job
writes.
"""

from __future__ import annotations

from pipeline.config import groups_of, public_config, stage_groups
from pipeline.decode import ImageLimits
from pipeline.encoders import load_encoders, resolve_views
from pipeline.lossless import choose_chains
from pipeline.sources import list_source
from storage_specs.layout import StoreError, create_store, n_shards, require_array
from storage_specs.provenance import provenance, redact_uri


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
    _check_same_limits(root, config)
    encoders = load_encoders(config)
    specs = [spec for encoder in encoders for spec in encoder.array_specs(config["dtype"])]
    for spec in choose_chains(root, specs, encoders, config, items):
        require_array(root, spec)
    return {
        "store": public_config(config)["store"],
        "store_id": root.attrs.get("store_id"),  # markers of another store at the URL are stale
        "n_samples": len(items),
        "n_shards": n_shards(len(items), root.attrs["shard_size"]),
        "shard_size": root.attrs["shard_size"],
        "groups": groups_of(config),
        "stages": {stage: stage_groups(config, stage) for stage in ("features", "latents")},
        "ignored": listing.ignored,
    }


def _check_same_limits(root, config: dict) -> None:
    """The image limits decide which images are skipped: a store keeps those it was begun with."""
    recorded, asked = ImageLimits.of_store(root.attrs), ImageLimits(**config["image_limits"])
    if recorded != asked:
        store = public_config(config)["store"]
        raise StoreError(f"store '{store}' was planned with image_limits {vars(recorded)}, "
                         f"config asks for {vars(asked)}: use a new store")  # fmt: skip
