"""Grids of held-out reconstructions while training: what the model makes of maps it never saw.

Each row is one held-out sample (view 0, the evaluation view): its target as stored, then
`preview.samples` samples from its feature map, with the same seeds at every step so the grids of
a run can be compared (the updecoder's one prediction: it is deterministic).  Written as PNG
files under `<run>/previews/` and to TensorBoard.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from sampling.sampler import make_scheduler, sample, to_images
from storage_specs.datasets import PairDataset
from training.data import TrainingData
from training.denoisers import ModelLoadError, Trainee, load_vae


def load_store_vae(vae: dict, device: torch.device):
    """The store's VAE, or None with a warning: previews then show nothing, training goes on."""
    try:
        return load_vae(vae, device)
    except ModelLoadError as exc:
        warnings.warn(f"previews off: {exc}", stacklevel=2)
        return None


MIN_CELL = 96  # pixels


class Preview:
    """The first `preview.count` held-out samples (training samples when none is held out), read
    once; `log` samples them with the current weights."""

    def __init__(self, data: TrainingData, trainee: Trainee, spec: dict, out: Path):
        self.data, self.trainee, self.settings = data, trainee, spec["preview"]
        self.seed, self.folder = spec["seed"], out / "previews"
        rows = data.heldout_rows if len(data.heldout_rows) else data.train_rows
        self.label = "heldout" if len(data.heldout_rows) else "train"
        dataset = PairDataset(data.url, data.arrays, rows=rows[: self.settings["count"]], views=[0])
        self.batch = dataset.read_batch(range(len(dataset)))
        device = trainee.model.device
        vae = data.record["target"]["vae"] if data.target_kind == "latents" else None
        self.vae = load_store_vae(vae, device) if vae else None

    @property
    def enabled(self) -> bool:
        return self.data.target_kind == "pixels" or self.vae is not None

    def targets(self, device: torch.device) -> torch.Tensor:
        if self.data.target_kind == "pixels":
            return self.batch["pixels"]
        mean = self.batch["mean"].to(device).float() * self.data.scaling_factor
        return to_images(mean, self.vae, self.data.scaling_factor).cpu()

    @property
    def samples(self) -> int:
        """Images per row besides the target: one for a deterministic model."""
        return 1 if self.trainee.noise_scheduler is None else self.settings["samples"]

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        """x0 of each map: the updecoder's prediction, or a sample with the preview's seed."""
        if self.trainee.noise_scheduler is None:
            return model(features)
        noise = self.trainee.noise_scheduler.config
        return sample(
            self.trainee.denoiser(model), make_scheduler("ddim", noise), features,
            self.data.target_shape, steps=self.settings["steps"],
            guidance=self.settings["guidance"], unconditional=self.trainee.unconditional,
            generator=torch.Generator(features.device).manual_seed(self.seed),
        )  # fmt: skip

    def grid(self, model: torch.nn.Module) -> torch.Tensor:
        """uint8 `[3, H, W]`: a row per held-out sample, target then samples."""
        device = model.device
        n, k = len(self.batch["key"]), self.samples
        x0 = self.predict(model, self.batch["features"].to(device).repeat_interleave(k, dim=0))
        images = to_images(x0, self.vae, self.data.scaling_factor).cpu()
        size = images.shape[-2:]
        targets = torch.nn.functional.interpolate(self.targets(device).float(), size)
        rows = torch.cat([targets.to(torch.uint8)[:, None], images.reshape(n, k, 3, *size)], 1)
        grid = make_grid(rows.flatten(0, 1), nrow=k + 1, padding=2, pad_value=255)
        scale = -(-MIN_CELL // size[0])  # small images are enlarged (nearest) to be seen
        return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)

    def log(self, accelerator, model: torch.nn.Module, step: int) -> Path | None:
        if not self.enabled:
            return None
        grid = self.grid(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:07d}.png"
        Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(path)
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(f"{self.label}_reconstructions", grid, global_step=step)
        return path
