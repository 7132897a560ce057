"""Views: the crops (and flips) of an image that features and targets are computed from.

FeatInv trains on augmented views (random resized crop + flip), and a feature map and its
target (VAE latent or pixels) are a pair only if both come from the same view.  So a view is data:
a crop box in original-image pixel coordinates plus a flip flag, drawn from a generator seeded by
(seed, sample key), identical in every job that touches the sample, and stored with it.  View 0
is the deterministic evaluation view (timm's centre crop); views 1..K-1 are random.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class ViewSpec:
    """The `views:` section of the config."""

    count: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    eval_size: tuple[int, int] = (224, 224)
    eval_crop_pct: float = 0.875
    eval_crop_mode: str = "center"

    @classmethod
    def from_config(cls, views: dict) -> ViewSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in views.items()})

    def to_attrs(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def eval_box(height: int, width: int, size: tuple[int, int], crop_pct: float, crop_mode: str):
    """timm's evaluation transform (resize by 1/crop_pct, centre crop to `size`) as a box.

    The integer rounding of torchvision's Resize and CenterCrop is reproduced, so resampling the
    box to `size` in one step gives timm's eval input (same sample positions, same filter).
    """
    scaled = [math.floor(s / crop_pct) for s in size]
    if crop_mode == "squash" or scaled[0] != scaled[1]:
        resized_h, resized_w = scaled
    elif height <= width:
        resized_h, resized_w = scaled[0], int(scaled[0] * width / height)
    else:
        resized_h, resized_w = int(scaled[0] * height / width), scaled[0]
    top, left = round((resized_h - size[0]) / 2), round((resized_w - size[1]) / 2)
    sy, sx = height / resized_h, width / resized_w
    return (left * sx, top * sy, (left + size[1]) * sx, (top + size[0]) * sy)


def random_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple, ratio: tuple
) -> tuple[float, ...]:
    """RandomResizedCrop's box (area fraction in `scale`, log-uniform aspect in `ratio`)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    side = min(height, width)  # torchvision's fallback: the largest centred square
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def draw_views(key: str, height: int, width: int, spec: ViewSpec) -> np.ndarray:
    """`[count, 5]` float32 rows of (x0, y0, x1, y1, hflip) for one image."""
    rng = _rng(spec.seed, key)
    box = eval_box(height, width, spec.eval_size, spec.eval_crop_pct, spec.eval_crop_mode)
    views = [(*box, 0.0)]
    for _ in range(spec.count - 1):
        box = random_box(rng, height, width, spec.scale, spec.ratio)
        views.append((*box, float(rng.uniform() < spec.hflip)))
    return np.asarray(views, dtype=np.float32)


def render_view(
    image: Image.Image, view: np.ndarray, size: tuple[int, int], interpolation: str
) -> Image.Image:
    """The view's crop resampled to `size` (H, W) in one step, flipped if the view says so."""
    box = tuple(float(v) for v in view[:4])
    out = image.resize((size[1], size[0]), INTERPOLATION[interpolation], box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view[4] else out
