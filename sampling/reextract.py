"""Re-extract the features of generated images with exactly the backbone a store records.

Evaluation is the one place after extraction that runs a backbone, and it must be the same one:
the weights, layer and preprocessing come from the feature array's attributes (or a training
record's copy of them), and the forward pass is the extraction stage's own code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.backbones import PREPROCESSING_KEYS, Backbone, BackboneSpec, load_backbone


def recorded_backbone(attrs: dict, device: str = "cpu") -> Backbone:
    """The backbone of a feature array's attributes (`backbone`, `layer`, `weights`,
    `preprocessing`), random weights re-made from their recorded seed."""
    spec = BackboneSpec(
        name=attrs["backbone"],
        weights=attrs["weights"]["source"],
        layers=(attrs["layer"],),
        preprocessing={k: attrs["preprocessing"][k] for k in PREPROCESSING_KEYS},
    )
    return load_backbone(spec, seed=attrs["weights"].get("seed") or 0, device=device)


def inputs(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The backbone's inputs of uint8 images `[N, 3, H, W]`, each taken whole as its view
    (resampled to the backbone's input size with its interpolation, then normalised)."""
    out = []
    for image in images:
        pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))
        whole = np.array([[0, 0, pil.width, pil.height, 0]], np.float32)
        out.append(backbone.prepare(pil, whole))
    return torch.cat(out)


def reextract(backbone: Backbone, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Features `[N, C, y, x]` of uint8 images `[N, 3, H, W]` at the recorded layer."""
    path = f"features/{backbone.name}/{backbone.spec.layers[0]}"
    maps = []
    for i in range(0, len(images), batch_size):
        with torch.inference_mode():
            maps.append(backbone.encode(inputs(backbone, images[i : i + batch_size]))[path])
    return torch.cat(maps).float().cpu()


def classify(backbone: Backbone, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The whole network's logits of prepared inputs `x` (see `inputs`)."""
    device = next(backbone.model.parameters()).device
    with torch.inference_mode():
        return torch.cat([backbone.model(x[i : i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])  # fmt: skip
