"""The sampler and the evaluation on the demo photos' store and the demo config's trained model:
reproducible seeds, guidance, a samples store that validates and resumes, and an evaluation whose
numbers say what the condition is worth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import validate_config
from sampling.reconstruct import Reconstructor
from sampling.sampler import guided, make_scheduler, sample, seeded
from storage_specs.layout import StoreError
from storage_specs.samples import SamplesStore, validate_samples
from tests.conftest import cli
from tests.test_training import write


def sampling_config(store: str, model, out, **sampling) -> dict:
    spec = {"model": str(model), "output_dir": str(out), "steps": 8, "n": 2, "limit": 6,
            "baselines": {"updecoder": False}, **sampling}  # fmt: skip
    return validate_config({"store": store, "sampling": spec,
                            "evaluation": {"sweep": {"schedulers": ["ddim", "dpm++", "unipc"],
                                                     "steps": [4, 8]}}}, "sample")  # fmt: skip


@pytest.fixture(scope="module")
def model(demo_run) -> Reconstructor:
    return Reconstructor.load(demo_run[0])


@pytest.fixture(scope="module")
def maps(model, train_store) -> torch.Tensor:
    from storage_specs.datasets import PairDataset
    from training.data import open_training_data

    data = open_training_data(train_store, model.record["training"])
    held = PairDataset(data.url, {"features": data.arrays["features"]}, data.heldout_rows, [0])
    return held.read_batch(range(4))["features"]


def test_same_seeds_same_images_whatever_the_batch(model, maps):
    seeds = [11, 12, 13, 14]
    whole = model.images(maps, seeds, steps=6, guidance=1.75)
    halves = torch.cat([model.images(maps[:2], seeds[:2], steps=6, guidance=1.75),
                        model.images(maps[2:], seeds[2:], steps=6, guidance=1.75)])  # fmt: skip
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, model.images(maps, [21, 22, 23, 24], steps=6, guidance=1.75))


def test_guidance_one_is_the_plain_conditional_prediction(model, maps):
    denoiser = model.trainee.denoiser()
    x = torch.randn(len(maps), *model.target_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(maps),), 500)
    with torch.no_grad():
        cond = denoiser(x, t, maps)
        uncond = denoiser(x, t, maps, keep_hint=torch.zeros(len(maps)))
        assert torch.equal(guided(denoiser, x, t, maps, 1.0, {"keep_hint": 0}), cond)
        mixed = guided(denoiser, x, t, maps, 1.75, {"keep_hint": 0})
    torch.testing.assert_close(mixed, uncond + 1.75 * (cond - uncond))
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the condition does something

    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return denoiser(*args, **kwargs)

    scheduler = make_scheduler("ddim", model.trainee.noise_scheduler.config)
    plain = sample(counting, scheduler, maps, model.target_shape, steps=5, guidance=1.0,
                   generator=seeded(range(4)))  # fmt: skip
    assert calls == [{}] * 5  # never an unconditional pass
    torch.testing.assert_close(plain, model.model_space(maps, range(4), steps=5, guidance=1.0))


def test_sample_store_validates_resumes_and_refuses_other_settings(demo_run, train_store,
                                                                   tmp_path):  # fmt: skip
    from sampling.sample import sample_run

    config = sampling_config(train_store, demo_run[0], tmp_path)
    out = sample_run(config, progress=False)
    url = str(out / "samples.zarr")
    assert validate_samples(url) == []
    done = cli("validate", url)
    assert done.returncode == 0 and "valid" in done.stdout, done.stderr
    store = SamplesStore(url)
    assert set(store.methods) == {"model", "unconditional", "nearest"}
    images = {m: store.images(m) for m in store.methods}
    assert images["model"].shape == (6, 1, 2, 3, 32, 32)
    assert len(set(store.seeds().ravel().tolist())) == 12
    assert sorted(p.name for p in (out / "png" / store.keys[0]).iterdir()) == [
        "v0_model_0.png", "v0_model_1.png", "v0_nearest_0.png", "v0_original.png",
        "v0_unconditional_0.png", "v0_unconditional_1.png"]  # fmt: skip

    # An interrupted run (entries 3.. never written) resumes those entries alone, identically;
    # a finished entry's deleted PNGs are written again from the store.
    png = out / "png" / store.keys[0] / "v0_model_1.png"
    written = png.read_bytes()
    png.unlink()
    root = zarr.open_group(url, mode="r+")
    root["done"][3:] = False
    for method in store.methods:
        root[f"reconstructions/{method}"][3:] = 0
    sample_run(config, progress=False)
    for method, before in images.items():
        np.testing.assert_array_equal(SamplesStore(url).images(method), before)
    assert png.read_bytes() == written

    with pytest.raises(StoreError, match="other settings \\(sampling\\)"):
        sample_run(sampling_config(train_store, demo_run[0], tmp_path, steps=9), progress=False)

    # A flipped byte in a chunk is caught, naming the array.
    chunk = next((out / "samples.zarr" / "reconstructions" / "model" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = validate_samples(url)
    assert problems and problems[0].startswith("reconstructions/model: unreadable"), problems


def test_evaluation_scores_the_model_against_its_baselines(demo_run, train_store, tmp_path,
                                                           capsys):  # fmt: skip
    """Through the CLI (`featinv sample`, then `featinv evaluate`): the condition is worth
    something in the backbone's own feature space, and every metric is either a number or one
    line saying why not."""
    config = sampling_config(train_store, demo_run[0], tmp_path, n=2, limit=None)
    path = write(tmp_path / "config.yaml", config)
    for command in ("sample", "evaluate"):
        done = cli(command, str(path))
        assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / demo_run[0].name / "evaluation.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["model", "unconditional", "nearest"]
    model, uncond = methods["model"], methods["unconditional"]
    assert model["cosine"]["mean"] > uncond["cosine"]["mean"] + 0.1
    assert model["position_cosine"]["mean"] > uncond["position_cosine"]["mean"]
    assert model["rel_l2"]["mean"] < uncond["rel_l2"]["mean"]
    assert model["ssim"]["mean"] > uncond["ssim"]["mean"]
    assert model["frechet_backbone"] < uncond["frechet_backbone"]
    for scores in methods.values():
        assert {"cosine", "position_cosine", "rel_l2", "psnr", "ssim", "top1", "top5"} <= set(
            scores
        )
    for name in ("lpips", "fid"):
        assert name in result["unavailable"] or all(name in m for m in methods.values())
    assert all("\n" not in reason for reason in result["unavailable"].values())
    assert [(p["scheduler"], p["steps"]) for p in result["sweep"]] == [
        (s, k) for s in ("ddim", "dpm++", "unipc") for k in (4, 8)]  # fmt: skip
    assert result["layer"] == "blocks.5" and 0 < result["depth"] < 1
    rows = (tmp_path / demo_run[0].name / "per_sample.csv").read_text().splitlines()
    n_entries = result["n_entries"]
    assert len(rows) == 1 + n_entries * (2 + 2 + 1)
    with capsys.disabled():
        print(f"\nevaluation ({n_entries} held-out maps): " + "; ".join(
            f"{m} cosine {s['cosine']['mean']:.3f} ssim {s['ssim']['mean']:.3f}"
            for m, s in methods.items()))  # fmt: skip


def test_sampling_and_evaluating_from_s3_equal_disk(demo_run, train_store, tmp_path, s3_bucket):
    """The same model on the store's copy on the loopback S3 server: the same images, the same
    evaluation (a store may move; the config's `store` is what is read)."""
    import s3fs

    from sampling.evaluate import evaluate_run
    from sampling.sample import sample_run

    url = f"{s3_bucket}/train.zarr"
    s3fs.S3FileSystem().put(train_store, url, recursive=True)
    results = {}
    for name, store in (("disk", train_store), ("s3", url)):
        config = sampling_config(store, demo_run[0], tmp_path / name, steps=3, limit=3)
        config["evaluation"]["sweep"]["steps"] = []
        sample_run(config, progress=False)
        out = evaluate_run(config, progress=False)
        store = SamplesStore(str(out / "samples.zarr"))
        results[name] = ({m: store.images(m) for m in store.methods},
                         json.loads((out / "evaluation.json").read_text())["methods"])  # fmt: skip
    for method, images in results["disk"][0].items():
        np.testing.assert_array_equal(results["s3"][0][method], images)
    assert results["s3"][1] == results["disk"][1]
    assert SamplesStore(str(tmp_path / "s3" / demo_run[0].name / "samples.zarr")).attrs[
        "source"]["url"] == url  # fmt: skip


def test_a_source_image_changed_since_extraction_is_said(train_store, tmp_path):
    """The evaluation renders the original views again from the source images: one replaced by
    another of another size is named, not a bare "box can't exceed original image size"."""
    import shutil

    from PIL import Image

    from sampling.evaluate import original_inputs
    from sampling.reextract import recorded_backbone
    from storage_specs.reader import FeatureStore

    url = str(shutil.copytree(train_store, tmp_path / "store.zarr"))
    root = zarr.open_group(url, mode="r+")
    row = int(np.flatnonzero(root["samples/valid"][:])[0])
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(other)
    sources = root["samples/source"][:]
    sources[row] = other.as_uri()
    root["samples/source"][:] = sources
    store = FeatureStore(url)
    features = store.require("features/efficientnet_lite0/blocks.5")
    backbone = recorded_backbone(dict(features.attrs), "cpu")
    height, width = root["samples/height"][row], root["samples/width"][row]
    assert original_inputs(backbone, store, [row], [0]) == (None, (
        f"source image '{other.as_uri()}' changed since extraction (40x50, stored "
        f"{height}x{width})"))  # fmt: skip


def test_the_nearest_training_pair_is_never_the_query_itself(train_store):
    """With `split: train` or `all` the queried image is in the pool: the baseline would be the
    image itself (PSNR at its cap), so no view of the query's own sample counts."""
    from sampling.baselines import nearest_items
    from storage_specs.datasets import PairDataset
    from storage_specs.reader import FeatureStore

    path = "features/efficientnet_lite0/blocks.5"
    pool = PairDataset(train_store, {"features": path})
    queries = pool.read_batch(range(4))["features"]
    stats = FeatureStore(train_store).require(path).attrs["channel_stats"]
    assert nearest_items(queries, pool, stats) == [0, 1, 2, 3]
    rows = [pool.item(i)[0] for i in range(4)]
    found = nearest_items(queries, pool, stats, query_rows=rows)
    assert all(pool.item(j)[0] != row for j, row in zip(found, rows, strict=True))
