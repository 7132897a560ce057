"""`featinv evaluate`: how faithful are the reconstructions, by the studied backbone's own measure.

The only place after extraction that runs a backbone, and it is exactly the one the source store
records (weights, layer, preprocessing), run through the extraction stage's own code.  For every
method of a samples store (the model and its baselines, on the same entries):

- feature agreement: the reconstruction's re-extracted map against the stored map of the same
  view: cosine over the flattened map, FeatInv's cosine (per position, median over positions;
  the mean over images is the aggregate), relative L2;
- the classifier's top-1 and top-5 agreement between the original view (rendered from the source
  image) and the reconstruction, when the backbone has a classification head;
- PSNR and SSIM against the stored target of the view; LPIPS and Inception FID when their weights
  are on the machine (otherwise one line in `unavailable` says what is missing);
- the Fréchet distance between stored and re-extracted maps, mean-pooled over positions: always
  computable offline.

A sweep over schedulers and step counts (the model only, one sample per map) adds the cosine it
reaches and the images per second, for the report's plot by sampling steps.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.decode import ImageLimits, SkipSample, decode_image
from pipeline.sources import read_items
from sampling import metrics
from sampling.reconstruct import Reconstructor
from sampling.reextract import classify, inputs, recorded_backbone, reextract
from sampling.sample import image_seed, model_folder, output_folder
from storage_specs.provenance import provenance
from storage_specs.reader import FeatureStore
from storage_specs.samples import SamplesRun

PER_SAMPLE = ("cosine", "position_cosine", "rel_l2", "top1", "top5", "psnr", "ssim", "lpips")
HIGHER_IS_BETTER = {"cosine": True, "position_cosine": True, "rel_l2": False, "top1": True,
                    "top5": True, "psnr": True, "ssim": True, "lpips": False,
                    "frechet_backbone": False, "fid": False}  # fmt: skip


def layer_depth(model: torch.nn.Module, layer: str) -> float:
    """Where a layer sits in the network, 0 (input) to 1 (last module), by module order."""
    names = [name for name, _ in model.named_modules()]
    return round(names.index(layer) / max(len(names) - 1, 1), 4)


def has_classifier(model: torch.nn.Module) -> bool:
    return getattr(model, "num_classes", 0) > 0


def original_inputs(backbone, store: FeatureStore, rows, views) -> tuple[torch.Tensor | None, str]:
    """The backbone's inputs of the original views, rendered from the source images as extraction
    rendered them; None and the reason when a source image cannot be read any more."""
    samples = store.samples()
    uris = [str(samples["source"][r]) for r in rows]
    limits = ImageLimits.of_store(store.root.attrs)
    inputs = []
    for (pos, data), row, view in zip(read_items(uris, limits.max_bytes), rows, views, strict=True):
        if isinstance(data, Exception):
            return None, f"source image '{uris[pos]}' unreadable ({type(data).__name__})"
        try:
            image = decode_image(data, limits)
        except SkipSample as exc:
            return None, f"source image '{uris[pos]}' no longer decodes ({exc})"
        stored = (int(samples["height"][row]), int(samples["width"][row]))
        if (image.height, image.width) != stored:
            now = f"{image.height}x{image.width}, stored {stored[0]}x{stored[1]}"
            return None, f"source image '{uris[pos]}' changed since extraction ({now})"
        box = np.concatenate([samples["view_box"][row, view], [samples["view_hflip"][row, view]]])
        inputs.append(backbone.prepare(image, box[None].astype(np.float32)))
    return torch.cat(inputs), ""


def evaluate_run(config: dict, device: str | None = None, progress: bool = True) -> Path:
    """Evaluate the samples of `config["sampling"]`; writes evaluation.json and per_sample.csv."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = output_folder(config)
    samples = SamplesRun(out)
    if not samples.complete:
        raise ValueError(f"{', '.join(samples.unfinished())} unfinished: run `featinv sample` "
                         "(`featinv guided-decode`) to the end first")  # fmt: skip
    store = FeatureStore(config["store"])
    features = store.require(samples.attrs["source"]["features"])
    backbone = recorded_backbone(dict(features.attrs), device)
    entries = [(int(r), int(v)) for r in samples.rows for v in samples.views]
    rows, views = zip(*entries, strict=True)
    stored = torch.from_numpy(store.read_rows(features.path, list(samples.rows))).float()
    stored = stored[:, samples.views].flatten(0, 1)  # [entries x views, C, y, x]
    originals = torch.from_numpy(samples.originals()).flatten(0, 1)  # the same in every store

    unavailable: dict[str, str] = {}
    original_logits = None
    if has_classifier(backbone.model):
        prepared, reason = original_inputs(backbone, store, rows, views)
        if prepared is None:
            unavailable["top1"] = unavailable["top5"] = reason
        else:
            original_logits = classify(backbone, prepared)
    else:
        unavailable["top1"] = unavailable["top5"] = f"{backbone.name} has no classification head"
    if len(stored) < 2:  # a set statistic: one map has no covariance
        unavailable["frechet_backbone"] = (f"Fréchet distances need at least 2 maps per set, "
                                           f"this evaluation has {len(stored)}")  # fmt: skip
    perceptual = _perceptual(unavailable)

    table, aggregate = [], {}
    for method, about in tqdm(samples.methods.items(), desc="evaluate", disable=not progress):
        images = torch.from_numpy(samples.images(method))  # [E, V, n, 3, H, W]
        n = images.shape[2]
        flat = images.flatten(0, 2)
        made = reextract(backbone, flat)
        reference = stored.repeat_interleave(n, dim=0)
        scores = {
            "cosine": metrics.flat_cosine(made, reference),
            "position_cosine": metrics.position_cosine_median(made, reference),
            "rel_l2": metrics.relative_l2(made, reference),
            "psnr": metrics.psnr(flat, originals.repeat_interleave(n, dim=0)),
            "ssim": metrics.ssim(flat, originals.repeat_interleave(n, dim=0)),
        }
        if original_logits is not None:
            recon_logits = classify(backbone, inputs(backbone, flat))
            reference_logits = original_logits.repeat_interleave(n, dim=0)
            for k in (1, 5):
                scores[f"top{k}"] = metrics.topk_agreement(reference_logits, recon_logits, k)
        if "lpips" in perceptual:
            scores["lpips"] = metrics.lpips(flat, originals.repeat_interleave(n, dim=0),
                                            perceptual["lpips"])  # fmt: skip
        sets = {}
        if "frechet_backbone" not in unavailable:
            sets["frechet_backbone"] = metrics.frechet_distance(metrics.pooled(stored),
                                                                metrics.pooled(made))  # fmt: skip
        if "fid" in perceptual:
            sets["fid"] = metrics.inception_fid(originals, flat, perceptual["fid"])
        aggregate[method] = {
            "description": about["description"], "samples_per_map": n,
            **{name: _summary(values) for name, values in scores.items()}, **sets,
        }  # fmt: skip
        table += _rows(samples, entries, method, n, scores)

    result = {
        "featinv_evaluation": 1,
        "samples": [store.url for store in samples.stores],
        "stores": [{k: store.attrs[k] for k in ("model", "sampling")} for store in samples.stores],
        "model": samples.attrs["model"],
        "sampling": samples.attrs["sampling"],
        "backbone": backbone.name,
        "layer": features.attrs["layer"],
        "depth": layer_depth(backbone.model, features.attrs["layer"]),
        "weights": features.attrs["weights"],
        "n_entries": len(samples.rows),
        "views": samples.views,
        "methods": aggregate,
        "higher_is_better": HIGHER_IS_BETTER,
        "unavailable": unavailable,
        "sweep": _sweep(config, samples, stored, backbone, device, progress),
        "provenance": provenance({"store": config["store"], "sampling": config["sampling"]}),
    }
    _write(out, result, table)
    return out


def _perceptual(unavailable: dict) -> dict:
    """LPIPS and FID metric objects when their weights are here; else the reason, recorded."""
    found = {}
    for name, make in (("lpips", metrics.lpips_metric), ("fid", metrics.inception_fid_metric)):
        if name == "fid" and "frechet_backbone" in unavailable:
            unavailable[name] = unavailable["frechet_backbone"]
            continue
        try:
            found[name] = make()
        except metrics.MetricUnavailable as exc:
            unavailable[name] = str(exc)
    return found


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else 0.0}


def _rows(samples: SamplesRun, entries, method: str, n: int, scores: dict) -> list[dict]:
    rows = []
    for i, (row, view) in enumerate(np.repeat(np.asarray(entries), n, axis=0)):
        entry = i // (n * len(samples.views))
        values = {name: round(float(v[i]), 6) for name, v in scores.items()}
        rows.append({"key": samples.keys[entry], "row": int(row), "view": int(view),
                     "method": method, "sample": i % n, **values})  # fmt: skip
    return rows


def _sweep(config: dict, samples: SamplesRun, stored, backbone, device, progress) -> list[dict]:
    """`steps_sweep` of `evaluation.sweep` on view 0 of the entries (or the first evaluated view),
    one sample each, with the samples' guidance and eta (none for a guided run alone)."""
    sweep = config["evaluation"]["sweep"]
    if not sweep["steps"] or "model" not in samples.methods:
        return []
    spec = samples.attrs["sampling"]
    seeds = [image_seed(spec["seed"], key, samples.views[0], 0) for key in samples.keys]
    points = [(s, k) for s in sweep["schedulers"] for k in sweep["steps"]]
    model = Reconstructor.load(model_folder(config), device)
    maps = stored[:: len(samples.views)]
    return steps_sweep(model, backbone, maps, seeds, points, spec["guidance"], spec["eta"],
                       progress)  # fmt: skip


def steps_sweep(model: Reconstructor, backbone, maps: torch.Tensor, seeds, points, guidance: float,
                eta: float = 0.0, progress: bool = False) -> list[dict]:  # fmt: skip
    """Per (scheduler, steps): images/s of sampling alone and the feature cosine it reaches."""
    results = []
    for scheduler, steps in tqdm(points, desc="steps sweep", disable=not progress):
        start = time.perf_counter()
        images = model.images(maps, seeds, scheduler=scheduler, steps=steps, guidance=guidance,
                              eta=eta)  # fmt: skip
        seconds = time.perf_counter() - start
        cosine = metrics.flat_cosine(reextract(backbone, images), maps)
        results.append({"scheduler": scheduler, "steps": steps, "cosine": cosine.mean().item(),
                        "images_per_s": len(images) / seconds})  # fmt: skip
    return results


def _write(out: Path, result: dict, table: list[dict]) -> None:
    """per_sample.csv, then evaluation.json whole (its presence means the evaluation is)."""
    columns = ["key", "row", "view", "method", "sample", *PER_SAMPLE]
    with open(out / "per_sample.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(table)
    tmp = out / ".evaluation.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "evaluation.json")


def summary_lines(path: Path) -> list[str]:
    """The evaluation in a few lines for a terminal: each method's main numbers."""
    result = json.loads(Path(path).read_text())
    lines = [f"evaluation of {result['model']['path']} on {result['n_entries']} "
             f"{result['backbone']}/{result['layer']} maps: {path}"]  # fmt: skip
    for method, scores in result["methods"].items():
        shown = [f"{name} {scores[name]['mean']:.3f}" for name in PER_SAMPLE if name in scores]
        if "frechet_backbone" in scores:
            shown.append(f"frechet_backbone {scores['frechet_backbone']:.1f}")
        lines.append(f"  {method:14s} " + ", ".join(shown))
    reasons = dict.fromkeys(result["unavailable"].values())  # top1 and top5 share theirs
    lines += [f"  unavailable: {reason}" for reason in reasons]
    return lines
