"""`featinv variants` / `featinv robustness`: what the features keep of corrupted, adversarial
and unfamiliar inputs, shown by the trained decoder (and the guided decoder when `guided.enabled`).

`variants_run` writes the variants of held-out images (pipeline/variants.py) and the first images
of any second collection (`robustness.ood`) as an image collection under
`<sampling output>/robustness/variants/`.  `robustness_run` stores their features with the
extraction stage itself (a derived config: that folder as source, the model's recorded backbone
and layer, one view that is the whole image) into `robustness/variants.zarr`, has each method
reconstruct every map (one seed per key, so only the map changes along a row), and measures, per
variant and method: the cosine of the reconstruction's re-extracted map to the variant's own map
and to the clean image's, the classifier's top-1 on clean, variant and reconstruction, and PSNR /
SSIM of variant and reconstruction to the clean image.  A second collection's image is its own
clean image.  Into `robustness/robustness.json`, with grids variant | reconstructions per family
(a corruption, an attack and goal) and level (severity, eps; level 0 of every family is the clean
image's entry itself) and per second collection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.config import validate_config
from pipeline.decode import ImageLimits
from pipeline.run import run_all
from pipeline.variants import ATTACKS, CLEAN, OOD, write_variants
from sampling import metrics
from sampling.analyses import Analysis, _save_grid, open_analysis
from sampling.guided_run import guided_images
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
OOD_QUESTION = (
    "Are the features of images unlike the classifier's training data (a second collection) "
    "still enough to draw them, as those of held-out images are?"
)
METHOD_NAMES = {"model": "trained decoder", "guided": "guided decoder"}
Reconstruct = Callable[[torch.Tensor, list[str]], torch.Tensor]  # maps, keys -> uint8 images
CELL = 96  # grid cells: the 224 px variants and the small reconstructions at one size


def robustness_folder(config: dict) -> Path:
    return output_folder(config) / "robustness"


def analysis_of(config: dict, device: str | None) -> Analysis:
    """The model and store of `config` with the `robustness:` settings (view 0)."""
    analysis = open_analysis(config, device)
    return replace(analysis, spec={**config["robustness"], "view": 0}, section="robustness")


def variants_run(config: dict, device: str | None = None) -> Path:
    """Write the variants collection and its manifest.json; the folder."""
    analysis = analysis_of(config, device)
    keys = analysis.keys()
    root = FeatureStore(analysis.data.url)
    sources = [str(root.samples()["source"][analysis.rows[key]]) for key in keys]
    crop_pct = root.root.attrs["views"]["eval_crop_pct"]
    folder = robustness_folder(config) / "variants"
    limits = ImageLimits.of_store(root.root.attrs)  # the images as extraction read them
    write_variants(
        folder, analysis.backbone(), keys, sources, config["robustness"], crop_pct, limits
    )
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


def reconstructors(config: dict, analysis: Analysis) -> dict[str, Reconstruct]:
    """The trained decoder, and the training-free guided decoder when `guided.enabled` (with the
    `guided:` settings), by method name."""
    out = {"model": analysis.sample}
    if config["guided"]["enabled"]:
        out["guided"] = guided_images(config, str(analysis.model.device))
    return out


def robustness_run(config: dict, device: str | None = None, progress: bool = True) -> Path:
    """Extract, reconstruct and evaluate the variants written by `variants_run`; the folder."""
    analysis = analysis_of(config, device)
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
    methods = reconstructors(config, analysis)

    def read(name: str, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The variant's maps `[K, C, y, x]` and its images `[K, 3, H, W]`."""
        images = np.stack([
            np.asarray(Image.open(out / "variants" / name / f"{key}.png")) for key in keys
        ])  # fmt: skip
        maps = store.read_rows(path, [rows[f"{name}/{key}"] for key in keys])[:, 0]
        return torch.from_numpy(maps).float(), torch.from_numpy(images).permute(0, 3, 1, 2)

    def reconstructed(name: str, keys: list[str], clean: tuple | None) -> tuple[dict, dict]:
        """Per method, the scores of the variant's reconstructions (against `clean`: maps,
        images, logits; None: the inputs are their own clean images) and what is shown."""
        maps, images = read(name, keys)
        clean = clean or (maps, images, classify(backbone, inputs(backbone, images)))
        made = {method: make(maps, keys) for method, make in methods.items()}
        scores = {m: _scores(backbone, maps, images, x, *clean) for m, x in made.items()}
        return scores, {"images": images, **made}

    clean_maps, clean_images = read(CLEAN, keys)
    clean = (clean_maps, clean_images, classify(backbone, inputs(backbone, clean_images)))
    per_variant, shown = {}, {}
    for name in tqdm(names, desc="robustness", disable=not progress):
        per_variant[name], shown[name] = reconstructed(name, keys, clean)
    ood = {}
    for name, entry in tqdm(manifest["ood"].items(), desc="robustness ood", disable=not progress):
        scores, shown[OOD + name] = reconstructed(OOD + name, entry["keys"], None)
        ood[name] = {**entry, "per_key": scores}
    stored = torch.from_numpy(_stored(analysis, keys))
    result = {
        "title": "Robustness: corrupted, adversarial and unfamiliar inputs",
        "question": QUESTION,
        "metrics": METRICS,
        "methods": list(methods),
        "model": str(analysis.model.folder),
        "features": path,
        "keys": keys,
        "sampling": {k: analysis.spec[k] for k in ("scheduler", "steps", "guidance", "seed")},
        "guided": config["guided"] if "guided" in methods else None,
        "variants_store": str(store.url),
        "provenance": {k: manifest[k] for k in ("seed", "settings", "libraries", "variants")},
        "clean_vs_store_cosine": _rounded(metrics.flat_cosine(clean_maps, stored)),
        "per_variant": per_variant,
        "mean": {name: _means(scores) for name, scores in per_variant.items()},
        "families": _families(manifest["variants"], per_variant),
        "ood": _ood(ood, per_variant[CLEAN]) if ood else None,
    }
    result["grids"] = _grids(out, result["families"], keys, shown, list(methods))
    if ood:
        result["ood"]["grids"] = _ood_grids(out, ood, shown, list(methods))
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


def _means(scores: dict) -> dict:
    """Per method, the mean of every metric over the keys."""
    return {method: {m: _mean(values[m]) for m in METRICS} for method, values in scores.items()}


def _families(variants: dict, per_variant: dict) -> dict:
    """Each corruption, and each attack with its goal, as levels (severity or eps, 0 first: the
    clean entry) with, per method, the mean of every metric per level."""
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
            method: {m: [_mean(per_variant[name][method][m]) for name in entry["variants"]]
                     for m in METRICS}
            for method in per_variant[CLEAN]
        }  # fmt: skip
    return families


def _ood(collections: dict, clean: dict) -> dict:
    """The second collections beside the held-out images: per method, the mean of every metric
    (each image is its own clean image, so the metrics against it are of the image itself)."""
    rows = {"held-out": {"mean": _means(clean)}}
    for name, entry in collections.items():
        rows[name] = {**entry, "mean": _means(entry["per_key"])}
    return {"question": OOD_QUESTION, "rows": rows}


def _grids(out: Path, families: dict, keys, shown: dict, methods: list[str]) -> list[dict]:
    """One PNG per family: rows are keys; per level (0: the clean image) the variant and each
    method's reconstruction."""
    grids = []
    made = _reconstructions(methods)
    for family, entry in families.items():
        cells = _columns([shown[name] for name in entry["variants"]], methods)
        png = _save_grid(out / f"{family.replace(' ', '_')}.png", cells)
        levels = ", ".join(f"{entry['axis']} {level:g}" for level in entry["levels"])
        caption = (
            f"Rows: {', '.join(keys)}. Per level: the variant, then {made} from its features, "
            f"at {levels} ({entry['axis']} 0 = the clean image; one seed per row)."
        )
        question = (
            f"What does the decoder draw from the features of {family} inputs as the "
            f"{entry['axis']} grows?"
        )
        grids.append({"family": family, "png": png, "caption": caption, "question": question})
    return grids


def _ood_grids(out: Path, collections: dict, shown: dict, methods: list[str]) -> list[dict]:
    """One PNG per second collection: rows are its images, then each method's reconstruction."""
    grids = []
    made = _reconstructions(methods)
    for name, entry in collections.items():
        png = _save_grid(out / f"ood_{name}.png", _columns([shown[OOD + name]], methods))
        caption = f"Rows: {', '.join(entry['keys'])} ({entry['source']}); the image, then {made}."
        grids.append({"collection": name, "png": png, "caption": caption})
    return grids


def _reconstructions(methods: list[str]) -> str:
    """What a grid shows after the inputs, for its caption."""
    return " and ".join(f"the {METHOD_NAMES[m]}'s reconstruction" for m in methods)


def _columns(levels: list[dict], methods: list[str]) -> torch.Tensor:
    """`[rows, columns, 3, CELL, CELL]`: per level the inputs, then each method's images."""
    columns = [
        resized(level[what], (CELL, CELL)) for level in levels for what in ("images", *methods)
    ]
    return torch.stack(columns, 1)
