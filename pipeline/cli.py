"""`featinv`: the commands behind the Snakemake rules, plus `validate` and `info` for users.

Errors a user can fix (bad config, bad store, an object store out of reach) print one line and
exit 2; `validate` exits 1 on an invalid store and 3 on a store finished for some stages only
(features complete, latents pending).  Tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, check_url, load_config, stage_groups
from pipeline.endpoints import quiet_lost_connections, unreachable_message
from storage_specs.layout import StoreError, open_root

# The Snakemake target that finishes each stage of a store.
STAGE_TARGETS = {"features": "extract_features", "latents": "encode_latents"}
PENDING_EXIT = 3  # `featinv validate`: finished for some stages, others pending


def _write_json_atomic(path: str, value: dict) -> None:
    """Snakemake markers: written whole or not at all."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def cmd_check_config(args) -> None:
    load_config(args.config)
    print(f"config {args.config}: ok")


def cmd_demo_images(args) -> None:
    from pipeline.demo import build_demo_images

    n = build_demo_images(args.out)
    print(f"demo collection: {n} images in {args.out}")


def cmd_demo_vae(args) -> None:
    from pipeline.demo import build_demo_vae

    print(f"demo VAE: {build_demo_vae(args.out)}")


def cmd_plan(args) -> None:
    from pipeline.plan import plan_store

    plan = plan_store(load_config(args.config))
    if args.out:
        _write_json_atomic(args.out, plan)
    print(
        f"planned {plan['store']}: {plan['n_samples']} samples in {plan['n_shards']} shards "
        f"x {len(plan['groups'])} group(s){_ignored(plan['ignored'], args.out)}",
        file=sys.stderr,
    )


def _ignored(ignored: list[str], plan_file: str | None) -> str:
    """What the listing left out (non-image files, unreadable tar tails, ...), the first few."""
    if not ignored:
        return ""
    more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
    where = f" (all in {plan_file})" if more and plan_file else ""
    return f"; {len(ignored)} ignored: {', '.join(ignored[:3])}{more}{where}"


def cmd_extract_shard(args) -> None:
    from pipeline.extract import extract_shards

    config = load_config(args.config)
    if args.threads:
        config["threads"] = args.threads
    records = extract_shards(config, args.group, [shard for run in args.shard for shard in run])
    if args.out:
        _write_json_atomic(args.out, records)


def _shard_run(text: str) -> range:
    """`--shard 7` or an inclusive run `--shard 0-7`."""
    first, _, last = text.partition("-")
    try:
        shards = range(int(first), int(last or first) + 1)
    except ValueError:
        shards = range(0)
    if not shards or shards.start < 0:
        raise argparse.ArgumentTypeError(f"not a shard number or a run A-B of them: '{text}'")
    return shards


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: '{text}'")
    return value


def cmd_finalize(args) -> None:
    """One line per stage; the store's summary is printed once per run (the Snakefile's
    onsuccess, or `featinv info`)."""
    from pipeline.finalize import finalize_store

    config = load_config(args.config, purpose="finalize")  # the plan job checked the backbones
    groups = None if args.stage == "all" else stage_groups(config, args.stage)
    summary = finalize_store(config["store"], groups)
    if args.out:
        _write_json_atomic(args.out, summary)
    pending = summary["pending_groups"]
    print(
        f"finalized {args.stage} of {config['store']}: {summary['n_valid']} valid, "
        f"{summary['n_skipped']} skipped" + (f"; pending: {', '.join(pending)}" if pending else ""),
        file=sys.stderr,
    )


def _dask(address: str | None) -> contextlib.AbstractContextManager:
    """`--dask-scheduler`: a client of that cluster, or None (work on this process's threads)."""
    from storage_specs.compute import dask_client

    return contextlib.nullcontext() if address is None else dask_client(address)


def cmd_validate(args) -> None:
    from storage_specs.samples import is_samples_store, validate_samples
    from storage_specs.validate import (
        lossy_errors,
        pending_stages,
        validate_store,
        withdraw_damaged,
    )

    check_url("store", args.store)
    samples = is_samples_store(args.store)
    if not samples:
        open_root(args.store, consolidated=False)  # no store at all: exit 2, like a bad URL
    stages = None if samples else pending_stages(args.store)
    if samples:
        problems = validate_samples(args.store)
    else:
        with _dask(args.dask_scheduler) as client:
            problems = validate_store(
                args.store, check_data=not args.metadata_only, progress=True, client=client,
                require_complete=stages is None, groups=stages and stages.groups,
            )  # fmt: skip
    for problem in problems:
        print(f"INVALID {problem}", file=sys.stderr)
    withdrawn = withdraw_damaged(args.store, problems) if args.repair and not samples else []
    if withdrawn:
        print(f"withdrew {len(withdrawn)} commit(s) ({', '.join(withdrawn[:5])}"
              f"{', ...' if len(withdrawn) > 5 else ''}): rerun the pipeline to redo those "
              "shards", file=sys.stderr)  # fmt: skip
    if problems:
        sys.exit(1)
    if stages:
        targets = " ".join(STAGE_TARGETS[stage] for stage in stages.pending)
        print(f"{args.store}: {', '.join(stages.finished)} complete; "
              f"{', '.join(stages.pending)} pending: run `snakemake {targets}`")  # fmt: skip
        sys.exit(PENDING_EXIT)
    for path, e in ({} if samples else lossy_errors(args.store)).items():
        print(f"{path}: lossy, measured relative L2 error max {e['rel_l2_max']:.3g} "
              f"(mean {e['rel_l2_mean']:.3g}) on {len(e['rows'])} stored exact samples; "
              f"bound {e['limit']:.3g}")  # fmt: skip
    print(f"{args.store}: valid")


def cmd_stats(args) -> None:
    from storage_specs.stats import store_stats

    check_url("store", args.store)
    with _dask(args.dask_scheduler) as client:
        stats = store_stats(args.store, args.array, client, write=args.write)
    print(json.dumps(stats))
    if args.write:
        print(f"wrote channel_stats of {len(stats)} array(s) into {args.store}", file=sys.stderr)


def cmd_sample(args) -> None:
    from sampling.sample import sample_run

    out = sample_run(load_config(args.config, purpose="sample"))
    if args.out:
        _write_json_atomic(args.out, {"samples": str(out / "samples.zarr")})
    print(f"samples: {out / 'samples.zarr'} (PNG files in {out / 'png'})")


def cmd_guided_decode(args) -> None:
    from sampling.guided_run import decode_arrays, guided_run, store_name

    config = load_config(args.config, purpose="sample")
    if args.targets:
        if not args.to:
            raise ValueError("--targets needs --to FOLDER (where the images go)")
        out = decode_arrays(config, args.targets, Path(args.to))
        print(f"guided decoding of {args.targets}: {out} (guided.json, target*.png)")
        return
    out = guided_run(config) / store_name(config["guided"])
    if args.out:
        _write_json_atomic(args.out, {"samples": str(out)})
    print(f"guided samples: {out}")


def cmd_evaluate(args) -> None:
    from sampling.evaluate import evaluate_run, summary_lines

    out = evaluate_run(load_config(args.config, purpose="sample"))
    print("\n".join(summary_lines(out / "evaluation.json")))


def cmd_report(args) -> None:
    from sampling.report import build_report
    from sampling.sample import output_folder

    config = load_config(args.config, purpose="sample")
    runs = [Path(run) for run in args.runs] or [output_folder(config)]
    path = build_report(runs, Path(args.out) if args.out else runs[0] / "report.html")
    print(f"report: {path.resolve()}")


def _sampling_command(target: str, said: str) -> Callable[[argparse.Namespace], None]:
    """A subcommand that runs ``module:function`` on the config's sampling setup and says where
    its output went (``said`` with ``{out}``); the module is imported only when it runs."""
    module, function = target.split(":")

    def run(args) -> None:
        config = load_config(args.config, purpose="sample")
        out = getattr(importlib.import_module(module), function)(config)
        print(said.format(out=out))

    return run


cmd_steer = _sampling_command("sampling.analyses:steer_run", "steering grids: {out}")
cmd_composite = _sampling_command(
    "sampling.analyses:composite_run", "composite-feature grids: {out}"
)
cmd_variants = _sampling_command(
    "sampling.robustness:variants_run", "robustness variants: {out} (manifest.json)"
)
cmd_robustness = _sampling_command(
    "sampling.robustness:robustness_run", "robustness analysis: {out}/robustness.json"
)


def cmd_info(args) -> None:
    from pipeline.summary import print_summary

    check_url("store", args.store)
    print_summary(args.store, classify=args.classify)


def cmd_migrate(args) -> None:
    from storage_specs.migrate import migrate_store

    check_url("store", args.store)
    changed = migrate_store(args.store)
    print(f"{args.store}: featinv-store/3 ({len(changed)} arrays renamed their dimensions)")


def cmd_export_webdataset(args) -> None:
    from storage_specs.export import export_webdataset

    check_url("store", args.store)
    check_url("out", args.out)
    features = f"features/{args.backbone}/{args.layer}"
    with _dask(args.dask_scheduler) as client:
        tars = export_webdataset(
            args.store, args.out, features, args.target, args.max_mb * 2**20, client=client
        )
    print(f"wrote {len(tars)} tar shard(s)" + (f": {tars[0]} ..." if tars else ""))


def baseline_spec(spec: dict) -> dict:
    """The `training:` section of the up-convolutional baseline beside a run: same data, split,
    seed and loop; its own mode, folder and step count."""
    steps = spec["updecoder"]["steps"] or spec["steps"]
    return {**spec, "mode": "updecoder", "run": f"{spec['run']}-updecoder", "steps": steps}


def _training_config(args) -> dict:
    config = load_config(args.config, purpose="train")
    if args.baseline:
        config["training"] = baseline_spec(config["training"])
    if args.store:
        check_url("--store", args.store)
        config["store"] = args.store
    return config


def _train_args(args) -> list[str]:
    """`featinv train`'s own arguments, for the processes a launcher starts."""
    extra = ["--baseline", args.baseline] if args.baseline else []
    return [args.config, *extra, *(["--store", args.store] if args.store else [])]


def cmd_launch_train(args) -> None:
    from training.launch import launch

    config = _training_config(args)
    code = launch(config["training"], _train_args(args))
    if code is None:
        _train(config)
    elif code:
        sys.exit(code)


def cmd_train(args) -> None:
    _train(_training_config(args))


def _train(config: dict) -> None:
    """Train in this process (one rank of a launch, or the whole run) and say what was made."""
    from training.train import train

    out = train(config)
    if os.environ.get("RANK", "0") == "0":  # once, not per process of `accelerate launch`
        record = json.loads((out / "featinv_training.json").read_text())
        previews = sorted((out / "previews").glob("*.png"))
        loss = record["final_loss"]
        print(
            f"trained model: {out} ({record['mode']}, {record['steps']} steps, final loss "
            f"{'n/a' if loss is None else f'{loss:.4f}'}"
            + (f"; latest held-out grid {previews[-1]}" if previews else "")
            + ")"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featinv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        return p

    p = add("check-config", cmd_check_config, "validate a config file")
    p.add_argument("config")
    p = add("demo-images", cmd_demo_images, "build the embedded demo image collection")
    p.add_argument("out")
    p = add("demo-vae", cmd_demo_vae, "save the tiny demo VAE (diffusers save_pretrained)")
    p.add_argument("out")
    p = add("plan", cmd_plan, "list the source and create/resume the store")
    p.add_argument("config")
    p.add_argument("--out", help="write the plan JSON here (Snakemake checkpoint)")
    p = add("extract-shard", cmd_extract_shard, "extract and commit shards of one group")
    p.add_argument("config")
    p.add_argument("--group", default="main")
    p.add_argument(
        "--shard", type=_shard_run, action="append", required=True,
        help="a shard or a run of them (0-7), repeatable: one job, models loaded once",
    )  # fmt: skip
    p.add_argument("--threads", type=_positive, help="torch threads (default: the config's)")
    p.add_argument("--out", help="write the commit records here (Snakemake marker)")
    p = add("finalize", cmd_finalize, "gather commits, validate, consolidate, summarise")
    p.add_argument("config")
    p.add_argument(
        "--stage",
        choices=["features", "latents", "all"],
        default="all",
        help="the groups that must be committed (default: all)",
    )
    p.add_argument("--out")
    p = add("validate", cmd_validate, "check a store against the spec; exit 1 on any problem")
    p.add_argument("store")
    p.add_argument("--metadata-only", action="store_true", help="skip reading every chunk")
    p.add_argument("--repair", action="store_true",
                   help="withdraw the commits of missing or damaged shards (and restore the "
                        "metadata of deleted arrays), so that the next run of the pipeline "
                        "redoes them")  # fmt: skip
    dask_help = (
        "read the shards on this dask cluster: tcp://host:port, a scheduler file, or 'local' "
        "(a LocalCluster on this machine)"
    )
    p.add_argument("--dask-scheduler", metavar="ADDR", help=dask_help + "; default: threads here")
    p = add("stats", cmd_stats, "per-channel statistics of a store's arrays (JSON on stdout)")
    p.add_argument("store")
    p.add_argument("--array", action="append", metavar="PATH",
                   help="e.g. features/resnet18/layer4 (repeatable; default: all)")  # fmt: skip
    p.add_argument("--dask-scheduler", metavar="ADDR", default="local",
                   help=dask_help + " (the default)")  # fmt: skip
    p.add_argument("--write", action="store_true", help="store them as the arrays' channel_stats")
    p = add("export-webdataset", cmd_export_webdataset, "write webdataset tar shards of an array")
    p.add_argument("store")
    p.add_argument("out", help="folder (path or fsspec URL) for 00000.tar, 00001.tar, ...")
    p.add_argument("--backbone", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--target", help="also export a target array, e.g. latents/vae/mean")
    p.add_argument("--max-mb", type=_positive, default=512,
                   help="tar size: about this, in whole store shards (default 512)")  # fmt: skip
    p.add_argument("--dask-scheduler", metavar="ADDR",
                   help=dask_help + "; each tar is one task; default: threads here")  # fmt: skip
    for name, fn, what in (
        ("train", cmd_train, "fit the feature-conditioned diffusion model from a store"),
        ("launch-train", cmd_launch_train,
         "train on training.nodes x processes_per_node processes (accelerate; srun in SLURM)"),
    ):  # fmt: skip
        p = add(name, fn, what)
        p.add_argument("config", help="a config with `store` and `training:` (see README)")
        p.add_argument("--store", help="train on this store instead of the config's")
        p.add_argument("--baseline", choices=["updecoder"],
                       help="train the evaluation's baseline into <run>-updecoder")  # fmt: skip
    for name, fn, what in (
        ("sample", cmd_sample, "sample images from stored feature maps (config `sampling:`)"),
        ("evaluate", cmd_evaluate, "re-extract and score the samples against the originals"),
        ("steer", cmd_steer, "concept steering grids (config `analyses.steering`)"),
        ("composite", cmd_composite, "composite-feature grids (config `analyses.composite`)"),
        ("variants", cmd_variants, "corrupted and adversarial variants (config `robustness:`)"),
        ("robustness", cmd_robustness, "extract, reconstruct and score the variants"),
    ):
        p = add(name, fn, what)
        p.add_argument("config", help="a config with `store` and a trained model (see README)")
        if name == "sample":
            p.add_argument("--out", help="write a marker JSON here when done (Snakemake)")
    p = add("guided-decode", cmd_guided_decode,
            "training-free guided decoding of stored maps (config `guided:`)")  # fmt: skip
    p.add_argument("config", help="a config with `store` and `guided:` (see README)")
    p.add_argument("--out", help="write a marker JSON here when done (Snakemake)")
    p.add_argument("--targets", help="decode the maps in this .npy file instead of store entries")
    p.add_argument("--to", help="folder for the images of --targets")
    p = add("report", cmd_report, "one HTML page: samples, metrics, plots, analyses")
    p.add_argument("config")
    p.add_argument("runs", nargs="*", help="sample folders to report on (default: the config's)")
    p.add_argument("--out", help="the HTML file (default: report.html in the first run's folder)")
    p = add("info", cmd_info, "print a store's summary")
    p.add_argument("store")
    p.add_argument("--no-classify", dest="classify", action="store_false")
    p = add("migrate", cmd_migrate, "upgrade a featinv-store/2 store to /3 in place")
    p.add_argument("store")
    return parser


def _fail(message: str) -> None:
    """Print the one-line error and exit 2.

    An error raised mid-I/O leaves zarr's background event loop with abandoned requests; Python
    closes them at shutdown and prints each one's teardown error as "Exception ignored".  The
    error is said already, so that noise is dropped."""
    print(f"featinv: error: {message}", file=sys.stderr)
    sys.unraisablehook = lambda unraisable: None
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quiet_lost_connections()
    try:
        args.fn(args)
    except (ConfigError, StoreError, ValueError) as exc:
        _fail(str(exc))
    except Exception as exc:
        message = unreachable_message(exc)
        if message is None:
            raise
        _fail(message)


if __name__ == "__main__":
    main()
