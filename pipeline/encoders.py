"""Everything a job runs over views: backbones (features) and targets (pixels, VAE latents).

They share one small interface — `name`, `group`, `prepare(image, views)` (in the decode
workers), `encode(batch)` (in the job), `array_specs(dtype)` (for the plan) — so the extraction job
does not care which is which, and one decode serves all encoders of a group.
"""

from __future__ import annotations

import torch

from pipeline.backbones import Backbone, BackboneSpec, load_backbone, resolve_preprocessing
from pipeline.targets import PixelsTarget, VaeTarget, load_target
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


def resolve_views(config: dict) -> ViewSpec:
    """The config's `views`, with view 0 defaulting to the first backbone's timm eval crop."""
    import timm

    views = dict(config["views"])
    first = config["backbones"][0]
    with torch.device("meta"):
        model = timm.create_model(first["name"], pretrained=False)
    data_config = resolve_preprocessing(model, first.get("preprocessing") or {})
    if views.get("eval_crop_pct") is None:
        views["eval_crop_pct"] = data_config["crop_pct"]
    if views.get("eval_crop_mode") is None:
        views["eval_crop_mode"] = data_config["crop_mode"]
    views["eval_size"] = tuple(data_config["input_size"][1:])
    return ViewSpec.from_config(views)
