"""Scores of a feature inversion, per sample, for the evaluation command to aggregate.

Three questions, three groups: do the generated image's re-extracted features match the features
it was generated from (`flat_cosine`, `position_cosine_median`, `relative_l2`, `topk_agreement`),
does the image match the original (`psnr`, `ssim`, `lpips`), and do the two sets look alike
(`frechet_distance`, `inception_fid`). Image metrics come from torchmetrics so numbers are
comparable with published ones. LPIPS and Inception FID need pretrained weights: they are looked
up in the local cache before anything is built, and `MetricUnavailable` says what is missing
rather than letting a download start (or hang) on a machine without internet.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

# PSNR of identical images is infinite; report this instead so means and tables stay finite.
PSNR_CAP = 100.0
# Wang et al.'s SSIM window (torchmetrics' default): an 11x11 Gaussian of sigma 1.5. It fits the
# 32x32 images the demo stores; smaller images are refused rather than scored with another window.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
# torchvision weights of each LPIPS backbone; the linear heads ship inside torchmetrics.
LPIPS_BACKBONES = {
    "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


class MetricUnavailable(ValueError):
    """A metric whose package or pretrained weights are not on this machine (one-line reason)."""


def flat_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity per sample between two batches of maps, over the flattened map."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float())


def position_cosine_median(a: Tensor, b: Tensor) -> Tensor:
    """FeatInv's feature similarity: cosine over channels at each position of `[N, C, y, x]`
    maps, then the median over positions, per sample (a few bad positions do not dominate).

    The median is the usual one (mean of the two middle values for an even count), not
    `torch.median`'s lower middle value.
    """
    per_position = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)
    return torch.quantile(per_position.flatten(1), 0.5, dim=1)


def relative_l2(a: Tensor, b: Tensor) -> Tensor:
    """`||a - b|| / ||b||` per sample, `b` being the reference (the original features)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return (a - b).norm(dim=1) / b.norm(dim=1)


def topk_agreement(logits_original: Tensor, logits_reconstruction: Tensor, k: int) -> Tensor:
    """Per sample 1.0 if the original's top-1 class is among the reconstruction's top-k classes,
    else 0.0 (k=1: same argmax). Logits are `[N, classes]`; a tie for the original's top-1 goes
    to the lower class index."""
    top1 = logits_original.argmax(dim=1, keepdim=True)
    topk = logits_reconstruction.topk(k, dim=1).indices
    return (topk == top1).any(dim=1).float()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB per sample of uint8 images `[N, 3, H, W]`, capped at `PSNR_CAP`."""
    _check_uint8(x, y)
    values = peak_signal_noise_ratio(
        x.float(), y.float(), data_range=255.0, reduction="none", dim=(1, 2, 3)
    )
    return values.clamp(max=PSNR_CAP)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per sample of uint8 images `[N, 3, H, W]` with the `SSIM_WINDOW` Gaussian window."""
    _check_uint8(x, y)
    height, width = x.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels "
            f"(its Gaussian window), got {height}x{width}"
        )
    return structural_similarity_index_measure(
        x.float(), y.float(), sigma=SSIM_SIGMA, data_range=255.0, reduction="none"
    )


def lpips_metric(net_type: str = "alex") -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics' LPIPS (per-sample scores, inputs in [0, 1]), built only once the backbone's
    torchvision weights are in the torch hub cache. AlexNet needs images of at least 31x31."""
    weights = LPIPS_BACKBONES[net_type]
    _cached_weights("LPIPS", f"torchvision {weights} weights", weights.url)
    return LearnedPerceptualImagePatchSimilarity(
        net_type=net_type, reduction="none", normalize=True
    )


def lpips(
    x: Tensor, y: Tensor, metric: LearnedPerceptualImagePatchSimilarity | None = None
) -> Tensor:
    """LPIPS per sample of uint8 images `[N, 3, H, W]` (lower is closer). Pass a `lpips_metric()`
    to reuse it across batches; one is built (weights loaded) otherwise."""
    _check_uint8(x, y)
    metric = (lpips_metric() if metric is None else metric).to(x.device)
    metric.reset()
    metric.update(x.float() / 255, y.float() / 255)
    return metric.compute().reshape(-1)


def inception_fid_metric() -> FrechetInceptionDistance:
    """torchmetrics' FID on torch-fidelity's InceptionV3 (2048-d pool features, the published
    one), built only when that package and its weights file in the torch hub cache exist."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable(
            "Inception FID unavailable: package torch-fidelity is not installed "
            "(pip install torch-fidelity)"
        )
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = _cached_weights("Inception FID", "torch-fidelity InceptionV3 weights", URL_INCEPTION_V3)
    # An explicit path: torch-fidelity would otherwise download when the file is missing.
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))


def inception_fid(
    x_real: Tensor, x_fake: Tensor, metric: FrechetInceptionDistance | None = None
) -> float:
    """FID between two sets of uint8 images `[N, 3, H, W]` (at least 2 each)."""
    _check_uint8(x_real, x_fake)
    metric = (inception_fid_metric() if metric is None else metric).to(x_real.device)
    metric.reset()
    metric.update(x_real, real=True)
    metric.update(x_fake, real=False)
    return float(metric.compute())


def pooled(features: Tensor) -> Tensor:
    """`[N, C, y, x]` maps mean-pooled over positions to `[N, C]` vectors for `frechet_distance`."""
    return features.float().mean(dim=(2, 3))


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of vectors `[N, D]` (N >= 2 each).

    torchmetrics' FID with the vectors as their own features, so the formula is the one behind
    `inception_fid`; its float64 moments and eigenvalue form of the trace term stay real and
    finite for the singular covariances of few samples (N <= D). Rounding can leave identical
    sets slightly below 0 (~1e-7 of the covariance trace); that is clamped to 0.
    """
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(float(metric.compute()), 0.0)


class _GivenFeatures(torch.nn.Identity):
    """Identity 'feature extractor' that tells FrechetInceptionDistance its width."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def _check_uint8(x: Tensor, y: Tensor) -> None:
    """Image metrics assume 0..255 pixels; floats in [0, 1] would score silently wrong."""
    if x.dtype != torch.uint8 or y.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype} and {y.dtype}")


def _cached_weights(metric: str, what: str, url: str) -> Path:
    """The file `torch.hub.load_state_dict_from_url(url)` would read, checked to exist so that
    nothing tries to download it."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        raise MetricUnavailable(
            f"{metric} unavailable: {what} are not in the torch hub cache ({path}); "
            f"put {url} there to enable it"
        )
    return path
