"""The feature-conditioned models, diffusers models (`from_pretrained`/`save_pretrained`).

Both diffusion modes condition through FeatInv's hint block (`FeatureHint`): the feature map,
normalised with its channel statistics (`FeatureNorm`), is resized bilinearly to the model's grid,
then conv3x3 C->h, SiLU, conv3x3 h->h, SiLU, and a zero-initialised conv3x3 h->width whose output
is added right after the model's input conv.  Zero init means training starts from the
unconditional model exactly.

- `CompactUNet`: a small diffusers `UNet2DModel` trained from scratch (pixels or latents) with the
  hint added after its `conv_in`.  For people without a text-to-image model; the demo's model.
- `FeatInvControlNet`: a diffusers `ControlNetModel` copied from a pretrained SD-1.x UNet, whose
  conditioning embedding is the hint block.  The frozen UNet and the fixed prompt's text embedding
  make the rest of the denoiser (`FeatInvDenoiser`).

Dropping the condition (classifier-free guidance) zeroes the normalised map: `keep_hint` per sample.

The baseline, `UpConvDecoder`, is no diffusion model: Dosovitskiy & Brox's deterministic decoder
("Inverting visual representations with convolutional networks", CVPR 2016), the same normalised
map through 3x3 convs and stride-2 up-convolutions to the target grid; `model(features)` is x0.
Trained by the same loop on the same pairs, so the two kinds are compared on the same keys.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FeatureNorm(nn.Module):
    """Per-channel normalisation of stored feature maps, kept as buffers (saved with the weights),
    so a saved model takes raw stored maps."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_stats(self, mean, std) -> None:
        """Normalise with the store's `channel_stats`; dead channels (std 0) are only centred."""
        std = torch.as_tensor(std, dtype=torch.float32)
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def normalize(self, features: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Stored features -> normalised float32; rows with `keep` False become zeros (dropped)."""
        x = (features.float() - self.mean[:, None, None]) / self.std[:, None, None]
        if keep is not None:
            x = x * keep.to(x.dtype)[:, None, None, None]
        return x


class FeatureHint(FeatureNorm):
    """FeatInv's hint block, normalising the map as `FeatureNorm` does."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int], hidden: int):
        super().__init__(in_channels)
        self.size = tuple(size)
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def normalize(self, features: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Stored features -> the block's input (in the convs' dtype)."""
        return super().normalize(features, keep).to(self.conv_in.weight.dtype)

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.resized_conv_in(normalized))
        x = F.silu(self.conv_mid(x))
        return self.conv_out(x)

    def resized_conv_in(self, x: torch.Tensor) -> torch.Tensor:
        """`conv_in(interpolate(x, size))`, computed where it is cheaper.

        Bilinear resizing is separable and acts on each channel alone, and each of the conv's 9
        taps mixes channels at one position, so the two commute: the taps run as 1x1 convs on the
        small map (C -> 9h), then each tap's map is resized by matrices `Ry_i . M . Rx_j^T` that
        also shift it by the tap's offset (zero rows play the conv's zero padding).  For a
        C x 7 x 7 map resized to 32 x 32 that is ~20x fewer operations, with the same weights and
        the same result up to float rounding; a map larger than the grid goes the direct way.
        """
        (rows, cols), size = x.shape[-2:], self.size
        if rows * cols >= size[0] * size[1]:
            return self.conv_in(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        weight = self.conv_in.weight  # [h, C, 3, 3]
        hidden, channels = weight.shape[:2]
        taps = F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(9 * hidden, channels, 1, 1))
        taps = taps.unflatten(1, (3, 3, hidden))  # [N, 3 (dy), 3 (dx), h, rows, cols]
        ry, rx = (
            _shifted_resize(n, m, x.dtype, x.device) for n, m in ((rows, size[0]), (cols, size[1]))
        )
        out = torch.einsum("iya,jxb,nijhab->nhyx", ry, rx, taps)
        return out + self.conv_in.bias[:, None, None]


def _shifted_resize(n: int, m: int, dtype, device) -> torch.Tensor:
    """`[3, m, n]`: 1-D bilinear resizing n -> m (as F.interpolate, align_corners=False), read at
    offsets -1, 0, +1 with zeros outside: the rows a 3-tap conv sees of the resized signal."""
    eye = torch.eye(n, dtype=dtype, device=device)[:, None, :]
    resize = F.interpolate(eye, size=m, mode="linear", align_corners=False)[:, 0, :].T  # [m, n]
    padded = F.pad(resize, (0, 0, 1, 1))
    return torch.stack([padded[i : i + m] for i in range(3)])


class CompactUNet(ModelMixin, ConfigMixin):
    """A small `UNet2DModel` (`unet_config`) with the hint added after its input conv."""

    @register_to_config
    def __init__(self, unet_config: dict, feature_channels: int, hint_channels: int = 64):
        super().__init__()
        self.unet = UNet2DModel.from_config(unet_config)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.hint = FeatureHint(feature_channels, self.unet.conv_in.out_channels, size,
                                hint_channels)  # fmt: skip

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        features: torch.Tensor,
        keep_hint: torch.Tensor | None = None,
        keep_prompt: torch.Tensor | None = None,  # no prompt here; the denoisers share a signature
    ) -> torch.Tensor:
        residual = self.hint(self.hint.normalize(features, keep_hint))
        handle = self.unet.conv_in.register_forward_hook(lambda _m, _i, out: out + residual)
        try:
            return self.unet(sample, timestep).sample
        finally:
            handle.remove()


class FeatInvControlNet(ModelMixin, ConfigMixin):
    """A `ControlNetModel` (`controlnet_config`) whose conditioning embedding is the hint block."""

    @register_to_config
    def __init__(self, controlnet_config: dict, feature_channels: int, hint_size: int,
                 hint_channels: int = 512):  # fmt: skip
        super().__init__()
        self.controlnet = ControlNetModel.from_config(controlnet_config)
        width = self.controlnet.conv_in.out_channels
        self.controlnet.controlnet_cond_embedding = FeatureHint(
            feature_channels, width, (hint_size, hint_size), hint_channels
        )

    @property
    def hint(self) -> FeatureHint:
        return self.controlnet.controlnet_cond_embedding

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, feature_channels: int, hint_size: int,
                  hint_channels: int = 512) -> FeatInvControlNet:  # fmt: skip
        """ControlNet's usual start: a copy of the UNet's encoder; the hint block is new, its
        grid (`hint_size`) the latents' (FeatInv: 32 for 256 px SD-1.x)."""
        source = ControlNetModel.from_unet(unet, conditioning_channels=feature_channels)
        config = {k: v for k, v in source.config.items() if not k.startswith("_")}
        model = cls(config, feature_channels, hint_size, hint_channels)
        weights = {k: v for k, v in source.state_dict().items()
                   if not k.startswith("controlnet_cond_embedding.")}  # fmt: skip
        missing, unexpected = model.controlnet.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("controlnet_cond_embedding.") for k in missing):
            raise RuntimeError(f"ControlNet copy mismatch: {missing + unexpected}")
        return model

    def forward(self, sample, timestep, encoder_hidden_states, features, keep_hint=None):
        """The residuals for the frozen UNet's down blocks and mid block."""
        return self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=self.hint.normalize(features, keep_hint), return_dict=False,
        )  # fmt: skip


class FeatInvDenoiser(nn.Module):
    """Trained ControlNet + frozen SD UNet + the fixed prompt's embedding (encoded once)."""

    def __init__(self, controlnet: nn.Module, unet: UNet2DConditionModel,
                 prompt_embeds: torch.Tensor, empty_embeds: torch.Tensor):  # fmt: skip
        super().__init__()
        self.controlnet, self.unet = controlnet, unet
        self.register_buffer("prompt_embeds", prompt_embeds)
        self.register_buffer("empty_embeds", empty_embeds)

    def forward(self, sample, timestep, features, keep_hint=None, keep_prompt=None):
        n = sample.shape[0]
        text = self.prompt_embeds.expand(n, -1, -1)
        if keep_prompt is not None:
            keep = keep_prompt.to(text.dtype)[:, None, None]
            text = keep * text + (1 - keep) * self.empty_embeds.expand(n, -1, -1)
        down, mid = self.controlnet(sample, timestep, text, features, keep_hint)
        return self.unet(
            sample, timestep, encoder_hidden_states=text,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample  # fmt: skip


class UpConvDecoder(ModelMixin, ConfigMixin):
    """Dosovitskiy & Brox's up-convolutional decoder: `model(features)` is x0 in model space.

    The normalised map goes through `conv_channels` 3x3 convs at its own resolution, then one
    ConvTranspose2d(4, stride 2, pad 1) per `up_channels` entry (each doubling the grid), all with
    LeakyReLU(0.2), a bilinear resize to `sample_size` when the grid is not there exactly, and a
    3x3 conv to `out_channels` (pixels in [-1, 1] or scaled latents).
    """

    @register_to_config
    def __init__(self, feature_channels: int, out_channels: int, sample_size: tuple[int, int],
                 conv_channels: tuple[int, ...] = (128, 128, 128),
                 up_channels: tuple[int, ...] = (128, 64, 32)):  # fmt: skip
        super().__init__()
        self.size = tuple(sample_size)
        self.norm = FeatureNorm(feature_channels)
        widths = [feature_channels, *conv_channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in pairwise(widths))
        widths = [widths[-1], *up_channels]
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in pairwise(widths)
        )
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    @classmethod
    def for_shapes(cls, feature_shape: tuple[int, ...], target_shape: tuple[int, ...],
                   conv_channels: list[int], up_channels: list[int]) -> UpConvDecoder:  # fmt: skip
        """A decoder from `[C, y, x]` maps to `[C', H, W]` targets.  It doubles the grid as many
        times as brings it nearest the target's (so the final resize scales by at most sqrt 2,
        never runs the last stages at twice the target size); stage i is `up_channels[i]` wide,
        the last width repeated when the ratio needs more stages than listed."""
        (channels, *grid), (out_channels, *size) = feature_shape, target_shape
        stages = max(0, *(round(math.log2(s / g)) for g, s in zip(grid, size, strict=True)))
        widths = [up_channels[min(i, len(up_channels) - 1)] for i in range(stages)]
        return cls(feature_channels=channels, out_channels=out_channels, sample_size=size,
                   conv_channels=list(conv_channels), up_channels=widths)  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm.normalize(features).to(self.conv_out.weight.dtype)
        for layer in (*self.convs, *self.ups):
            x = F.leaky_relu(layer(x), 0.2)
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.conv_out(x)
