"""`featinv steer` / `featinv composite`: FeatInv's two applications of a trained model.

Both edit stored feature maps and let the model show what the edited map encodes.  Every image of
a grid row uses one seed (`image_seed(seed, key, view, 0)`), so only the map changes along a row.
Edits are made in the space the model sees, the channel-normalised one (`z = (f - mean) / std`
per channel from the store's `channel_stats`, dead channels only centred, as the trainer does),
and go back to raw stored units for sampling, since a model takes raw maps.  Each run writes grid
PNGs and a `manifest.json` (`kind`, `title`, `description`, `grids: [{png, caption}]`, then what
was done and measured) under `<sampling output>/analyses/<kind>/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr
from torchvision.utils import make_grid
from tqdm import tqdm

from pipeline.config import ConfigError
from sampling.metrics import flat_cosine
from sampling.reconstruct import Reconstructor
from sampling.reextract import recorded_backbone, reextract
from sampling.sample import check_store, image_seed, model_folder, output_folder, resized
from storage_specs.datasets import PairDataset
from storage_specs.reader import FeatureStore, open_dataset
from training.data import TrainingData, open_training_data
from training.models import FeatureNorm

STEERING = """A feature map is moved along a direction in the model's normalised feature space,
z' = z + alpha * r * d / |d|, where r = sqrt(live channels x positions) is the typical norm of a
normalised map (its RMS over the store, where every live channel has unit variance): alpha = 1
moves any map by one typical map norm, whatever the direction's kind (class-mean difference,
one channel, or a given vector), and direction.alpha_of_d = |d| / r is the alpha that moves the map
by d itself (for a class-mean direction: from the 'from' class mean to the 'to' class mean).
The effect is measured by re-extracting each image's map with the recorded backbone and
projecting it on d / |d|, in alpha units (the fed map's projection rises by exactly alpha)."""

COMPOSITE = """Parts of feature maps are kept, removed or swapped, and the model shows what is
left: the top-k channels by mean normalised activation, spatial regions, and two images' maps
mixed region by region.  Removed means set to the channel's mean, the normalised zero, not to a
raw 0: the model was trained on normalised maps, where a raw 0 is an arbitrary and often
out-of-distribution value, while the mean is the map's 'nothing here' (and what
classifier-free guidance drops to).  Each sample's re-extracted map is compared (cosine) with
the map it was fed and with the unedited maps."""

MIN_CELL = 96  # pixels: small images are enlarged (nearest) to be seen
COMPLEMENTS = {"center": "border", "left": "right", "top": "bottom"}


@dataclass
class ChannelNorm:
    """The model's normalisation of raw maps, both ways (`[C, 1, 1]` mean and std)."""

    mean: torch.Tensor
    std: torch.Tensor
    live: int  # channels with a non-zero std

    @classmethod
    def of(cls, stats: dict) -> ChannelNorm:
        norm = FeatureNorm(len(stats["mean"]))  # the trainer's own rule for dead channels
        norm.set_stats(stats["mean"], stats["std"])
        live = int((torch.as_tensor(stats["std"]) > 1e-6).sum())
        return cls(norm.mean[:, None, None], norm.std[:, None, None], live)

    def normalize(self, maps: torch.Tensor) -> torch.Tensor:
        return (maps.float() - self.mean) / self.std

    def typical_norm(self, grid: tuple[int, int]) -> float:
        """The RMS norm of a normalised map over the store: unit variance per live channel."""
        return float(np.sqrt(self.live * grid[0] * grid[1]))


@dataclass
class Analysis:
    """A trained model, its store's pairs and the `analyses:` settings."""

    model: Reconstructor
    data: TrainingData
    norm: ChannelNorm
    spec: dict
    rows: dict[str, int]  # valid store key -> row
    section: str = "analyses"  # the config section of `spec`, named by its errors

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.data.feature_shape[1:])

    def keys(self) -> list[str]:
        """The configured keys, else the first `limit` held-out samples."""
        if self.spec["keys"]:
            return self.checked(self.spec["keys"], "keys")
        held = set(self.data.heldout_rows.tolist())
        keys = [key for key, row in self.rows.items() if row in held]
        if not keys:
            raise ConfigError(
                f"config {self.section}.keys: not set, and the model holds out no samples"
            )
        return keys[: self.spec["limit"]]

    def checked(self, keys: list[str], where: str) -> list[str]:
        for key in keys:
            if key not in self.rows:
                raise ConfigError(
                    f"config {self.section}.{where}: '{key}' is no valid key of the store"
                )
        return list(keys)

    def read(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw stored maps `[K, C, y, x]` (float32) and target images of the keys' view."""
        rows = [self.rows[k] for k in keys]
        pairs = PairDataset(self.data.url, self.data.arrays, rows=rows, views=[self.spec["view"]])
        batch = pairs.read_batch(range(len(rows)))
        return batch["features"].float(), self.model.target_images(batch)

    def seeds(self, keys: list[str]) -> list[int]:
        return [image_seed(self.spec["seed"], key, self.spec["view"], 0) for key in keys]

    def sample(self, maps: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """uint8 images of raw maps, one per map, with the seeds of `keys`."""
        settings = {k: self.spec[k] for k in ("scheduler", "steps", "guidance")}
        return self.model.images(maps, self.seeds(keys), **settings)

    def backbone(self):
        return recorded_backbone(self.model.record["store"]["features"], str(self.model.device))


def open_analysis(config: dict, device: str | None = None) -> Analysis:
    """The model of `config["sampling"]` on `config["store"]`, with `config["analyses"]`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Reconstructor.load(model_folder(config), device)
    data = open_training_data(config["store"], model.record["training"])
    check_store(data, model.record)
    root = FeatureStore(data.url).root
    view, count = config["analyses"]["view"], root.attrs["views"]["count"]
    if view >= count:
        raise ConfigError(f"config analyses.view: {view} is out of range (the store has {count})")
    valid = root["samples/valid"][:]
    rows = {str(key): row for row, key in enumerate(root["samples/key"][:]) if valid[row]}
    return Analysis(model, data, ChannelNorm.of(data.channel_stats), config["analyses"], rows)


# ---------------------------------------------------------------------------- steering


def class_means(data: TrainingData, names: list[str]) -> np.ndarray:
    """Mean raw map `[len(names), C, y, x]` of each class over the training rows and views,
    computed by dask shard by shard: the store is never loaded whole."""
    import dask

    classes = FeatureStore(data.url).classes
    path = data.arrays["features"]
    ds = open_dataset(data.url, [path])
    labels = ds["label"].values[data.train_rows]
    maps = ds[path].isel(sample=data.train_rows, view=data.views).astype("float64")
    means = []
    for name in names:
        if name not in classes:
            raise ConfigError(
                f"config analyses.steering: unknown class '{name}' (classes: {', '.join(classes)})"
            )
        members = np.flatnonzero(labels == classes.index(name))
        if not len(members):
            raise ConfigError(f"config analyses.steering: class '{name}' has no training samples")
        means.append(maps.isel(sample=members).mean(("sample", "view")).data)
    return np.stack(dask.compute(*means))


def steering_direction(analysis: Analysis) -> tuple[torch.Tensor, dict]:
    """The direction `[C, y, x]` in normalised units, and what it is, for the manifest."""
    spec, shape = analysis.spec["steering"], analysis.data.feature_shape
    kind = spec["direction"]
    if kind == "class_mean":
        means = torch.from_numpy(class_means(analysis.data, [spec["from"], spec["to"]])).float()
        direction = (means[1] - means[0]) / analysis.norm.std
        about = {"from": spec["from"], "to": spec["to"]}
    elif kind == "channel":
        if not 0 <= spec["channel"] < shape[0]:
            raise ConfigError(
                f"config analyses.steering.channel: {spec['channel']} is out of "
                f"range (the map has {shape[0]} channels)"
            )
        direction = torch.zeros(shape)
        direction[spec["channel"]] = 1.0  # one std of that channel, at every position
        about = {"channel": spec["channel"]}
    else:
        direction = _vector(spec["vector"], shape) / analysis.norm.std
        about = {"vector": spec["vector"]}
    typical = analysis.norm.typical_norm(analysis.grid)
    if not direction.norm() > 0:
        raise ConfigError(f"config analyses.steering: the {kind} direction is zero")
    ratio = float(direction.norm()) / typical
    return direction, {"kind": kind, **about, "typical_norm": typical, "alpha_of_d": ratio}


def _vector(path: str | None, shape: tuple[int, ...]) -> torch.Tensor:
    """A given direction in raw stored units (a difference of maps): `[C]` (the same at every
    position) or `[C, y, x]`."""
    if not path:
        raise ConfigError("config analyses.steering.vector: direction 'vector' needs a .npy path")
    try:
        vector = torch.from_numpy(np.load(path)).float()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"config analyses.steering.vector: cannot read '{path}' ({type(exc).__name__})"
        ) from None
    if tuple(vector.shape) == shape[:1]:
        return vector[:, None, None].expand(shape).clone()
    if tuple(vector.shape) != shape:
        raise ConfigError(
            f"config analyses.steering.vector: '{path}' has shape "
            f"{list(vector.shape)}, not [{shape[0]}] or {list(shape)}"
        )
    return vector


def steer_run(config: dict, progress: bool = True, *, device: str | None = None) -> Path:
    """Sample the steering grid of `config["analyses"]` (rows: keys, columns: alphas) into
    `<output>/analyses/steering/` with its manifest; the folder."""
    analysis = open_analysis(config, device)
    alphas = analysis.spec["steering"]["alphas"]
    direction, about = steering_direction(analysis)
    unit = direction / direction.norm()
    step = unit * about["typical_norm"] * analysis.norm.std  # alpha = 1, in raw units
    keys = analysis.keys()
    maps, targets = analysis.read(keys)
    fed = [maps + alpha * step for alpha in alphas]
    columns = [analysis.sample(f, keys) for f in tqdm(fed, desc="steer", disable=not progress)]
    out = output_folder(config) / "analyses" / "steering"
    png = _save_grid(out / "steering.png", _with_targets([targets], columns))
    caption = (
        f"Rows: samples ({', '.join(keys)}). Columns: the target, then the model's sample "
        f"from the map moved by alpha = {', '.join(map(str, alphas))} along the "
        f"{_name(about)} direction (same seed in a row; alpha 0 is the plain sample)."
    )
    effect = _projections(analysis, maps, fed, columns, unit / about["typical_norm"], alphas)
    _write_manifest(
        out,
        analysis,
        "steering",
        f"Concept steering: {_name(about)}",
        STEERING,
        [{"png": png, "caption": caption}],
        direction=about,
        alphas=alphas,
        keys=keys,
        seeds=analysis.seeds(keys),
        effect=effect,
    )
    return out


def _name(about: dict) -> str:
    if about["kind"] == "class_mean":
        return f"class-mean '{about['from']}' -> '{about['to']}'"
    if about["kind"] == "channel":
        return f"channel {about['channel']}"
    return f"vector '{Path(about['vector']).name}'"


def _projections(analysis: Analysis, maps, fed, columns, axis: torch.Tensor, alphas) -> dict:
    """Each map's normalised projection on `axis` (the unit direction over the typical norm, so
    in alpha units): the stored maps, the fed ones, and the samples' re-extracted ones."""
    backbone = analysis.backbone()

    def projection(raw: torch.Tensor) -> np.ndarray:
        return (analysis.norm.normalize(raw) * axis).flatten(1).sum(1).double().numpy().round(5)

    fed = np.stack([projection(f) for f in fed], 1)  # [keys, alphas]
    reextracted = np.stack([projection(reextract(backbone, images)) for images in columns], 1)
    per_key = [
        {
            "stored": float(p0),
            "fed": f.tolist(),
            "reextracted": r.tolist(),
            "spearman": _spearman(alphas, r),
            "slope": float(np.polyfit(alphas, r, 1)[0]) if len(alphas) > 1 else None,
        }
        for p0, f, r in zip(projection(maps), fed, reextracted, strict=True)
    ]
    return {
        "about": "projection of each normalised map on the unit direction over the typical map "
        "norm (alpha units): 'fed' (the maps given to the model) rises by alpha; 'reextracted' "
        "is each sample's map re-extracted with the recorded backbone; its slope over alpha is "
        "the part of the move that reaches the image (1 = all of it)",
        "per_key": per_key,
        "mean_reextracted": reextracted.mean(0).round(5).tolist(),
        "mean_slope": float(np.mean([p["slope"] for p in per_key])) if len(alphas) > 1 else None,
    }


def _spearman(alphas, values) -> float | None:
    rho = spearmanr(alphas, values).statistic if len(alphas) > 2 else float("nan")
    return None if np.isnan(rho) else round(float(rho), 4)


# ---------------------------------------------------------------------------- composite


def region_mask(name: str, grid: tuple[int, int]) -> torch.Tensor:
    """Bool `[y, x]` of a named region, by each position's centre in [0, 1]: `center` the middle
    half of both axes, `border` the rest; `left`/`top` the first half, `right`/`bottom` the rest
    (an odd grid's middle column or row goes right or bottom); `cell:i,j` a 3x3 grid's cell."""
    cy, cx = ((torch.arange(n) + 0.5) / n for n in grid)
    y, x = torch.meshgrid(cy, cx, indexing="ij")
    if name.startswith("cell:"):
        i, j = (int(v) for v in name[5:].split(","))
        return ((y * 3).floor() == i) & ((x * 3).floor() == j)
    masks = {
        "center": ((y - 0.5).abs() < 0.25) & ((x - 0.5).abs() < 0.25),
        "left": x < 0.5,
        "top": y < 0.5,
    }
    masks |= {other: ~masks[side] for side, other in COMPLEMENTS.items()}
    if name not in masks:
        raise ConfigError(f"config analyses.composite: unknown region '{name}'")
    return masks[name]


def removed(maps: torch.Tensor, mask: torch.Tensor, norm: ChannelNorm) -> torch.Tensor:
    """`maps` with the entries of `mask` (broadcast to `[N, C, y, x]`) set to their channel's
    mean: the normalised zero, a value the model knows, not a raw 0."""
    return torch.where(mask, norm.mean.expand_as(maps), maps)


def top_channels(maps: torch.Tensor, k: int, norm: ChannelNorm) -> torch.Tensor:
    """`[N, k]` channels of each map with the highest mean normalised activation over positions:
    what is unusually active in this image (raw means would rank channels by their scale)."""
    return norm.normalize(maps).mean((-2, -1)).topk(k, dim=1).indices


def channel_mask(channels: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Bool `[N, C, 1, 1]`, True on each map's `channels` (`[N, k]`)."""
    mask = torch.zeros(len(channels), n_channels, dtype=torch.bool)
    return mask.scatter_(1, channels, True)[:, :, None, None]


def mixed(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`a` inside `region` (`[y, x]`), `b` elsewhere."""
    return torch.where(region, a, b)


@dataclass
class Grid:
    """One composite grid: per column a batch of edited maps, all rows seeded by `keys`."""

    name: str
    keys: list[str]  # one per row: whose seed the row uses
    targets: list[torch.Tensor]  # the leading target columns
    fed: list[torch.Tensor]  # per sampled column: raw maps [rows, C, y, x]
    columns: list[str]
    caption: str
    references: dict[str, torch.Tensor]  # unedited maps the samples are compared with
    about: dict = field(default_factory=dict)


def composite_run(config: dict, progress: bool = True, *, device: str | None = None) -> Path:
    """Sample the composite-feature grids of `config["analyses"]` (channels, regions, mixes) into
    `<output>/analyses/composite/` with their manifest; the folder."""
    analysis = open_analysis(config, device)
    spec = analysis.spec["composite"]
    keys = analysis.keys()
    pairs = spec["pairs"] or [list(p) for p in zip(keys[::2], keys[1::2], strict=False)]
    pairs = [analysis.checked(pair, "composite.pairs") for pair in pairs]
    maps, targets = analysis.read(keys)
    grids = [
        _channel_grid(analysis, keys, maps, targets, spec["top_k"]),
        _region_grid(analysis, keys, maps, targets, spec["regions"]),
    ]
    if pairs:
        grids.append(_mix_grid(analysis, pairs, spec["mix"]))
    out = output_folder(config) / "analyses" / "composite"
    backbone = analysis.backbone()
    listed, effect = [], {}
    for grid in tqdm(grids, desc="composite", disable=not progress):
        samples = [analysis.sample(fed, grid.keys) for fed in grid.fed]
        png = _save_grid(out / f"{grid.name}.png", _with_targets(grid.targets, samples))
        listed.append({"png": png, "caption": grid.caption})
        effect[grid.name] = {
            "columns": grid.columns,
            **grid.about,
            **_cosines(backbone, samples, grid),
        }
    _write_manifest(
        out,
        analysis,
        "composite",
        "Composite features: what each part of a map carries",
        COMPOSITE,
        listed,
        keys=keys,
        pairs=pairs,
        seeds=dict(zip(keys, analysis.seeds(keys), strict=True)),
        settings={k: spec[k] for k in ("top_k", "regions", "mix")},
        effect=effect,
    )
    return out


def _channel_grid(analysis: Analysis, keys, maps, targets, k: int) -> Grid:
    n_channels = maps.shape[1]
    if not 0 < k <= n_channels:
        raise ConfigError(
            f"config analyses.composite.top_k: {k} is out of range "
            f"(the map has {n_channels} channels)"
        )
    top = top_channels(maps, k, analysis.norm)
    keep = channel_mask(top, n_channels)
    fed = [
        maps,
        removed(maps, ~keep, analysis.norm),
        removed(maps, keep, analysis.norm),
        removed(maps, torch.ones_like(keep), analysis.norm),
    ]
    columns = ["full map", f"top-{k} channels kept", f"top-{k} channels removed", "mean map"]
    caption = (
        f"Rows: samples ({', '.join(keys)}). Columns: the target, then the model's samples "
        f"from: {'; '.join(columns)} (top = highest mean normalised activation; removed "
        "= set to the channel mean; the mean map has every channel removed; same seed "
        "in a row)."
    )
    about = {"top_channels": dict(zip(keys, top.tolist(), strict=True))}
    return Grid("channels", keys, [targets], fed, columns, caption, {"full": maps}, about)


def _region_grid(analysis: Analysis, keys, maps, targets, regions: list[str]) -> Grid:
    kept = _region_columns(regions, analysis.grid)
    fed = [maps] + [removed(maps, ~mask, analysis.norm) for _, mask in kept]
    columns = ["full map"] + [label for label, _ in kept]
    caption = (
        f"Rows: samples ({', '.join(keys)}). Columns: the target, then the model's samples "
        f"from: {'; '.join(columns)} (regions of the {analysis.grid[0]}x{analysis.grid[1]} "
        "map; removed positions set to the channel mean; same seed in a row)."
    )
    return Grid("regions", keys, [targets], fed, columns, caption, {"full": maps})


def _region_columns(regions: list[str], grid: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    """(label, positions kept) of "only R kept" and "R removed" for each region, one column per
    distinct mask (with center and border, "center removed" is "only border kept")."""
    columns: list[tuple[str, torch.Tensor]] = []
    for name in regions:
        mask = region_mask(name, grid)
        for label, kept in ((f"only {name} kept", mask), (f"{name} removed", ~mask)):
            same = next((i for i, (_, k) in enumerate(columns) if torch.equal(k, kept)), None)
            if same is None:
                columns.append((label, kept))
            else:
                columns[same] = (f"{columns[same][0]} = {label}", kept)
    return columns


def _mix_grid(analysis: Analysis, pairs: list[list[str]], regions: list[str]) -> Grid:
    (a, a_targets), (b, b_targets) = (analysis.read([p[i] for p in pairs]) for i in (0, 1))
    fed, columns = [a, b], ["A", "B"]
    for name in regions:
        mask = region_mask(name, analysis.grid)
        fed += [mixed(a, b, mask), mixed(b, a, mask)]
        columns += [f"{name} of A + rest of B", f"{name} of B + rest of A"]
    caption = (
        f"Rows: pairs A, B ({'; '.join(f'{x} + {y}' for x, y in pairs)}). Columns: the "
        f"targets of A and B, then the model's samples from: {'; '.join(columns)} (all "
        "with A's seed, so only the map changes)."
    )
    return Grid(
        "mix",
        [p[0] for p in pairs],
        [a_targets, b_targets],
        fed,
        columns,
        caption,
        {"A": a, "B": b},
    )


def _cosines(backbone, samples: list[torch.Tensor], grid: Grid) -> dict:
    """Per row and sampled column: cosine of the re-extracted map with the map fed, and with each
    unedited map: did the model honour the edit, and which image does the result resemble."""
    remade = [reextract(backbone, images) for images in samples]

    def table(maps: list[torch.Tensor]) -> list[list[float]]:
        values = torch.stack([flat_cosine(r, m) for r, m in zip(remade, maps, strict=True)], 1)
        return values.double().round(decimals=4).tolist()

    cosines = {"cosine_to_fed": table(grid.fed)}
    for name, maps in grid.references.items():
        cosines[f"cosine_to_{name}"] = table([maps] * len(remade))
    return cosines


# ---------------------------------------------------------------------------- output


def _with_targets(targets: list[torch.Tensor], samples: list[torch.Tensor]) -> torch.Tensor:
    """`[rows, columns, 3, H, W]`: the target columns (resized to the samples), then samples."""
    size = samples[0].shape[-2:]
    return torch.stack([resized(t, size) for t in targets] + samples, dim=1)


def _save_grid(path: Path, cells: torch.Tensor) -> str:
    """`cells` `[rows, columns, 3, H, W]` as one PNG, enlarged to be seen; its file name."""
    grid = make_grid(cells.flatten(0, 1), nrow=cells.shape[1], padding=2, pad_value=255)
    scale = -(-MIN_CELL // cells.shape[-2])
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(path)
    return path.name


def _write_manifest(
    out: Path,
    analysis: Analysis,
    kind: str,
    title: str,
    description: str,
    grids: list[dict],
    **record,
) -> None:
    """`manifest.json` as the report reads it (kind, title, description, grids), then the record."""
    settings = {k: analysis.spec[k] for k in ("scheduler", "steps", "guidance", "seed", "view")}
    manifest = {
        "kind": kind,
        "title": title,
        "description": " ".join(description.split()),
        "grids": grids,
        "model": str(analysis.model.folder),
        "features": analysis.model.features_path,
        "sampling": settings,
        **record,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
