"""The robustness analysis end to end, against reconstructing the same number of maps.

Subject: `featinv variants` + `featinv robustness` on a trained model (the demo's, by default with
the demo config's `robustness:` and `guided:` sections): making the variants (corruptions and
attacks on the recorded backbone), extracting their features through the extraction stage,
reconstructing each map with every method, re-extracting and scoring.  Each phase is timed.

Baseline: the trained decoder reconstructing the same number of stored maps (the sampler alone,
same settings), in the same process; the ratio says what the analysis costs around the
reconstructions it shows (these machines are noisy: ratios hold, absolute times do not).  The
headline metrics (mean per family and level) are printed for RESULTS.md.

Usage: `.venv/bin/python benchmarks/robustness.py [--config config/config.yaml]
[--model models/demo] [--store stores/demo.zarr] [--out /tmp/robustness-bench]`
(after `make demo`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from pipeline.config import validate_config
from sampling.robustness import analysis_of, keys_of, robustness_run, variants_run


def _config(args) -> dict:
    given = yaml.safe_load(Path(args.config).read_text())
    return validate_config({
        "store": args.store,
        "sampling": {"model": args.model, "output_dir": args.out},
        "robustness": {**given.get("robustness", {}), "enabled": True},
        "guided": given.get("guided", {}),
    }, "sample")  # fmt: skip


def _baseline(config: dict, count: int) -> float:
    """Seconds for the trained decoder to reconstruct `count` stored maps of the keys."""
    analysis = analysis_of(config, None)
    keys = keys_of(analysis)
    maps, _ = analysis.read(keys)
    reps = -(-count // len(keys))
    maps, keys = maps.repeat(reps, 1, 1, 1)[:count], (keys * reps)[:count]
    start = time.perf_counter()
    analysis.sample(maps, keys)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--model", default="models/demo")
    parser.add_argument("--store", default="stores/demo.zarr")
    parser.add_argument("--out", default="/tmp/robustness-bench")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    config = _config(args)

    start = time.perf_counter()
    folder = variants_run(config)
    made = time.perf_counter() - start
    start = time.perf_counter()
    out = robustness_run(config, progress=False)
    analysed = time.perf_counter() - start
    manifest = json.loads((folder / "manifest.json").read_text())
    result = json.loads((out / "robustness.json").read_text())
    images = len(manifest["keys"]) * len(manifest["variants"])
    images += sum(len(entry["keys"]) for entry in manifest["ood"].values())
    base = _baseline(config, images)

    print(f"{images} variant images ({len(manifest['variants'])} variants x "
          f"{len(manifest['keys'])} keys + second collections), methods {result['methods']}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"variants made: {made:7.1f} s   robustness run: {analysed:7.1f} s   "
          f"baseline (trained decoder alone on {images} maps): {base:6.1f} s")  # fmt: skip
    print(f"analysis / baseline: {(made + analysed) / base:.1f}x")
    shown = ("cosine_to_variant", "cosine_to_clean", "top1_variant", "top1_reconstruction")
    for method in result["methods"]:
        print(f"\n{method}: mean per level ({', '.join(shown)})")
        for family, entry in result["families"].items():
            for i, level in enumerate(entry["levels"]):
                values = " ".join(f"{entry['mean'][method][m][i]:6.3f}" for m in shown)
                print(f"  {family:22s} {entry['axis']} {level:<6g} {values}")
        for name, row in (result["ood"] or {"rows": {}})["rows"].items():
            values = " ".join(f"{row['mean'][method][m]:6.3f}" for m in shown)
            print(f"  {name:22s} {'':13s} {values}")


if __name__ == "__main__":
    main()
