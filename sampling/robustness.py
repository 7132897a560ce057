"""`featinv variants` / `featinv robustness`: what the features keep of corrupted and adversarial
inputs, shown by the trained decoder.

`variants_run` writes the variants of held-out images (pipeline/variants.py) as an image
collection under `<sampling output>/robustness/variants/`.  `robustness_run` stores their features
with the extraction stage itself (a derived config: that folder as source, the model's recorded
backbone and layer, one view that is the whole image) into `robustness/variants.zarr`, has the
model reconstruct every variant's map (one seed per key, so only the map changes along a row), and
measures, per variant: the cosine of the reconstruction's re-extracted map to the variant's own map
and to the clean image's, the classifier's top-1 on clean, variant and reconstruction, and PSNR /
SSIM of variant and reconstruction to the clean image.  Into `robustness/robustness.json`, with
grids clean | variant | reconstruction per family (a corruption, an attack and goal) and level
(severity, eps); level 0 of every family is the clean image's entry itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.config import ConfigError, validate_config
from pipeline.run import run_all
from pipeline.variants import ATTACKS, CLEAN, write_variants
from sampling import metrics
from sampling.analyses import Analysis, _save_grid, open_analysis
from sampling.reextract import classify, inputs, reextract
from sampling.sample import output_folder, resized
from storage_specs.reader import FeatureStore

METRICS = {
    "cosine_to_variant": "cosine of the reconstruction's re-extracted map to the variant's map",
    "cosine_to_clean": "cosine of the reconstruction's re-extracted map to the clean image's map",
    "top1_variant": "the variant's top-1 is the clean image's",
    "top1_reconstruction": "the reconstruction's top-1 is the clean image's",
    "top1_reconstruction_variant": "the reconstruction's top-1 is the variant's",
    "psnr_variant": "PSNR of the variant to the clean image (dB)",
    "psnr": "PSNR of the reconstruction to the clean image at its size (dB)",
    "ssim": "SSIM of the reconstruction to the clean image at its size",
}
QUESTION = (
    "Does the decoder still draw the clean image from the features of a corrupted or attacked "
    "one, and does the classifier still see the same class in it?"
)
CELL = 96  # grid cells: the 224 px variants and the small reconstructions at one size


def robustness_folder(config: dict) -> Path:
    return output_folder(config) / "robustness"


def _analysis(config: dict, device: str | None) -> Analysis:
    """The model and store of `config` with the `robustness:` settings (view 0)."""
    analysis = open_analysis(config, device)
    return replace(analysis, spec={**config["robustness"], "view": 0})


def _keys(analysis: Analysis) -> list[str]:
    spec = analysis.spec
    if spec["keys"]:
        for key in spec["keys"]:
            if key not in analysis.rows:
                raise ConfigError(f"config robustness.keys: '{key}' is no valid key of the store")
        return list(spec["keys"])
    held = set(analysis.data.heldout_rows.tolist())
    keys = [key for key, row in analysis.rows.items() if row in held][: spec["limit"]]
    if not keys:
        raise ConfigError("config robustness.keys: not set, and the model holds out no samples")
    return keys


def variants_run(config: dict, device: str | None = None) -> Path:
    """Write the variants collection and its manifest.json; the folder."""
    analysis = _analysis(config, device)
    keys = _keys(analysis)
    root = FeatureStore(analysis.data.url)
    sources = [str(root.samples()["source"][analysis.rows[key]]) for key in keys]
    crop_pct = root.root.attrs["views"]["eval_crop_pct"]
    folder = robustness_folder(config) / "variants"
    write_variants(folder, analysis.backbone(), keys, sources, config["robustness"], crop_pct)
    return folder


def variants_config(config: dict, features: dict) -> dict:
    """The extraction config of the variants collection: the recorded backbone and layer, one
    view that is the whole image (the variants are already the backbone's input)."""
    out = robustness_folder(config)
    return validate_config({
        "source": str(out / "variants"),
        "store": str(out / "variants.zarr"),
        "work_dir": str(out / "work"),
        "shard_size": 64, "batch_size": config["batch_size"], "num_workers": 0,
        "threads": config["threads"], "seed": features["weights"].get("seed") or 0,
        "views": {"count": 1, "eval_crop_pct": 1.0, "eval_crop_mode": "center"},
        "backbones": [{
            "name": features["backbone"], "weights": features["weights"]["source"],
            "layers": [features["layer"]],
            "preprocessing": {k: features["preprocessing"][k]
                              for k in ("input_size", "interpolation", "mean", "std")},
        }],
    })  # fmt: skip


def robustness_run(config: dict, device: str | None = None, progress: bool = True) -> Path:
    """Extract, reconstruct and evaluate the variants written by `variants_run`; the folder."""
    analysis = _analysis(config, device)
    out = robustness_folder(config)
    manifest_path = out / "variants" / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"no variants at {manifest_path.parent}: run `featinv variants` first")
    manifest = json.loads(manifest_path.read_text())
    features = analysis.model.record["store"]["features"]
    store = FeatureStore(run_all(variants_config(config, features)))
    keys, names = manifest["keys"], list(manifest["variants"])
    rows = {str(k): r for r, k in enumerate(store.samples()["key"])}
    backbone = analysis.backbone()
    path = f"features/{features['backbone']}/{features['layer']}"

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The variant's maps `[K, C, y, x]` and its images `[K, 3, H, W]`."""
        images = np.stack([
            np.asarray(Image.open(out / "variants" / name / f"{key}.png")) for key in keys
        ])  # fmt: skip
        maps = store.read_rows(path, [rows[f"{name}/{key}"] for key in keys])[:, 0]
        return torch.from_numpy(maps).float(), torch.from_numpy(images).permute(0, 3, 1, 2)

    clean_maps, clean_images = read(CLEAN)
    clean_logits = classify(backbone, inputs(backbone, clean_images))
    per_variant, shown = {}, {}
    for name in tqdm(names, desc="robustness", disable=not progress):
        maps, images = read(name)
        made = analysis.sample(maps, keys)
        shown[name] = (images, made)
        per_variant[name] = _scores(backbone, maps, images, made, clean_maps, clean_images,
                                    clean_logits)  # fmt: skip
    stored = torch.from_numpy(_stored(analysis, keys))
    result = {
        "title": "Robustness: corrupted and adversarial inputs",
        "question": QUESTION,
        "metrics": METRICS,
        "model": str(analysis.model.folder),
        "features": path,
        "keys": keys,
        "sampling": {k: analysis.spec[k] for k in ("scheduler", "steps", "guidance", "seed")},
        "variants_store": str(store.url),
        "provenance": {k: manifest[k] for k in ("seed", "settings", "libraries", "variants")},
        "clean_vs_store_cosine": _rounded(metrics.flat_cosine(clean_maps, stored)),
        "per_variant": per_variant,
        "mean": {name: {m: _mean(s[m]) for m in METRICS} for name, s in per_variant.items()},
        "families": _families(manifest["variants"], per_variant),
    }
    result["grids"] = _grids(out, result["families"], keys, clean_images, shown)
    (out / "robustness.json").write_text(json.dumps(result, indent=1))
    return out


def _stored(analysis: Analysis, keys: list[str]) -> np.ndarray:
    """The source store's view-0 maps of the keys: what the clean variant's maps reproduce."""
    store = FeatureStore(analysis.data.url)
    rows = [analysis.rows[key] for key in keys]
    return store.read_rows(analysis.data.arrays["features"], rows)[:, 0].astype(np.float32)


def _scores(backbone, maps, images, made, clean_maps, clean_images, clean_logits) -> dict:
    """Per key, every metric of `METRICS` for one variant."""
    remade = reextract(backbone, made)
    variant_logits = classify(backbone, inputs(backbone, images))
    made_logits = classify(backbone, inputs(backbone, made))
    small_clean = resized(clean_images, made.shape[-2:])
    scores = {
        "cosine_to_variant": metrics.flat_cosine(remade, maps),
        "cosine_to_clean": metrics.flat_cosine(remade, clean_maps),
        "top1_variant": metrics.topk_agreement(clean_logits, variant_logits, 1),
        "top1_reconstruction": metrics.topk_agreement(clean_logits, made_logits, 1),
        "top1_reconstruction_variant": metrics.topk_agreement(variant_logits, made_logits, 1),
        "psnr_variant": metrics.psnr(images, clean_images),
        "psnr": metrics.psnr(made, small_clean),
        "ssim": metrics.ssim(made, small_clean),
    }
    out = {k: _rounded(v) for k, v in scores.items()}
    out["class_variant"] = variant_logits.argmax(1).tolist()
    out["class_reconstruction"] = made_logits.argmax(1).tolist()
    out["class_clean"] = clean_logits.argmax(1).tolist()
    return out


def _rounded(values: torch.Tensor) -> list[float]:
    return values.double().round(decimals=5).tolist()


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 5)


def _families(variants: dict, per_variant: dict) -> dict:
    """Each corruption, and each attack with its goal, as levels (severity or eps, 0 first: the
    clean entry) with the mean of every metric per level."""
    families: dict[str, dict] = {}
    for name, v in variants.items():
        if v["kind"] == CLEAN:
            continue
        if v["kind"] in ATTACKS:
            family = f"{v['kind']} {'targeted' if v['targeted'] else 'untargeted'}"
            level, axis = v["eps"], "eps"
        else:
            family, level, axis = v["kind"], v["severity"], "severity"
        entry = families.setdefault(family, {"axis": axis, "levels": [0], "variants": [CLEAN]})
        entry["levels"].append(level)
        entry["variants"].append(name)
    for entry in families.values():
        entry["mean"] = {
            m: [_mean(per_variant[name][m]) for name in entry["variants"]] for m in METRICS
        }
    return families


def _grids(out: Path, families: dict, keys, clean_images, shown: dict) -> list[dict]:
    """One PNG per family: rows are keys; columns the clean image and its reconstruction, then
    per level the variant and its reconstruction."""
    grids = []
    for family, entry in families.items():
        columns = []
        for name in entry["variants"]:
            images, made = shown[name]
            columns += [resized(images, (CELL, CELL)), resized(made, (CELL, CELL))]
        png = _save_grid(out / f"{family.replace(' ', '_')}.png", torch.stack(columns, 1))
        levels = ", ".join(f"{entry['axis']} {level:g}" for level in entry["levels"])
        caption = (
            f"Rows: {', '.join(keys)}. Column pairs: the variant, then the model's "
            f"reconstruction from its features, at {levels} ({entry['axis']} 0 = the clean "
            "image; one seed per row)."
        )
        question = (
            f"What does the decoder draw from the features of {family} inputs as the "
            f"{entry['axis']} grows?"
        )
        grids.append({"family": family, "png": png, "caption": caption, "question": question})
    return grids
