"""The decoupled trainer on a real store of the demo photos: it reads nothing but the store, learns,
resumes exactly, runs on two processes and from S3, and refuses bad input before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
import zarr
from safetensors.torch import load_file

from pipeline.config import validate_config
from pipeline.demo import build_demo_sd
from storage_specs.split import heldout_mask
from tests.conftest import cli, featinv
from training.data import EpochBatches, Position, open_training_data

FEATURES = "features/efficientnet_lite0/blocks.5"
# A small model for tests that check mechanics rather than learning.
TINY = {"compact": {"block_out_channels": [16, 32], "norm_num_groups": 8, "hint_channels": 16},
        "batch_size": 8, "num_workers": 0, "log_every": 1, "preview_every": 0}  # fmt: skip


def training_config(store: str, out: Path, **training) -> dict:
    """A config with nothing but `store` and `training:` (what `featinv train` needs)."""
    spec = {"features": FEATURES, "target": "pixels/pixels", "output_dir": str(out),
            "heldout": {"fraction": 0.25}, **training}  # fmt: skip
    return validate_config({"store": store, "training": spec}, purpose="train")


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------- data


def test_heldout_split_depends_on_the_key_alone():
    keys = [f"class{i % 7}/img_{i:05d}" for i in range(10_000)]
    held = heldout_mask(keys, 0.25)
    assert 0.23 < held.mean() < 0.27
    grown = heldout_mask(keys[::-1] + [f"new/{i}" for i in range(500)], 0.25)
    assert np.array_equal(grown[:10_000][::-1], held)  # order and growth change nothing
    assert not heldout_mask(keys, 0.25, salt="other")[held].all()
    with pytest.raises(ValueError, match="fraction"):
        heldout_mask(keys, 1.0)


def test_training_rows_never_include_heldout_keys(train_store):
    spec = training_config(train_store, Path("unused"))["training"]
    data = open_training_data(train_store, spec)
    root = zarr.open_group(train_store, mode="r")
    keys, valid = root["samples/key"][:], root["samples/valid"][:]
    held = heldout_mask(keys, 0.25)
    assert set(data.train_rows) == set(np.flatnonzero(valid & ~held))
    assert set(data.heldout_rows) == set(np.flatnonzero(valid & held))
    assert len(data.heldout_rows) >= 8 and data.record["split"]["n_heldout_samples"] >= 8
    items = {data.dataset().item(i)[0] for i in range(len(data.dataset()))}
    assert items == set(data.train_rows)


@pytest.mark.parametrize(("n", "batch", "world"), [(44, 8, 1), (100, 7, 3), (30, 4, 2)])
def test_epoch_batches_split_ranks_and_resume_anywhere(n, batch, world):
    def stream(rank, start=None, count=40):
        return list(EpochBatches(n, batch, world, rank, 3, start or Position(), count))

    per_rank = [stream(rank) for rank in range(world)]
    per_epoch = n // (batch * world)
    for step in range(40):
        together = list(chain.from_iterable(per_rank[rank][step] for rank in range(world)))
        assert len(set(together)) == len(together) == batch * world  # disjoint parts
    first_epoch = [i for batches in per_rank for b in batches[:per_epoch] for i in b]
    assert len(set(first_epoch)) == len(first_epoch)  # no item twice within an epoch
    sampler = EpochBatches(n, batch, world, 0, 3, Position(), 40)
    for k in (0, 1, per_epoch, per_epoch + 1, 17):
        assert stream(0, sampler.advance(Position(), k), 40 - k) == per_rank[0][k:]
    assert stream(0) != list(EpochBatches(n, batch, world, 0, 4, Position(), 40))  # seeded


# ---------------------------------------------------------------------------- the models


@pytest.mark.parametrize(("channels", "grid", "size"), [
    (192, (7, 7), (32, 32)), (1024, (9, 9), (32, 32)), (16, (9, 12), (32, 40)),
    (64, (40, 40), (32, 32)),
])  # fmt: skip
def test_hint_block_is_featinvs_resize_then_convs(channels, grid, size):
    """FeatInv's order (resize, conv3x3 C->h, SiLU, conv3x3 h->h, SiLU, zero conv), written out
    with torch ops, equals the block (which runs conv_in on the small map when that is cheaper),
    and the zero-initialised last conv makes the residual exactly 0 at the start."""
    import torch.nn.functional as F

    from training.models import FeatureHint

    hint = FeatureHint(channels, 32, size, hidden=48)
    features = torch.randn(3, channels, *grid, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hint(features), torch.zeros(3, 32, *size))
    torch.nn.init.normal_(hint.conv_out.weight, std=0.1)
    x = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    x = F.silu(hint.conv_mid(F.silu(hint.conv_in(x))))
    torch.testing.assert_close(hint(features), hint.conv_out(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the loop


def test_training_reads_nothing_but_the_store(train_store, tmp_path, monkeypatch):
    """With every backbone construction made impossible, training runs and records its inputs."""
    from training.train import train

    def no_backbones(*args, **kwargs):
        raise AssertionError("training must not build a backbone")

    monkeypatch.setattr(timm, "create_model", no_backbones)
    config = training_config(train_store, tmp_path, steps=3, checkpoint_every=2, **TINY)
    out = train(config, progress=False)

    from training.models import CompactUNet

    model = CompactUNet.from_pretrained(out)
    assert model.hint.mean.shape == (192,) and model.hint.std.min() > 0
    record = json.loads((out / "featinv_training.json").read_text())
    features = zarr.open_group(train_store, mode="r")[FEATURES]
    assert record["store"]["url"] == train_store and record["store"]["spec"] == "featinv-store/3"
    assert record["store"]["features"]["backbone"] == "efficientnet_lite0"
    assert record["store"]["features"]["layer"] == "blocks.5"
    assert record["store"]["features"]["weights"]["sha256"] == features.attrs["weights"]["sha256"]
    assert record["store"]["target"]["paths"] == ["pixels/pixels/rgb"]
    assert record["store"]["views"] == [0, 1] and record["split"]["fraction"] == 0.25
    assert record["noise_schedule"]["beta_schedule"] == "squaredcos_cap_v2"
    assert record["prediction_type"] == "epsilon" and record["steps"] == 3
    assert record["seed"] == 0 and record["provenance"]["packages"]["featinv"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-2", "checkpoint-3"]  # fmt: skip
    assert (out / "scheduler/scheduler_config.json").is_file()


def _scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(folder.glob("logs/*/events.out.tfevents.*"))))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_compact_model_learns_on_the_demo_store(demo_run, capsys):
    """Loss falls clearly, and held-out reconstructions, re-measured with the backbone, are closer
    to their targets' features than those of the untrained model (same init, same seeds)."""
    from sampling.metrics import flat_cosine
    from sampling.reextract import recorded_backbone, reextract
    from sampling.sampler import make_scheduler, sample, to_images
    from storage_specs.datasets import PairDataset
    from training.denoisers import load_trained, new_trainee

    out, seconds = demo_run
    losses = _scalars(out, "loss")
    assert np.mean(losses[-4:]) < 0.3 * losses[0], losses
    assert max(_scalars(out, "data_wait_fraction")) < 0.2
    assert sorted(p.name for p in (out / "previews").iterdir()) == [
        "step-0000250.png", "step-0000500.png"]  # fmt: skip

    trained, record = load_trained(out)
    data = open_training_data(record["store"]["url"], record["training"])
    untrained = new_trainee(record["training"], data)
    held = PairDataset(data.url, data.arrays, rows=data.heldout_rows, views=[0])
    batch = held.read_batch(range(len(held)))
    backbone = recorded_backbone(record["store"]["features"])
    cosine = {}
    for name, trainee in (("trained", trained), ("untrained", untrained)):
        scheduler = make_scheduler("ddim", trainee.noise_scheduler.config)
        x0 = sample(trainee.denoiser(), scheduler, batch["features"], data.target_shape,
                    steps=25, generator=torch.Generator().manual_seed(0))  # fmt: skip
        features = reextract(backbone, to_images(x0))
        cosine[name] = flat_cosine(features, batch["features"]).mean().item()
    with capsys.disabled():
        print(f"\ndemo training: {record['steps']} steps in {seconds:.0f} s, loss "
              f"{losses[0]:.3f} -> {np.mean(losses[-4:]):.3f}; held-out feature cosine "
              f"{cosine['trained']:.3f} trained vs {cosine['untrained']:.3f} untrained "
              f"({len(data.heldout_rows)} samples)")  # fmt: skip
    assert cosine["trained"] > cosine["untrained"] + 0.05


def _run_until(cmd: list[str], path: Path, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL its process group once `path` exists (a job killed by a scheduler)."""
    process = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_and_resumed_equals_uninterrupted(train_store, tmp_path):
    """Weights bitwise equal on CPU, with data-loader workers, gradient accumulation, EMA and
    previews; a checkpoint torn by the kill is deleted, only the last checkpoints are kept."""
    settings = {"steps": 12, "checkpoint_every": 4, "checkpoints_total_limit": 2,
                "batch_size": 16, "gradient_accumulation_steps": 2, "num_workers": 1,
                "preview_every": 5, "log_every": 3, "compact": TINY["compact"]}  # fmt: skip
    whole = write(tmp_path / "whole.yaml", training_config(train_store, tmp_path, run="whole",
                                                          **settings))  # fmt: skip
    cut = write(tmp_path / "cut.yaml", training_config(train_store, tmp_path, run="cut",
                                                      **settings))  # fmt: skip
    assert featinv("train", str(whole)).returncode == 0

    _run_until([sys.executable, "-m", "pipeline.cli", "train", str(cut)],
               tmp_path / "cut/checkpoints/checkpoint-8")  # fmt: skip
    assert not (tmp_path / "cut/featinv_training.json").exists()  # really interrupted
    torn = tmp_path / "cut/checkpoints/.tmp-checkpoint-12"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"half")
    resumed = featinv("train", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert_same_weights(model_weights(tmp_path / "whole"), model_weights(tmp_path / "cut"))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(
            load_file(tmp_path / f"whole/checkpoints/checkpoint-12/{name}"),
            load_file(tmp_path / f"cut/checkpoints/checkpoint-12/{name}"),
        )
    assert {p.name for p in (tmp_path / "cut/checkpoints").iterdir()} == {
        "checkpoint-8", "checkpoint-12"}  # fmt: skip


def test_a_checkpoint_resumes_only_what_it_can(train_store, tmp_path):
    """A finished run is left as it is; a resume with another learning rate (the checkpoint's
    optimizer would bring back its own), on another store, or from a torn checkpoint, and a torn
    model folder: one line each."""
    import shutil

    from sampling.reconstruct import Reconstructor
    from storage_specs.layout import consolidate

    def train(store: str, **changes) -> subprocess.CompletedProcess:
        settings = {"steps": 2, "checkpoint_every": 2, "ema": {"enabled": True}, **TINY, **changes}
        path = write(tmp_path / "run.yaml", training_config(store, tmp_path, run="r", **settings))
        return cli("train", str(path))

    assert train(train_store).returncode == 0
    record = (tmp_path / "r/featinv_training.json").read_bytes()
    assert json.loads(record)["final_loss"] is not None
    assert train(train_store).returncode == 0  # finished: nothing to train, nothing rewritten
    assert (tmp_path / "r/featinv_training.json").read_bytes() == record
    checkpoint = tmp_path / "r/checkpoints/checkpoint-2"
    lr = train(train_store, steps=4, learning_rate=0.05)
    assert lr.returncode == 2 and "training.learning_rate = None, this run has 0.05" in lr.stderr
    other = shutil.copytree(train_store, tmp_path / "other.zarr")  # the same data, rebuilt
    zarr.open_group(other, mode="r+").attrs["store_id"] = "0" * 32
    consolidate(str(other))
    moved = train(str(other), steps=4)
    assert moved.returncode == 2 and "written with a store of store_id '" in moved.stderr
    (checkpoint / "ema.safetensors").write_bytes(b"torn")
    torn = train(train_store, steps=4)
    assert torn.returncode == 2
    assert torn.stderr.startswith(f"featinv: error: checkpoint {checkpoint} cannot be loaded (")
    assert torn.stderr.rstrip().endswith("delete it to resume from the one before")
    weights = tmp_path / "r/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model folder '.*/r' cannot be loaded \(OSError"):
        Reconstructor.load(tmp_path / "r")


def test_two_processes_save_one_consistent_checkpoint(train_store, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun, gloo): one checkpoint
    with both ranks' RNG states, equal to the saved model."""
    config = training_config(train_store, tmp_path, run="ddp", steps=4, checkpoint_every=2,
                             ema={"enabled": False}, **TINY)  # fmt: skip
    path = write(tmp_path / "ddp.yaml", config)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--multi_gpu", "-m", "pipeline.cli", "train", str(path)]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ddp"
    record = json.loads((out / "featinv_training.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 4
    checkpoint = out / "checkpoints/checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # fmt: skip
    assert_same_weights(load_file(checkpoint / "model.safetensors"), model_weights(out))
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_training_from_s3_equals_training_from_disk(train_store, tmp_path, s3_bucket):
    import s3fs

    url = f"{s3_bucket}/train.zarr"
    s3fs.S3FileSystem().put(train_store, url, recursive=True)
    settings = {"steps": 3, **TINY, "num_workers": 1}
    for name, store in (("disk", train_store), ("s3", url)):
        config = write(tmp_path / f"{name}.yaml",
                       training_config(store, tmp_path, run=name, **settings))  # fmt: skip
        result = cli("train", str(config))
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(model_weights(tmp_path / "disk"), model_weights(tmp_path / "s3"))
    record = json.loads((tmp_path / "s3/featinv_training.json").read_text())
    assert record["store"]["url"] == url


def test_featinv_mode_end_to_end(train_store, tmp_path, monkeypatch):
    """ControlNet on a tiny SD-1.x folder (UNet, CLIP text model and tokenizer, scheduler, saved
    with save_pretrained and loaded by path): the prompt is encoded once, the UNet stays frozen,
    and the trained folder samples through the store's VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sampling.reconstruct import Reconstructor
    from training.denoisers import load_trained
    from training.train import train

    base = build_demo_sd(str(tmp_path / "sd"))
    calls = []
    encode = CLIPTextModel.forward
    monkeypatch.setattr(CLIPTextModel, "forward",
                        lambda self, *a, **k: calls.append(1) or encode(self, *a, **k))  # fmt: skip
    config = training_config(
        train_store, tmp_path, mode="featinv", target="latents/vae", steps=3, batch_size=4,
        num_workers=0, featinv={"pretrained": str(base), "hint_channels": 32}, preview_every=3,
    )  # fmt: skip
    out = train(config, progress=False)
    assert len(calls) == 1  # the fixed prompt (and the empty one) in one call, not per step

    trainee, record = load_trained(out)
    assert record["mode"] == "featinv" and record["base"]["pretrained"] == str(base)
    assert record["noise_schedule"]["beta_schedule"] == "scaled_linear"
    frozen = UNet2DConditionModel.from_pretrained(base / "unet")
    assert_same_weights(frozen.state_dict(), trainee.unet.state_dict())
    assert trainee.model.hint.conv_out.weight.abs().sum() > 0  # zero-initialised, then trained
    assert (out / "previews/step-0000003.png").is_file()

    data = open_training_data(train_store, record["training"])
    features = torch.from_numpy(zarr.open_group(train_store, mode="r")[FEATURES][
        data.heldout_rows[:2], 0].astype("float32"))  # fmt: skip
    model = Reconstructor.load(out)  # as `featinv sample` loads it: the VAE from the store
    assert model.trainee.unconditional == {"keep_prompt": 0}  # guidance keeps the hint
    images = model.images(features, [1, 2], scheduler="dpm++", steps=4, guidance=1.75)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, model.images(features, [1, 2], scheduler="dpm++", steps=4,
                                            guidance=1.75))  # fmt: skip


# ---------------------------------------------------------------------------- bad input


def _fails(tmp_path: Path, config: dict, message: str, capsys) -> None:
    """One line on stderr naming the problem, exit 2, and no model folder started."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["train", str(write(tmp_path / "bad.yaml", config))])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "models").exists()


def test_bad_config_or_store_stops_before_any_work(train_store, tmp_path, capsys):
    import shutil

    training = {
        "features": FEATURES,
        "target": "pixels/pixels",
        "output_dir": str(tmp_path / "models"),
    }
    good = {"store": train_store, "training": training}

    def fails(changes: dict, message: str, store: str = train_store) -> None:
        config = {**good, "store": store, "training": {**good["training"], **changes}}
        _fails(tmp_path, config, message, capsys)

    fails({"steps": 0}, "config training.steps: 0 is less than the minimum of 1")
    fails(
        {"features": "features/efficientnet_lite0/blocks.9"},
        "has no features/efficientnet_lite0/blocks.9 (arrays: features/efficientnet_lite0/",
    )
    fails({"target": "latents/nope"}, "has no latents/nope/mean")
    fails({"views": [0, 5]}, "config training.views: [0, 5] out of range")
    fails(
        {
            "mode": "featinv",
            "target": "latents/vae",
            "featinv": {"pretrained": str(tmp_path / "nothing")},
        },
        f"cannot load training.featinv.pretrained '{tmp_path / 'nothing'}'",
    )
    base = str(build_demo_sd(str(tmp_path / "sd")))
    capsys.readouterr()
    fails(
        {"mode": "featinv", "featinv": {"pretrained": base}},
        "featinv mode trains on latents/<target>",
    )
    fails({"batch_size": 1000}, "fewer than one batch")
    fails({}, "no featinv store at", store=str(tmp_path / "missing.zarr"))
    cases = (
        ({"complete": False}, "is not complete"),
        ({"featinv_spec": "featinv-store/1"}, "is not a featinv store this reader knows"),
    )
    for i, (attrs, message) in enumerate(cases):
        copy = tmp_path / f"copy{i}.zarr"
        shutil.copytree(train_store, copy)
        root = zarr.open_group(str(copy), mode="r+", use_consolidated=False)
        root.attrs.update(attrs)
        zarr.consolidate_metadata(str(copy))
        fails({}, message, store=str(copy))


# ---------------------------------------------------------------------------- updecoder baseline


@pytest.mark.parametrize(("grid", "size", "stages"), [
    ((7, 7), (32, 32), 2), ((8, 8), (32, 32), 2), ((7, 7), (256, 256), 5), ((9, 12), (32, 40), 2),
    ((40, 40), (32, 32), 0),
])  # fmt: skip
def test_updecoder_doubles_to_the_nearest_power_of_two_then_resizes(grid, size, stages):
    from training.models import UpConvDecoder

    decoder = UpConvDecoder.for_shapes((16, *grid), (3, *size), [8], [8, 4])
    assert [up.out_channels for up in decoder.ups] == [8, 4, 4, 4, 4][:stages]
    assert decoder(torch.randn(2, 16, *grid)).shape == (2, 3, *size)


@pytest.fixture(scope="session")
def updecoder_run(train_store, tmp_path_factory):
    """Dosovitskiy & Brox's decoder (narrower than the default) trained by the same loop on the
    demo store's 32 px pixels."""
    from training.train import train

    tmp = tmp_path_factory.mktemp("updecoder_run")
    config = training_config(
        train_store, tmp, run="updecoder", mode="updecoder", steps=200, batch_size=16,
        learning_rate=2e-3, updecoder={"conv_channels": [64, 64], "up_channels": [64, 32]},
        log_every=10, checkpoint_every=200, preview_every=200, num_workers=1,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine two OpenMP threads per process stall (10x slower)
    start = time.perf_counter()
    out = train(config, progress=False)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return out, seconds


def test_updecoder_learns_on_the_demo_store(updecoder_run, capsys):
    """Loss falls clearly (measured: 0.158 -> 0.021 in 200 steps, ~20 s on one busy core), and
    the held-out predictions, re-measured with the backbone, are closer to their targets' features
    than the untrained decoder's (measured: cosine 0.49 vs 0.33; the stored 32 px targets
    themselves: 0.94)."""
    from sampling.metrics import flat_cosine
    from sampling.reextract import recorded_backbone, reextract
    from sampling.sampler import to_images
    from storage_specs.datasets import PairDataset
    from training.denoisers import load_trained, new_trainee

    out, seconds = updecoder_run
    losses = _scalars(out, "loss")
    assert np.mean(losses[-4:]) < 0.3 * losses[0], losses

    trained, record = load_trained(out)
    data = open_training_data(record["store"]["url"], record["training"])
    untrained = new_trainee(record["training"], data)
    held = PairDataset(data.url, data.arrays, rows=data.heldout_rows, views=[0])
    batch = held.read_batch(range(len(held)))
    with torch.no_grad():
        images = {"trained": to_images(trained.model(batch["features"])),
                  "untrained": to_images(untrained.model(batch["features"])),
                  "targets": batch["pixels"]}  # fmt: skip
    backbone = recorded_backbone(record["store"]["features"])
    cosine = {name: flat_cosine(reextract(backbone, made), batch["features"]).mean().item()
              for name, made in images.items()}  # fmt: skip
    with capsys.disabled():
        print(f"\nupdecoder: {record['steps']} steps in {seconds:.0f} s, loss {losses[0]:.3f} -> "
              f"{np.mean(losses[-4:]):.3f}; held-out feature cosine {cosine['trained']:.3f} "
              f"trained vs {cosine['untrained']:.3f} untrained, {cosine['targets']:.3f} for the "
              f"stored targets ({len(data.heldout_rows)} samples)")  # fmt: skip
    assert cosine["trained"] > cosine["untrained"] + 0.05


def test_updecoder_folder_loads_back_with_the_same_predictions(updecoder_run, tmp_path):
    """`load_trained` gives the decoder whose predictions are the last held-out grid drawn while
    training, pixel for pixel; the record says what it is (no noise schedule, x0)."""
    from PIL import Image

    from training.denoisers import load_trained
    from training.preview import Preview

    out, _ = updecoder_run
    trainee, record = load_trained(out)
    assert record["mode"] == "updecoder" and record["model_class"] == "UpConvDecoder"
    assert record["noise_schedule"] is None and record["prediction_type"] == "x0"
    assert record["normalisation"]["in_model"] == "norm.mean, norm.std buffers"
    assert trainee.noise_scheduler is None and not (out / "scheduler").exists()
    with pytest.raises(TypeError, match="no denoiser"):
        trainee.denoiser()

    data = open_training_data(record["store"]["url"], record["training"])
    grid = Preview(data, trainee, record["training"], tmp_path).grid(trainee.model)
    drawn = np.asarray(Image.open(out / "previews/step-0000200.png"))
    assert np.array_equal(grid.permute(1, 2, 0).numpy(), drawn)
    assert drawn.shape[1] < drawn.shape[0]  # two columns (target, prediction) for four rows


def test_updecoder_resumed_equals_uninterrupted(train_store, tmp_path):
    """3 steps, then 3 more from its checkpoint: the same weights (and EMA) as 6 at once (the
    step count set as `featinv train --baseline` sets it, which may grow as `steps` may)."""
    from training.train import train

    settings = {**TINY, "mode": "updecoder", "checkpoint_every": 3}
    for run, steps in (("whole", 6), ("cut", 3), ("cut", 6)):
        config = training_config(train_store, tmp_path, run=run, steps=steps,
                                 updecoder={"steps": steps}, **settings)  # fmt: skip
        train(config, progress=False)
    assert_same_weights(model_weights(tmp_path / "whole"), model_weights(tmp_path / "cut"))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(
            load_file(tmp_path / f"whole/checkpoints/checkpoint-6/{name}"),
            load_file(tmp_path / f"cut/checkpoints/checkpoint-6/{name}"),
        )
