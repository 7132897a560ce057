"""The end-of-run summary: what was written, what was skipped and why, sizes, and a proof that the
stored features are real (a pretrained classifier's head applied to its own stored feature maps)."""

from __future__ import annotations

import numpy as np
import torch
from timm.data import ImageNetInfo

from pipeline.backbones import LayerTaps
from pipeline.weights import create_backbone
from storage_specs.reader import FeatureStore, open_store


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def format_summary(store: FeatureStore) -> list[str]:
    info = store.describe()
    if info["complete"]:
        state = "complete"
    elif info["pending_groups"]:
        state = f"pending groups: {', '.join(info['pending_groups'])}"
    else:
        state = "NOT finalized"
    lines = [f"store {info['url']} ({info['spec']}, {state})"]
    if info["skipped"] is not None:
        lines.append(
            f"samples: {info['n_samples']} listed, {info['n_valid']} written, "
            f"{len(info['skipped'])} skipped"
        )
        lines += [f"  skipped {s['key']}: {s['reason']}" for s in info["skipped"]]
    stored = raw = 0
    lines.append(f"arrays: {len(info['arrays'])}")
    width = max(map(len, info["arrays"]), default=0)
    for path, a in info["arrays"].items():
        weights = {True: "pretrained", False: "random weights", None: "target"}[a["pretrained"]]
        head = f"  {path:{width}s} {a['shape']!s:22s} {a['dtype']}"
        if a["group"] in (info["pending_groups"] or ()):  # not in the totals either
            lines.append(f"{head}  pending (group {a['group']})  ({weights})")
            continue
        ratio = a["stored_bytes"] / a["raw_fp32_bytes"] if a["raw_fp32_bytes"] else 0.0
        lines.append(f"{head}  {_mb(a['stored_bytes'])} = {ratio:.2f}x raw fp32  ({weights})")
        stored, raw = stored + a["stored_bytes"], raw + a["raw_fp32_bytes"]
    if raw:
        lines.append(f"bytes on disk {_mb(stored)} vs raw fp32 {_mb(raw)}: {stored / raw:.2f}x")
    return lines


def feeds_head(model: torch.nn.Module, layer: str, input_size: list[int]) -> bool:
    """Whether the layer's output is exactly what the classifier head consumes."""
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        final = model.forward_features(x)
        grid, _ = LayerTaps(model, (layer,))(x)[layer]
    return grid.shape == final.shape and torch.equal(grid, final)


def example_rows(samples: dict[str, np.ndarray], max_rows: int = 8) -> np.ndarray:
    """The first valid sample of each class (or the first valid samples when unlabeled)."""
    valid = np.flatnonzero(samples["valid"])
    _, first = np.unique(samples["label"][valid], return_index=True)
    return valid[np.sort(first)][:max_rows] if len(first) > 1 else valid[:max_rows]


def top1_lines(store: FeatureStore) -> list[str]:
    """Top-1 ImageNet classes from the stored features of each pretrained 1000-class backbone."""
    samples = store.samples()
    rows = example_rows(samples)
    lines = []
    models: dict[tuple[str, str], torch.nn.Module] = {}  # one load per backbone, not per layer
    for path in store.arrays():
        attrs = store.root[path].attrs
        if not path.startswith("features/") or not attrs["pretrained"] or not len(rows):
            continue
        key = (attrs["backbone"], attrs["weights"]["source"])
        if key not in models:
            models[key] = create_backbone(*key)[0]
        model = models[key]
        if getattr(model, "num_classes", 0) != 1000:
            continue
        if not feeds_head(model, attrs["layer"], attrs["preprocessing"]["input_size"]):
            continue
        features = torch.from_numpy(store.read_rows(path, rows)[:, 0].astype(np.float32))
        with torch.inference_mode():
            top1 = model.forward_head(features).argmax(dim=1).tolist()
        names = ImageNetInfo()
        lines.append(f"top-1 ImageNet class from stored {path} (view 0):")
        lines += [
            f"  {samples['key'][row]:32s} -> {cls} {names.index_to_description(cls)}"
            for row, cls in zip(rows, top1, strict=True)
        ]
    return lines


def print_summary(url: str, classify: bool = True) -> None:
    store = open_store(url)
    lines = format_summary(store)
    if classify and "summary" in store.root.attrs:
        lines += top1_lines(store)
    print("\n".join(lines))
