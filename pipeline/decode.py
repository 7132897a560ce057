"""Turn the raw bytes of a user's image file into a clean RGB image, or a recorded skip.

Collections come from users and contain everything: truncated downloads, HTML error pages
saved as ``.jpg``, CMYK scans, 16-bit medical PNGs, animated GIFs, phone photos whose pixels
are stored sideways with an EXIF orientation tag, and now and then a decompression bomb.
Every feature-map cache must see the *same* pixels for the same file, and one bad file must
never kill a long extraction run. So this module is the single place where bytes become
pixels: :func:`decode_image` either returns an ``RGB`` :class:`PIL.Image.Image` or raises
:class:`SkipSample`, whose one-line message is recorded in the store as the reason.

Policy (the same for every caller):

* The format is sniffed from the content (never from a file name), and only from an
  allowlist of common raster formats that carry a magic number (:data:`FORMATS`): this keeps
  exotic decoders and external programs (EPS runs Ghostscript) away from untrusted bytes, and
  stops header-less formats such as TGA from "decoding" random bytes into noise.
* Size limits (:class:`ImageLimits`) are checked from the header, before any pixel is
  decoded. PIL's global ``Image.MAX_IMAGE_PIXELS`` is neither relied on nor changed; PIL
  still refuses images above twice that value (~179 MP) on its own, which is reported as a
  skip too.
* Truncated or corrupt files are skipped, never padded with grey: this requires PIL's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` to be False, which is checked on every call.
* Multi-frame files (GIF, TIFF, APNG, MPO) give their first frame; EXIF orientation is applied.
* Transparency is alpha-composited over white: transparent pixels carry no colour, and
  logos, icons and cut-outs on transparent backgrounds are made to be seen on white pages.
* High-bit-depth grey is rescaled rather than clipped: ``I;16`` maps 0..65535 to 0..255;
  ``I`` (32-bit int) is treated the same when its values lie in 0..65535, otherwise it is
  min-max stretched; ``F`` (float) is taken as 0..1 when its values lie there, otherwise
  min-max stretched (non-finite values become 0; a constant image becomes black).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

__all__ = ["FORMATS", "ImageLimits", "SkipSample", "decode_image", "decode_jpegs", "jpeg_size"]

#: Formats PIL may try, in this order (those this PIL build lacks are left out).
FORMATS: tuple[str, ...] = (
    "JPEG",  # also MPO (multi-picture JPEG from phones and cameras)
    "PNG",  # also APNG
    "WEBP",
    "GIF",
    "TIFF",
    "BMP",
    "PPM",
    "JPEG2000",
    "AVIF",
)

_WHITE = (255, 255, 255, 255)
_MAX_REASON = 300


class SkipSample(Exception):
    """Raised for an input that is not a usable image; str(exc) is the one-line reason recorded in the store."""  # noqa: E501


@dataclass(frozen=True)
class ImageLimits:
    # larger files are skipped without decoding
    max_bytes: int = 64 * 2**20
    # decompression-bomb bound (width*height), checked from the header before decoding
    max_pixels: int = 50_000_000
    # smaller images (e.g. 1x1) carry no spatial information: skipped
    min_side: int = 8

    @classmethod
    def of_store(cls, attrs: Mapping) -> ImageLimits:
        """The limits a store's images were read with (its recorded config): what evaluation
        and analyses read the same images with again."""
        return cls(**attrs.get("provenance", {}).get("config", {}).get("image_limits", {}))


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Return an RGB image (EXIF orientation applied) or raise SkipSample(reason).

    No exception other than :class:`SkipSample` escapes for any input bytes. The one exception
    is a misconfigured process: if PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` has been
    set to True somewhere, a ``RuntimeError`` is raised, because truncated files would then be
    accepted silently (padded with grey) and this is not a property of any one file.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated images would be accepted "
            "silently. Do not set it in a process that decodes user images."
        )
    if not data:
        raise SkipSample("empty file")
    if len(data) > limits.max_bytes:
        raise SkipSample(f"file too large: {len(data)} bytes > limit {limits.max_bytes}")
    Image.init()
    formats = tuple(f for f in FORMATS if f in Image.OPEN)
    try:
        with warnings.catch_warnings():
            # Our own limit below governs; PIL's global one only warns in this range.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as im:
                _check_size(im.size, limits)
                im.load()  # open() leaves multi-frame files on their first frame
                out = _to_rgb(ImageOps.exif_transpose(im))
    except SkipSample:
        raise
    except Image.UnidentifiedImageError:
        raise SkipSample(
            f"not an image: no supported format ({', '.join(formats)}) recognised; "
            f"first bytes {data[:16]!r}"
        ) from None
    except Image.DecompressionBombError as e:
        raise SkipSample(_reason("too many pixels", e)) from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        raise SkipSample(_reason("corrupt image", e)) from None
    except Exception as e:
        raise SkipSample(_reason(f"decode failed: {type(e).__name__}", e)) from None
    if out.mode != "RGB":  # defensive: _to_rgb always converts
        raise SkipSample(f"decode failed: got mode {out.mode}")
    return out


def _reason(prefix: str, exc: BaseException) -> str:
    """One line, bounded length: the reason is stored per sample."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{prefix}: {message}"[:_MAX_REASON]


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise SkipSample(f"too many pixels: {w}x{h} > {limits.max_pixels}")
    if min(w, h) < limits.min_side:
        raise SkipSample(f"image too small: {w}x{h} < {limits.min_side}")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        return _gray(a / 257.0)
    if im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _gray(a / 257.0)
        return _gray(_stretch(a))
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return _gray(a * 255.0)
        return _gray(_stretch(a))
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _stretch(a: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255; a constant image becomes 0."""
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)


def _gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")


_EXIF_ORIENTATION = 0x0112


def decode_jpegs(
    datas: list[bytes], device: str | torch.device, limits: ImageLimits = ImageLimits()
) -> list[torch.Tensor | None]:
    """Batched JPEG decoding with torchvision (nvJPEG on a CUDA device): an RGB uint8
    `[3, H, W]` tensor on `device` per input, or None where this path does not apply.

    Only whole, upright, RGB or grey baseline/progressive JPEGs within `limits` are taken (the
    header is read, no pixels): everything else (other formats, CMYK, EXIF rotation, truncated
    or corrupt files, bombs) is None, and the caller decodes it with :func:`decode_image`, so the
    one bad-sample policy and its recorded reasons stay in one place.  A batch that fails is
    retried image by image, so one bad file costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    taken = [i for i, data in enumerate(datas) if jpeg_size(data, limits)]
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in taken]
    out: list[torch.Tensor | None] = [None] * len(datas)
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device) if tensors else []
    except RuntimeError:
        images = []
        for tensor in tensors:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    for i, image in zip(taken, images, strict=True):
        out[i] = image
    return out


def jpeg_size(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int] | None:
    """(width, height) of a JPEG that decodes to the same pixels without PIL's conversions (whole,
    upright, RGB or grey, within `limits`), from its header; None for anything else."""
    if not data.startswith(b"\xff\xd8") or not data.endswith(b"\xff\xd9"):
        return None  # not a JPEG, or truncated / trailing bytes: PIL decides
    if len(data) > limits.max_bytes:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
                _check_size(im.size, limits)
                upright = im.getexif().get(_EXIF_ORIENTATION, 1) == 1
                plain = im.format == "JPEG" and im.mode in ("RGB", "L") and upright
                return im.size if plain else None
    except Exception:  # anything odd: the PIL path decides and records why
        return None
