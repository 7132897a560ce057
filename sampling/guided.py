"""Training-free guided decoding (Shirahama et al., "Feature Space Analysis by Guided Diffusion
Model"): a diffusion prior's reverse process steered so that the backbone's feature of its clean
estimate matches a target feature.

At each DDIM step the prior predicts the noise with gradients on; the clean estimate x0 is
decoded to an image, preprocessed for the backbone differentiably (straight-through rounding to
8-bit levels, resize, normalise), and the squared L2 distance of its feature at the layer to the
target is differentiated with respect to the current sample.  That gradient, rescaled to the norm
of the noise prediction and clipped to mean ± tau·std, is added `scale` times to the noise
prediction (the paper's "subtract" of the log-likelihood gradient: adding the distance's gradient
moves the clean estimate down the distance).  "Time travel" re-noises the result back to the same
step and repeats it; the best clean estimate along the trajectory is kept.

Cheaper than the paper's ~13,000 passes per image by: few DDIM steps; adaptive time travel (a
sample stops repeating a step once `patience` repeats in a row did not raise the step's best
cosine by `min_gain`);
stopping each sample once its feature cosine reaches `stop_cosine` (finished samples leave the
batch, so they cost nothing more); many targets per batch, each with its own generator, so a
sample does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.backbones import Backbone
from sampling.priors import Prior


def rescaled_clipped(grad: torch.Tensor, eps: torch.Tensor, tau: float) -> torch.Tensor:
    """Per sample: `grad` rescaled to the norm of `eps`, then clipped to its mean ± tau·std."""
    flat = grad.flatten(1)
    norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    flat = flat * (eps.flatten(1).norm(dim=1, keepdim=True) / norm)
    mean, std = flat.mean(dim=1, keepdim=True), flat.std(dim=1, keepdim=True)
    return torch.clamp(flat, mean - tau * std, mean + tau * std).view_as(grad)


def straight_through_8bit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images rounded to 8-bit levels forward, identity backward (what saving does)."""
    return x + ((x * 255).round().clamp(0, 255) / 255 - x).detach()


class FeatureDistance:
    """The backbone's feature of images in [-1, 1] against targets, as the evaluation measures it:
    the image saved as 8-bit, resampled to the input size with the backbone's interpolation
    (8-bit again), normalised.  Targets are maps `[N, C, y, x]`, or pooled vectors `[N, C]`
    (compared with the mean-pooled map)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        cfg = backbone.data_config
        self.mode = (
            cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bilinear"
        )
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def features(self, images: torch.Tensor, pooled: bool) -> torch.Tensor:
        x = straight_through_8bit((images.float().clamp(-1, 1) + 1) / 2)
        if tuple(x.shape[-2:]) != self.backbone.input_hw:
            x = F.interpolate(x, size=self.backbone.input_hw, mode=self.mode, antialias=True)
            x = straight_through_8bit(x.clamp(0, 1))
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        layer = self.backbone.spec.layers[0]
        grid = self.backbone.taps((layer,))(x)[layer][0]
        return grid.mean(dim=(2, 3)) if pooled else grid

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        """Squared L2 distance and cosine per sample (flattened features)."""
        made = self.features(images, pooled=targets.ndim == 2).flatten(1)
        targets = targets.to(made.device).float().flatten(1)
        return (made - targets).pow(2).sum(dim=1), F.cosine_similarity(made, targets, dim=1)


@dataclass
class GuidedResult:
    """Per target: the best clean estimate (model space), its distance and cosine, the guided
    passes spent, and the best cosine after each pass (the cosine-versus-passes curve)."""

    x0: torch.Tensor
    distance: torch.Tensor
    cosine: torch.Tensor
    passes: torch.Tensor
    trace: list[list[float]] = field(repr=False)


def _eps_and_x0(prediction, x, alpha_bar, prediction_type: str):
    """The noise and clean estimates of `x` at a step from an epsilon or v prediction."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "v_prediction":  # x0 directly: no division by a tiny sqrt(alpha_bar)
        return a * prediction + s * x, a * x - s * prediction
    return prediction, (x - s * prediction) / a


def _noise(shape: tuple, generators: list[torch.Generator], index, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=generators[int(i)]) for i in index]).to(device)


class BestSoFar:
    """The best image of each target so far (lowest distance), with the passes spent and the
    best cosine after each pass."""

    def __init__(self, x: torch.Tensor):
        n = len(x)
        self.x0, self.passes = x.clone(), torch.zeros(n, dtype=torch.long)
        self.d, self.c = torch.full((n,), float("inf")), torch.full((n,), -float("inf"))
        self.trace: list[list[float]] = [[] for _ in range(n)]

    def update(self, idx: torch.Tensor, x0: torch.Tensor, d: torch.Tensor, c: torch.Tensor):
        """Record one pass of targets `idx` (distances `d`, cosines `c` of candidates `x0`)."""
        d, c = d.detach().cpu(), c.detach().cpu()
        self.passes[idx] += 1
        better = d < self.d[idx]
        self.x0[idx[better]] = x0.detach()[better.to(x0.device)]
        self.d[idx[better]], self.c[idx[better]] = d[better], c[better]
        for j in idx.tolist():
            self.trace[j].append(float(self.c[j]))

    def result(self) -> GuidedResult:
        return GuidedResult(self.x0, self.d, self.c, self.passes, self.trace)


def guided_decode(prior: Prior, distance: FeatureDistance, targets: torch.Tensor,
                  generators: list[torch.Generator], *, steps: int = 50, scale: float = 4.0,
                  tau: float = 3.0, travel: Callable[[int], int] = lambda i: 1,
                  min_gain: float = 0.0, patience: int = 3, stop_cosine: float | None = None,
                  progress: bool = False) -> GuidedResult:  # fmt: skip
    """Guided DDIM (eta 0) from one noise per target (`generators[i]` draws target i's).
    `travel(i)` is the most passes step i may take (repeats after re-noising); with `min_gain`,
    a step stops repeating once `patience` passes in a row did not raise its best cosine by that
    much (0: always all; guidance works in bursts: repeats pay in the middle steps and at the
    last one, hardly on the plateaus between)."""
    scheduler = prior.scheduler
    scheduler.set_timesteps(steps)
    timesteps, kind = scheduler.timesteps, scheduler.config.prediction_type
    n, device = len(targets), targets.device
    x = _noise(prior.shape, generators, range(n), device) * scheduler.init_noise_sigma
    best, active = BestSoFar(x), torch.ones(n, dtype=torch.bool)
    for i, t in enumerate(tqdm(timesteps, desc="guided", disable=not progress)):
        alpha = scheduler.alphas_cumprod[t].to(device)
        prev = scheduler.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else None
        alpha_prev = (scheduler.final_alpha_cumprod if prev is None else prev).to(device)
        todo, step_best = active.clone(), torch.full((n,), -float("inf"))
        stalled = torch.zeros(n, dtype=torch.long)
        for k in range(travel(i)):
            idx = todo.nonzero().flatten()
            if not len(idx):
                break
            xi = x[idx].detach().requires_grad_(True)
            condition = targets[idx] if prior.conditional else None
            eps, x0 = _eps_and_x0(prior.predict(xi, t.expand(len(idx)).to(device), condition),
                                  xi, alpha, kind)  # fmt: skip
            d, c = distance(prior.to_image(x0), targets[idx])
            (grad,) = torch.autograd.grad(d.sum(), xi)
            best.update(idx, x0, d, c)
            guided = eps.detach() + scale * rescaled_clipped(grad, eps.detach(), tau)
            x0 = (xi.detach() - (1 - alpha).sqrt() * guided) / alpha.sqrt()
            stepped = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * guided
            again = torch.full((len(idx),), k + 1 < travel(i))
            c = c.detach().cpu()
            rose = c - step_best[idx] >= min_gain
            stalled[idx] = torch.where(rose, 0, stalled[idx] + 1)
            step_best[idx] = torch.maximum(step_best[idx], c)
            if min_gain > 0:  # adaptive: stop once `patience` repeats brought no rise
                again &= stalled[idx] < patience
            if stop_cosine is not None:
                again &= best.c[idx] < stop_cosine
            if again.any():  # back to step t: x_t ~ q(x_t | x_prev)
                ratio = alpha / alpha_prev
                noise = _noise(prior.shape, generators, idx[again], device)
                stepped[again] = ratio.sqrt() * stepped[again] + (1 - ratio).sqrt() * noise
            x[idx], todo[idx] = stepped, again
        if stop_cosine is not None:
            active &= best.c < stop_cosine
        if not active.any():
            break
    return best.result()
