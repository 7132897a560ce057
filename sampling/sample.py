"""`featinv sample`: images from stored feature maps by a trained model, and by its baselines.

The entries are the model's held-out samples (or chosen keys, or its training samples), at the
chosen views; each gets `n` samples with recorded seeds (a hash of seed, key, view and sample
index, so an image does not depend on what else was sampled), the same seeds with the condition
dropped, the up-convolutional decoder's prediction when one was trained, and the nearest training
image by feature distance.  All go into one samples store (`storage_specs/samples.py`) beside PNG
files, entry by entry, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sampling.baselines import nearest_items
from sampling.reconstruct import Reconstructor
from storage_specs.datasets import PairDataset
from storage_specs.layout import StoreError
from storage_specs.provenance import provenance, redact_url
from storage_specs.reader import FeatureStore
from storage_specs.samples import create_samples_store, write_entry
from training.data import TrainingData, open_training_data

SETTINGS = ("scheduler", "steps", "guidance", "eta", "seed")


def image_seed(seed: int, key: str, view: int, index: int) -> int:
    """The seed of one sampled image: stable across batchings, runs and subsets of keys."""
    digest = hashlib.sha256(f"{seed}/{key}/{view}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def model_folder(config: dict) -> Path:
    spec = config["sampling"]
    if spec["model"]:
        return Path(spec["model"])
    training = config.get("training") or {}
    if not training:
        raise ValueError("config sampling.model: not set, and no training: section to take it from")
    return Path(training["output_dir"]) / training["run"]


def baseline_folder(config: dict) -> Path | None:
    """The up-convolutional decoder trained beside the model (`<model>-updecoder`), if asked."""
    if not config["sampling"]["baselines"]["updecoder"]:
        return None
    folder = model_folder(config)
    return folder.with_name(f"{folder.name}-updecoder")


def output_folder(config: dict) -> Path:
    spec = config["sampling"]
    return Path(spec["output_dir"]) / (spec["name"] or model_folder(config).name)


def check_store(data: TrainingData, record: dict) -> None:
    """The store must hold the features the model was trained on (it may have moved)."""
    trained, here = record["store"]["features"], data.record["features"]
    for key in ("path", "weights", "preprocessing"):
        if trained[key] != here[key]:
            raise StoreError(f"'{redact_url(data.url)}' has other {key} for {here['path']} than "
                             "the model was trained on")  # fmt: skip


def select_rows(data: TrainingData, spec: dict, keys: np.ndarray) -> np.ndarray:
    """Source rows to sample: chosen keys (in their order), else a split; at most `limit`."""
    if spec["keys"]:
        index = {str(k): i for i, k in enumerate(keys)}
        missing = [k for k in spec["keys"] if k not in index]
        if missing:
            raise StoreError(f"config sampling.keys: {missing[:3]} not in the store")
        rows = np.array([index[k] for k in spec["keys"]], dtype=np.int64)
    else:
        split = {"heldout": data.heldout_rows, "train": data.train_rows,
                 "all": np.sort(np.concatenate([data.train_rows, data.heldout_rows]))}  # fmt: skip
        rows = split[spec["split"]]
    if not len(rows):
        raise StoreError(f"config sampling.split: no {spec['split']} samples in '{data.url}'")
    return rows[: spec["limit"]] if spec["limit"] else rows


def sample_run(config: dict, device: str | None = None, progress: bool = True) -> Path:
    """Sample (or finish sampling) the entries of `config["sampling"]`; the output folder."""
    spec = config["sampling"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Reconstructor.load(model_folder(config), device)
    data = open_training_data(config["store"], model.record["training"])
    check_store(data, model.record)
    decoder = _load_baseline(baseline_folder(config), device)
    keys = FeatureStore(data.url).root["samples/key"][:]
    source = PairDataset(data.url, data.arrays, rows=select_rows(data, spec, keys),
                         views=spec["views"])  # fmt: skip
    out = output_folder(config)
    methods = _methods(spec, decoder)
    root = create_samples_store(
        str(out / "samples.zarr"), rows=source.rows, keys=keys[source.rows],
        views=source.views, methods=methods, image_shape=_image_shape(model, source),
        attrs=_attrs(config, model, data),
    )  # fmt: skip
    neighbours = _neighbours(data, source, progress) if "nearest" in methods else None
    restore_pngs(out / "png", root, source.views, methods)
    todo = np.flatnonzero(~root["done"][:])
    bar = tqdm(total=len(todo), desc=f"sample {out.name}", unit="entry", disable=not progress)
    for start in range(0, len(todo), spec["batch_size"]):
        entries = todo[start : start + spec["batch_size"]]
        results = _sample_entries(entries, source, model, decoder, neighbours, spec)
        for i, result in zip(entries, results, strict=True):
            write_pngs(out / "png", str(root["keys"][int(i)]), source.views, *result[:2])
            write_entry(root, int(i), *result)  # done last: a killed run redoes the entry
        bar.update(len(entries))
    bar.close()
    return out


def _load_baseline(folder: Path | None, device: str) -> Reconstructor | None:
    if folder is None:
        return None
    if not (folder / "featinv_training.json").is_file():
        raise ValueError(f"no baseline decoder in '{folder}': run `featinv train CONFIG --baseline "
                         "updecoder` (or set sampling.baselines.updecoder: false)")  # fmt: skip
    return Reconstructor.load(folder, device)


def _methods(spec: dict, decoder: Reconstructor | None) -> dict[str, dict]:
    n = spec["n"]
    methods = {"model": {"samples": n, "description": "the trained model, conditioned on the map"}}
    if spec["baselines"]["unconditional"]:
        methods["unconditional"] = {
            "samples": n,
            "description": "the same model and seeds with the condition dropped",
        }
    if decoder is not None:
        methods["updecoder"] = {
            "samples": 1,
            "description": "up-convolutional decoder trained on the same cache "
            "(Dosovitskiy & Brox 2016)",
            "model": str(decoder.folder),
        }
    if spec["baselines"]["nearest"]:
        methods["nearest"] = {
            "samples": 1,
            "description": "the training image whose map is nearest (normalised L2)",
        }
    return methods  # fmt: skip


def _image_shape(model: Reconstructor, source: PairDataset) -> tuple[int, int, int]:
    batch = source.read_batch([0])
    return tuple(model.target_images(batch).shape[1:])


def _attrs(config: dict, model: Reconstructor, data: TrainingData) -> dict:
    spec = config["sampling"]
    record = model.record
    return {
        "source": {"url": redact_url(data.url), "features": model.features_path,
                   "target": record["store"]["target"]["paths"], "spec": data.record["spec"]},
        "model": {"path": str(model.folder), "mode": model.mode, "steps": record["steps"],
                  "backbone": record["store"]["features"]["backbone"],
                  "layer": record["store"]["features"]["layer"]},
        "sampling": {**{k: spec[k] for k in SETTINGS},
                     "unconditional_branch": model.trainee.unconditional,
                     "seed_rule": "sha256('<seed>/<key>/<view>/<index>')[:4], little-endian"},
        "provenance": provenance({"store": data.url, "sampling": spec}),
    }  # fmt: skip


def _neighbours(data: TrainingData, source: PairDataset, progress: bool):
    """For every entry view (row, view), its nearest training pair, as a function of a batch's
    (row, view) list giving their target images."""
    queries = [source.item(i) for i in range(len(source))]
    features = torch.cat([source.read_batch(range(s, min(s + 256, len(source))))["features"]
                          for s in range(0, len(source), 256)])  # fmt: skip
    train = {"rows": data.train_rows, "views": data.views}
    pool = PairDataset(data.url, {"features": data.arrays["features"]}, **train)
    found = nearest_items(features, pool, data.channel_stats, progress=progress,
                          query_rows=[row for row, _ in queries])  # fmt: skip
    nearest = dict(zip(queries, found, strict=True))
    targets = PairDataset(data.url, {k: v for k, v in data.arrays.items() if k != "features"},
                          **train)  # fmt: skip
    return lambda pairs: targets.read_batch([nearest[pair] for pair in pairs])


def _sample_entries(entries, source: PairDataset, model: Reconstructor, decoder, neighbours,
                    spec: dict):  # fmt: skip
    """Per entry: (original [V,3,H,W], {method: [V,n,3,H,W]}, seeds [V,n])."""
    v, n = len(source.views), spec["n"]
    batch = source.read_batch([int(i) * v + j for i in entries for j in range(v)])
    maps = batch["features"].repeat_interleave(n, dim=0)
    views = zip(batch["key"], batch["view"].tolist(), strict=True)
    seeds = [image_seed(spec["seed"], key, view, s) for key, view in views for s in range(n)]
    settings = {k: spec[k] for k in ("scheduler", "steps", "guidance", "eta")}
    originals = model.target_images(batch)
    made = {"model": model.images(maps, seeds, **settings)}
    if spec["baselines"]["unconditional"]:
        made["unconditional"] = model.images(maps, seeds, condition=False, **settings)
    if decoder is not None:
        made["updecoder"] = decoder.images(batch["features"], [0] * len(batch["key"]))
    if neighbours is not None:
        pairs = [(int(r), int(w)) for r, w in zip(batch["row"], batch["view"], strict=True)]
        made["nearest"] = model.target_images(neighbours(pairs))
    size = originals.shape[-2:]
    grouped = {m: resized(x, size).reshape(len(entries), v, -1, 3, *size).numpy()
               for m, x in made.items()}  # fmt: skip
    originals = originals.reshape(len(entries), v, 3, *size).numpy()
    seeds = np.asarray(seeds, dtype=np.int64).reshape(len(entries), v, n)
    for k in range(len(entries)):
        yield originals[k], {m: x[k] for m, x in grouped.items()}, seeds[k]


def resized(images: torch.Tensor, size) -> torch.Tensor:
    """uint8 images at `size` (antialiased bilinear), untouched when already there."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.nn.functional.interpolate(images.float(), size=tuple(size), mode="bilinear",
                                          antialias=True)  # fmt: skip
    return out.round().clamp(0, 255).to(torch.uint8)


def write_pngs(folder: Path, key: str, views, original: np.ndarray, images: dict) -> None:
    """`<folder>/<key>/v<view>_original.png` and `v<view>_<method>_<index>.png`."""
    where = folder / key
    where.mkdir(parents=True, exist_ok=True)
    for j, view in enumerate(views):
        save_png(where / png_name(view, "original"), original[j])
        for method, data in images.items():
            for s, image in enumerate(data[j]):
                save_png(where / png_name(view, f"{method}_{s}"), image)


def png_name(view: int, kind: str) -> str:
    """The PNG of a view's original (`kind` "original") or of a method's sample ("model_0")."""
    return f"v{view}_{kind}.png"


def restore_pngs(folder: Path, root, views, methods: dict[str, dict]) -> None:
    """Rewrite, from the samples store, the PNGs of finished entries that are gone (deleted, a
    run killed between its PNGs and the store): the store is the record, the PNGs a view of it."""
    names = [png_name(view, kind) for view in views
             for kind in ["original", *(f"{m}_{s}" for m, spec in methods.items()
                                        for s in range(spec["samples"]))]]  # fmt: skip
    for i in np.flatnonzero(root["done"][:]):
        key = str(root["keys"][int(i)])
        if not all((folder / key / name).is_file() for name in names):
            images = {m: root[f"reconstructions/{m}"][int(i)] for m in methods}
            write_pngs(folder, key, views, root["originals"][int(i)], images)


def save_png(path: Path, chw: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(path)
