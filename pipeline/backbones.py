"""A configured backbone: the timm model, its preprocessing and the taps on its named layers.

Layers are timm module paths (`blocks.5`, `layer3`, `stages.2`).  All layers of one backbone come
from a single forward pass that stops as soon as the deepest requested layer has run.  Whatever a
layer emits is normalised to the store's layout: a channels-first map `[C, y, x]`, plus the prefix
(class/register) tokens of ViT-style models, which have no place on the grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.layers import to_2tuple
from torchvision.transforms.functional import normalize

from pipeline.views import render_views
from pipeline.weights import WeightsInfo, create_backbone
from storage_specs.layout import ArraySpec

# The crop is not per backbone: it is the view (see pipeline.views and the store's `views`).
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std")


@dataclass(frozen=True)
class BackboneSpec:
    """One `backbones:` entry of the config."""

    name: str
    weights: str
    layers: tuple[str, ...]
    group: str = "main"
    preprocessing: dict = field(default_factory=dict)
    compression: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, entry: dict) -> BackboneSpec:
        return cls(
            name=entry["name"],
            weights=entry["weights"],
            layers=tuple(entry["layers"]),
            group=entry.get("group", "main"),
            preprocessing=dict(entry.get("preprocessing") or {}),
            compression=dict(entry.get("compression") or {}),
        )


@dataclass(frozen=True)
class BackboneInputs:
    """A backbone's step in the decode workers: its inputs of an image's views."""

    input_hw: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, data_config: dict) -> BackboneInputs:
        return cls(tuple(data_config["input_size"][1:]), data_config["interpolation"],
                   tuple(data_config["mean"]), tuple(data_config["std"]))  # fmt: skip

    def __call__(self, image: Image.Image | torch.Tensor, views: np.ndarray) -> torch.Tensor:
        """`[K, 3, H, W]` normalised inputs (of a PIL image, or of a decoded uint8 tensor on its
        device); view 0 equals timm's eval transform exactly."""
        pixels = render_views(image, views, self.input_hw, self.interpolation)
        return normalize(pixels.float() / 255, self.mean, self.std)  # as to_tensor does


def data_config_of(spec: BackboneSpec) -> dict:
    """The backbone's resolved data config without building its weights: timm derives it from the
    architecture (a meta-device model), never from the weights."""
    with torch.device("meta"):
        model = timm.create_model(spec.name, pretrained=False)
    return resolve_preprocessing(model, spec.preprocessing)


@dataclass
class Backbone:
    """A backbone as an encoder of views: prepare (in decode workers), encode (in the job)."""

    spec: BackboneSpec
    model: torch.nn.Module
    weights: WeightsInfo
    data_config: dict
    channels_last: dict[str, bool] = field(default_factory=dict)  # `map_layouts`

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])

    def preprocessing_attrs(self) -> dict:
        """The resolved timm data config, JSON-able, as recorded in the store."""
        return {k: _jsonable(self.data_config[k]) for k in PREPROCESSING_KEYS}

    @property
    def prepare(self) -> BackboneInputs:
        return BackboneInputs.of(self.data_config)

    def taps(self, layers: tuple[str, ...] | None = None) -> LayerTaps:
        """Taps on `layers` (default: the configured ones) that lay out maps as this backbone's
        layers emit them."""
        return LayerTaps(self.model, layers or self.spec.layers, self.channels_last)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        outputs = {}
        for layer, (grid, prefix) in self.taps()(x.to(device)).items():
            outputs[f"features/{self.name}/{layer}"] = grid
            if prefix is not None:
                outputs[f"prefix_tokens/{self.name}/{layer}"] = prefix
        return outputs

    def array_specs(self, dtype: str) -> list[ArraySpec]:
        specs = []
        for layer, shape in probe_shapes(self).items():
            attrs = {
                "backbone": self.name,
                "layer": layer,
                "group": self.group,
                "weights": self.weights.to_attrs(),
                "pretrained": self.weights.pretrained,
                "preprocessing": self.preprocessing_attrs(),
                "stride": shape["stride"],
            }
            specs.append(ArraySpec("features", self.name, layer, shape["grid"], dtype, attrs,
                                   self.spec.compression))  # fmt: skip
            if shape["prefix"]:
                specs.append(
                    ArraySpec("prefix_tokens", self.name, layer, shape["prefix"], dtype, attrs)
                )
        return specs


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve_preprocessing(model: torch.nn.Module, overrides: dict) -> dict:
    """timm's `pretrained_cfg` of the model, with the config's overrides applied."""
    args = dict(overrides)
    if isinstance(args.get("input_size"), int):
        args["input_size"] = (3, args["input_size"], args["input_size"])
    return resolve_data_config(args, model=model)


def _fixed_patch_grid(model: torch.nn.Module, input_hw: tuple[int, int]) -> bool:
    """ViT-style models built for one image size reject others unless rebuilt with `img_size`."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    dynamic = getattr(patch_embed, "dynamic_img_size", False)
    return img_size is not None and tuple(img_size) != tuple(input_hw) and not dynamic


def load_backbone(spec: BackboneSpec, seed: int = 0, device: str = "cpu") -> Backbone:
    model, weights, data_config = _built(spec, spec.weights, seed)
    layouts = map_layouts(spec, tuple(data_config["input_size"][1:]))
    return Backbone(spec, model.to(device).eval(), weights, data_config, layouts)


def check_layouts(spec: BackboneSpec) -> None:
    """ValueError unless every layer exists and emits what the store holds (a map, or tokens on
    the patch grid): a forward pass on the meta device, shapes without weights or data, so that
    the config check refuses a layer in one line instead of the plan job in a traceback."""
    with torch.device("meta"):
        model, _, data_config = _built(spec, "random", 0)
        x = torch.zeros(1, *data_config["input_size"])
        layouts = map_layouts(spec, tuple(x.shape[-2:]))
        try:
            LayerTaps(model.eval(), spec.layers, layouts)(x)
            check_called_once(model, spec.layers, x)
        except ValueError:
            raise
        except Exception:  # an op meta tensors cannot run (data-dependent): the plan's real
            return  # forward on a blank image checks these layers, with the same errors


def map_layouts(spec: BackboneSpec, input_hw: tuple[int, int]) -> dict[str, bool]:
    """`_layouts` of the spec's model and layers (a job's config check and its backbone load ask
    for the same: computed once per process)."""
    return dict(_layouts(spec.name, spec.layers, tuple(input_hw)))


@functools.cache
def _layouts(name: str, layers: tuple[str, ...], input_hw: tuple[int, int]) -> tuple:
    """Whether each layer's 4-D output is channels-last (`[y, x, C]`), from which of its axes grow
    with the input: shapes on the meta device at `input_hw` and at twice it.  The shape alone
    cannot tell `[64, 56, 56]` from `[56, 56, 64]` (a channel count near the map's size), and a
    model's `output_fmt` is not every module's.  ValueError for an output whose growing axes are
    not two of them (heads x tokens x dims, unfolded patches).  Layers this cannot place (a model
    that rejects the larger input, an op the meta device cannot run) are left out: `to_grid`
    tells those by their shape."""
    shapes = []
    try:
        with torch.device("meta"):
            model, _ = create_backbone(name, "random")
            for hw in (input_hw, (2 * input_hw[0], 2 * input_hw[1])):
                if _fixed_patch_grid(model, hw):  # ViT-style: built for each size
                    model, _ = create_backbone(name, "random", img_size=hw)
                outputs = LayerTaps(model.eval(), layers).raw(torch.zeros(1, 3, *hw))
                shapes.append({layer: tuple(out.shape) for layer, out in outputs.items()})
    except Exception:  # refusals come from the real forward, with their own messages
        return ()
    layouts = {}
    for layer, small in shapes[0].items():
        if len(small) != 4 or len(shapes[1][layer]) != 4:
            continue
        grown = tuple(axis for axis in (1, 2, 3) if small[axis] != shapes[1][layer][axis])
        if grown not in ((), (1, 2), (2, 3)):
            raise ValueError(
                f"layer '{layer}' emits {small[1:]} per image, where axes "
                f"{tuple(axis - 1 for axis in grown)} follow the image size: not a [C, y, x] or "
                "[y, x, C] map; name a module that emits one"
            )
        layouts[layer] = grown == (1, 2)  # () : a pooled map, the size of no input
    return tuple(layouts.items())


def _built(
    spec: BackboneSpec, weights: str, seed: int
) -> tuple[torch.nn.Module, WeightsInfo, dict]:
    """The model with ``weights``, its layers checked, and its resolved data config; ViT-style
    models built for another image size are rebuilt for the configured one."""
    model, info = create_backbone(spec.name, weights, seed=seed)
    for layer in spec.layers:
        check_layer(model, spec.name, layer)
    data_config = resolve_preprocessing(model, spec.preprocessing)
    input_hw = tuple(data_config["input_size"][1:])
    if _fixed_patch_grid(model, input_hw):
        model, info = create_backbone(spec.name, weights, seed=seed, img_size=input_hw)
    return model, info, data_config


def check_layer(model: torch.nn.Module, name: str, layer: str) -> None:
    """Fail with the layer names a user would pick from, not a bare AttributeError or a layer
    that never runs."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"backbone {name} has no layer '{layer}' (top-level modules: {', '.join(top)})"
        ) from None
    if type(module).forward is torch.nn.Module.forward:  # a container (ModuleList): never runs
        inner = ", ".join(f"{layer}.{child}" for child, _ in module.named_children())
        raise ValueError(
            f"backbone {name} layer '{layer}' is a {type(module).__name__}, which the forward "
            f"pass never calls: name one of its modules ({inner})"
        )


def check_called_once(model: torch.nn.Module, layers: tuple[str, ...], x: torch.Tensor) -> None:
    """ValueError for a layer the whole forward pass runs more than once: a module shared within
    its block (legacy SE-ResNets' `relu`, run after each conv and after the sum) has no one output
    to store, and the taps, which stop at the deepest layer, would keep whichever came last."""
    calls = dict.fromkeys(layers, 0)

    def count(layer: str):
        def hook(*_):
            calls[layer] += 1

        return hook

    handles = [model.get_submodule(layer).register_forward_hook(count(layer)) for layer in layers]
    try:
        model(x)
    except Exception:  # past the layers (a head that does not fit the input size) it is moot
        if not all(calls.values()):
            raise
    finally:
        for handle in handles:
            handle.remove()
    for layer, n in calls.items():
        if n > 1:
            raise ValueError(
                f"layer '{layer}' runs {n} times in one forward pass (a shared module): name a "
                "module that runs once"
            )


class _StopForward(Exception):
    """Raised by the last tap so the rest of the network is never run."""


class LayerTaps:
    """Capture the outputs of named modules in one forward pass; `channels_last` says, per layer,
    how a 4-D output is laid out (`map_layouts`; a layer it does not name is told by its shape)."""

    def __init__(
        self, model: torch.nn.Module, layers: tuple[str, ...],
        channels_last: dict[str, bool] | None = None,
    ):  # fmt: skip
        self.model, self.layers, self.channels_last = model, layers, channels_last or {}

    def __call__(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        hw = tuple(x.shape[-2:])
        return {layer: self._grid(layer, out, hw) for layer, out in self.raw(x).items()}

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layers' outputs as the modules emit them, one item per image of `x`."""
        captured: dict[str, Any] = {}

        def hook(name: str):
            def fn(_module, _inputs, output):
                out = _one_tensor(name, output)
                if {*captured, name} == set(self.layers):  # the last: the forward stops here
                    captured[name] = out
                    raise _StopForward
                # a copy: the rest of the forward may rewrite the tensor in place (ResNet's
                # ReLU(inplace=True) after bn1, `x += shortcut` after a block's bn2)
                captured[name] = out.clone()

            return fn

        handles = [
            self.model.get_submodule(layer).register_forward_hook(hook(layer))
            for layer in self.layers
        ]
        try:
            self.model(x)
        except _StopForward:
            pass
        except AssertionError as exc:  # timm's own checks of the input (window sizes, ...)
            hw = "x".join(map(str, x.shape[-2:]))
            raise ValueError(f"the forward pass fails on {hw} inputs: {exc}") from None
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass")
        for layer, out in captured.items():
            if out.ndim == 0 or out.shape[0] != x.shape[0]:  # windows or heads in the batch axis
                raise ValueError(
                    f"layer '{layer}' emits {tuple(out.shape)} for {x.shape[0]} image(s), not "
                    "one map per image: name a module that emits one"
                )
        return {layer: captured[layer] for layer in self.layers}

    def _grid(self, layer: str, out: torch.Tensor, input_hw: tuple[int, int]) -> tuple:
        try:
            return to_grid(self.model, out, input_hw, self.channels_last.get(layer))
        except ValueError as exc:
            raise ValueError(f"layer '{layer}': {exc}") from None


def _one_tensor(layer: str, output: Any) -> torch.Tensor:
    """A module's output, or the one tensor of a tuple or list with others than tensors (None);
    several tensors (HRNet's branches, CrossViT's two scales) are not one map to store."""
    parts = output if isinstance(output, tuple | list) else [output]
    tensors = [part for part in parts if isinstance(part, torch.Tensor)]
    if len(tensors) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(
            f"layer '{layer}' emits {len(tensors)} tensors ({shapes}) in a "
            f"{type(output).__name__}: name a module that emits one"
        )
    return tensors[0]


def to_grid(
    model: torch.nn.Module, out: torch.Tensor, input_hw: tuple[int, int],
    channels_last: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A layer output as `[N, C, y, x]`, plus `[N, prefix, C]` prefix tokens for token outputs;
    a 4-D output is `[N, y, x, C]` when `channels_last` (None: told by its shape)."""
    if out.ndim == 4:
        if channels_last is None:
            channels_last = _channels_last(model, out, input_hw)
        return (out.permute(0, 3, 1, 2) if channels_last else out), None
    if out.ndim == 3:
        return _tokens_to_grid(model, out, input_hw)
    raise ValueError(f"cannot store a layer output of shape {tuple(out.shape)} as a spatial map")


def _aspect_matches(h: int, w: int, input_hw: tuple[int, int]) -> bool:
    return abs(h / w - input_hw[0] / input_hw[1]) <= 0.25 * input_hw[0] / input_hw[1]


def _channels_last(model: torch.nn.Module, out: torch.Tensor, input_hw: tuple[int, int]) -> bool:
    """NHWC (Swin, ConvNeXt block internals) or NCHW, where `map_layouts` could not tell: from
    the shape, else (both fit the input's aspect) the model's format."""
    _, a, b, c = out.shape
    nchw, nhwc = _aspect_matches(b, c, input_hw), _aspect_matches(a, b, input_hw)
    if not nchw and not nhwc:
        raise ValueError(
            f"its output {tuple(out.shape[1:])} per image has no two axes in the input's aspect: "
            "not a [C, y, x] or [y, x, C] map"
        )
    if nchw == nhwc:
        return getattr(model, "output_fmt", "NCHW") == "NHWC"
    return nhwc


def _tokens_to_grid(
    model: torch.nn.Module, tokens: torch.Tensor, input_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, length, channels = tokens.shape
    h, w = _patch_grid(model, input_hw, length)
    declared = getattr(model, "num_prefix_tokens", 0)
    # CaiT and XCiT add their class token after the patch blocks: those blocks have none
    n_prefix = length - h * w
    if n_prefix not in (0, declared):
        raise ValueError(
            f"{length} tokens do not form a {h}x{w} grid plus {declared} prefix tokens"
        )
    grid = tokens[:, n_prefix:].reshape(n, h, w, channels).permute(0, 3, 1, 2)
    return grid, (tokens[:, :n_prefix] if n_prefix else None)


def _patch_grid(model: torch.nn.Module, input_hw: tuple[int, int], length: int) -> tuple[int, int]:
    """The patch grid of an input size, from the model's patch embedding (``patch_embed``, or
    MLP-Mixer's ``stem``): timm's own ``dynamic_feat_size`` where it has one (hybrid ViTs embed
    a CNN's map, padded patches round up), else the input over the patch size."""
    embed = next((m for m in (getattr(model, "patch_embed", None), getattr(model, "stem", None))
                  if hasattr(m, "patch_size")), None)  # fmt: skip
    if embed is None:  # no raster order to rely on (Hiera's tokens, for one, are not)
        raise ValueError(
            f"{type(model).__name__} emits {length} tokens but has no patch_embed.patch_size to "
            "place them on a grid: pick a layer that emits a [C, y, x] map"
        )
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size(input_hw))
    patch = to_2tuple(embed.patch_size)
    return input_hw[0] // patch[0], input_hw[1] // patch[1]


def probe_shapes(backbone: Backbone) -> dict[str, dict]:
    """Per-sample shapes and strides of every requested layer, from one forward on a blank image."""
    device = next(backbone.model.parameters()).device
    x = torch.zeros(1, *backbone.data_config["input_size"], device=device)
    with torch.inference_mode():
        try:
            outputs = backbone.taps()(x)
        except RuntimeError as exc:  # a reshape that does not fit this input size, say
            hw = "x".join(map(str, x.shape[-2:]))
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"backbone {backbone.name}: the forward pass fails on {hw} inputs: "
                             f"{reason}") from None  # fmt: skip
        check_called_once(backbone.model, backbone.spec.layers, x)
    shapes = {}
    for layer, (grid, prefix) in outputs.items():
        shapes[layer] = {
            "grid": tuple(grid.shape[1:]),
            "prefix": tuple(prefix.shape[1:]) if prefix is not None else None,
            "stride": backbone.input_hw[0] // grid.shape[2],
        }
    return shapes
