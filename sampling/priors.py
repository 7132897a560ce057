"""Diffusion priors for the guided decoder: a denoiser, its noise schedule, and the way back to
pixels, whatever the model's origin.

- any unconditional diffusers pipeline by hub id or local folder (`DDPMPipeline`: a pixel
  `UNet2DModel`; `LDMPipeline` and the like: a latent UNet with its `vqvae` or `vae`), or a bare
  `UNet2DModel` folder (a DDPM noise schedule is then assumed);
- a model folder of our trainer (`featinv_training.json`), with its condition dropped (a model
  trained with `condition_dropout: 1.0` is an unconditional prior of the store's pixels or
  latents), or kept: the trained decoder, guided on top.

`to_image` is differentiable: the feature distance's gradient flows through the VAE decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel

from sampling.reconstruct import Reconstructor
from training.denoisers import ModelLoadError, first_line

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Prior:
    """`predict(x_t, t, condition)` -> the model's output (`scheduler.config.prediction_type`);
    `condition` is the per-sample target map when `conditional`, else ignored."""

    predict: Predict
    scheduler: DDIMScheduler
    shape: tuple[int, ...]  # of one sample in model space
    to_image: Callable[[torch.Tensor], torch.Tensor]  # model space -> [-1, 1] pixels
    about: dict  # what is recorded with the output
    conditional: bool = False


def load_prior(source: str, device: str | torch.device = "cpu", condition: bool = False) -> Prior:
    """The prior at `source` (see the module docstring); `condition` keeps a trained model's
    condition (only our trainer's models have one)."""
    device = torch.device(device)
    if (Path(source) / "featinv_training.json").is_file():
        return _trained_prior(source, device, condition)
    if condition:
        raise ValueError(f"guided.condition: the prior '{source}' is no featinv model, it has no "
                         "condition to keep")  # fmt: skip
    try:
        if Path(source, "config.json").is_file():  # a bare UNet2DModel folder
            unet, vae = UNet2DModel.from_pretrained(source), None
            scheduler = DDPMScheduler(num_train_timesteps=unet.config.get("num_train_timesteps")
                                      or 1000)  # fmt: skip
        else:
            pipe = DiffusionPipeline.from_pretrained(source)
            unet, scheduler = pipe.unet, pipe.scheduler
            vae = getattr(pipe, "vqvae", None) or getattr(pipe, "vae", None)
    except Exception as exc:
        raise ModelLoadError(f"cannot load guided.prior '{source}': {first_line(exc)} (a hub id "
                             "needs network; or give a local folder saved with save_pretrained)"
                             ) from None  # fmt: skip
    if not isinstance(unet, UNet2DModel):
        raise ModelLoadError(f"guided.prior '{source}': {type(unet).__name__} is no unconditional "
                             "UNet2DModel")  # fmt: skip
    return _diffusers_prior(source, unet, scheduler, vae, device)


def _diffusers_prior(source: str, unet: UNet2DModel, scheduler, vae, device) -> Prior:
    unet = unet.to(device).eval().requires_grad_(False)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if vae is None:
        to_image = _identity
    else:
        vae = vae.to(device).eval().requires_grad_(False)
        scaling = getattr(vae.config, "scaling_factor", 1.0) or 1.0
        to_image = lambda x0: vae.decode(x0 / scaling).sample  # noqa: E731
    about = {"source": source, "kind": "diffusers", "class": type(unet).__name__,
             "latent": vae is not None}  # fmt: skip
    return Prior(lambda x, t, _c: unet(x, t).sample, DDIMScheduler.from_config(scheduler.config),
                 (unet.config.in_channels, *size), to_image, about)  # fmt: skip


def _trained_prior(source: str, device, condition: bool) -> Prior:
    model = Reconstructor.load(source, device)
    if model.deterministic:
        raise ModelLoadError(f"guided.prior '{source}' is a {model.mode} model, no diffusion prior")
    denoiser = model.trainee.denoiser()
    channels = model.trainee.model.hint.mean.numel()  # a dropped map is zeros, of any size

    def predict(x, t, maps):
        if condition:
            return denoiser(x, t, maps)
        zeros = torch.zeros(x.shape[0], device=x.device)
        blank = torch.zeros((x.shape[0], channels, 1, 1), device=x.device)
        return denoiser(x, t, blank, keep_hint=zeros, keep_prompt=zeros)

    target = model.record["store"]["target"]
    scaling = target.get("scaling_factor")
    vae = model.vae
    to_image = _identity if vae is None else (lambda x0: vae.decode(x0 / scaling).sample)
    training = model.record["training"]
    about = {
        "source": source,
        "kind": "featinv",
        "mode": model.mode,
        "steps": model.record["steps"],
        "target": target["paths"],
        "condition_dropout": training.get("condition_dropout"),
        "condition": condition,
    }
    scheduler = DDIMScheduler.from_config(model.trainee.noise_scheduler.config)
    return Prior(predict, scheduler, model.target_shape, to_image, about, condition)


def _identity(x0: torch.Tensor) -> torch.Tensor:
    return x0
