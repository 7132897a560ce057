"""Everything a job runs over views: backbones (features) and targets (pixels, VAE latents).

They share one small interface — `name`, `group`, `prepare(image, views)` (in the decode
workers), `encode(batch)` (in the job), `array_specs(dtype)` (for the plan) — so the extraction job
does not care which is which, and one decode serves all encoders of a group.
"""

from __future__ import annotations

from pipeline.backbones import (
    Backbone,
    BackboneInputs,
    BackboneSpec,
    data_config_of,
    load_backbone,
)
from pipeline.targets import PixelsTarget, TargetInputs, VaeTarget, load_target, target_inputs
from pipeline.views import ViewSpec

Encoder = Backbone | PixelsTarget | VaeTarget


def load_encoders(config: dict, group: str | None = None, device: str = "cpu") -> list[Encoder]:
    """The encoders of one group (all groups when `group` is None), in config order."""
    encoders: list[Encoder] = [
        load_backbone(BackboneSpec.from_config(entry), config["seed"], device)
        for entry in config["backbones"]
        if group is None or entry["group"] == group
    ]
    encoders += [
        load_target(entry, device)
        for entry in config["targets"]
        if group is None or entry["group"] == group
    ]
    return encoders


def load_prepares(config: dict, group: str) -> dict[str, BackboneInputs | TargetInputs]:
    """Each encoder's `prepare` by name, as `load_encoders` would give them, without loading a
    weight: a job's decode workers start on these while its models load."""
    prepares = {
        entry["name"]: BackboneInputs.of(data_config_of(BackboneSpec.from_config(entry)))
        for entry in config["backbones"]
        if entry["group"] == group
    }
    targets = [entry for entry in config["targets"] if entry["group"] == group]
    return prepares | {entry["name"]: target_inputs(entry) for entry in targets}


def resolve_views(config: dict) -> ViewSpec:
    """The config's `views`, with view 0 defaulting to the first backbone's timm eval crop."""
    views = dict(config["views"])
    data_config = data_config_of(BackboneSpec.from_config(config["backbones"][0]))
    if views.get("eval_crop_pct") is None:
        views["eval_crop_pct"] = data_config["crop_pct"]
    if views.get("eval_crop_mode") is None:
        views["eval_crop_mode"] = data_config["crop_mode"]
    views["eval_size"] = tuple(data_config["input_size"][1:])
    return ViewSpec.from_config(views)
