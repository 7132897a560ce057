"""View 0 is timm's eval transform: the same pixels from one resampling of its box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from timm.data import create_transform

from pipeline.views import eval_box, render_view


@pytest.mark.parametrize("photo", ["chelsea", "rocket", "astronaut"])  # landscape, portrait, square
@pytest.mark.parametrize("size", [(224, 224), (192, 256), (256, 192)])
@pytest.mark.parametrize("mode", ["center", "squash"])
def test_the_eval_view_is_timms_eval_transform(photo, size, mode):
    """Non-square input sizes too: timm resizes keeping the aspect (`ResizeKeepRatio`), then
    crops the centre, unless the mode is `squash`."""
    image = Image.fromarray(getattr(data, photo)()).convert("RGB")
    transform = create_transform(
        input_size=(3, *size), crop_pct=0.875, crop_mode=mode, interpolation="bicubic",
        mean=(0, 0, 0), std=(1, 1, 1),
    )  # fmt: skip
    expected = (transform(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    box = eval_box(image.height, image.width, size, 0.875, mode)
    view = np.asarray(render_view(image, np.array([*box, 0.0]), size, "bicubic"))
    difference = np.abs(view.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # float rounding; was 20-32 levels
