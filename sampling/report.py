"""`featinv report`: one HTML page that shows what sampling and evaluation found, to anyone.

Everything a reader needs is in the one file (images and plots as data URIs, no external CSS,
scripts or fonts), so it can be mailed, attached to an issue or opened offline.  Per run (one
backbone / layer): the settings, a grid of originals beside the model's samples and the
baselines' images, the metrics of evaluation.json with a verdict per baseline computed from them,
the steps sweep and the run's analyses; then the metrics by layer depth across runs.  Numbers are
printed as `NUMBER_FORMAT` everywhere, so the page and evaluation.json can be checked against
each other.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from storage_specs.samples import SamplesRun

NUMBER_FORMAT = "{:.3f}"
GRID_ROWS = 8  # entry views shown per run
GRID_SAMPLES = 4  # images per method shown per row
CELL_PX = 96  # display width of a grid image (small images enlarged by an integer factor)
ANALYSIS_PX = 640  # small analysis grids are enlarged to about this width
DEPTH_METRICS = ("cosine", "position_cosine", "ssim")
ANALYSIS_KINDS = ("steering", "composite")

METHODS = {
    "model": "model",
    "unconditional": "unconditional",
    "updecoder": "up-conv decoder",
    "nearest": "nearest neighbour",
    "guided": "guided decoder",
    "guided-pooled": "guided decoder (pooled)",
    "pixelopt": "pixel optimisation",
    "pixelopt-pooled": "pixel optimisation (pooled)",
}
METRICS = {  # name, what it measures
    "cosine": ("feature cosine", "cosine between the stored map and the map the backbone "
               "extracts from the generated image, both flattened"),
    "position_cosine": ("FeatInv cosine", "cosine over channels at each position of the two "
                        "maps, median over positions (FeatInv's measure)"),
    "rel_l2": ("relative L2", "distance between the two maps divided by the stored map's norm"),
    "top1": ("top-1 agreement", "share of images the backbone's classifier puts in the "
             "original's class"),
    "top5": ("top-5 agreement", "share of images whose top 5 classes hold the original's class"),
    "psnr": ("PSNR (dB)", "pixel agreement with the original view"),
    "ssim": ("SSIM", "structural similarity with the original view"),
    "lpips": ("LPIPS", "learned perceptual distance to the original view"),
    "frechet_backbone": ("Fréchet (backbone)", "distance between the set of stored maps and the "
                         "set of re-extracted maps, mean-pooled over positions; one number per "
                         "method"),
    "fid": ("FID", "Inception Fréchet distance between originals and generated images"),
}  # fmt: skip

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h2 { border-top: 2px solid #ccc; padding-top: .6em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: 3px 7px; text-align: center; }
.metrics td, .metrics th, .sweep td, .sweep th { border-bottom: 1px solid #ddd; }
.metrics td { white-space: nowrap; } .metrics { font-size: 14px; }
.std { color: #666; font-size: 12px; } .wide { overflow-x: auto; }
.metrics td:first-child, .metrics th:first-child { text-align: left; }
.grid td { padding: 1px; } .grid th { font-weight: 600; font-size: 13px; }
.grid td.key { text-align: right; font-size: 12px; color: #555; padding-right: 6px; }
.grid td.first { padding-left: 10px; }
img { height: auto; max-width: 100%; } img.pixels { image-rendering: pixelated; }
.settings, .note, .unavailable { color: #555; font-size: 14px; }
.verdict { font-weight: 500; } figure { margin: 1em 0; } figcaption { color: #555; }
"""
# Marks <body data-images-loaded="loaded/total"> once the page has loaded (checked by tests).
IMAGES_LOADED = (
    "addEventListener('load', () => { const all = [...document.images]; "
    "document.body.dataset.imagesLoaded = "
    "all.filter(i => i.naturalWidth > 0).length + '/' + all.length; });"
)


def build_report(runs: list[Path], path: Path) -> Path:
    """Write the report of `runs` (sample + evaluate output folders) to `path`."""
    loaded = [_load_run(Path(folder)) for folder in runs]
    if not loaded:
        raise ValueError("report: no runs given")
    body = [_intro(loaded)]
    body += [_run_section(i, run) for i, run in enumerate(loaded)]
    body.append(_layers_section(loaded))
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>featinv report</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{IMAGES_LOADED}</script>\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def fmt(value: float) -> str:
    """A number as the page prints it."""
    return NUMBER_FORMAT.format(value)


# ---------------------------------------------------------------------------- inputs


def _load_run(folder: Path) -> dict:
    evaluation = folder / "evaluation.json"
    if not evaluation.is_file():
        raise ValueError(f"report: '{folder}' has no evaluation.json: run `featinv evaluate`")
    return {
        "folder": folder,
        "evaluation": json.loads(evaluation.read_text()),
        "samples": SamplesRun(folder),
        "analyses": [_manifest(p) for p in sorted(folder.glob("analyses/*/manifest.json"))],
        "robustness": _robustness_result(folder / "robustness"),
    }


def _robustness_result(folder: Path) -> dict | None:
    """`featinv robustness`'s result with its grids read, or None when it did not run."""
    path = folder / "robustness.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    for grid in result["grids"] + (result["ood"]["grids"] if result["ood"] else []):
        grid["data"] = (folder / grid["png"]).read_bytes()
    return result


def _manifest(path: Path) -> dict:
    """An analysis manifest, its grids read; a malformed one names itself and what is wrong."""
    manifest = json.loads(path.read_text())
    missing = {"kind", "title", "description", "grids"} - manifest.keys()
    if missing or manifest["kind"] not in ANALYSIS_KINDS:
        raise ValueError(f"report: '{path}' is no analysis manifest (missing {sorted(missing)} "
                         f"or kind not in {ANALYSIS_KINDS})")  # fmt: skip
    for grid in manifest["grids"]:
        png = path.parent / grid["png"]
        if not png.is_file():
            raise ValueError(f"report: '{path}' names a grid '{grid['png']}' that does not exist")
        grid["data"] = png.read_bytes()
    return manifest


# ---------------------------------------------------------------------------- sections


def _intro(runs: list[dict]) -> str:
    glossary = "".join(f"<li><b>{html.escape(label)}</b>: {html.escape(about)}</li>"
                       for label, about in METRICS.values())  # fmt: skip
    contents = "".join(f'<li><a href="#run-{i}">{html.escape(_title(run))}</a></li>'
                       for i, run in enumerate(runs))  # fmt: skip
    return f"""<h1>featinv report: images from feature maps</h1>
<section id="intro">
<p>A vision model (the <i>backbone</i>) turns an image into feature maps at each layer. Here a
conditional diffusion model was trained to generate images from nothing but the stored maps of
one backbone layer (FeatInv). Whatever the generated images share with the originals, the layer
kept; what varies between samples of the same map, the layer discarded.</p>
<p><b>How to read it.</b> Each section below is one backbone / layer. Its image grid shows, per
row, the original view, several samples of the model from that view's map (different seeds), and
baselines that set the scale: <i>unconditional</i> is the same model with the map withheld (what
it makes from no information), <i>up-conv decoder</i> a deterministic decoder trained on the same
maps (Dosovitskiy &amp; Brox 2016), <i>nearest neighbour</i> the training image whose stored map
is closest (retrieval, no generation). Where present, <i>guided decoder</i> needs no trained
decoder at all: an unconditional diffusion model is steered, step by step, by the backbone's
gradient towards the stored map (Shirahama et al.), and <i>pixel optimisation</i> fits the pixels
to the map directly with simple image priors and the same number of backbone gradient
evaluations (Mahendran &amp; Vedaldi 2015). Faithfulness is measured by the backbone itself: each
generated image is run through it again and its map compared with the stored one; image metrics
compare it with the original. Tables give mean ± std over all generated images,
↑ / ↓ say whether higher or lower is better, and the best value of each column is bold. Numbers
are rounded to three decimals, exactly as in each run's evaluation.json.</p>
<ul>{glossary}</ul>
<p>Sections:</p><ol>{contents}<li><a href="#layers">metrics by layer depth</a></li></ol>
</section>"""


def _title(run: dict) -> str:
    return f"{run['evaluation']['backbone']} / {run['evaluation']['layer']}"


def _run_section(i: int, run: dict) -> str:
    evaluation = run["evaluation"]
    parts = [
        f'<section class="run" id="run-{i}"><h2>{html.escape(_title(run))}</h2>',
        f'<p class="settings">{html.escape(_settings(run))}</p>',
        "<h3>Images</h3>",
        _grid(run["samples"]),
        "<h3>Metrics</h3>",
        _metrics_table(evaluation),
        _unavailable(evaluation),
        _verdicts(evaluation),
        _sweep(evaluation),
        *(_analysis(analysis) for analysis in run["analyses"]),
        _robustness(run["robustness"]) if run["robustness"] else "",
        "</section>",
    ]
    return "\n".join(parts)


def _settings(run: dict) -> str:
    e = run["evaluation"]
    made = [_made_by(store) for store in e.get("stores") or [e]]
    return (
        f"{run['folder'].name}: {'; '.join(made)}; {e['n_entries']} entries at views "
        f"{e['views']}; layer depth {fmt(e['depth'])} (0 input, 1 last module); weights "
        f"{e['weights']['source']}"
    )


def _made_by(store: dict) -> str:
    """What made one samples store's images: the model and sampler, or the guided decoder."""
    model, s = store["model"], store["sampling"]
    if "guided" in s:
        g = s["guided"]
        travel = g["travel"]
        return (
            f"guided decoder: prior {model['path']} ({model['prior']['kind']}), DDIM {g['steps']} "
            f"steps, scale {g['scale']}, tau {g['tau']}, time travel {travel['early']}x for "
            f"{travel['early_steps']} steps, then {travel['later']}x, "
            f"{travel['last'] or travel['later']}x at the last (min gain {travel['min_gain']}), "
            f"stop at cosine {g['stop_cosine']}, pooled {g['pooled']}"
        )
    return (
        f"model {model['path']} ({model['mode']}, {model['steps']} training steps); sampler "
        f"{s['scheduler']}, {s['steps']} steps, guidance {s['guidance']}, eta {s['eta']}, "
        f"seed {s['seed']}"
    )


def _grid(samples: SamplesRun) -> str:
    """Rows: entry views; columns: original, then up to GRID_SAMPLES images of each method."""
    entries = -(-GRID_ROWS // len(samples.views))
    originals = samples.originals(entries)
    made = {m: samples.images(m, entries, GRID_SAMPLES) for m in samples.methods}
    head = "<th></th><th>original</th>" + "".join(
        f'<th colspan="{x.shape[2]}" title="{html.escape(samples.methods[m]["description"])}">'
        f"{html.escape(_method(m))}{_shown(x.shape[2], samples.methods[m]['samples'])}</th>"
        for m, x in made.items()
    )
    rows = []
    for e, v in [(e, v) for e in range(len(originals)) for v in range(len(samples.views))]:
        key = samples.keys[e] + (f" (view {samples.views[v]})" if len(samples.views) > 1 else "")
        cells = [_image_cell(originals[e, v], f"{key} original")]
        for m, x in made.items():
            cells += [_image_cell(image, f"{key} {m} {s}", s == 0) for s, image in
                      enumerate(x[e, v])]  # fmt: skip
        rows.append(f'<tr><td class="key">{html.escape(key)}</td>{"".join(cells)}</tr>')
    legend = "; ".join(f"<b>{html.escape(_method(m))}</b>: {html.escape(about['description'])}"
                       for m, about in samples.methods.items())  # fmt: skip
    return (f'<table class="grid"><tr>{head}</tr>{"".join(rows[:GRID_ROWS])}</table>'
            f'<p class="note">{legend}.</p>')  # fmt: skip


def _shown(shown: int, total: int) -> str:
    return f" ({shown} of {total})" if shown < total else ""


def _image_cell(chw: np.ndarray, alt: str, first: bool = True) -> str:
    data = _png(Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))))
    return f"<td{' class=first' if first else ''}>{_img(data, alt, CELL_PX)}</td>"


def _metrics_table(evaluation: dict) -> str:
    methods, better = evaluation["methods"], evaluation["higher_is_better"]
    names = [m for m in better if any(m in about for about in methods.values())]
    best = {m: _best(evaluation, m) for m in names}
    head = "<th>method</th>" + "".join(
        f'<th title="{html.escape(METRICS.get(m, (m, ""))[1])}">'
        f"{html.escape(_metric(m))} {'↑' if better[m] else '↓'}</th>"
        for m in names
    )
    rows = []
    for method, about in methods.items():
        cells = [_metric_cell(about.get(m), method in best[m]) for m in names]
        rows.append(f"<tr><td>{html.escape(_method(method))}</td>{''.join(cells)}</tr>")
    table = f'<table class="metrics"><tr>{head}</tr>{"".join(rows)}</table>'
    return f'<div class="wide">{table}</div>'


def _metric_cell(value, bold: bool) -> str:
    if value is None:
        return "<td>not computed</td>"
    mean = fmt(_mean(value))
    std = f' <span class="std">± {fmt(value["std"])}</span>' if isinstance(value, dict) else ""
    return f"<td><b>{mean}</b>{std}</td>" if bold else f"<td>{mean}{std}</td>"


def _mean(value) -> float:
    return value["mean"] if isinstance(value, dict) else value


def _rounded(evaluation: dict, method: str, metric: str) -> float | None:
    """A method's value of a metric as printed (comparisons use what the reader sees); None when
    there is nothing to compare."""
    value = evaluation["methods"][method].get(metric)
    value = None if value is None else float(fmt(_mean(value)))
    return value if value is not None and np.isfinite(value) else None


def _best(evaluation: dict, metric: str) -> set[str]:
    values = {m: _rounded(evaluation, m, metric) for m in evaluation["methods"]}
    values = {m: v for m, v in values.items() if v is not None}
    if not values:
        return set()
    pick = max if evaluation["higher_is_better"][metric] else min
    best = pick(values.values())
    return {m for m, v in values.items() if v == best}


def _unavailable(evaluation: dict) -> str:
    lines = "".join(f"<li><b>{html.escape(_metric(m))}</b> not computed: {html.escape(why)}</li>"
                    for m, why in evaluation["unavailable"].items())  # fmt: skip
    return f'<ul class="unavailable">{lines}</ul>' if lines else ""


def _verdicts(evaluation: dict) -> str:
    """The model against every other row; the guided decoder against its pixel optimisation."""
    methods = evaluation["methods"]
    pairs = [("model", m) for m in methods if m != "model" and "model" in methods]
    pairs += [(m, m.replace("guided", "pixelopt")) for m in methods
              if m.startswith("guided") and m.replace("guided", "pixelopt") in methods]  # fmt: skip
    lines = "".join(f"<li>{html.escape(_verdict(evaluation, *pair))}</li>" for pair in pairs)
    return f'<ul class="verdict">{lines}</ul>' if lines else ""


def _verdict(evaluation: dict, subject: str, baseline: str) -> str:
    """'The model beats the X baseline on k of n metrics: ...; ...' from the printed values."""
    outcome: dict[str, list[str]] = {"beats": [], "ties": [], "loses": []}
    for metric, higher in evaluation["higher_is_better"].items():
        ours, theirs = (_rounded(evaluation, m, metric) for m in (subject, baseline))
        if ours is None or theirs is None:
            continue
        sign = (ours > theirs) - (ours < theirs)
        key = "ties" if sign == 0 else "beats" if (sign > 0) == higher else "loses"
        outcome[key].append(_metric(metric))
    total = sum(map(len, outcome.values()))
    won, tied, lost = outcome["beats"], outcome["ties"], outcome["loses"]
    text = (f"The {_method(subject)} beats the {_method(baseline)} baseline on {len(won)} of "
            f"{total} metrics")  # fmt: skip
    text += f" ({', '.join(won)})" if won else ""
    text += f"; it is level on {', '.join(tied)}" if tied else ""
    text += f"; it is worse on {', '.join(lost)}" if lost else ""
    return text + "."


def _sweep(evaluation: dict) -> str:
    sweep = evaluation["sweep"]
    if not sweep:
        return '<h3>Sampling steps</h3><p class="note">No steps sweep in this run.</p>'
    rows = "".join(f"<tr><td>{p['scheduler']}</td><td>{p['steps']}</td><td>{fmt(p['cosine'])}"
                   f"</td><td>{fmt(p['images_per_s'])}</td></tr>" for p in sweep)  # fmt: skip
    return (
        '<h3>Sampling steps</h3><p class="note">The model alone, one sample per map of the first '
        "view, at each scheduler and number of denoising steps: how faithful (feature cosine) "
        "and how fast.</p>"
        f"{_img(_sweep_plot(sweep), 'feature cosine and images/s by sampling steps', 0)}"
        '<table class="sweep"><tr><th>scheduler</th><th>steps</th><th>feature cosine ↑</th>'
        f"<th>images/s</th></tr>{rows}</table>"
    )


def _analysis(manifest: dict) -> str:
    figures = "".join(
        f"<figure>{_img(grid['data'], grid['caption'], ANALYSIS_PX)}"
        f"<figcaption>{html.escape(grid['caption'])}</figcaption></figure>"
        for grid in manifest["grids"]
    )
    return (f'<section class="analysis"><h3>Analysis ({html.escape(manifest["kind"])}): '
            f'{html.escape(manifest["title"])}</h3><p>{html.escape(manifest["description"])}</p>'
            f"{figures}</section>")  # fmt: skip


ROBUSTNESS_SHOWN = ("cosine_to_variant", "cosine_to_clean", "top1_variant",
                    "top1_reconstruction", "psnr", "ssim")  # fmt: skip
# A second collection's image is its own clean image: what is left to show.
OOD_SHOWN = ("cosine_to_variant", "top1_reconstruction", "psnr", "ssim")
AXIS_QUESTIONS = {
    "severity": "How do the features, the classifier and the reconstruction degrade as each "
    "corruption gets more severe?",
    "eps": "How far do adversarial perturbations of growing eps move the features, the "
    "classifier and the reconstruction away from the clean image?",
}


def _robustness(result: dict) -> str:
    """Per family (a corruption, an attack and goal), its question, grid and mean metrics per
    level (level 0: the clean image) and method; the metrics against severity and eps; then the
    second collections beside the held-out images."""
    parts = [f'<section class="analysis" id="robustness"><h3>{html.escape(result["title"])}</h3>'
             f"<p><b>{html.escape(result['question'])}</b></p>"
             f'<p class="note">Keys: {html.escape(", ".join(result["keys"]))}. Metrics: '
             + "; ".join(f"<i>{m}</i>: {html.escape(about)}" for m, about in
                         result["metrics"].items()) + ".</p>"]  # fmt: skip
    families = result["families"]
    for grid in result["grids"]:
        family = families[grid["family"]]
        levels = enumerate(family["levels"])
        rows = [(f"{family['axis']} {level:g}", method, family["mean"][method], i)
                for i, level in levels for method in result["methods"]]  # fmt: skip
        parts.append(
            f"<h4>{html.escape(grid['family'])}</h4><p><b>{html.escape(grid['question'])}</b></p>"
            + _figure(grid)
            + _robustness_table("level", rows, ROBUSTNESS_SHOWN)
        )
    for axis, question in AXIS_QUESTIONS.items():
        shown = {name: f for name, f in families.items() if f["axis"] == axis}
        if shown:
            plot = _robustness_plot(shown, axis, result["methods"])
            parts.append(f"<p><b>{html.escape(question)}</b></p>{_img(plot, question, 0)}")
    if result["ood"]:
        ood = result["ood"]
        rows = [(name, method, {m: [v] for m, v in row["mean"][method].items()}, 0)
                for name, row in ood["rows"].items() for method in result["methods"]]  # fmt: skip
        parts.append(
            f"<h4>Unfamiliar inputs</h4><p><b>{html.escape(ood['question'])}</b></p>"
            + _robustness_table("collection", rows, OOD_SHOWN)
            + "".join(_figure(grid) for grid in ood["grids"])
        )
    return "\n".join(parts) + "</section>"


def _figure(grid: dict) -> str:
    return (f"<figure>{_img(grid['data'], grid['caption'], ANALYSIS_PX)}<figcaption>"
            f"{html.escape(grid['caption'])}</figcaption></figure>")  # fmt: skip


def _robustness_table(first: str, rows: list[tuple], shown: tuple[str, ...]) -> str:
    """Rows of (label, method, means by metric, index into them)."""
    head = "".join(f"<th>{m}</th>" for m in shown)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{method}</td>"
        + "".join(f"<td>{fmt(means[m][i])}</td>" for m in shown)
        + "</tr>"
        for label, method, means, i in rows
    )
    return (f'<table class="robustness"><tr><th>{first}</th><th>method</th>{head}</tr>{body}'
            "</table>")  # fmt: skip


def _robustness_plot(families: dict, axis: str, methods: list[str]) -> bytes:
    figure = Figure(figsize=(3.2 * len(ROBUSTNESS_SHOWN), 3.2), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(ROBUSTNESS_SHOWN)), ROBUSTNESS_SHOWN,
                          strict=True):  # fmt: skip
        for i, (name, family) in enumerate(families.items()):
            for method, style in zip(methods, ("o-", "s--"), strict=False):
                label = name if method == "model" else f"{name} ({method})"
                ax.plot(family["levels"], family["mean"][method][metric], style, label=label,
                        color=f"C{i}")  # fmt: skip
        ax.set_xlabel(axis)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right upper")
    return _figure_png(figure)


def _layers_section(runs: list[dict]) -> str:
    layers = {_title(run) for run in runs}
    note = ("Only one layer so far: its point is shown; sample and evaluate more layers (one run "
            "each) and list them in the report to see a trend." if len(layers) == 1 else
            "Each marker is one run; lines join the runs of one backbone.")  # fmt: skip
    plot = _img(_depth_plot(runs), "metrics by layer depth", 0)
    return (f'<section id="layers"><h2>Metrics by layer depth</h2><p class="note">Depth is the '
            f"layer's position in the backbone (0 input, 1 last module). {note}</p>{plot}"
            "</section>")  # fmt: skip


# ---------------------------------------------------------------------------- plots and images


def _sweep_plot(sweep: list[dict]) -> bytes:
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    axes = figure.subplots(1, 2)
    for scheduler in dict.fromkeys(p["scheduler"] for p in sweep):
        points = sorted((p["steps"], p["cosine"], p["images_per_s"]) for p in sweep
                        if p["scheduler"] == scheduler)  # fmt: skip
        steps, cosine, speed = zip(*points, strict=True)
        axes[0].plot(steps, cosine, "o-", label=scheduler)
        axes[1].plot(steps, speed, "o-", label=scheduler)
    ticks = sorted({p["steps"] for p in sweep})
    for ax, label in zip(axes, ("feature cosine ↑", "images / s"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(title="scheduler")
    return _figure_png(figure)


def _depth_plot(runs: list[dict]) -> bytes:
    computed = {m for r in runs for about in r["evaluation"]["methods"].values() for m in about}
    metrics = [m for m in DEPTH_METRICS if m in computed]
    figure = Figure(figsize=(3.6 * len(metrics) + 1.6, 3.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(metrics)))
    methods = list(dict.fromkeys(m for r in runs for m in r["evaluation"]["methods"]))
    backbones = list(dict.fromkeys(r["evaluation"]["backbone"] for r in runs))
    for ax, metric in zip(axes, metrics, strict=True):
        for (k, method), backbone in [(km, b) for km in enumerate(methods) for b in backbones]:
            points = sorted(
                (r["evaluation"]["depth"], _mean(r["evaluation"]["methods"][method][metric]))
                for r in runs
                if r["evaluation"]["backbone"] == backbone
                and metric in r["evaluation"]["methods"].get(method, {})
            )
            if points:
                marker = "osD^v"[backbones.index(backbone) % 5]
                label = _method(method) + (f", {backbone}" if len(backbones) > 1 else "")
                depths, values = zip(*points, strict=True)
                line = "-" if len(set(depths)) == len(depths) else ""  # one line per layer order
                ax.plot(depths, values, marker=marker, linestyle=line, color=f"C{k}", label=label)
        ax.set_xlim(0, 1)
        ax.set_xlabel("layer depth (0 input, 1 last module)")
        arrow = "↑" if runs[0]["evaluation"]["higher_is_better"][metric] else "↓"
        ax.set_title(f"{_metric(metric)} {arrow}")
        ax.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=9)
    return _figure_png(figure)


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _img(data: bytes, alt: str, width: int) -> str:
    """An embedded PNG; one narrower than `width` is enlarged by an integer factor with
    nearest-neighbour pixels (a 32 px image stays sharp at 96 px)."""
    w = Image.open(io.BytesIO(data)).width
    scale = max(1, width // w)
    css = f' class="pixels" style="width:{w * scale}px"' if scale > 1 else ""
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<img src="{uri}" alt="{html.escape(alt)}"{css}>'


def _method(name: str) -> str:
    return METHODS.get(name, name)


def _metric(name: str) -> str:
    return METRICS.get(name, (name,))[0]
