"""`featinv guided-decode`: the training-free guided decoder on stored features, beside the
trained decoder.

Targets are the entries `featinv sample` takes (the same keys, split, limit and views), so one
evaluation and one report compare both: each stored map (or its mean-pooled vector, with
`guided.pooled`) is decoded `n` times by the guided prior, and once by pixel optimisation with
the same number of backbone gradient evaluations (Mahendran & Vedaldi).  The output is a samples
store (`featinv-samples/1`) beside the sampler's, `guided.zarr` (`guided-pooled.zarr`), written
entry by entry so a killed run resumes; every setting is in its attributes, and the passes and
feature cosine of every image in its `trajectory/` arrays.  `.npy` targets (no store entry, so no
original to compare with) go to `decode_arrays`: PNG files and a JSON record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sampling.guided import FeatureDistance, GuidedResult, guided_decode
from sampling.pixelopt import PixelPriors, pixel_optimise
from sampling.priors import Prior, load_prior
from sampling.reconstruct import stored_images
from sampling.reextract import recorded_backbone
from sampling.sample import (
    check_store,
    image_seed,
    model_folder,
    output_folder,
    resized,
    save_png,
    select_rows,
    write_pngs,
)
from sampling.sampler import seeded, to_images
from storage_specs.datasets import PairDataset
from storage_specs.layout import StoreError
from storage_specs.provenance import provenance, redact_url
from storage_specs.reader import FeatureStore
from storage_specs.samples import create_samples_store, write_entry
from training.data import TrainingData, open_training_data
from training.denoisers import RECORD, load_vae

SETTINGS = ("steps", "scale", "tau", "travel", "stop_cosine", "seed", "pooled", "condition")


def store_name(spec: dict) -> str:
    return "guided-pooled.zarr" if spec["pooled"] else "guided.zarr"


def method_names(spec: dict) -> tuple[str, str]:
    suffix = "-pooled" if spec["pooled"] else ""
    return f"guided{suffix}", f"pixelopt{suffix}"


def travel_schedule(travel: dict, steps: int):
    """Most passes of step i: `early` for the first `early_steps` steps, then `later`, and
    `last` at the last step (near-clean: its repeats refine the image itself)."""

    def passes(i: int) -> int:
        if i == steps - 1 and travel["last"]:
            return travel["last"]
        return travel["early"] if i < travel["early_steps"] else travel["later"]

    return passes


def decode(prior: Prior, distance: FeatureDistance, targets: torch.Tensor, seeds, spec: dict,
           progress: bool = False) -> GuidedResult:  # fmt: skip
    """`guided_decode` of `targets` with the settings of a `guided:` config section."""
    travel = spec["travel"]
    return guided_decode(
        prior, distance, targets, seeded(seeds), steps=spec["steps"], scale=spec["scale"],
        tau=spec["tau"], travel=travel_schedule(travel, spec["steps"]),
        min_gain=travel["min_gain"], patience=travel["patience"],
        stop_cosine=spec["stop_cosine"], progress=progress,
    )  # fmt: skip


@dataclass
class _Job:
    """What every batch of a run needs: the settings, the entries, the prior and the measure."""

    spec: dict
    source: PairDataset  # the entries' rows and views
    keys: np.ndarray  # of the entries
    data: TrainingData
    prior: Prior
    distance: FeatureDistance
    vae: torch.nn.Module | None
    methods: dict[str, dict]
    image_shape: tuple[int, int, int]  # of the stored targets, what every image is stored at
    prior_images: tuple[int, int, int]  # of the prior's images (latent priors: decoded)

    def decode(self, entries: np.ndarray) -> tuple[np.ndarray, dict, dict, np.ndarray]:
        """Per entry: originals `[E, V, 3, H, W]`, each method's images `[E, V, n, 3, H, W]`,
        its `GuidedResult`, and the seeds `[E, V, n]`."""
        spec, v, n = self.spec, len(self.source.views), self.spec["n"]
        batch = self.source.read_batch([int(i) * v + j for i in entries for j in range(v)])
        device = self.prior_device
        targets = _targets(batch["features"].to(device), spec["pooled"])
        views = zip(batch["key"], batch["view"].tolist(), strict=True)
        seeds = [image_seed(spec["seed"], key, view, s) for key, view in views for s in range(n)]
        guided, pixelopt = method_names(spec)
        made = {guided: decode(self.prior, self.distance, targets.repeat_interleave(n, 0), seeds,
                               spec)}  # fmt: skip
        if pixelopt in self.methods:  # its budget: the passes of the target's first guided image
            made[pixelopt] = pixel_optimise(
                self.distance, targets, made[guided].passes.view(-1, n)[:, 0], self.prior_images,
                seeded(seeds[::n]), PixelPriors.from_config(spec["pixelopt"]),
            )  # fmt: skip
        e = len(entries)
        originals = stored_images(batch, self.vae, self.data.scaling_factor)
        originals = _per_entry(originals, e, v)[:, :, 0]
        images = {m: _per_entry(resized(_images(self.prior, r, m == guided),
                                        self.image_shape[1:]), e, v)
                  for m, r in made.items()}  # fmt: skip
        return originals, images, made, np.asarray(seeds).reshape(e, v, n)

    @property
    def prior_device(self) -> torch.device:
        return next(self.distance.backbone.model.parameters()).device


def guided_run(config: dict, device: str | None = None, progress: bool = True) -> Path:
    """Decode (or finish decoding) the sampler's entries; the output folder."""
    job = _open_job(config, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = output_folder(config)
    root = create_samples_store(
        str(out / store_name(job.spec)), rows=job.source.rows, keys=job.keys,
        views=job.source.views, methods=job.methods, image_shape=job.image_shape,
        attrs=_attrs(config, job.prior, job.data),
    )  # fmt: skip
    trajectory = _trajectory_arrays(root, job.methods)
    todo = np.flatnonzero(~root["done"][:])
    bar = tqdm(total=len(todo), desc=f"guided-decode {out.name}", unit="entry",
               disable=not progress)  # fmt: skip
    for start in range(0, len(todo), job.spec["batch_size"]):
        entries = todo[start : start + job.spec["batch_size"]]
        originals, images, made, seeds = job.decode(entries)
        for k, i in enumerate(int(i) for i in entries):
            pictures = {m: x[k] for m, x in images.items()}
            write_pngs(out / "png", str(root["keys"][i]), job.source.views, originals[k], pictures)
            for m, result in made.items():
                for what in ("passes", "cosine"):
                    trajectory[m][what][i] = _per_entry(getattr(result, what), len(entries),
                                                        len(job.source.views))[k]  # fmt: skip
            write_entry(root, i, originals[k], pictures, seeds[k])  # done last
        bar.update(len(entries))
    bar.close()
    return out


def guided_images(config: dict, device: str) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """The guided decoder of `config` as a function of raw maps `[N, C, y, x]` and their keys:
    uint8 images, one per map, seeded per key as `guided-decode` seeds view 0's first image."""
    spec = config["guided"]
    _, prior, distance = _open_parts(config, device)

    def images(maps: torch.Tensor, keys: list[str]) -> torch.Tensor:
        seeds = [image_seed(spec["seed"], key, 0, 0) for key in keys]
        targets = _targets(maps.to(device), spec["pooled"])
        return _images(prior, decode(prior, distance, targets, seeds, spec), True)

    return images


def _open_job(config: dict, device: str) -> _Job:
    spec = config["guided"]
    data, prior, distance = _open_parts(config, device)
    keys = FeatureStore(data.url).root["samples/key"][:]
    rows = select_rows(data, config["sampling"], keys)
    source = PairDataset(data.url, data.arrays, rows=rows, views=config["sampling"]["views"])
    vae = load_vae(data.record["target"]["vae"], device) if data.target_kind == "latents" else None
    image_shape = tuple(stored_images(source.read_batch([0]), vae, data.scaling_factor).shape[1:])
    return _Job(spec, source, keys[rows], data, prior, distance, vae, _methods(spec, prior),
                image_shape, _image_size(prior, device))  # fmt: skip


def _open_parts(config: dict, device: str) -> tuple[TrainingData, Prior, FeatureDistance]:
    """The targets' store arrays and split, the prior (checked against them) and the measure."""
    spec = config["guided"]
    data = open_training_data(config["store"], _data_spec(config))
    prior = load_prior(spec["prior"] or str(model_folder(config)), device, spec["condition"])
    _check_prior(prior, data, spec)
    backbone = recorded_backbone(data.record["features"], device)
    backbone.model.requires_grad_(False)
    return data, prior, FeatureDistance(backbone)


def _data_spec(config: dict) -> dict:
    """The store arrays and split the targets come from: the sampled model's training section
    (else the config's), with `guided.features` as the targets' array."""
    record = model_folder(config) / RECORD
    training = json.loads(record.read_text())["training"] if record.is_file() else None
    training = training or config.get("training")
    if not training:
        raise ValueError(f"guided-decode: no trained model at '{record.parent}' and no training: "
                         "section to take the targets' arrays and split from")  # fmt: skip
    features = config["guided"]["features"] or training["features"]
    return {**training, "features": features, "batch_size": 1}


def _check_prior(prior: Prior, data: TrainingData, spec: dict) -> None:
    """A prior guided with its condition must take the targets' maps."""
    if not prior.conditional:
        return
    if spec["pooled"]:
        raise ValueError("guided.condition: a conditional prior takes maps, not pooled vectors "
                         "(set guided.pooled: false)")  # fmt: skip
    check_store(data, json.loads(Path(prior.about["source"], RECORD).read_text()))


def _per_entry(x: torch.Tensor, entries: int, views: int) -> np.ndarray:
    """`[entries x views x n, ...]` -> `[entries, views, n, ...]`."""
    return x.reshape(entries, views, -1, *x.shape[1:]).numpy()


def _targets(maps: torch.Tensor, pooled: bool) -> torch.Tensor:
    maps = maps.float()
    return maps.mean(dim=(2, 3)) if pooled else maps


def _image_size(prior: Prior, device) -> tuple[int, int, int]:
    """The shape of the prior's images (latent priors: after decoding)."""
    with torch.no_grad():
        return tuple(prior.to_image(torch.zeros((1, *prior.shape), device=device)).shape[1:])


def _images(prior: Prior, result: GuidedResult, model_space: bool) -> torch.Tensor:
    with torch.no_grad():
        pixels = prior.to_image(result.x0) if model_space else result.x0
    return to_images(pixels).cpu()


def _methods(spec: dict, prior: Prior) -> dict[str, dict]:
    guided, pixelopt = method_names(spec)
    what = "the mean-pooled vector of the map" if spec["pooled"] else "the map"
    about = f"training-free guided diffusion to {what} (Shirahama et al.)"
    methods = {guided: {"samples": spec["n"], "prior": prior.about["source"], "description": about}}
    if spec["pixelopt"]["enabled"]:
        about = (f"pixels optimised to {what} with TV and alpha-norm priors, the same gradient "
                 "evaluations (Mahendran & Vedaldi)")  # fmt: skip
        methods[pixelopt] = {"samples": 1, "description": about}
    return methods


def _trajectory_arrays(root, methods: dict) -> dict[str, dict]:
    """`trajectory/<method>/{passes,cosine}`: per image, the guided passes (gradient
    evaluations) spent and the feature cosine of the kept image, as the decoder measured it."""
    v = len(root.attrs["views"])
    arrays = {}
    for name, method in methods.items():
        shape = (root.attrs["n_entries"], v, method["samples"])
        arrays[name] = {
            what: root.require_array(f"trajectory/{name}/{what}", shape=shape, dtype=dtype,
                                     chunks=(1, v, method["samples"]), fill_value=0)
            for what, dtype in (("passes", "int64"), ("cosine", "float32"))
        }  # fmt: skip
    return arrays


def _attrs(config: dict, prior: Prior, data: TrainingData) -> dict:
    spec = config["guided"]
    features = data.record["features"]
    settings = {k: spec[k] for k in SETTINGS}
    return {
        "source": {"url": redact_url(data.url), "features": features["path"],
                   "target": data.record["target"]["paths"], "spec": data.record["spec"]},
        "model": {"path": prior.about["source"], "mode": f"guided prior ({prior.about['kind']})",
                  "steps": prior.about.get("steps"), "backbone": features["backbone"],
                  "layer": features["layer"], "prior": prior.about},
        "sampling": {"scheduler": "ddim (guided)", "steps": spec["steps"],
                     "guidance": spec["scale"], "eta": 0.0, "seed": spec["seed"],
                     "guided": settings, "pixelopt": spec["pixelopt"],
                     "seed_rule": "sha256('<seed>/<key>/<view>/<index>')[:4], little-endian"},
        "provenance": provenance({"store": data.url, "guided": spec}),
    }  # fmt: skip


def decode_arrays(config: dict, path: str, out: Path, device: str | None = None) -> Path:
    """Guided decoding of the feature arrays in a `.npy` file (`[C, y, x]`, `[N, C, y, x]`,
    `[C]` or `[N, C]` for pooled targets) with the config's prior and backbone; PNGs and
    `guided.json` (settings, passes, cosine per target) into `out`."""
    spec = config["guided"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data, prior, distance = _open_parts(config, device)
    targets = _npy_targets(path, tuple(data.feature_shape), spec["pooled"]).to(device)
    n = spec["n"]
    seeds = [image_seed(spec["seed"], Path(path).name, i, s) for i in range(len(targets))
             for s in range(n)]  # fmt: skip
    result = decode(prior, distance, targets.repeat_interleave(n, 0), seeds, spec, progress=True)
    images = _images(prior, result, True)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(out / f"target{i // n:04d}_{i % n}.png", image.numpy())
    record = {
        "targets": str(path), "features": data.record["features"]["path"],
        "settings": {k: spec[k] for k in SETTINGS}, "prior": prior.about,
        "passes": result.passes.view(-1, n).tolist(), "cosine": result.cosine.view(-1, n).tolist(),
    }  # fmt: skip
    (out / "guided.json").write_text(json.dumps(record, indent=1))
    return out


def _npy_targets(path: str, map_shape: tuple[int, ...], pooled: bool) -> torch.Tensor:
    """`[N, C, y, x]` maps or `[N, C]` vectors from a `.npy` file (never a pickle)."""
    array = np.load(path, allow_pickle=False)
    want = map_shape[:1] if pooled else map_shape
    if tuple(array.shape[-len(want) :]) != want or array.ndim not in (len(want), len(want) + 1):
        kind = "pooled vector" if pooled else "map"
        raise StoreError(f"'{path}': target shape {tuple(array.shape)} does not fit the stored "
                         f"{kind} shape {want} (or [N, {', '.join(map(str, want))}])")  # fmt: skip
    array = array.reshape(-1, *want)
    return torch.from_numpy(array.astype(np.float32))
