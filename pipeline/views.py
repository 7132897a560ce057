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
import torch
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
    if crop_mode == "squash":
        resized_h, resized_w = scaled
    elif scaled[0] != scaled[1]:  # timm's ResizeKeepRatio: the image covers `scaled`, aspect kept
        ratio = min(height / scaled[0], width / scaled[1])
        resized_h, resized_w = round(height / ratio), round(width / ratio)
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


# PIL's resampling filters (libImaging/Resample.c): support and kernel, for render_views on tensors.
_FILTERS = {
    "area": (0.5, lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64)),
    "bilinear": (1.0, lambda x: np.maximum(1.0 - np.abs(x), 0.0)),
    "bicubic": (2.0, lambda x: _bicubic(np.abs(x))),
    "lanczos": (3.0, lambda x: np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)),
}
_PRECISION_BITS = 22  # PIL's fixed-point weights for 8-bit images


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resample_weights(n_in: int, lo: float, hi: float, n_out: int, interpolation: str):
    """`[n_out, n_in]` weights of PIL's 8-bit resampling of [lo, hi) to `n_out` pixels, in its
    fixed point (units of 2**-22), so a float64 matrix product reproduces its integer sums.
    PIL takes the box as C floats and subtracts them as such."""
    lo, hi = np.float32(lo), np.float32(hi)
    scale = float(hi - lo) / n_out
    lo = float(lo)
    if interpolation == "nearest":  # PIL's affine nearest: the pixel under each output centre
        weights = np.zeros((n_out, n_in))
        centre = (lo + (np.arange(n_out) + 0.5) * scale).astype(int)
        weights[np.arange(n_out), np.clip(centre, 0, n_in - 1)] = 1 << _PRECISION_BITS
        return weights
    support, kernel = _FILTERS[interpolation]
    filterscale = max(scale, 1.0)
    support *= filterscale
    centre = lo + (np.arange(n_out) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(int), 0)
    taps = np.minimum((centre + support + 0.5).astype(int), n_in) - first
    tap = np.arange(max(taps.max(), 0))  # the kernel on each output's window only, as PIL does
    inside = tap < taps[:, None]
    x = first[:, None] + tap
    w = np.where(inside, kernel((x - centre[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # summed in order, as PIL does
    w = np.divide(w, total, out=w, where=total != 0.0)
    fixed = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    weights = np.zeros((n_out, n_in))
    weights[np.nonzero(inside)[0], x[inside]] = fixed[inside]
    return weights


def _apply(weights: np.ndarray, pixels: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass of PIL's resampling along `dim`: integer sums, rounded, clipped to 0..255."""
    w = torch.from_numpy(weights).to(pixels.device)
    sums = torch.tensordot(pixels, w, dims=([dim], [1])).movedim(-1, dim)
    return torch.floor((sums + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp(0, 255)


def render_views(
    image: Image.Image | torch.Tensor, views: np.ndarray, size: tuple[int, int], interpolation: str
) -> torch.Tensor:
    """`[K, 3, H, W]` uint8 views of a PIL image, or of a decoded `[3, H, W]` uint8 tensor on its
    device (a GPU): the same pixels as `render_view` (PIL's two passes, horizontal first, each
    rounded to 8 bits, reproduced exactly in float64)."""
    if isinstance(image, Image.Image):
        arrays = [np.asarray(render_view(image, v, size, interpolation)) for v in views]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    pixels = image.to(torch.float64)
    out = []
    for x0, y0, x1, y1, flip in views.tolist():
        rows = _apply(resample_weights(image.shape[2], x0, x1, size[1], interpolation), pixels, 2)
        view = _apply(resample_weights(image.shape[1], y0, y1, size[0], interpolation), rows, 1)
        out.append(view.flip(-1) if flip else view)
    return torch.stack(out).to(torch.uint8)
