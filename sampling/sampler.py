"""The sampling loop: any diffusers scheduler, classifier-free guidance, images out.

Kept in the k-diffusion spirit: the loop knows nothing of the model (a denoiser with the signature
`(sample, timestep, features, keep_hint, keep_prompt) -> prediction`), the scheduler is built apart
(by name, from the model's noise schedule), and guidance is one small function.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def make_scheduler(name: str, noise_schedule: dict):
    """A sampling scheduler by name, on the noise schedule the model was trained with."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name].from_config(noise_schedule)


def guided(denoiser, x, t, features, guidance: float, unconditional: dict) -> torch.Tensor:
    """cond + (guidance - 1) (cond - uncond); `unconditional` says what the uncond branch drops
    (`keep_hint`, `keep_prompt` as 0/1: FeatInv keeps the hint and drops the prompt)."""
    cond = denoiser(x, t, features)
    if guidance == 1.0:
        return cond
    n = x.shape[0]
    drops = {k: torch.full((n,), float(v), device=x.device) for k, v in unconditional.items()}
    uncond = denoiser(x, t, features, **drops)
    return uncond + guidance * (cond - uncond)


def seeded(seeds, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded by its recorded seed."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


@torch.no_grad()
def sample(
    denoiser,
    scheduler,
    features: torch.Tensor,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    guidance: float = 1.0,
    unconditional: dict | None = None,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """One x0 per feature map (in the model's space: latents or pixels in [-1, 1]).

    With a list of generators (one per map, e.g. `seeded(seeds)`), each image depends on its own
    seed alone, not on what else is in the batch."""
    device = features.device
    scheduler.set_timesteps(steps, device=device)
    x = randn_tensor((features.shape[0], *shape), generator=generator, device=device)
    x = x * scheduler.init_noise_sigma
    accepted = inspect.signature(scheduler.step).parameters  # UniPC takes neither
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
    unconditional = unconditional or {"keep_hint": 0}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        pred = guided(denoiser, model_in, timestep, features, guidance, unconditional)
        x = scheduler.step(pred, t, x, **extra).prev_sample
    return x


@torch.no_grad()
def to_images(x0: torch.Tensor, vae=None, scaling_factor: float | None = None) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` images from model-space samples (decoded by the VAE for latents)."""
    if vae is not None:
        x0 = vae.decode(x0.to(vae.dtype) / scaling_factor).sample
    return ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
