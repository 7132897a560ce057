"""Input variants for the robustness analysis: the images a classifier finds hard, made
deterministically from a seed.

A variant is a function of one clean image, the evaluation view of a source image rendered at the
backbone's input size (what the backbone sees).  Common corruptions (ImageNet-C: noise, blur,
weather, digital) come from `imagecorruptions`; adversarial perturbations (FGSM, PGD, untargeted or
targeted, L-inf ball of radius eps in [0, 1] pixel units) from `foolbox`, against the whole
classifier with its recorded preprocessing.  (`torchattacks` pins requests~=2.25, which the test
extra's moto cannot install beside, so foolbox it is.)  Severity 0 and eps 0 are the clean image,
byte for byte.  Out-of-distribution inputs are the first images of any second collection the
user names (`robustness.ood`), rendered at the same view; each is its own clean image.
`write_variants` writes them all as an image collection, `<variant>/<source key>.png` and
`ood-<name>/<key>.png`, so the extraction stage can store their features: each variant and each
second collection is a class of that collection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.backbones import Backbone
from pipeline.decode import ImageLimits, SkipSample, decode_image
from pipeline.sources import list_source, read_items
from pipeline.views import eval_box, render_views
from storage_specs.provenance import redact_uri, redact_url

CLEAN = "clean"
OOD = "ood-"  # the class folder of a second collection: ood-<name>
ATTACKS = ("fgsm", "pgd")
LIBRARIES = ("imagecorruptions-imaug", "foolbox", "numpy", "torch")


@dataclass(frozen=True)
class Variant:
    """One way of changing an image: a corruption at a severity, or an attack at an eps."""

    kind: str  # "clean", a corruption name, or an attack
    severity: int = 0  # corruptions: 1..5
    eps: float = 0.0  # attacks: L-inf radius in [0, 1] pixel units
    targeted: bool = False

    @property
    def name(self) -> str:
        """A store-safe name (a class folder of the variants collection)."""
        if self.kind in ATTACKS:
            goal = "targeted" if self.targeted else "untargeted"
            return f"{self.kind}-{goal}-eps{self.eps:g}".replace(".", "p")
        return self.kind if self.kind == CLEAN else f"{self.kind}-{self.severity}"


def variants_of(spec: dict) -> list[Variant]:
    """The `robustness:` section's variants, clean first; severity 0 and eps 0 are the clean
    image itself, so they are not listed again."""
    out = [Variant(CLEAN)]
    out += [Variant(c, severity=s) for c in spec["corruptions"] for s in spec["severities"] if s]
    for attack in spec["attacks"]:
        for targeted in spec["targeted"]:
            out += [Variant(attack, eps=e, targeted=targeted) for e in spec["epsilons"] if e]
    return out


def clean_view(backbone: Backbone, data: bytes, crop_pct: float, limits: ImageLimits) -> np.ndarray:
    """uint8 `[H, W, 3]`: the evaluation view of an encoded image at the backbone's input size."""
    image = decode_image(data, limits)
    box = eval_box(image.height, image.width, backbone.input_hw, crop_pct, "center")
    pixels = render_views(image, np.array([[*box, 0]], np.float32), backbone.input_hw,
                          backbone.data_config["interpolation"])  # fmt: skip
    return pixels[0].permute(1, 2, 0).numpy()


def corrupted(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (uint8 `[H, W, 3]`, at least 32 px) corrupted by `imagecorruptions`; severity 0 is
    the image itself.  Deterministic: the corruptions draw from numpy's global generator (seeded
    here and restored after) or take the seed."""
    from imagecorruptions import corrupt, get_corruption_names

    if name not in get_corruption_names("all"):
        raise ValueError(f"unknown corruption '{name}' ({', '.join(get_corruption_names('all'))})")
    if severity == 0:
        return image.copy()
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        seeded = {"seed": seed} if name in ("impulse_noise", "glass_blur") else {}
        return corrupt(image, severity=severity, corruption_name=name, **seeded)
    finally:
        np.random.set_state(state)


def attacked(
    backbone: Backbone, images: np.ndarray, variant: Variant, target: int, steps: int, seed: int
) -> np.ndarray:
    """uint8 `[N, H, W, 3]` adversarial images of `images` (at the backbone's input size) by
    foolbox, within `variant.eps` of them after rounding to 8 bits (eps 0: the images).
    Untargeted attacks move away from the clean top-1, targeted ones towards class `target`."""
    import foolbox as fb

    if variant.eps == 0:
        return images.copy()
    cfg = backbone.data_config
    model = fb.PyTorchModel(
        backbone.model,
        bounds=(0, 1),
        preprocessing={"mean": list(cfg["mean"]), "std": list(cfg["std"]), "axis": -3},
        device=next(backbone.model.parameters()).device,
    )
    clean = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(model.device)
    if variant.targeted:
        criterion = fb.criteria.TargetedMisclassification(torch.full((len(clean),), target))
    else:
        criterion = fb.criteria.Misclassification(model(clean).argmax(1))
    if variant.kind == "fgsm":  # foolbox's FGSM, which its own FGSM class runs untargeted only
        attack = fb.attacks.LinfPGD(steps=1, rel_stepsize=1.0, random_start=False)
    else:
        attack = fb.attacks.LinfPGD(steps=steps, rel_stepsize=2.5 / steps)
    torch.manual_seed(seed)  # PGD's random start
    _, adversarial, _ = attack(model, clean, criterion, epsilons=variant.eps)
    radius = np.floor(variant.eps * 255 + 1e-6)
    out = (adversarial * 255).round().cpu().permute(0, 2, 3, 1).numpy()
    return np.clip(out, images - radius, images + radius).clip(0, 255).astype(np.uint8)


def make_variants(
    backbone: Backbone, clean: np.ndarray, variants: list[Variant], spec: dict
) -> dict[str, np.ndarray]:
    """Every variant of the clean images `[N, H, W, 3]`, by name; one seed per (variant, image)
    position, so a variant does not depend on which others are made."""
    out = {}
    for variant in variants:
        seed = spec["seed"]
        if variant.kind == CLEAN:
            out[variant.name] = clean
        elif variant.kind in ATTACKS:
            steps, target = spec["pgd_steps"], spec["target_class"]
            out[variant.name] = attacked(backbone, clean, variant, target, steps, seed)
        else:
            out[variant.name] = np.stack([
                corrupted(image, variant.kind, variant.severity, seed + i)
                for i, image in enumerate(clean)
            ])  # fmt: skip
    return out


def ood_views(
    backbone: Backbone, source: str, limit: int, crop_pct: float, limits: ImageLimits
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """The first `limit` usable images of a second collection at the clean view: their keys,
    the images `[N, H, W, 3]`, and the skipped ones' reasons by key (corrupt, truncated, ...)."""
    items = list_source(source).items
    keys, images, skipped = [], [], {}
    for pos, data in read_items([item.uri for item in items], limits.max_bytes):
        key = items[pos].key
        try:
            if isinstance(data, SkipSample):
                raise data
            if isinstance(data, Exception):
                raise SkipSample(f"unreadable ({type(data).__name__})")
            images.append(clean_view(backbone, data, crop_pct, limits))
            keys.append(key)
        except SkipSample as skip:
            skipped[key] = str(skip)
        if len(keys) == limit:
            break
    if not keys:
        raise ValueError(f"config robustness.ood: no usable image in '{redact_url(source)}'")
    return keys, np.stack(images), skipped


def _save(folder: Path, keys: list[str], images: np.ndarray) -> None:
    for key, image in zip(keys, images, strict=True):
        path = folder / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def write_variants(
    folder: Path,
    backbone: Backbone,
    keys: list[str],
    sources: list[str],
    spec: dict,
    crop_pct: float,
    limits: ImageLimits,
) -> dict:
    """The variants of the source images as `<folder>/<variant>/<key>.png`, the second
    collections' images as `<folder>/ood-<name>/<key>.png`, and a manifest.json: which variant
    each folder is (corruption and severity, attack, eps, target), the seed, the library
    versions, the source key and URI of every image, and each second collection's source, keys
    and skipped images.  Returns the manifest."""
    clean = []
    for pos, data in read_items(sources, limits.max_bytes):
        if isinstance(data, Exception):
            raise ValueError(f"source image '{sources[pos]}' unreadable ({type(data).__name__})")
        clean.append(clean_view(backbone, data, crop_pct, limits))
    variants = variants_of(spec)
    made = make_variants(backbone, np.stack(clean), variants, spec)
    for variant in variants:
        _save(folder / variant.name, keys, made[variant.name])
    ood = {}
    for entry in spec["ood"]:
        ood_keys, images, skipped = ood_views(
            backbone, entry["source"], entry["limit"], crop_pct, limits
        )
        _save(folder / f"{OOD}{entry['name']}", ood_keys, images)
        ood[entry["name"]] = {"source": redact_url(entry["source"]), "keys": ood_keys,
                              "skipped": skipped}  # fmt: skip
    manifest = {
        "backbone": backbone.name,
        "input_size": list(backbone.input_hw),
        "seed": spec["seed"],
        "variants": {v.name: asdict(v) for v in variants},
        "settings": {k: spec[k] for k in ("pgd_steps", "target_class")},
        "libraries": {name: version(name) for name in LIBRARIES},
        "keys": keys,
        "sources": [redact_uri(uri) for uri in sources],
        "ood": ood,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
