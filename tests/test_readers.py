"""Reading a store: plain zarr/xarray/dask by the spec, our xarray and torch readers, webdataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_store, cli, make_config

BACKBONES = [
    {"name": "resnet18", "layers": ["layer3", "layer4"], "preprocessing": {"input_size": 64}}
]
TARGETS = [{"name": "pixels", "kind": "pixels", "size": 16}]


@pytest.fixture(scope="module")
def store_url(small_dir, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("readers")
    config = make_config(tmp, small_dir, backbones=BACKBONES, targets=TARGETS, views={"count": 3})
    return build_store(config)


def test_plain_zarr_xarray_dask_by_the_spec(store_url):
    """Only zarr, xarray and dask, following SPEC.md: no featinv module is imported here."""
    code = f"""
import dask.array as da, numpy as np, xarray as xr, zarr
root = zarr.open_group({store_url!r}, mode="r")
assert root.attrs["featinv_spec"] == "featinv-store/3" and root.attrs["complete"]
valid = root["samples/valid"][:]
arr = root["features/resnet18/layer4"]
x = xr.DataArray(da.from_zarr(arr, chunks=arr.shards), dims=arr.metadata.dimension_names)
x = x.isel(sample=np.flatnonzero(valid))
mean = x.astype("float64").mean(dim=("sample", "view", "layer4.y", "layer4.x")).compute().values
assert x.dims == ("sample", "view", "layer4.channel", "layer4.y", "layer4.x")
assert x.shape == (8, 3, 512, 2, 2)
np.testing.assert_allclose(mean, arr.attrs["channel_stats"]["mean"], rtol=1e-5)
boxes = root["samples/view_box"][:]
assert boxes.shape == (9, 3, 4) and (boxes[valid, :, 2] > boxes[valid, :, 0]).all()
print("ok", root["samples/key"][:][valid][0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "featinv" not in out.stderr
    assert out.stdout.split() == ["ok", "animals/chelsea"]


def test_open_dataset_is_lazy_and_equal(store_url):
    import zarr

    from storage_specs.reader import open_dataset

    ds = open_dataset(store_url)
    layer3 = ds["features/resnet18/layer3"]
    assert layer3.chunks is not None  # dask-backed
    assert layer3.dims[2] == "layer3.channel"  # 256 (layer4: 512 channels)
    assert ds["pixels/pixels/rgb"].dims == ("sample", "view", "color", "pixel_y", "pixel_x")
    valid = ds.isel(sample=ds.valid.values)
    root = zarr.open_group(store_url, mode="r")
    np.testing.assert_array_equal(
        valid["features/resnet18/layer4"].values, root["features/resnet18/layer4"][:][ds.valid]
    )


def test_pair_dataset_with_workers(store_url):
    import zarr

    from storage_specs.datasets import PairDataset

    ds = PairDataset(
        store_url, {"features": "features/resnet18/layer4", "target": "pixels/pixels/rgb"}
    )
    assert len(ds) == 8 * 3
    whole = ds[list(range(len(ds)))]  # decoded in this process's threads, before the fork
    loader = torch.utils.data.DataLoader(
        ds, batch_size=5, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0),
        collate_fn=lambda items: items,
    )  # fmt: skip
    seen = []
    root = zarr.open_group(store_url, mode="r")
    paths = ("features/resnet18/layer4", "pixels/pixels/rgb", "samples/key")
    features, pixels, keys = (root[p][:] for p in paths)
    for batch in loader:
        for item in batch:
            row, view = item["row"], item["view"]
            assert np.array_equal(item["features"].numpy(), features[row, view])
            assert np.array_equal(item["target"].numpy(), pixels[row, view])
            assert item["key"] == keys[row]
            seen.append((row, view))
    assert sorted(seen) == sorted({(r, v) for r, v in seen}) and len(seen) == 24
    assert np.array_equal(whole["features"].numpy(), features[whole["row"], whole["view"]])
    with pytest.raises(IndexError):
        ds[24]


def test_chunk_reader_matches_zarr_and_checks_crc(store_url, tmp_path):
    import zarr

    from storage_specs.chunks import ChunkReader

    arr = zarr.open_group(store_url, mode="r")["features/resnet18/layer3"]
    items = [(7, 2), (0, 0), (3, 1), (3, 1), (8, 0), (5, 2)]  # row 3 is the skipped one
    np.testing.assert_array_equal(
        ChunkReader(arr).read(items), np.stack([arr[r, v] for r, v in items])
    )

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_url, copy)
    shard = copy / "features/resnet18/layer3/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10  # inside the first chunk of shard 0
    shard.write_bytes(bytes(data))
    broken = zarr.open_group(str(copy), mode="r")["features/resnet18/layer3"]
    with pytest.raises(OSError, match="checksum mismatch"):
        ChunkReader(broken).read([(0, 0)])


def _copy_with_codecs(src, path: Path, codecs: dict):
    """`src`'s values rewritten with other codecs (a store's layout: a sample-view per chunk, 4
    rows per shard, row 3 never written), reopened from its metadata."""
    import zarr

    arr = zarr.create_group(str(path)).create_array(
        "features/copy", shape=src.shape, chunks=(1, 1, *src.shape[2:]),
        shards=(4, *src.shape[1:]), dtype=src.dtype, fill_value=0, **codecs,
    )  # fmt: skip
    arr[:3], arr[4:] = src[:3], src[4:]
    return zarr.open_group(str(path), mode="r")["features/copy"]


def _chains() -> dict[str, tuple[dict, bool]]:
    """Codec chains a store may hold, and whether ChunkReader decodes them itself."""
    from zarr.codecs import ZstdCodec

    from storage_specs.codecs import compression_codecs, spec2_compressors

    def spec(**compression) -> dict:
        return {k: v for k, v in compression_codecs(compression, "float16").items() if k != "attrs"}

    return {
        "lossless": (spec(mode="lossless"), True),
        "lossless-none": (spec(mode="lossless", shuffle="none"), True),
        "spec2-blosc-bitshuffle": ({"compressors": spec2_compressors()}, True),
        "zstd-without-crc32c": ({"compressors": [ZstdCodec(level=3)]}, True),
        "bitround": (spec(mode="bitround", keepbits=6), True),
        "quantize": (spec(mode="quantize", rel_l2=0.01), False),  # zarr decodes it
    }


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")
@pytest.mark.parametrize("chain", list(_chains()))
def test_chunk_reader_decodes_each_chain_like_zarr(store_url, tmp_path, chain):
    """Batches in any order, with repeats and never-written chunks, across shards and in the
    decoding threads, equal zarr's own reads of the same chunks."""
    import zarr

    from storage_specs.chunks import ChunkReader

    codecs, fast = _chains()[chain]
    src = zarr.open_group(store_url, mode="r")["features/resnet18/layer3"][:]
    arr = _copy_with_codecs(src, tmp_path / "copy.zarr", codecs)
    pairs = [(row, view) for row in range(9) for view in range(3)]
    items = [pairs[i] for i in np.random.default_rng(0).permutation(27)] + pairs[9:14]
    reader = ChunkReader(arr)
    got = reader.read(items)
    assert reader.fast == fast
    np.testing.assert_array_equal(got, np.stack([arr[r, v] for r, v in items]))
    assert not got[[i for i, (r, _) in enumerate(items) if r == 3]].any()  # the fill value
    assert reader.read([]).shape == (0, *src.shape[2:])
    with pytest.raises(IndexError, match=r"row 9, view 0"):
        reader.read([(0, 0), (9, 0)])


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")
def test_chunk_reader_fails_on_a_flipped_bit_in_any_thread(store_url, tmp_path):
    """A corrupt chunk read last in a batch (decoded by a pool thread) or a corrupt shard index
    fails the read with a line naming it."""
    import zarr

    from storage_specs.chunks import ChunkReader

    src = zarr.open_group(store_url, mode="r")["features/resnet18/layer3"][:]
    arr = _copy_with_codecs(src, tmp_path / "copy.zarr", _chains()["lossless"][0])
    shard = tmp_path / "copy.zarr/features/copy/c/1/0/0/0/0"
    clean = shard.read_bytes()
    index = ChunkReader(arr)
    index.read([(4, 0)])
    offset, nbytes = (int(x) for x in index.table[1, 1, 2])  # row 5, view 2
    items = [(row, view) for row in range(9) for view in range(3) if (row, view) != (5, 2)]
    for flip, error in ((offset + nbytes // 2, "row 5 view 2: chunk checksum mismatch"),
                        (len(clean) - 10, "shard 1: missing or corrupt shard index")):  # fmt: skip
        data = bytearray(clean)
        data[flip] ^= 0x01
        shard.write_bytes(bytes(data))
        with pytest.raises(OSError, match=error):
            ChunkReader(arr).read([*items, (5, 2)])
    shard.write_bytes(clean)
    np.testing.assert_array_equal(
        ChunkReader(arr).read(items), np.stack([src[r, v] for r, v in items])
    )


def test_export_webdataset_reads_back_with_plain_webdataset(store_url, tmp_path):
    import webdataset as wds
    import zarr

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export-webdataset", store_url,
         str(tmp_path / "wds"),
         "--backbone", "resnet18", "--layer", "layer4", "--target", "pixels/pixels/rgb"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    root = zarr.open_group(store_url, mode="r")
    features, pixels = root["features/resnet18/layer4"][:], root["pixels/pixels/rgb"][:]
    samples = list(wds.WebDataset(str(tmp_path / "wds/00000.tar"), shardshuffle=False).decode())
    assert len(samples) == 8 * 3
    for sample in samples:
        meta = sample["json"]
        assert sample["__key__"] == f"{meta['key']}/v{meta['view']}"
        assert np.array_equal(sample["features.npy"], features[meta["row"], meta["view"]])
        assert np.array_equal(sample["target.npy"], pixels[meta["row"], meta["view"]])
    assert not list(tmp_path.glob("wds/*.pyd")) and not list(tmp_path.glob("wds/*.pkl"))


SPEC2 = Path(__file__).parent / "fixtures/spec2.zarr"  # made by featinv at commit 5bb44b9


@pytest.mark.parametrize("where", ["local", "s3"])
def test_spec2_store_reads_and_migrates_to_spec3(where, tmp_path, request):
    """A store written under featinv-store/2 is read as it is; `featinv migrate` upgrades its
    metadata in place (no chunk changes) so plain `xarray.open_datatree` opens it."""
    import fsspec
    import xarray as xr
    import zarr

    from storage_specs import open_store, validate_store

    if where == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/store.zarr"
        fs = request.getfixturevalue("s3").filesystem()
        fs.put(f"{SPEC2}/", url, recursive=True)
    else:
        url = str(shutil.copytree(SPEC2, tmp_path / "store.zarr"))
        fs = fsspec.filesystem("file")
    objects = {p: fs.cat_file(p) for p in fs.find(url) if not p.endswith("zarr.json")}
    before = open_store(url).read_rows("features/resnet18/layer3", [2, 0])
    assert open_store(url).spec == "featinv-store/2"
    assert "featinv migrate" in validate_store(url)[0]
    with pytest.raises(ValueError, match="conflicting sizes for dimension 'channel'"):
        xr.open_datatree(url, engine="zarr")

    for _ in range(2):  # the second run has nothing left to do
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "migrate", url],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
    assert validate_store(url) == []
    assert {p: fs.cat_file(p) for p in objects} == objects
    np.testing.assert_array_equal(
        open_store(url).read_rows("features/resnet18/layer3", [2, 0]), before
    )
    tree = xr.open_datatree(url, engine="zarr", chunks={})
    resnet = tree["features/resnet18"].to_dataset()
    assert resnet["layer3"].dims[2] == "layer3.channel" and resnet.sizes["layer4.channel"] == 512
    assert list(resnet["sample"].values) == ["animals/chelsea", "food/coffee", "space/rocket"]
    np.testing.assert_array_equal(resnet["layer3"].values[[2, 0]], before)
    assert zarr.open_group(url, mode="r").metadata.consolidated_metadata is not None

    # A run stopped between the version's flip and the snapshot: the next run writes the snapshot.
    meta = json.loads(fs.cat_file(f"{url}/zarr.json"))
    del meta["consolidated_metadata"]
    fs.pipe(f"{url}/zarr.json", json.dumps(meta).encode())
    assert cli("migrate", url).returncode == 0
    assert zarr.open_group(url, mode="r").metadata.consolidated_metadata is not None
    missing = cli("migrate", str(tmp_path / "nope.zarr"))
    assert (missing.returncode, missing.stderr) == (
        2,
        f"featinv: error: no featinv store at '{tmp_path / 'nope.zarr'}'\n",
    )
