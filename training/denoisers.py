"""Assemble what a run trains, or what a trained folder holds, for any mode.

A `Trainee` is the trainable diffusers model (saved with `save_pretrained`), the noise schedule it
is trained on, and how to turn it into a denoiser `(sample, timestep, features, keep_hint,
keep_prompt) -> prediction`.  In compact mode the model is the denoiser; in FeatInv mode the
ControlNet drives a frozen SD UNet with the fixed prompt's text embedding, encoded once here and
never per step.

In updecoder mode there is nothing to sample: `noise_scheduler` is None and x0 (in model space,
as `TrainingData.to_model_space`) is `trainee.model(features)`, raw stored maps in:

    trainee, record = load_trained("models/updecoder")
    x0 = trainee.model(features)  # [N, C, H, W]: pixels in [-1, 1] or scaled latents
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from training.data import TrainingData
from training.models import CompactUNet, FeatInvControlNet, FeatInvDenoiser, UpConvDecoder

RECORD = "featinv_training.json"


class ModelLoadError(ValueError):
    """A base model that cannot be loaded; the message is one line."""


def one_line(exc: BaseException) -> str:
    """An error as one bounded line, for messages that wrap it."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


@dataclass
class Trainee:
    mode: str
    model: torch.nn.Module  # the trainable part: CompactUNet, FeatInvControlNet or UpConvDecoder
    noise_scheduler: DDPMScheduler | None  # None: deterministic, x0 = model(features)
    unconditional: dict | None  # what the guidance's unconditional branch drops (None: no guidance)
    base: dict | None = None  # featinv: {pretrained, revision, prompt}
    unet: UNet2DConditionModel | None = None
    prompt_embeds: torch.Tensor | None = None
    empty_embeds: torch.Tensor | None = None

    def denoiser(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The denoiser around `model` (default: self.model; pass the accelerate-wrapped one)."""
        model = self.model if model is None else model
        if self.noise_scheduler is None:
            raise TypeError(f"the {self.mode} model is no denoiser: its x0 is model(features)")
        if self.mode == "compact":
            return model
        return FeatInvDenoiser(model, self.unet, self.prompt_embeds, self.empty_embeds)

    def to(self, device: torch.device) -> Trainee:
        for name in ("model", "unet", "prompt_embeds", "empty_embeds"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def first_line(exc: Exception) -> str:
    """An exception as one line for a user (library errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_vae(vae: dict, device: torch.device | str = "cpu"):
    """The VAE recorded by a store's latents array (`source`, `subfolder`), frozen; it turns
    latents back into images for previews and samplers."""
    from diffusers import AutoencoderKL

    try:
        model = AutoencoderKL.from_pretrained(vae["source"], subfolder=vae.get("subfolder"))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the store's VAE '{vae['source']}': {first_line(exc)}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def load_featinv_base(pretrained: str, revision: str | None, prompt: str):
    """The frozen SD-1.x UNet, its training noise schedule and the prompt's text embeddings."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        kwargs = {"revision": revision}
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kwargs)
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load training.featinv.pretrained '{pretrained}': {first_line(exc)} "
            "(a hub id needs network; or give a local folder saved with save_pretrained)"
        ) from None
    with torch.no_grad():
        ids = tokenizer([prompt, ""], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
        embeds = text_encoder(ids.input_ids)[0]
    unet.requires_grad_(False).eval()
    return unet, scheduler, embeds[:1].clone(), embeds[1:].clone()


def _compact_unet_config(spec: dict, data: TrainingData) -> dict:
    widths = spec["compact"]["block_out_channels"]
    attention = spec["compact"]["attention"]
    down = ["DownBlock2D"] * len(widths)
    up = ["UpBlock2D"] * len(widths)
    if attention and len(widths) > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    channels, size = data.target_shape[0], data.target_shape[1]
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "layers_per_block": spec["compact"]["layers_per_block"],
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": spec["compact"]["norm_num_groups"],
    }


def new_trainee(spec: dict, data: TrainingData) -> Trainee:
    """A fresh model for `spec` (the config's `training:`) on `data`, seeded."""
    torch.manual_seed(spec["seed"])
    channels = data.feature_shape[0]
    if spec["mode"] == "updecoder":
        widths = spec["updecoder"]
        model = UpConvDecoder.for_shapes(
            data.feature_shape, data.target_shape, widths["conv_channels"], widths["up_channels"]
        )
        model.norm.set_stats(data.channel_stats["mean"], data.channel_stats["std"])
        return Trainee("updecoder", model, None, None)
    if spec["mode"] == "compact":
        model = CompactUNet(_compact_unet_config(spec, data), channels,
                            spec["compact"]["hint_channels"])  # fmt: skip
        scheduler = DDPMScheduler(
            num_train_timesteps=spec["noise_schedule"]["num_train_timesteps"],
            beta_schedule=spec["noise_schedule"]["beta_schedule"],
            prediction_type=spec["prediction_type"] or "epsilon",
            clip_sample=data.target_kind == "pixels",
        )
        model.hint.set_stats(data.channel_stats["mean"], data.channel_stats["std"])
        return Trainee("compact", model, scheduler, {"keep_hint": 0})
    if data.target_kind != "latents":
        raise ModelLoadError("config training.target: featinv mode trains on latents/<target>")
    base = {k: spec["featinv"][k] for k in ("pretrained", "revision", "prompt")}
    unet, scheduler, prompt, empty = load_featinv_base(**base)
    check_featinv_target(unet, data)
    if spec["prediction_type"] and spec["prediction_type"] != scheduler.config.prediction_type:
        raise ModelLoadError(
            f"config training.prediction_type: {spec['prediction_type']} differs from the base "
            f"model's {scheduler.config.prediction_type}"
        )
    model = FeatInvControlNet.from_unet(unet, channels, data.target_shape[-1],
                                        spec["featinv"]["hint_channels"])  # fmt: skip
    model.hint.set_stats(data.channel_stats["mean"], data.channel_stats["std"])
    return Trainee("featinv", model, scheduler, {"keep_prompt": 0}, base, unet, prompt, empty)


def check_featinv_target(unet: UNet2DConditionModel, data: TrainingData) -> None:
    if data.target_shape[0] != unet.config.in_channels:
        raise ModelLoadError(
            f"config training.target: latents have {data.target_shape[0]} channels, the base "
            f"UNet takes {unet.config.in_channels} (encode with the base model's VAE)"
        )


def load_trained(folder: str | Path) -> tuple[Trainee, dict]:
    """A trained model folder as a Trainee (eval mode), and its training record; a folder whose
    files cannot be loaded (lost, torn) is a one-line ModelLoadError."""
    try:
        return _load_trained(Path(folder))
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model folder '{folder}' cannot be loaded ({one_line(exc)})") from exc


def _load_trained(folder: Path) -> tuple[Trainee, dict]:
    record = json.loads((folder / RECORD).read_text())
    if record["mode"] == "updecoder":
        model = UpConvDecoder.from_pretrained(folder).eval()
        return Trainee("updecoder", model, None, None), record
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if record["mode"] == "compact":
        model = CompactUNet.from_pretrained(folder).eval()
        return Trainee("compact", model, scheduler, {"keep_hint": 0}), record
    base = record["base"]
    unet, _, prompt, empty = load_featinv_base(**base)
    model = FeatInvControlNet.from_pretrained(folder).eval()
    return Trainee("featinv", model, scheduler, {"keep_prompt": 0}, base, unet, prompt,
                   empty), record  # fmt: skip
