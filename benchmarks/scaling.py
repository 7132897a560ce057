"""Write docs/scaling.md: an ImageNet-1k-sized store and its training reads, computed on paper.

No number of the document is typed in.  Sizes come from the compression ratios that
`compression.py` measured on the scenario's own arrays (benchmarks/scaling/config.yaml),
extraction hours from `extraction_throughput.py`'s images/s, reader rates and requests per batch
from `rank_read_throughput.py` and `read_throughput.py` (all written with `--json` into
benchmarks/results/); the rest follows from the parameters and the store layout (SPEC.md,
storage_specs/layout.py and chunks.py): one object per shard per array, one chunk per (sample,
view), the reader's one request per run of nearby chunks of a shard.  Rerun a benchmark, then this.

    .venv/bin/python benchmarks/scaling.py [--images 1281167] [--views 4] [--ranks 8] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import load_schema
from storage_specs.layout import SAMPLE_FIELDS, VIEW_FIELDS, n_shards

ROOT = Path(__file__).resolve().parents[1]
S3_WRITES, S3_READS = 3500, 5500  # AWS's documented requests/s per partitioned prefix
S3FS_PART = 50 * 2**20  # s3fs puts an object in one request below two parts, else multipart
LATENT_CHANNELS, VAE_STRIDE = 4, 8  # Stable Diffusion's AutoencoderKL
INDEX_BYTES = 16  # per chunk in a shard index (offset, length), plus one crc32c per shard
GPU_MISSING = "missing: no GPU was lent to the session that measured this"


@dataclass(frozen=True)
class Array:
    """One per-sample array of the scenario: its per-view shape and its measured compression."""

    path: str
    shape: tuple[int, ...]
    ratio: float  # stored / raw fp32 bytes of chunks and shard indexes (metadata left out)
    source: str  # which measured array the ratio comes from, and whose values those were

    @property
    def encoder(self) -> str:
        return self.path.split("/")[1]

    @property
    def raw_view(self) -> int:
        return math.prod(self.shape) * 2  # fp16

    @property
    def stored_view(self) -> float:
        return math.prod(self.shape) * 4 * self.ratio

    def object_bytes(self, p: argparse.Namespace) -> float:
        """One shard object: every view of `shard_size` samples."""
        return self.stored_view * p.views * p.shard_size


def size(n: float) -> str:
    """Bytes in decimal units, three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:,.3g} PB"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def natural(path: str) -> list:
    """Sort key that puts blocks.2 before blocks.11."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def load(path: Path) -> dict:
    """One benchmark's `--json` output; stops with the file's name when it was never made."""
    if not path.exists():
        sys.exit(f"{path} is missing: run the benchmark that writes it (benchmarks/RESULTS.md)")
    return json.loads(path.read_text())


def data_ratio(m: dict) -> float:
    """Stored / raw fp32 bytes without the array's metadata, which does not grow with samples."""
    return (m["stored_bytes"] - m["metadata_bytes"]) / m["raw_fp32_bytes"]


def scenario_arrays(compression: dict, backbones: list[str], latent_size: int) -> list[Array]:
    """The scenario's arrays with measured ratios: the backbones' own arrays as `compression.py`
    stored them; the latents of Stable Diffusion's VAE borrow the ratio of the measured VAE's."""
    measured = compression["results"]["arrays"]
    arrays = []
    for path in sorted(measured, key=natural):
        m, (kind, encoder, _) = measured[path], path.split("/")
        if kind in ("features", "prefix_tokens") and encoder in backbones:
            source = f"measured, {'ImageNet' if m['pretrained'] else 'random'} weights"
            arrays.append(Array(path, tuple(m["per_view_shape"]), data_ratio(m), source))
    missing = set(backbones) - {a.encoder for a in arrays}
    if missing:
        sys.exit(f"no measured sizes of {sorted(missing)} in the compression JSON")
    side = latent_size // VAE_STRIDE
    for stat in ("mean", "logvar"):
        path = next(p for p in measured if p.startswith("latents/") and p.endswith(f"/{stat}"))
        m, shape = measured[path], "x".join(map(str, measured[path]["per_view_shape"]))
        source = f"borrowed: `{path}` ({shape}) of the VAE `{m['source']}`"
        shape = (LATENT_CHANNELS, side, side)
        arrays.append(Array(f"latents/sd-vae/{stat}", shape, data_ratio(m), source))
    return arrays


def header(inputs: list[Path], p: argparse.Namespace) -> list[str]:
    """What made the document: the command, and each input with its date and command."""
    command = shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])
    outputs = {path: load(path) for path in inputs}
    files = [f"- `{path.relative_to(ROOT)}` ({run['date']}): `{run['command']}`"
             for path, run in outputs.items()]  # fmt: skip
    return [
        "<!-- Generated by benchmarks/scaling.py: do not edit, rerun it. -->",
        "# Scaling on paper: ImageNet-1k",
        "",
        f"Generated by `{command}` from these benchmark outputs (no number below is typed in):",
        "",
        *files,
        "",
        f"Scenario: {p.images:,} images x {p.views} views; backbones "
        f"{', '.join(p.backbones)}, four layers each; fp16; shards of {p.shard_size} samples "
        f"(the config schema's default); targets: the latents of Stable Diffusion's VAE at "
        f"{p.latent_size} px (mean and logvar, as the store keeps the posterior).",
        "",
    ]


def sizes_section(arrays: list[Array], p: argparse.Namespace) -> list[str]:
    """Bytes per sample (K views) and over the collection, per array, encoder and in all."""
    rows = [[f"`{a.path}`", "x".join(map(str, a.shape)), size(a.raw_view * p.views),
             f"{a.ratio:.3f}", a.source, size(a.stored_view * p.views),
             size(a.stored_view * p.views * p.images)] for a in arrays]  # fmt: skip
    for encoder in dict.fromkeys(a.encoder for a in arrays):
        rows.append(total_row(f"**{encoder}**", [a for a in arrays if a.encoder == encoder], p))
    rows.append(total_row("**all**", arrays, p))
    head = ["array", "per view", "raw fp16 / sample", "stored / fp32", "ratio",
            "stored / sample", f"{p.images:,} images"]  # fmt: skip
    return [
        "## 1. Store size",
        "",
        f"A sample is {p.views} views. Stored = chunks + shard indexes, from the ratio stored / "
        "raw fp32 that `compression.py` measured on the demo photos (lossless chain: blosc zstd "
        "bit-shuffle + crc32c). fp16 is 0.5 of fp32: a ratio near 0.5 is incompressible. Maps "
        "of random weights (where no trained ones could be had) may compress otherwise than "
        "trained ones; the raw fp16 totals bound them.",
        "",
        *table(head, rows),
        "",
    ]


def total_row(name: str, arrays: list[Array], p: argparse.Namespace) -> list[str]:
    raw, stored = sum(a.raw_view for a in arrays), sum(a.stored_view for a in arrays)
    total = f"**{size(stored * p.views * p.images)}** (raw {size(raw * p.views * p.images)})"
    return [name, "", size(raw * p.views), f"{stored / raw / 2:.3f}", "",
            size(stored * p.views), total]  # fmt: skip


def puts_per_object(nbytes: float) -> int:
    """s3fs's requests to write one object: a PUT, or create + parts + complete (multipart)."""
    return 1 if nbytes < 2 * S3FS_PART else math.ceil(nbytes / S3FS_PART) + 2


def objects_section(arrays: list[Array], p: argparse.Namespace) -> list[str]:
    """Shards, objects and object sizes: what an object store holds, lists and serves."""
    shards, groups, samples = n_shards(p.images, p.shard_size), 2, len(SAMPLE_FIELDS + VIEW_FIELDS)
    parents = {a.path.rsplit("/", 1)[0] for a in arrays} | {a.path.split("/")[0] for a in arrays}
    counts = {
        "shard objects (one per shard per array)": len(arrays) * shards,
        f"`samples/` chunks ({samples} arrays, one chunk per shard; at most)": samples * shards,
        f"commit records (one per group and shard; {groups} groups)": groups * shards,
        # root, samples/, commits/, commits/<group>, <kind>/, <kind>/<encoder>/ and the arrays
        "`zarr.json` of the arrays and groups": 3 + groups + len(parents) + len(arrays) + samples,
    }
    rows = [[f"`{a.path}`", size(a.object_bytes(p)), puts_per_object(a.object_bytes(p))]
            for a in arrays]  # fmt: skip
    return [
        "## 2. Shards and objects",
        "",
        f"**{shards:,} shards**. Each per-sample array stores one object per shard (zarr's "
        "sharding codec: every view of the shard's samples, the chunk index at the end), written "
        "once by one job; the backbones form the group `main`, the VAE `latents` (the config's "
        "defaults), each committing every shard.",
        "",
        *table(["objects", "count"], [[k, f"{v:,}"] for k, v in counts.items()]),
        f"| **all** | **{sum(counts.values()):,}** |",
        "",
        *table(["array", "object size", "s3fs write requests per object"], rows),
        "",
    ]


def extraction_runs(results: Path) -> dict[tuple[str, str], dict]:
    """`extraction_throughput.py` runs of one backbone each, by (backbone, "cpu" or "gpu"): the
    files `extraction_<backbone>_<device>.json` (others hold runs made for other questions)."""
    runs = {}
    paths = [*results.glob("extraction_*_cpu.json"), *results.glob("extraction_*_cuda.json")]
    for path in sorted(paths):
        run = load(path)
        r = run["results"]
        if len(r["backbones"]) == 1:
            kind = "gpu" if r["device"].startswith("cuda") else "cpu"
            runs[r["backbones"][0]["name"], kind] = {**r, "file": path, **run["machine"]}
    return runs


def views_per_s(run: dict) -> float:
    """The stage's views/s: median images/s over repeats x the views it ran per image."""
    return statistics.median(r["stage_img_s"] for r in run["repeats"]) * run["views"]


def extraction_section(backbones: list[str], runs: dict, p: argparse.Namespace) -> list[str]:
    """Hours to extract every view of every image, per backbone, from measured throughput."""
    n_views = p.images * p.views

    def hours(run: dict) -> float:
        return n_views / views_per_s(run) / 3600

    rows = []
    for name in backbones:
        cpu, gpu = runs[name, "cpu"], runs.get((name, "gpu"))
        rows.append([name, ", ".join(cpu["backbones"][0]["layers"]),
                     f"{cpu['threads']} threads, load {cpu['load_average'][0]:.1f}",
                     f"{views_per_s(cpu):.2f}", f"{hours(cpu):,.0f}",
                     f"{hours(gpu):,.1f} ({gpu['device']})" if gpu else "missing"])  # fmt: skip
    cpu_total = sum(hours(runs[name, "cpu"]) for name in backbones)
    gpus = [runs.get((name, "gpu")) for name in backbones]
    gpu_total = f"**{sum(hours(g) for g in gpus):,.1f}**" if all(gpus) else "missing"
    rows.append(["**all, one after another**", "", "", "", f"**{cpu_total:,.0f}**", gpu_total])
    return [
        "## 3. Extraction time",
        "",
        f"{n_views:,} forward passes per backbone. Measured: the whole extraction stage "
        "(`extract_shard`: decode, views, forward, fp16, compression, writes) on the demo "
        "photos, one view per image, median of repeats. CPU hours are hours of the "
        f"{runs[backbones[0], 'cpu']['cpus']}-CPU VM that measured them, whose load "
        "average (other work shared it) is shown. GPU hours: "
        f"{'as measured' if all(gpus) else GPU_MISSING} (`extraction_throughput.py --device "
        "cuda --json benchmarks/results/extraction_<backbone>_cuda.json` on a GPU fills them in)."
        " The VAE's encoding (group `latents`) is not measured: missing.",
        "",
        *table(["backbone", "layers", "CPU run", "views/s (CPU)", "CPU hours", "GPU hours"], rows),
        "",
    ]


def writes_section(arrays: list[Array], backbones: list[str], runs: dict,
                   p: argparse.Namespace) -> list[str]:  # fmt: skip
    """Write requests during extraction: per image, and per array prefix against S3's limit."""
    # per array and shard: a delete of what an interrupted job may have left, then the write
    per_shard = {a.path: 1 + puts_per_object(a.object_bytes(p)) for a in arrays}
    per_image = (sum(per_shard.values()) + 2) / p.shard_size  # + a commit record per group
    busiest = max(per_shard, key=per_shard.get)
    job = 1 / sum(p.views / views_per_s(runs[name, "cpu"]) for name in backbones)
    return [
        "## 4. S3 requests while extracting",
        "",
        "From the code (`storage_specs.layout.write_shard`, s3fs): per array and shard a DELETE "
        "of an interrupted job's debris, then the object (one PUT below 100 MiB, else a "
        "multipart upload of 50 MiB parts), then a commit record per group and shard; besides, a "
        "few metadata reads per job.",
        "",
        f"- Write requests per image: **{per_image:.3f}**, so **{1000 * per_image:,.0f}/s** for "
        "every 1,000 images/s extracted across a cluster.",
        f"- Per array prefix (S3 scales per prefix, {S3_WRITES:,} writes/s each): the busiest, "
        f"`{busiest}`, takes {per_shard[busiest]} requests per shard, so it reaches the limit at "
        f"{S3_WRITES * p.shard_size / per_shard[busiest]:,.0f} images/s.",
        f"- One job of all {len(backbones)} backbones on this CPU: {job:.3f} images/s "
        f"({p.views} views), {job * per_image:.4f} requests/s.",
        "",
    ]


def reads_section(arrays: list[Array], rank: dict, p: argparse.Namespace) -> list[str]:
    """The read bandwidth and GET rate a trainer needs per rank and in all, per condition layer
    (feature map + the VAE posterior's mean and logvar), against what one rank read here."""
    latent = sum(a.stored_view for a in arrays if a.path.startswith("latents/"))
    pairs = p.step_rate * p.batch_size  # per rank and second
    single = rank["worlds"]["1"]["per_rank_samples_s"][0]
    pair_here = sum(rank["stored_bytes_per_item"].values())
    rows = []
    for a in (a for a in arrays if a.path.startswith("features/")):
        pair = a.stored_view + latent
        rows.append([f"`{a.path}`", size(pair), f"{pairs * pair / 1e6:,.1f}",
                     f"{p.ranks * pairs * pair / 1e6:,.0f}",
                     f"{single * pair_here / (p.batch_size * pair):,.0f}"])  # fmt: skip
    head = ["condition", "stored bytes per pair (+ latents)", "MB/s per rank",
            f"MB/s, {p.ranks} ranks", "steps/s one rank's reader fed here"]  # fmt: skip
    return [
        "## 5. Training reads",
        "",
        f"A trainer at **{p.step_rate:g} steps/s**, **{p.batch_size} pairs** per rank and step, "
        f"**{p.ranks} ranks**: {pairs:,.0f} pairs/s per rank (each rank reads its slice of every "
        "global batch of a fresh permutation per epoch: `training.data.EpochBatches`).",
        "",
        *table(head, rows),
        "",
        f"Last column: one rank (`rank_read_throughput.py`, {rank['num_workers']} reader "
        f"worker(s), batches of {rank['batch_size']} from `{rank['store']}`) read {single:,.0f} "
        f"pairs/s of {size(pair_here)} ({single * pair_here / 1e6:,.1f} MB/s) on this VM; "
        "scaled by bytes per pair (decoding cost grows with bytes).",
        "",
    ]


def gets_section(rank: dict, read: dict, p: argparse.Namespace) -> list[str]:
    """GET requests of training reads at scale, and what the reader issued here."""
    shards = n_shards(p.images, p.shard_size)
    touched = shards * (1 - (1 - 1 / shards) ** p.batch_size)
    gets = 3 * p.step_rate * p.batch_size  # one per chunk of feature, mean and logvar
    r = read["results"]
    here = next(iter(r["requests"].values()))
    s3_gets = r["samples_per_s"]["s3"] / r["batch_size"] * here["requests_per_batch"]
    demo = ", ".join(
        f"`{path}` {q['requests_per_batch']:.1f}" for path, q in rank["requests"].items()
    )
    return [
        "## 6. S3 requests while training",
        "",
        f"A batch of {p.batch_size} random pairs touches {touched:.2f} of the {shards:,} shards "
        "on average: the reader merges only nearby chunks of one shard into a request, so at "
        "this scale it sends one GET per chunk, 3 per pair (feature, mean, logvar): "
        f"**{gets:,.0f} GET/s per rank, {p.ranks * gets:,.0f} in all**, and per array prefix "
        f"{p.ranks * p.step_rate * p.batch_size:,.0f}/s against S3's {S3_READS:,}/s (reached at "
        f"{S3_READS / p.batch_size / p.ranks:,.1f} steps/s per rank). Each reader process first "
        f"reads every shard index it touches, once: {shards:,} x 3 arrays, "
        f"{size(INDEX_BYTES * p.shard_size * p.views + 4)} each.",
        "",
        f"Measured: on the demo store ({rank['shard_size']} samples per shard) a batch of "
        f"{rank['batch_size']} took {demo} requests per array (`rank_read_throughput.py`). "
        f"On S3 (`read_throughput.py`, moto's server on loopback, which bounds it; no real S3 "
        f"endpoint was available) one process read {r['samples_per_s']['s3']:,.0f} maps/s of "
        f"`{r['array']}` with {s3_gets:,.0f} GET/s of {size(here['bytes_per_request'])}, against "
        f"{r['samples_per_s']['local']:,.0f} maps/s from local disk.",
        "",
    ]


def ranks_section(rank: dict) -> list[str]:
    """Per-rank reading measured side by side with 1, 2 and 4 ranks on one machine."""
    rows = [[world, " ".join(f"{r:,.0f}" for r in w["per_rank_samples_s"]),
             f"{w['total_samples_s']:,.0f}", f"{w['per_rank_over_single']:.2f}x",
             f"{w['total_over_single']:.2f}x"] for world, w in rank["worlds"].items()]  # fmt: skip
    head = ["ranks", "pairs/s per rank", "total", "per rank / one rank", "total / one rank"]
    return [
        "## 7. Ranks reading at once",
        "",
        "`rank_read_throughput.py`: each rank reads its own slice through the trainer's loader; "
        "the ranks of one line ran side by side on the one VM, sharing its CPUs (medians over "
        "repeats):",
        "",
        *table(head, rows),
        "",
    ]


def main() -> None:
    schema = load_schema()["properties"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling.md")
    parser.add_argument("--images", type=int, default=1_281_167, help="ImageNet-1k's train set")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--backbones", nargs="+", help="default: all the compression JSON has")
    parser.add_argument("--shard-size", type=int, default=schema["shard_size"]["default"])
    parser.add_argument("--latent-size", type=int, default=256, help="VAE input px")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per rank and step")
    parser.add_argument("--step-rate", type=float, default=4.0, help="steps/s per rank")
    parser.add_argument("--ranks", type=int, default=8)
    p = parser.parse_args()
    names = ("compression", "rank_read_throughput", "read_throughput")
    files = {name: p.results / f"{name}.json" for name in names}
    compression, rank, read = (load(path) for path in files.values())
    measured = compression["results"]["arrays"]
    p.backbones = p.backbones or list(dict.fromkeys(
        path.split("/")[1] for path in measured if path.startswith("features/")))  # fmt: skip
    arrays = scenario_arrays(compression, p.backbones, p.latent_size)
    runs = extraction_runs(p.results)
    missing = [name for name in p.backbones if (name, "cpu") not in runs]
    if missing:
        sys.exit(f"no extraction_throughput JSON of {missing} alone in {p.results}")
    inputs = [*files.values(), *sorted(run["file"] for run in runs.values())]
    doc = [
        *header(inputs, p),
        *sizes_section(arrays, p),
        *objects_section(arrays, p),
        *extraction_section(p.backbones, runs, p),
        *writes_section(arrays, p.backbones, runs, p),
        *reads_section(arrays, rank["results"], p),
        *gets_section(rank["results"], read, p),
        *ranks_section(rank["results"]),
    ]
    p.out.parent.mkdir(parents=True, exist_ok=True)
    p.out.write_text("\n".join(doc).rstrip() + "\n")
    print(f"wrote {p.out}")


if __name__ == "__main__":
    main()
