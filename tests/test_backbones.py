"""Layer taps match timm's own feature APIs for CNN, ViT (tokens) and Swin (channels-last)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import timm
import torch

from pipeline.backbones import (
    BackboneSpec,
    LayerTaps,
    check_layouts,
    load_backbone,
    probe_shapes,
    to_grid,
)
from pipeline.extract import pick_device

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name).eval()


def test_vit_tokens_become_grid_plus_prefix():
    model = _model("vit_tiny_patch16_224")
    with torch.inference_mode():
        taps = LayerTaps(model, ("blocks.3", "blocks.11"))(X)
        reference = model.forward_intermediates(X, indices=[3, 11], intermediates_only=True)
    for (grid, prefix), ref in zip(taps.values(), reference, strict=True):
        assert grid.shape == (2, 192, 14, 14) and prefix.shape == (2, 1, 192)
        torch.testing.assert_close(grid, ref)


def test_register_tokens_are_prefix():
    model = _model("vit_little_patch16_reg4_gap_256")
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        grid, prefix = LayerTaps(model, ("blocks.2",))(x)["blocks.2"]
        (ref,) = model.forward_intermediates(x, indices=[2], intermediates_only=True)
    assert prefix.shape == (1, 4, 320)  # 4 registers, no class token
    assert grid.shape == (1, 320, 16, 16)
    torch.testing.assert_close(grid, ref)


@pytest.mark.parametrize(
    ("name", "grid_hw", "n_prefix"),
    [
        ("cait_xxs24_224", (14, 14), 0),  # CaiT and XCiT add their class token after these blocks
        ("xcit_nano_12_p16_224", (14, 14), 0),  # (num_prefix_tokens 1; an int patch size)
        ("vit_tiny_r_s16_p8_224", (7, 7), 1),  # patches of 8 on a ResNet's stride-16 map
        ("mixer_s16_224", (14, 14), 0),  # the patch embedding is `stem`
    ],
)
def test_token_grids_of_other_vit_families_match_timm(name, grid_hw, n_prefix):
    model = _model(name)
    with torch.inference_mode():
        grid, prefix = LayerTaps(model, ("blocks.3",))(X)["blocks.3"]
        (ref,) = model.forward_intermediates(X, indices=[3], intermediates_only=True)
    assert grid.shape[2:] == grid_hw
    assert (prefix is None) if n_prefix == 0 else (prefix.shape[1] == n_prefix)
    torch.testing.assert_close(grid, ref)


def test_a_layer_before_a_part_that_rejects_the_input_size_is_stored():
    """MaxViT at 112 px: stages.3's 3.5x3.5 grid does not fit its windows, stages.1's does."""
    spec = BackboneSpec(
        "maxvit_tiny_tf_224", "random", ("stages.1",), preprocessing={"input_size": 112}
    )
    check_layouts(spec)
    assert probe_shapes(load_backbone(spec))["stages.1"]["grid"] == (128, 14, 14)
    with pytest.raises(ValueError, match=re.escape("fails on 112x112 inputs: height (4) must")):
        check_layouts(replace(spec, layers=("stages.3",)))


def test_a_container_with_a_forward_of_its_own_is_a_layer():
    spec = BackboneSpec("densenet121", "random", ("features.denseblock2",))  # a ModuleDict
    check_layouts(spec)
    assert probe_shapes(load_backbone(spec))["features.denseblock2"]["grid"] == (512, 28, 28)


@pytest.mark.parametrize(
    ("name", "layer", "message"),
    [
        ("twins_svt_small", "blocks.1", "'blocks.1' is a ModuleList, which the forward pass never"),
        ("hiera_tiny_224", "blocks.5", "Hiera emits 196 tokens but has no patch_embed.patch_size"),
        ("crossvit_tiny_240", "blocks.0.blocks.0.0", "CrossVit emits 401 tokens but has no"),
        ("crossvit_tiny_240", "blocks.0", "'blocks.0' emits 2 tensors ((1, 401, 96), (1, 197, 192"),
        ("hrnet_w18_small", "stage2", "'stage2' emits 2 tensors ((1, 16, 56, 56), (1, 32, 28, 2"),
        # run after bn1, after bn2 and after the sum: the taps stopping there would keep the first
        ("legacy_seresnet18", "layer1.0.relu", "'layer1.0.relu' runs 3 times in one forward pass"),
        ("vit_tiny_patch16_224", "head", "layer 'head': cannot store a layer output of shape"),
        # 4-D but no image map: heads x tokens x head size; MobileViT's unfolded patches
        (
            "vit_tiny_patch16_224",
            "blocks.0.attn.q_norm",
            "emits (3, 197, 64) per image, where axes (1,) follow the image size",
        ),
        ("mobilevitv2_050", "stages.2.1.transformer", "emits (64, 4, 256) per image, where axes"),
        # MaxViT's window attention: the windows of an image in the batch axis
        (
            "maxvit_pico_rw_256",
            "stages.0.blocks.0.attn_block.attn",
            "emits (64, 8, 8, 32) for 1 image(s), not one map per image",
        ),
    ],
)
def test_layers_the_store_cannot_hold_are_refused_without_weights(name, layer, message):
    spec = BackboneSpec(name, "random", (layer,))
    with pytest.raises(ValueError, match=re.escape(message)):
        check_layouts(spec)
    # the same verdict from the real model on a real-size input (the plan's forward)
    with pytest.raises(ValueError, match=re.escape(message)):
        probe_shapes(load_backbone(spec))


def test_swin_channels_last_is_stored_channels_first():
    model = _model("swin_tiny_patch4_window7_224")
    with torch.inference_mode():
        grid, prefix = LayerTaps(model, ("layers.1",))(X)["layers.1"]
        (ref,) = model.forward_intermediates(X, indices=[1], intermediates_only=True)
    assert prefix is None and grid.shape == (2, 192, 28, 28)
    torch.testing.assert_close(grid, ref)


def test_an_input_size_the_model_rejects_with_a_runtime_error_is_one_line():
    """The meta device lets it pass (ops it cannot run look the same); the plan's real forward
    says it in one line, not a traceback."""
    spec = BackboneSpec("convnext_tiny", "random", ("stages.3",), preprocessing={"input_size": 20})
    check_layouts(spec)
    message = r"^backbone convnext_tiny: the forward pass fails on 20x20 inputs: Calculated pad"
    with pytest.raises(ValueError, match=message):
        probe_shapes(load_backbone(spec))


@pytest.mark.parametrize(
    ("name", "layer", "size", "channels_last"),
    [
        ("mambaout_femto", "stem.conv2", 224, False),  # [48, 56, 56] in a model that says NHWC
        ("convnext_tiny", "stages.0.blocks.0.norm", 384, True),  # [96, 96, 96]: norm before fc1
        ("swin_tiny_patch4_window7_224", "patch_embed.proj", 320, False),  # [96, 80, 80]
    ],
)
def test_a_map_whose_shape_fits_both_layouts_is_stored_as_emitted(name, layer, size, channels_last):
    """A channel count near the map's size leaves the shape ambiguous, and a model's `output_fmt`
    is not every module's: the axes that grow with the input are the map's."""
    backbone = load_backbone(BackboneSpec(name, "random", (layer,), preprocessing={
        "input_size": size}))  # fmt: skip
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    emitted = {}
    hook = backbone.model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: emitted.setdefault("out", out.clone()))  # fmt: skip
    with torch.inference_mode():
        grid, _ = backbone.taps()(x)[layer]
    hook.remove()
    expected = emitted["out"].permute(0, 3, 1, 2) if channels_last else emitted["out"]
    torch.testing.assert_close(grid, expected)
    assert grid.shape[-2:] == (size // 4, size // 4)  # stride 4


def test_convnext_block_internals_nhwc():
    model = _model("convnext_atto")
    with torch.inference_mode():
        grid, _ = LayerTaps(model, ("stages.1.blocks.0.mlp",))(X)["stages.1.blocks.0.mlp"]
    assert grid.shape == (2, 80, 28, 28)


def test_taps_stop_early_and_match_full_forward():
    model = _model("resnet18")
    with torch.inference_mode():
        taps = LayerTaps(model, ("layer1", "layer3"))(X)
        full = model.forward_intermediates(X, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(taps["layer1"][0], full[0])
    torch.testing.assert_close(taps["layer3"][0], full[1])


def test_a_layer_rewritten_in_place_later_keeps_its_own_output():
    model = _model("resnet18")  # act1 is ReLU(inplace=True), run on bn1's output
    with torch.inference_mode():
        taps = LayerTaps(model, ("bn1", "layer1.0.bn2", "layer2"))(X)
        bn1 = model.bn1(model.conv1(X))
        block = model.layer1[0]
        bn2 = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(model.maxpool(bn1.relu()))))))
    assert bn1.min() < 0  # before the ReLU that runs in place on it
    torch.testing.assert_close(taps["bn1"][0], bn1)
    torch.testing.assert_close(taps["layer1.0.bn2"][0], bn2)  # before `x += shortcut`


def test_probe_shapes_and_preprocessing_override():
    spec = BackboneSpec(
        "resnet18", "random", ("layer2", "layer4"), preprocessing={"input_size": 160}
    )
    backbone = load_backbone(spec)
    shapes = probe_shapes(backbone)
    assert shapes["layer2"] == {"grid": (128, 20, 20), "prefix": None, "stride": 8}
    assert shapes["layer4"]["grid"] == (512, 5, 5)
    assert backbone.preprocessing_attrs()["input_size"] == [3, 160, 160]


def test_unknown_layer_and_bad_output():
    with pytest.raises(ValueError, match="has no layer 'layer9'"):
        load_backbone(BackboneSpec("resnet18", "random", ("layer9",)))
    with pytest.raises(ValueError, match="cannot store a layer output of shape"):
        to_grid(_model("resnet18"), torch.zeros(2, 10), (224, 224))


def test_auto_device_is_cpu_without_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    gpus = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device: cuda:{gpus}, but this machine has {gpus} CUDA"):
        pick_device(f"cuda:{gpus}")  # one past the last (cuda:0 on a machine without a GPU)
