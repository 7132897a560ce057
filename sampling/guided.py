"""Training-free guided decoding (Shirahama et al., "Feature Space Analysis by Guided Diffusion
Model"): an unconditional prior's reverse process steered so that the backbone's feature of its
clean estimate matches a target feature.

At each DDIM step the prior predicts the noise with gradients on; the clean estimate x0 is
decoded to an image, preprocessed for the backbone differentiably (straight-through rounding to
8-bit levels, resize, normalise), and the squared L2 distance of its feature at the layer to the
target is differentiated with respect to the current sample.  That gradient, rescaled to the norm
of the noise prediction and clipped to mean ± tau·std, is added `scale` times to the noise
prediction (the paper's "subtract" of the log-likelihood gradient: adding the distance's gradient
moves the clean estimate down the distance).  "Time travel" re-noises the result back to the same
step and repeats it; the best clean estimate along the trajectory is kept.

Work in progress for issue 9: the loop and its gradient handling; the command, the output store,
the pixel-optimisation row and the benchmark are to follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.backbones import Backbone, LayerTaps


def rescaled_clipped(grad: torch.Tensor, eps: torch.Tensor, tau: float) -> torch.Tensor:
    """Per sample: `grad` rescaled to the norm of `eps`, then clipped to its mean ± tau·std."""
    flat = grad.flatten(1)
    norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    flat = flat * (eps.flatten(1).norm(dim=1, keepdim=True) / norm)
    mean, std = flat.mean(dim=1, keepdim=True), flat.std(dim=1, keepdim=True)
    return torch.clamp(flat, mean - tau * std, mean + tau * std).view_as(grad)


class FeatureDistance:
    """Squared L2 distance per sample between a backbone's feature of images in [-1, 1] and a
    target (a map `[C, y, x]` per sample, or a pooled vector `[C]`, compared mean-pooled)."""

    def __init__(self, backbone: Backbone, target: torch.Tensor):
        self.backbone, self.target = backbone, target.float()
        cfg = backbone.data_config
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        x = x + ((x * 255).round().clamp(0, 255) / 255 - x).detach()  # straight-through 8-bit
        x = F.interpolate(x, size=self.backbone.input_hw, mode="bilinear", antialias=True)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        layer = self.backbone.spec.layers[0]
        grid = LayerTaps(self.backbone.model, (layer,))(x)[layer][0]
        return grid.mean(dim=(2, 3)) if self.target.ndim == 2 else grid

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        diff = self.features(images) - self.target.to(images.device)
        return diff.flatten(1).pow(2).sum(dim=1)


def _eps_and_x0(prediction, x, alpha_bar, prediction_type: str):
    """The noise and clean estimates of `x` at a step from an epsilon or v prediction."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    eps = a * prediction + s * x if prediction_type == "v_prediction" else prediction
    return eps, (x - s * eps) / a


def guided_decode(prior, scheduler, distance: FeatureDistance, to_image, shape: tuple, *,
                  steps: int = 50, scale: float = 4.0, tau: float = 3.0,
                  travel=lambda i: 1, stop_at: float | None = None,
                  generator=None) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """Best clean estimates (model space) along the guided trajectory, their distances, and the
    prior passes spent.  `prior(x, t) -> prediction` (the scheduler config's prediction type),
    `scheduler` a DDIM scheduler, `to_image` model space -> images in [-1, 1] (differentiable),
    `travel(i)` the repeats of step i, `stop_at` a distance below which a sample is done."""
    kind = scheduler.config.prediction_type
    scheduler.set_timesteps(steps)
    n = distance.target.shape[0]
    x = torch.randn((n, *shape), generator=generator)
    best, best_d, passes = x.clone(), torch.full((n,), float("inf")), 0
    for i, t in enumerate(scheduler.timesteps):
        alpha_bar = scheduler.alphas_cumprod[t]
        prev_t = t - scheduler.config.num_train_timesteps // steps
        alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        for k in range(travel(i)):
            x = x.detach().requires_grad_(True)
            eps, x0 = _eps_and_x0(prior(x, t.expand(n)), x, alpha_bar, kind)
            d = distance(to_image(x0))
            (grad,) = torch.autograd.grad(d.sum(), x)
            passes += 1
            better = d.detach() < best_d
            best[better], best_d[better] = x0.detach()[better], d.detach()[better]
            guided = eps.detach() + scale * rescaled_clipped(grad, eps.detach(), tau)
            x0 = (x.detach() - (1 - alpha_bar).sqrt() * guided) / alpha_bar.sqrt()
            x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * guided  # DDIM, eta 0
            if k + 1 < travel(i):  # back to step t: x_t ~ q(x_t | x_{t-1})
                ratio = alpha_bar / alpha_prev
                noise = torch.randn(x.shape, generator=generator)
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * noise
        if stop_at is not None and bool((best_d <= stop_at).all()):
            break
    return best, best_d, passes
