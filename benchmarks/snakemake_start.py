"""`snakemake extract_features` on a finished store ("Nothing to be done"), with the backbone
check's verdict kept in work_dir against the same command re-checking the backbones.

Subject: the rerun as it is (Snakemake's own process finds the verdict in
``work_dir/checked-backbones`` and never imports torch). Baseline: the same rerun after removing
that folder, so the process imports timm and builds every backbone on the meta device to check
its layers, as each rerun, ``--unlock`` and dry run did before. Both are whole ``snakemake``
processes, started alternately (subject, baseline, baseline, subject, ...) so that drifting load
hits both. Prints each side's median seconds and the ratio baseline / subject.

Then, in this process, the part of that start which checks the markers against the store: the
read of the root's zarr.json (`stale_reason`, all it did before) against that plus one listing of
`commits/<group>/` per group (`check_markers` as Snakemake calls it, since 2026-11-30),
alternated, medians.

Usage: ``.venv/bin/python benchmarks/snakemake_start.py [--pairs 4] [--json PATH]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from record import write_result

from pipeline.demo import build_demo_images
from pipeline.markers import check_markers, stale_reason

REPO = Path(__file__).resolve().parents[1]
# The demo config's three backbones at their layers, on two photos: a quick first run.
BACKBONES = yaml.safe_load((REPO / "config/config.yaml").read_text())["backbones"]


def snakemake(folder: Path, *args: str) -> float:
    """Seconds of one `snakemake extract_features` in `folder`; fails loudly if it fails."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "snakemake", "extract_features", "-s", str(REPO / "Snakefile"),
         "--directory", str(folder), "--configfile", str(folder / "config.yaml"), *args],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - start


def finished_store(folder: Path) -> None:
    """Two demo photos through the demo's backbones, extracted by Snakemake once."""
    build_demo_images(str(folder / "demo"))
    for extra in sorted((folder / "demo").rglob("*.*"))[2:]:
        extra.unlink()
    config = {"source": str(folder / "demo"), "store": str(folder / "store.zarr"),
              "work_dir": str(folder / "work"), "shard_size": 2,
              "backbones": BACKBONES}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(folder, "--cores", "2")


def markers_check(folder: Path, rounds: int = 50) -> dict[str, list[float]]:
    """Seconds of the markers check: the root alone, and the root with the commit listings."""
    (work,) = (folder / "work").glob("store.zarr-*")
    url = str(folder / "store.zarr")
    checks = {
        "root": lambda: stale_reason(work, url),
        "root+commits": lambda: check_markers(work, url),
    }
    seconds: dict[str, list[float]] = {side: [] for side in checks}
    for _ in range(rounds):
        for side, check in checks.items():
            start = time.perf_counter()
            check()
            seconds[side].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        finished_store(folder)
        seconds = {"kept": [], "rechecked": []}
        for pair in range(args.pairs):
            for side in ("kept", "rechecked") if pair % 2 == 0 else ("rechecked", "kept"):
                if side == "rechecked":
                    shutil.rmtree(folder / "work/checked-backbones")
                seconds[side].append(snakemake(folder, "--cores", "1"))
        checks = markers_check(folder)
    medians = {side: statistics.median(times) for side, times in seconds.items()}
    for side, times in seconds.items():
        print(f"{side:9s} median {medians[side]:.2f} s  ({', '.join(f'{t:.2f}' for t in times)})")
    ratio = medians["rechecked"] / medians["kept"]
    print(f"rerun of a finished store: {ratio:.2f}x faster with the verdict kept")
    check_ms = {side: 1000 * statistics.median(times) for side, times in checks.items()}
    print(
        f"markers check: root {check_ms['root']:.2f} ms, root and commit listings "
        f"{check_ms['root+commits']:.2f} ms ({check_ms['root+commits'] / check_ms['root']:.2f}x;"
        f" {medians['kept'] / (check_ms['root+commits'] / 1000):.0f}x less than the whole rerun)"
    )
    write_result(args.json, "snakemake_start", {"seconds": seconds, "ratio": ratio,
                                                "markers_check_ms": check_ms})  # fmt: skip


if __name__ == "__main__":
    main()
