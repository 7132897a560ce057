"""Store size of real feature arrays against raw fp32, and the lossless chain chosen per array.

Builds a store from the demo collection with the default config (``config/config.yaml``: its
backbones, layers, views, shard size, fp16; lossless; its ``targets`` left out unless
``--targets``), through the stage's Python API (plan, extract, finalize).

Size, per array: stored bytes (``nbytes_stored()``: chunks, shard indexes, metadata) over raw fp32
bytes (n_valid x per-sample elements x 4), with the store's default chain (planar). Goal: <= 0.45.

Lossless chain, per array (issue 11), on its first shard as stored (``[shard_size, views, ...]``,
chunked as the store chunks it): bytes zarr stores for it (chunks, crc32c, shard index) with each
of the four references, blosc zstd clevel 5 (zstd 9) or 9 (zstd 22) with byte- or bit-shuffle,
and with each of ``storage_specs.codecs.CANDIDATES`` (chain and zstd level); for each reader the
plan can choose for (zarr-python with numcodecs; with featinv-codecs too, which adds the sparse
chain), the one ``choose_lossless`` picks and its bytes over the best reference's (goal <= 1.02).
Speed, chosen chain against the old one (blosc zstd clevel 5 bit-shuffle): the chunk codecs (as
numcodecs objects, read from the arrays' metadata) encoding and decoding the shard's chunks, and
zarr writing and reading the shard in memory (with its per-chunk async overhead); alternating
over repeats in one process, each timing over ``--megabytes`` of the shard's data (passes of it,
at most 200); the median of per-repeat ratios old time / chosen time (goal >= 1.0 for encode).

Usage: ``.venv/bin/python benchmarks/compression.py [--repeats 5] [--megabytes 10]``
``[--config PATH] [--targets] [--json PATH]`` (another config's encoders; its targets too;
the measured sizes as JSON for ``benchmarks/scaling.py``)
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
import zarr
from numcodecs import Blosc, blosc, get_codec
from record import write_result
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.config import validate_config
from pipeline.demo import build_demo_images
from pipeline.extract import extract_shard
from pipeline.finalize import finalize_store
from pipeline.plan import plan_store
from storage_specs.codecs import (
    CANDIDATES,
    READERS,
    choose_lossless,
    chunk_pieces,
    lossless_compressors,
    memory_shard,
    stored_bytes,
)
from storage_specs.layout import array_chunks
from storage_specs.reader import FeatureStore

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
REFERENCES = {  # issue 11's four: blosc zstd clevel 5 (zstd 9) or 9 (zstd 22), byte or bit shuffle
    f"{name}{clevel}": [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle), Crc32cCodec()]
    for clevel in (5, 9)
    for name, shuffle in (("byte", "shuffle"), ("bit", "bitshuffle"))
}
OLD = "bit5"  # the chain of featinv-store/2 (storage_specs.codecs.spec2_compressors)
# zarr runs blosc in worker threads, where numcodecs does not use blosc's own threads: same here.
blosc.use_threads = False


def build_store(tmp: Path, config_path: Path, targets: bool) -> FeatureStore:
    config = yaml.safe_load(config_path.read_text())
    if not targets:
        config.pop("targets", None)  # feature arrays only (the VAE target needs a model folder)
    for entry in config["backbones"]:
        entry.pop("compression", None)  # lossless, whatever the config says
    build_demo_images(str(tmp / "demo"))
    config.update(source=str(tmp / "demo"), store=str(tmp / "store.zarr"), device="cpu")
    config = validate_config({**config, "work_dir": str(tmp / "work")})
    plan = plan_store(config)
    for group in plan["groups"]:
        for shard in range(plan["n_shards"]):
            extract_shard(config, group, shard, progress=False)
    finalize_store(config["store"], progress=False)
    return FeatureStore(config["store"])


def timed(fn: Callable[[], object], passes: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - start) / passes


def chunk_codecs(arr: zarr.Array) -> list:
    """The compressors of a sharded array's chunks as numcodecs codecs, read from its metadata:
    what zarr runs per chunk, without zarr's per-chunk async machinery around it."""
    inner = arr.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    codecs = []
    for codec in inner[1:]:  # after "bytes" (little endian, as numpy holds it here)
        name, config = codec["name"], codec.get("configuration", {})
        if name == "blosc":
            shuffle = ("noshuffle", "shuffle", "bitshuffle").index(config["shuffle"])
            codecs.append(Blosc(config["cname"], config["clevel"], shuffle, config["blocksize"],
                                typesize=config["typesize"]))  # fmt: skip
        else:  # numcodecs.shuffle, zstd, crc32c
            codecs.append(get_codec({**config, "id": name.removeprefix("numcodecs.")}))
    return codecs


def encode(codecs: list, chunk: np.ndarray) -> bytes:
    for codec in codecs:
        chunk = codec.encode(chunk)
    return chunk


def decode(codecs: list, data: bytes) -> bytes:
    for codec in reversed(codecs):
        data = codec.decode(data)
    return data


def speedups(
    data: np.ndarray, chunking: tuple[int, ...], chosen: list, repeats: int, megabytes: float
) -> dict[str, float]:
    """Median over repeats of old / chosen time: the chunk codecs encoding and decoding the
    shard's stored chunks, zarr writing and reading the shard; each timing over ``megabytes``."""
    passes = min(200, math.ceil(megabytes * 1e6 / data.nbytes))  # small shards: more passes
    arrays = {name: memory_shard(data, chain, chunking)[0]
              for name, chain in (("old", REFERENCES[OLD]), ("new", chosen))}  # fmt: skip
    pieces = chunk_pieces(data, chunking)
    chunks = [piece for piece in pieces if piece.any()]  # zarr stores no chunk of fill values
    codecs = {name: chunk_codecs(arr) for name, arr in arrays.items()}
    encoded = {name: [encode(c, chunk) for chunk in chunks] for name, c in codecs.items()}
    stored = stored_bytes(data, chosen, chunking)  # chunks, then the index: 16 bytes a chunk, crc
    assert sum(map(len, encoded["new"])) + 16 * len(pieces) + 4 == stored, "not zarr's chain"
    ops = {
        "encode": lambda name: [encode(codecs[name], chunk) for chunk in chunks],
        "decode": lambda name: [decode(codecs[name], buf) for buf in encoded[name]],
        "zarr_write": lambda name: arrays[name].__setitem__(slice(None), data),
        "zarr_read": lambda name: arrays[name][:],
    }
    ratios: dict[str, list[float]] = {op: [] for op in ops}
    for rep in range(repeats):
        for op, fn in ops.items():
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            times = {name: timed(lambda fn=fn, name=name: fn(name), passes) for name in order}
            ratios[op].append(times["old"] / times["new"])
    return {op: statistics.median(r) for op, r in ratios.items()}


def lossless_choice(
    data: np.ndarray, chunking: tuple[int, ...], repeats: int, megabytes: float
) -> dict:
    """Issue 11's measurement of one array's first shard (see the module docstring), for each
    reader the plan can choose for."""
    sizes = {name: stored_bytes(data, chain, chunking) for name, chain in REFERENCES.items()}
    chains = {f"{shuffle}{level}": (shuffle, level) for shuffle, level in CANDIDATES}
    sizes.update(
        {name: stored_bytes(data, lossless_compressors(*c), chunking) for name, c in chains.items()}
    )
    best = min(sizes[name] for name in REFERENCES)
    measured: dict[str, dict] = {}
    choices = {}
    for reader in READERS:
        spec = choose_lossless(data, chunking, reader)
        chosen = f"{spec['shuffle']}{spec['level']}"
        if chosen not in measured:
            compressors = lossless_compressors(*chains[chosen])
            measured[chosen] = speedups(data, chunking, compressors, repeats, megabytes)
        choices[reader] = {
            "chosen": chosen,
            "chosen_over_best_reference": sizes[chosen] / best,
            "speedup_over_old": measured[chosen],
        }
    return {"bytes": sizes, "raw_fp32_bytes": data.size * 4, "by_reader": choices}


def size_record(store: FeatureStore, path: str, arr: dict, metadata: int) -> dict:
    """What `benchmarks/scaling.py` scales one array's size from: the bytes it stored here, its
    per-view shape and dtype, and whose values they were (real or random weights, which VAE)."""
    attrs = store.root[path].attrs
    return {
        "per_view_shape": arr["shape"][2:],
        "dtype": arr["dtype"],
        "pretrained": arr["pretrained"],
        "source": attrs.get("weights", attrs.get("vae", {})).get("source"),
        "stored_bytes": arr["stored_bytes"],
        "metadata_bytes": metadata,
        "raw_fp32_bytes": arr["raw_fp32_bytes"],
    }


def print_choices(choices: dict[str, dict], repeats: int) -> None:
    """The sizes table, then per reader the chosen chains and how many arrays meet the goals."""
    names = list(next(iter(choices.values()))["bytes"])
    print("\nlossless chain per array, its first shard: stored / raw fp32 per chain")
    print(f"{'array':<44} " + " ".join(f"{n:>7}" for n in names))
    for path, c in choices.items():
        print(
            f"{path:<44} " + " ".join(f"{c['bytes'][n] / c['raw_fp32_bytes']:>7.3f}" for n in names)
        )
    for reader in READERS:
        print(
            f"\nchosen for readers with {reader}: its bytes / the best reference's; old ({OLD}) / "
            f"chosen time, median of {repeats} repeats: chunk codecs encoding, decoding, zarr "
            "writing, reading the shard"
        )
        print(f"{'array':<44}  chosen  /best encode decode  write   read")
        for path, c in choices.items():
            r = c["by_reader"][reader]
            speed = " ".join(f"{v:>5.2f}x" for v in r["speedup_over_old"].values())
            print(f"{path:<44} {r['chosen']:>7} {r['chosen_over_best_reference']:>5.3f} {speed}")
        picked = [c["by_reader"][reader] for c in choices.values()]
        met = sum(r["chosen_over_best_reference"] <= 1.02 for r in picked)
        fast = sum(r["speedup_over_old"]["encode"] >= 1.0 for r in picked)
        print(f"within 2% of the best reference: {met} of {len(picked)} arrays; "
              f"encodes at least as fast as the old chain: {fast} of {len(picked)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--megabytes", type=float, default=10, help="data (fp16) per timing")
    parser.add_argument("--config", type=Path, default=CONFIG, help="whose encoders to store")
    parser.add_argument(
        "--targets", action="store_true",
        help="also the config's targets (a VAE needs its folder, e.g. data/demo_vae of make demo)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the sizes per array to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featinv-bench-") as tmp_dir:
        store = build_store(Path(tmp_dir), args.config, args.targets)
        info = store.describe()
        views = store.root.attrs["views"]["count"]
        print(f"{store.n_samples} samples ({info['n_valid']} valid) x {views} views;")
        print(f"  chunk = one view of one sample, shard = {store.shard_size} samples")
        print(f"\n{'array':<44} {'per sample':>10} {'stored/fp32':>11} {'data only':>9}  goal")
        sizes, choices = {}, {}
        for path, arr in info["arrays"].items():
            metadata = (Path(store.url) / path / "zarr.json").stat().st_size
            ratio = arr["stored_bytes"] / arr["raw_fp32_bytes"]
            data_only = (arr["stored_bytes"] - metadata) / arr["raw_fp32_bytes"]
            shape = "x".join(map(str, arr["shape"][1:]))
            flag = "<= 0.45 ok" if ratio <= 0.45 else "ABOVE 0.45"
            print(f"{path:<44} {shape:>10} {ratio:>11.3f} {data_only:>9.3f}  {flag}")
            sizes[path] = size_record(store, path, arr, metadata)
            shard = store.read_shard(path, 0)
            chunking = array_chunks(path.split("/")[0], shard.shape)
            choices[path] = lossless_choice(shard, chunking, args.repeats, args.megabytes)
        print_choices(choices, args.repeats)
        results = {"config": str(args.config), "n_valid": info["n_valid"], "views": views,
                   "shard_size": store.shard_size, "arrays": sizes,
                   "lossless_choice": choices}  # fmt: skip
        write_result(args.json, "compression", results)


if __name__ == "__main__":
    main()
