"""The guided decoder's comparison row: the image optimised directly to match a feature
(Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015).

Minimises ||phi(x) - phi0||^2 / ||phi0||^2 + l_alpha * N_alpha(x) + l_tv * TV_beta(x) over the
pixels x in [-1, 1] (N_alpha = mean |x|^alpha: keeps values in range; TV_beta = mean of
(dx^2 + dy^2)^(beta/2): favours piecewise-smooth images, their two image priors), with Adam, for
exactly the number of backbone gradient evaluations the guided decoder spent on the same target,
through the same differentiable preprocessing.  The best image by feature distance is kept, as
the guided decoder keeps its best along the trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sampling.guided import BestSoFar, FeatureDistance, GuidedResult


@dataclass(frozen=True)
class PixelPriors:
    """Mahendran & Vedaldi's regularisers (their alpha = 6, beta = 2) and Adam's step size."""

    alpha: float = 6.0
    alpha_weight: float = 1e-3
    beta: float = 2.0
    tv_weight: float = 0.5
    lr: float = 0.05

    @classmethod
    def from_config(cls, section: dict) -> PixelPriors:
        """From a `guided.pixelopt` config section (its `enabled` switch aside)."""
        return cls(**{k: v for k, v in section.items() if k != "enabled"})


def total_variation(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Per image: mean over positions of (dx^2 + dy^2)^(beta/2) (the last row/column dropped)."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2) + 1e-8).pow(beta / 2).flatten(1).mean(dim=1)


def pixel_optimise(distance: FeatureDistance, targets: torch.Tensor, budgets: torch.Tensor,
                   shape: tuple[int, ...], generators: list[torch.Generator],
                   priors: PixelPriors = PixelPriors()) -> GuidedResult:  # fmt: skip
    """Images `[N, *shape]` in [-1, 1] after `budgets[i]` gradient evaluations for target i, from
    small seeded noise."""
    device = targets.device
    x = torch.stack([0.1 * torch.randn(shape, generator=g) for g in generators]).to(device)
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=priors.lr)
    norms = targets.flatten(1).pow(2).sum(dim=1).clamp_min(1e-12)
    best = BestSoFar(x.detach())
    for step in range(int(budgets.max())):
        live = budgets > step
        d, c = distance(x, targets)
        regular = priors.alpha_weight * x.abs().pow(priors.alpha).flatten(1).mean(dim=1)
        regular = regular + priors.tv_weight * total_variation(x, priors.beta)
        loss = ((d / norms + regular) * live.to(device)).sum()
        optimiser.zero_grad()
        loss.backward()
        index = live.nonzero().flatten()  # the images before this step, as measured
        best.update(index, x.detach()[index.to(device)], d[index.to(device)], c[index.to(device)])
        optimiser.step()
    return best.result()
