"""A bad config stops the run before any work, with one line naming the offending key or value."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline
import pipeline.config
from pipeline.config import (
    ConfigError,
    _verdict_name,
    load_config,
    validate_config,
    with_credentials,
)
from pipeline.sources import list_source
from pipeline.weights import WeightsInfo
from storage_specs.layout import StoreError, open_root
from storage_specs.provenance import redact_uri, redact_url
from tests.conftest import cli, featinv, snakemake

GOOD = {
    "source": "data/demo",
    "store": "stores/x.zarr",
    "backbones": [{"name": "resnet18", "layers": ["layer3"]}],
}


def test_defaults_are_filled():
    config = validate_config(GOOD)
    assert config["shard_size"] == 256 and config["dtype"] == "fp16"
    assert config["backbones"][0]["weights"] == "random"
    assert config["backbones"][0]["group"] == "main"
    assert config["image_limits"]["max_pixels"] == 50_000_000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shrad_size": 4}, "'shrad_size' was unexpected"),
        ({"shard_size": 0}, "config shard_size: 0 is less than the minimum of 1"),
        ({"shard_size": 4.0}, "config shard_size: 4.0 is not of type 'integer'"),  # YAML's float
        ({"num_workers": 100000}, "config num_workers: 100000 is greater than the maximum of 64"),
        ({"views": {"count": 2, "scale": [1.0, 0.08]}}, "config views.scale: [1.0, 0.08] must be"),
        (
            {
                "backbones": [
                    {
                        "name": "resnet18",
                        "weights": "random",
                        "layers": ["layer1"],
                        "preprocessing": {"input_size": [7, 64, 64]},
                    }
                ]
            },
            "config backbones[0].preprocessing.input_size[0]: 3 was expected",
        ),
        (
            {"backbones": [{"name": "resnet18.nope", "weights": "random", "layers": ["layer1"]}]},
            "config backbones[0].name: Invalid pretrained tag (nope) for resnet18.",
        ),
        ({"dtype": "fp8"}, "config dtype: 'fp8' is not one of"),
        ({"device": "tpu"}, "config device: 'tpu' does not match"),
        ({"backbones": []}, "config backbones: [] should be non-empty"),
        ({"views": {"count": 0}}, "config views.count: 0 is less than the minimum of 1"),
        ({"views": {"crop": 1}}, "config views: Additional properties are not allowed ('crop'"),
        (
            {"targets": [{"name": "vae", "kind": "vae"}]},
            "config targets[0]: a vae target needs 'model'",
        ),
        (
            {"targets": [{"name": "resnet18", "kind": "pixels"}]},
            "config targets[0].name: 'resnet18' is already used",
        ),
        ({"backbones": [{"name": "resnet18"}]}, "config backbones[0]: 'layers' is a required"),
        (
            {"backbones": [{"name": "resnet1000", "layers": ["layer3"]}]},
            "config backbones[0].name: unknown timm model 'resnet1000'",
        ),
        (
            {"backbones": [{"name": "resnet18", "layers": ["layer9"]}]},
            "config backbones[0].layers: backbone resnet18 has no layer 'layer9'",
        ),
        (
            {"backbones": [{"name": "resnet18", "layers": ["fc"]}]},
            "config backbones[0].layers: layer 'fc': cannot store a layer output of shape (1, 10",
        ),
        (
            {"backbones": [{"name": "twins_svt_small", "layers": ["blocks.1"]}]},
            "config backbones[0].layers: backbone twins_svt_small layer 'blocks.1' is a "
            "ModuleList, which the forward pass never calls: name one of its modules (blocks.1.0, "
            "blocks.1.1)",
        ),
        (
            {"backbones": [{"name": "levit_128s", "layers": ["stages.1"]}]},
            "config backbones[0].layers: layer 'stages.1': LevitDistilled emits 49 tokens but has "
            "no patch_embed.patch_size to place them on a grid",
        ),
        (
            {
                "backbones": [
                    {
                        "name": "maxvit_tiny_tf_224",
                        "layers": ["stages.1"],
                        "preprocessing": {"input_size": 100},
                    }
                ]
            },
            "config backbones[0].layers: the forward pass fails on 100x100 inputs: height (25) "
            "must be divisible by window (7)",
        ),
        (
            {
                "backbones": [
                    {"name": "resnet18", "layers": ["layer3"], "preprocessing": {"std": [1, 0, 1]}}
                ]
            },
            "config backbones[0].preprocessing.std[1]: 0 is less than or equal to the minimum of 0",
        ),
        (
            {"backbones": [GOOD["backbones"][0], GOOD["backbones"][0]]},
            "config backbones[1].name: 'resnet18' is listed twice",
        ),
        (
            {"robustness": {"ood": [{"name": "space", "source": "/a"}] * 2}},
            "config robustness.ood[1].name: 'space' is listed twice",
        ),
        (
            {"backbones": [{**GOOD["backbones"][0], "weights": "/no/such/resnet18.safetensors"}]},
            "config backbones[0].weights: weights file '/no/such/resnet18.safetensors' does not",
        ),
        (
            {"backbones": [{**GOOD["backbones"][0], "weights": "file:///no/such/r18.pth"}]},
            "config backbones[0].weights: weights file 'file:///no/such/r18.pth' does not exist",
        ),
        (
            {"backbones": [{**GOOD["backbones"][0], "weights": "imagenet"}]},
            "config backbones[0].weights: unknown weights 'imagenet'; accepted: 'random'",
        ),
        (
            {"store": "s3://AKIAKEY:s3cret@bucket/x.zarr"},
            "config store: credentials in s3:// URLs are not supported",
        ),
    ],
)
def test_bad_values_give_one_line(change, message):
    with pytest.raises(ConfigError) as err:
        validate_config({**GOOD, **change})
    assert message in str(err.value)
    assert "\n" not in str(err.value) and "s3cret" not in str(err.value)


def test_config_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    path.write_text("- a list")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' cannot be read: Is a direc"):
        load_config(tmp_path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="cannot be read: not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": "big"}, "config batch_size: 'big' is not of type 'integer'"),
        (
            {"backbones": [{**GOOD["backbones"][0], "weights": "/no/such/w.pth"}]},
            "config backbones[0].weights: weights file '/no/such/w.pth' does not exist",
        ),
        (
            {"source": "s3://AKIAKEY:s3cret@bucket/images"},
            "config source: credentials in s3:// URLs are not supported; give them through the "
            "environment or the provider's config files (s3: AWS_ACCESS_KEY_ID, ...)",
        ),
    ],
)
def test_cli_and_snakemake_stop_with_one_line(tmp_path, change, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    check = featinv("check-config", str(path))
    assert check.returncode == 2
    assert check.stderr.strip() == f"featinv: error: {message}"
    run = snakemake(path, tmp_path, "--cores", "1")
    assert run.returncode != 0
    assert f"featinv: {message}" in run.stderr and "Traceback" not in run.stderr
    assert "s3cret" not in run.stdout + run.stderr
    assert not (tmp_path / "stores").exists() and not (tmp_path / "data").exists()


def test_source_uris_are_stored_without_credentials():
    source = "https://user:pw@host:8443/shards/a.tar"
    uri = f"tar://cat.jpg::{source}"
    public = redact_uri(uri)
    assert public == "tar://cat.jpg::https://host:8443/shards/a.tar"
    assert with_credentials(public, source) == uri  # what an extraction job reads
    assert with_credentials("file:///x/a.jpg", "/x") == "file:///x/a.jpg"


def test_credentials_never_recorded(tmp_path):
    assert redact_url("s3://key:secret@bucket/x.zarr") == "s3://bucket/x.zarr"
    assert redact_url("https://u:p@host:9000/a") == "https://host:9000/a"
    assert redact_url("/local/path") == "/local/path"
    # a weights URL as arrays record it, and the messages that name a source or a store
    weights = WeightsInfo("https://u:s3cret@host/w.safetensors", True, "0" * 64, None)
    assert weights.to_attrs()["source"] == "https://host/w.safetensors"
    with pytest.raises(ValueError) as source:
        list_source(f"file://u:s3cret@{tmp_path}/none")
    with pytest.raises(StoreError) as store:
        open_root(f"file://u:s3cret@{tmp_path}/none.zarr")
    assert "s3cret" not in str(source.value) + str(store.value)


def test_snakemake_keeps_the_verdict_on_the_same_backbones(tmp_path):
    """Snakemake's own process checks models and layers once per set of backbones (timm's import
    and the model builds cost seconds of every start); other backbones are checked afresh."""
    config = {**GOOD, "work_dir": str(tmp_path / "work")}
    validate_config(config, remember=True)
    (verdict,) = (tmp_path / "work/checked-backbones").iterdir()
    again = subprocess.run(
        [sys.executable, "-c", "import sys; from pipeline.config import validate_config; "
         f"validate_config({config!r}, remember=True); print('timm' in sys.modules)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert again.stdout.strip() == "False", again.stderr
    bad = {**config, "backbones": [{"name": "resnet18", "layers": ["layer9"]}]}
    with pytest.raises(ConfigError, match=r"backbones\[0\].layers: backbone resnet18 has no"):
        validate_config(bad, remember=True)
    assert list((tmp_path / "work/checked-backbones").iterdir()) == [verdict]


def test_a_verdict_holds_only_for_the_code_that_judged(tmp_path, monkeypatch):
    """A work_dir kept across a checkout's commits (featinv's version stays the same) does not
    skip what newer code checks: the verdict is named after the checking code's source too."""
    judges = tmp_path / "pipeline"
    shutil.copytree(Path(pipeline.__file__).parent, judges)
    monkeypatch.setattr(pipeline.config, "JUDGES", (judges,))
    before = _verdict_name(GOOD["backbones"])
    assert _verdict_name(GOOD["backbones"]) == before
    with open(judges / "backbones.py", "a") as source:
        source.write("# a newer check\n")
    assert _verdict_name(GOOD["backbones"]) != before


def test_a_vae_folder_that_is_not_there_is_one_line(tmp_path, monkeypatch):
    """Not a folder: read as a hub id, whose download fails (offline here) in one line."""
    from pipeline.targets import load_target

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=f"cannot download VAE '{tmp_path / 'no_vae'}': "):
        load_target(
            {
                "name": "vae",
                "kind": "vae",
                "model": str(tmp_path / "no_vae"),
                "group": "main",
                "size": 64,
                "interpolation": "bicubic",
                "subfolder": None,
            }
        )


@pytest.mark.parametrize(
    "args",
    [
        ["extract-shard", "c.yaml", "--shard", "0", "--threads", "-3"],
        ["extract-shard", "c.yaml", "--shard", "3-1"],
        ["export-webdataset", "s", "o", "--backbone", "b", "--layer", "l", "--max-mb", "0"],
    ],
)
def test_bad_numbers_on_the_command_line_are_usage_errors(args):
    result = cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"'{args[-1]}'" in result.stderr.splitlines()[-1]
