"""The training-free guided decoder on the demo photos' store: gradient rescaling and clipping by
their definitions, guidance that lowers the feature distance against the same seed unguided,
early stop and best-of-trajectory, priors loaded as users give them (a diffusers pipeline saved
with save_pretrained, pixel or latent), and `featinv guided-decode` writing a samples store that
validates, resumes, and shows up in the evaluation beside pixel optimisation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import validate_config
from sampling.guided import FeatureDistance, guided_decode, rescaled_clipped
from sampling.priors import load_prior
from sampling.sampler import seeded
from storage_specs.samples import SamplesStore, validate_samples
from tests.conftest import cli
from tests.test_training import write


def test_rescaling_and_clipping_match_their_definitions():
    grad = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 20.0]])
    eps = torch.full((1, 8), 2.0)  # norm sqrt(32)
    scaled = grad * (32**0.5 / (7 + 400) ** 0.5)
    mean, std = scaled.mean().item(), scaled.std().item()
    expected = scaled.clone()
    expected[0, 7] = mean + 1.5 * std  # the outlier is clipped, nothing else moves
    torch.testing.assert_close(rescaled_clipped(grad, eps, tau=1.5), expected)
    wide = rescaled_clipped(grad, eps, tau=100.0)
    torch.testing.assert_close(wide.norm(), torch.tensor(32**0.5))  # rescaled to |eps|


@pytest.fixture(scope="module")
def setup(demo_run, train_store):
    """The demo model with its condition dropped as the prior; two held-out maps as targets."""
    from sampling.reextract import recorded_backbone
    from storage_specs.datasets import PairDataset
    from training.data import open_training_data

    prior = load_prior(str(demo_run[0]))
    record = json.loads((demo_run[0] / "featinv_training.json").read_text())
    data = open_training_data(train_store, record["training"])
    held = PairDataset(data.url, {"features": data.arrays["features"]}, data.heldout_rows, [0])
    maps = held.read_batch(range(2))["features"].float()
    backbone = recorded_backbone(record["store"]["features"])
    backbone.model.requires_grad_(False)
    return prior, FeatureDistance(backbone), maps


def _decode(setup, **kwargs):
    prior, distance, maps = setup
    return guided_decode(prior, distance, maps, seeded([0, 1]), **kwargs)


def test_guidance_lowers_the_feature_distance_against_the_same_seed(setup):
    plain = _decode(setup, steps=8, scale=0.0)
    guided = _decode(setup, steps=8, scale=4.0)
    assert plain.passes.tolist() == [8, 8]
    assert (guided.distance < plain.distance).all(), (guided.distance, plain.distance)


def test_best_of_trajectory_time_travel_and_early_stop(setup):
    prior, distance, maps = setup
    result = _decode(setup, steps=4, scale=4.0, travel=lambda i: 3 if i < 2 else 1)
    assert result.passes.tolist() == [8, 8]  # 2 steps x 3 + 2 steps x 1
    # The kept image is the best one measured along the way (the lowest distance: its cosine,
    # the trace's last, need not be the trace's highest), and measures as recorded.
    assert [trace[-1] for trace in result.trace] == result.cosine.tolist()
    with torch.no_grad():
        again, cosine = distance(prior.to_image(result.x0), maps)
    torch.testing.assert_close(again, result.distance, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cosine, result.cosine, rtol=1e-4, atol=1e-4)
    # A target reached at once stops at once; the other goes on alone.
    stopped = _decode(setup, steps=6, scale=4.0, stop_cosine=-1.0)
    assert stopped.passes.tolist() == [1, 1]
    first = _decode(setup, steps=6, scale=4.0).trace
    reach = (first[0][0] + first[1][0]) / 2  # between the two targets' first cosines
    split = _decode(setup, steps=6, scale=4.0, stop_cosine=reach)
    assert sorted(split.passes.tolist())[0] == 1 < sorted(split.passes.tolist())[1], split.passes


def test_adaptive_time_travel_stops_repeating_when_it_no_longer_helps(setup):
    fixed = _decode(setup, steps=3, scale=4.0, travel=lambda i: 6)
    adaptive = _decode(setup, steps=3, scale=4.0, travel=lambda i: 6, min_gain=0.5)
    assert fixed.passes.tolist() == [18, 18]
    assert (adaptive.passes < fixed.passes).all() and (adaptive.passes >= 3).all()


def test_diffusers_pipelines_load_as_priors_pixel_and_latent(setup, tmp_path):
    """Priors as users give them: `DDPMPipeline` (pixels) and `LDMPipeline` (a VQ-VAE's latents)
    saved with save_pretrained and loaded by path; the gradient reaches through the decoder."""
    from diffusers import DDIMScheduler, DDPMPipeline, LDMPipeline, UNet2DModel, VQModel

    _, distance, maps = setup
    torch.manual_seed(0)
    unet = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)  # fmt: skip
    DDPMPipeline(UNet2DModel(sample_size=32, **unet), DDIMScheduler()).save_pretrained(
        tmp_path / "ddpm"
    )
    vq = VQModel(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, norm_num_groups=8,
                 num_vq_embeddings=64, vq_embed_dim=3)  # fmt: skip
    latent_unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **unet)
    LDMPipeline(vq, latent_unet, DDIMScheduler()).save_pretrained(tmp_path / "ldm")
    for name, shape, image in (("ddpm", (3, 32, 32), 32), ("ldm", (3, 16, 16), 32)):
        prior = load_prior(str(tmp_path / name))
        assert prior.shape == shape and prior.about["latent"] == (name == "ldm")
        result = guided_decode(prior, distance, maps, seeded([0, 1]), steps=3)
        assert result.passes.tolist() == [3, 3] and torch.isfinite(result.distance).all()
        assert prior.to_image(result.x0).shape[-1] == image
    with pytest.raises(ValueError, match="no featinv model, it has no condition"):
        load_prior(str(tmp_path / "ddpm"), condition=True)


def guided_config(store: str, model, out, **guided) -> dict:
    spec = {"steps": 3, "travel": {"early_steps": 1, "early": 2, "later": 1, "last": 1}, **guided}
    return validate_config({"store": store, "guided": spec,
                            "sampling": {"model": str(model), "output_dir": str(out), "limit": 3},
                            "evaluation": {"sweep": {"steps": []}}}, "sample")  # fmt: skip


def test_guided_decode_command_writes_a_samples_store_the_evaluation_scores(demo_run, train_store,
                                                                             tmp_path):  # fmt: skip
    # One entry per batch, so the rerun below repeats the very same computations (batched float
    # math may differ in its last bits with the batch's composition: a pixel off by one).
    spec = guided_config(train_store, demo_run[0], tmp_path / "out", batch_size=1)
    config = write(tmp_path / "guided.yaml", spec)
    done = cli("guided-decode", str(config), "--out", str(tmp_path / "marker.json"))
    assert done.returncode == 0, done.stderr
    url = json.loads((tmp_path / "marker.json").read_text())["samples"]
    assert url.endswith("guided.zarr") and validate_samples(url) == []
    store = SamplesStore(url)
    assert set(store.methods) == {"guided", "pixelopt"}
    assert store.attrs["sampling"]["guided"]["travel"]["early"] == 2  # every setting recorded
    root = zarr.open_group(url, mode="r+")
    passes = root["trajectory/guided/passes"][:]
    assert passes.shape == (3, 1, 1) and (passes == 4).all()  # 1 step x 2 + 2 steps x 1
    np.testing.assert_array_equal(root["trajectory/pixelopt/passes"][:], passes)  # same budget
    before = {m: store.images(m) for m in store.methods}

    # Killed after the first entry: the rerun redoes the rest alone, identically.
    root["done"][1:] = False
    for method in store.methods:
        root[f"reconstructions/{method}"][1:] = 0
    assert cli("guided-decode", str(config)).returncode == 0
    for method, images in before.items():
        np.testing.assert_array_equal(SamplesStore(url).images(method), images)

    done = cli("evaluate", str(config))
    assert done.returncode == 0, done.stderr
    evaluation = json.loads((tmp_path / "out" / "demo" / "evaluation.json").read_text())
    methods = evaluation["methods"]
    assert set(methods) == {"guided", "pixelopt"}
    assert all(0 < methods[m]["cosine"]["mean"] <= 1 for m in methods)


def test_bad_targets_fail_in_one_line_naming_both_shapes(demo_run, train_store, tmp_path):
    config = write(
        tmp_path / "guided.yaml", guided_config(train_store, demo_run[0], tmp_path / "out")
    )
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 7, 7, 192), np.float32))  # channels last: a common slip
    done = cli("guided-decode", str(config), "--targets", str(bad), "--to", str(tmp_path / "x"))
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "(2, 7, 7, 192)" in line and "(192, 7, 7)" in line, line

    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).normal(size=(192, 7, 7)).astype(np.float32))
    done = cli("guided-decode", str(config), "--targets", str(good), "--to", str(tmp_path / "x"))
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "x" / "guided.json").read_text())
    assert record["passes"] == [[4]] and (tmp_path / "x" / "target0000_0.png").is_file()


def test_a_folder_of_samples_stores_must_decode_the_same_entries_and_array(tmp_path):
    from storage_specs.layout import StoreError
    from storage_specs.samples import SamplesRun, create_samples_store

    def store(name: str, features: str, rows=(3, 5)) -> None:
        methods = {name[:6]: {"samples": 1, "description": ""}}
        create_samples_store(str(tmp_path / name), rows=rows, keys=["a", "b"][: len(rows)],
                             views=[0], methods=methods, image_shape=(3, 4, 4),
                             attrs={"source": {"features": features}})  # fmt: skip

    store("samples.zarr", "features/m/blocks.5")
    store("guided.zarr", "features/m/blocks.5")
    assert list(SamplesRun(tmp_path).methods) == ["sample", "guided"]
    store("guided-pooled.zarr", "features/m/bn2")
    with pytest.raises(StoreError, match=r"decodes features/m/bn2, .* features/m/blocks\.5"):
        SamplesRun(tmp_path)
    shutil.rmtree(tmp_path / "guided-pooled.zarr")
    store("guided-pooled.zarr", "features/m/blocks.5", rows=(3,))
    with pytest.raises(StoreError, match="holds other entries"):
        SamplesRun(tmp_path)
