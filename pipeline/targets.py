"""Targets: what the conditional diffusion model learns to produce, stored per view.

`pixels` keeps the view itself, resampled small (uint8), for pixel-space decoders and for
evaluation.  `vae` keeps the posterior of a diffusers `AutoencoderKL` (mean and log-variance, not a
sample: the trainer draws `z = mean + exp(logvar / 2) * eps` itself, so every epoch sees fresh
noise, and multiplies by `scaling_factor`).  Both share the backbones' interface (`prepare` in the
decode workers, `encode` in the job), so one job can decode an image once for all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.views import render_views
from storage_specs.layout import ArraySpec


@dataclass(frozen=True)
class TargetInputs:
    """A target's step in the decode workers: its views resampled to `size`, as uint8 (pixels)
    or scaled to [-1, 1] (`vae`: the range Stable Diffusion's VAE was trained on)."""

    size: int
    interpolation: str
    vae: bool

    def __call__(self, image: Image.Image | torch.Tensor, views: np.ndarray) -> torch.Tensor:
        pixels = render_views(image, views, (self.size, self.size), self.interpolation)
        return pixels.float() / 127.5 - 1.0 if self.vae else pixels


def target_inputs(entry: dict) -> TargetInputs:
    """The target's `prepare`, without loading a model."""
    return TargetInputs(entry["size"], entry["interpolation"], entry["kind"] == "vae")


@dataclass
class PixelsTarget:
    name: str
    group: str
    size: int
    interpolation: str

    @property
    def prepare(self) -> TargetInputs:
        return TargetInputs(self.size, self.interpolation, vae=False)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"pixels/{self.name}/rgb": x}

    def array_specs(self, dtype: str) -> list[ArraySpec]:
        attrs = {"target": self.name, "group": self.group, "size": self.size,
                 "interpolation": self.interpolation}  # fmt: skip
        return [ArraySpec("pixels", self.name, "rgb", (3, self.size, self.size), "uint8", attrs)]


@dataclass
class VaeTarget:
    name: str
    group: str
    size: int
    interpolation: str
    source: str
    subfolder: str | None
    vae: torch.nn.Module
    sha256: str | None

    @property
    def prepare(self) -> TargetInputs:
        return TargetInputs(self.size, self.interpolation, vae=True)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.vae.parameters()).device
        posterior = self.vae.encode(x.to(device, next(self.vae.parameters()).dtype)).latent_dist
        return {
            f"latents/{self.name}/mean": posterior.mean,
            f"latents/{self.name}/logvar": posterior.logvar,
        }

    def array_specs(self, dtype: str) -> list[ArraySpec]:
        with torch.inference_mode():
            probe = self.encode(torch.zeros(1, 3, self.size, self.size))
        attrs = {
            "target": self.name,
            "group": self.group,
            "size": self.size,
            "interpolation": self.interpolation,
            "vae": {"source": self.source, "subfolder": self.subfolder, "sha256": self.sha256},
            "scaling_factor": float(self.vae.config.scaling_factor),
            "input_range": [-1.0, 1.0],
        }
        return [
            ArraySpec("latents", self.name, stat, tuple(values.shape[1:]), dtype,
                      {**attrs, "stat": stat})
            for stat, values in ((p.rsplit("/", 1)[1], v) for p, v in probe.items())
        ]  # fmt: skip


def _local_vae_folder(source: str, subfolder: str | None) -> Path:
    """A local folder holding the VAE: the path itself, or the hub snapshot (real download code)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*" if subfolder else "*"
    try:
        return Path(snapshot_download(source, allow_patterns=[pattern]))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"cannot download VAE '{source}': {reason}; pass a local folder saved with "
            "save_pretrained instead"
        ) from None


def _weights_digest(folder: Path) -> str:
    """sha256 over the VAE's safetensors files (sorted), so the store names the exact weights."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_target(entry: dict, device: str = "cpu") -> PixelsTarget | VaeTarget:
    common = {"name": entry["name"], "group": entry["group"], "size": entry["size"],
              "interpolation": entry["interpolation"]}  # fmt: skip
    if entry["kind"] == "pixels":
        return PixelsTarget(**common)
    from diffusers import AutoencoderKL

    root = _local_vae_folder(entry["model"], entry["subfolder"])
    folder = root / entry["subfolder"] if entry["subfolder"] else root
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True).to(device).eval()
    return VaeTarget(**common, source=entry["model"], subfolder=entry["subfolder"], vae=vae,
                     sha256=_weights_digest(folder))  # fmt: skip
