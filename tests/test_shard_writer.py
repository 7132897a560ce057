"""The extraction job's shard objects are zarr's own bytes, whichever way they are built.

Real efficientnet_lite0 maps of the demo photos, two views per sample, rows of skipped samples
left out, batches with gaps, a partial last shard: the writer's shard object must equal, byte for
byte, what zarr stores when the same rows are written into an array with the same metadata.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.demo import demo_feature_maps
from pipeline.shard_writer import EncodedShard, StagedShard, array_shard, to_storage
from storage_specs.codecs import compression_codecs, lossless_compressors, spec2_compressors
from storage_specs.layout import shard_key

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")
SHARD = 8
SKIPPED = {3, 9}  # rows no sample filled: fill values, no chunk stored


@pytest.fixture(scope="module")
def rows(demo_dir) -> dict[str, np.ndarray]:
    """fp16 `[sample, view, C, y, x]` rows (the second view flipped) of 12 samples."""
    maps = demo_feature_maps(str(demo_dir), ("blocks.3", "bn2"))
    out = {}
    for layer, x in maps.items():
        x = np.stack([x, x[..., ::-1]], axis=1)[:12].astype(np.float16)
        x[sorted(SKIPPED)] = 0
        out[layer] = x
    return out


def make(data: np.ndarray, compressors: list | None = None, serializer="auto", chunks=None):
    """An in-memory array with the feature layout (a sample-view per chunk unless `chunks` says
    otherwise, SHARD samples per shard)."""
    return zarr.create_array(
        zarr.storage.MemoryStore(), name="features/m/layer", shape=data.shape,
        chunks=chunks or (1, 1, *data.shape[2:]), shards=(SHARD, *data.shape[1:]),
        dtype=data.dtype, fill_value=0, compressors=compressors or "auto", serializer=serializer,
    )  # fmt: skip


def zarr_bytes(arr: zarr.Array, data: np.ndarray, shard: int) -> bytes:
    arr[:] = data
    return sync(
        arr.store_path.store.get(shard_key(arr, shard), default_buffer_prototype())
    ).to_bytes()


def built(arr: zarr.Array, data: np.ndarray, shard: int) -> bytes:
    """The writer's shard: its rows in batches of 3, the skipped rows never handed over."""
    builder = array_shard(arr, shard)
    rows = data[shard * SHARD : (shard + 1) * SHARD]
    start = shard * SHARD
    given = [i for i in range(len(rows)) if start + i not in SKIPPED]
    for batch in (given[i : i + 3] for i in range(0, len(given), 3)):
        builder.add(rows[batch[0] : batch[-1] + 1], batch[0])
    return builder.stored()


CHAINS = {
    "planar1": lossless_compressors("planar", 1),
    "planar5": lossless_compressors("planar", 5),
    "none9": lossless_compressors("none", 9),
    "sparse1": lossless_compressors("sparse", 1),
    "spec2-blosc-bitshuffle": spec2_compressors(),
}


@pytest.mark.parametrize("layer", ["blocks.3", "bn2"])
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("shard", [0, 1])  # 1: the last shard, 4 of its 8 rows in the array
def test_encoded_shards_are_zarrs_bytes(rows, layer, chain, shard):
    data = rows[layer]
    arr = make(data, CHAINS[chain])
    assert isinstance(array_shard(arr, shard), EncodedShard)
    assert built(arr, data, shard) == zarr_bytes(make(data, CHAINS[chain]), data, shard)


@pytest.mark.parametrize("shuffle", ["none", "sparse"])
def test_uint8_pixels_are_zarrs_bytes(shuffle):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 2, 3, 16, 16), dtype=np.uint8)
    pixels[sorted(SKIPPED)] = 0
    chain = lossless_compressors(shuffle)
    assert built(make(pixels, chain), pixels, 1) == zarr_bytes(make(pixels, chain), pixels, 1)


def test_other_layouts_and_chains_are_left_to_zarr(rows):
    data = rows["blocks.3"]
    lossy = compression_codecs({"mode": "quantize", "rel_l2": 0.01}, "float16")
    whole = dict(compressors=lossless_compressors("planar", 1), chunks=(SHARD, *data.shape[1:]))
    for kwargs in [{"compressors": lossy["compressors"], "serializer": lossy["serializer"]}, whole]:
        arr = make(data, **kwargs)
        assert isinstance(array_shard(arr, 0), StagedShard)
        assert built(arr, data, 0) == zarr_bytes(make(data, **kwargs), data, 0)


@pytest.mark.parametrize("chunks", ["sample-view", "whole shard"])
def test_batches_added_by_several_threads_at_once_give_zarrs_bytes(rows, chunks):
    """Beside a GPU a job's writer threads add a shard's batches at once, in any order; batches
    that share a chunk (one per shard) must not lose each other's rows."""
    data = rows["blocks.3"]
    kwargs = {"compressors": CHAINS["planar1"]}
    if chunks == "whole shard":
        kwargs["chunks"] = (SHARD, *data.shape[1:])
    builder = array_shard(make(data, **kwargs), 0)
    given = [i for i in range(SHARD) if i not in SKIPPED][::-1]  # one row a batch, last first
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: builder.add(data[i : i + 1], i), given))
    assert builder.stored() == zarr_bytes(make(data, **kwargs), data, 0)


def test_a_shard_of_skipped_rows_only_stores_nothing(rows):
    empty = np.zeros_like(rows["bn2"])
    builder = array_shard(make(empty, CHAINS["planar1"]), 0)
    builder.add(empty[:SHARD], 0)
    assert builder.stored() is None


def test_fp16_rounding_is_numpys():
    values = torch.from_numpy(
        np.random.default_rng(1).integers(0, 2**32, 2**20, dtype=np.uint32).view(np.float32)
    )
    values = values[values.abs() < 6e4]  # finite at fp16 (subnormals and zeros included)
    expected = values.numpy().astype(np.float16)
    assert np.array_equal(to_storage(values, "fp16").view(np.uint16), expected.view(np.uint16))
