"""A trained model folder as a maker of images from stored feature maps.

Loads what `featinv train` wrote (`from_pretrained` plus the training record), and, for models of
latents, the VAE that encoded the store's latents (from the source the store records), so that
every caller (sampler, baselines, analyses, guided decoding later) turns feature maps into uint8
images the same way: per-image seeds, a scheduler by name, guidance, and the condition kept or
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from sampling.sampler import make_scheduler, sample, seeded, to_images
from training.denoisers import ModelLoadError, Trainee, load_trained, load_vae


@dataclass
class Reconstructor:
    """`images(features, seeds)` -> uint8 `[N, 3, H, W]`, one image per (map, seed)."""

    trainee: Trainee
    record: dict
    folder: Path
    vae: torch.nn.Module | None
    device: torch.device

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Reconstructor:
        folder = Path(folder)
        if not (folder / "featinv_training.json").is_file():
            raise ModelLoadError(f"'{folder}' is no trained model (no featinv_training.json): "
                                 "run `featinv train` first")  # fmt: skip
        trainee, record = load_trained(folder)
        device = torch.device(device)
        target = record["store"]["target"]
        vae = load_vae(target["vae"], device) if target["kind"] == "latents" else None
        return cls(trainee.to(device), record, folder, vae, device)

    @property
    def mode(self) -> str:
        return self.trainee.mode

    @property
    def target_shape(self) -> tuple[int, ...]:
        return tuple(self.record["store"]["target"]["shape"])

    @property
    def features_path(self) -> str:
        return self.record["store"]["features"]["path"]

    @property
    def deterministic(self) -> bool:
        """True for models that map a feature map to one image (no noise, no seeds)."""
        return self.trainee.noise_scheduler is None

    @torch.no_grad()
    def model_space(self, features: torch.Tensor, seeds, *, scheduler: str = "ddim",
                    steps: int = 50, guidance: float = 1.0, eta: float = 0.0,
                    condition: bool = True) -> torch.Tensor:  # fmt: skip
        """x0 of each map (latents or pixels in [-1, 1]); `condition=False` drops the feature
        map (and the prompt) altogether: the model's unconditional samples, same seeds."""
        features = features.to(self.device)
        if self.deterministic:
            return self.trainee.model(features)
        denoiser = self.trainee.denoiser()
        if not condition:
            zeros = torch.zeros(features.shape[0], device=self.device)
            denoiser, guidance = partial(denoiser, keep_hint=zeros, keep_prompt=zeros), 1.0
        return sample(
            denoiser, make_scheduler(scheduler, self.trainee.noise_scheduler.config), features,
            self.target_shape, steps=steps, guidance=guidance, eta=eta,
            unconditional=self.trainee.unconditional, generator=seeded(seeds, self.device),
        )  # fmt: skip

    def images(self, features: torch.Tensor, seeds, **settings) -> torch.Tensor:
        """uint8 `[N, 3, H, W]` on the CPU (see `model_space` for the settings)."""
        x0 = self.model_space(features, seeds, **settings)
        return self.to_images(x0)

    @torch.no_grad()
    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        scaling = self.record["store"]["target"].get("scaling_factor")
        return to_images(x0, self.vae, scaling).cpu()

    def target_images(self, batch: dict) -> torch.Tensor:
        """The stored targets of a `PairDataset` batch as uint8 images (latents: the VAE's
        decoding of the posterior mean), what reconstructions are compared with."""
        return stored_images(batch, self.vae, self.record["store"]["target"]["scaling_factor"])


def stored_images(batch: dict, vae=None, scaling_factor: float | None = None) -> torch.Tensor:
    """A `PairDataset` batch's stored targets as uint8 images on the CPU: its pixels, or the
    VAE's decoding of the latent posterior mean."""
    if "pixels" in batch:
        return batch["pixels"]
    device = next(vae.parameters()).device
    mean = batch["mean"].to(device).float() * scaling_factor
    return to_images(mean, vae, scaling_factor).cpu()
