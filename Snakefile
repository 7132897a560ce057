"""featinv: `snakemake extract_features` turns an image collection into a feature store;
`snakemake encode_latents` adds the training targets (pixels, VAE latents) of the same views;
`snakemake train` fits the feature-conditioned diffusion model from the store (config `training:`);
`snakemake all` does all of them.

plan (checkpoint: list the source, create/resume the store)
  -> extract_shard (one job per run of shards x group; commits each shard in the store)
  -> finalize_<stage> (gather commits, validate every chunk, statistics, consolidate)
  -> train (reads the finished store only; resumes from its own checkpoints)

The store holds the authoritative commit records; the small JSON files under work_dir are only
Snakemake's view of them, so losing work_dir costs a re-check, never a re-extraction; markers of
a store that is gone or was replaced are removed before the run, which then rebuilds it.  The
store's summary is printed once, at the end of a run that finished a stage.
"""

import hashlib
import json
import sys
from pathlib import Path

from snakemake.utils import validate

from pipeline.config import SCHEMA_PATH, ConfigError, public_config, stage_groups, validate_config
from pipeline.markers import check_markers, finalized_markers
from storage_specs.layout import StoreError

# The embedded demo config, unless the user passes --configfile (then only theirs counts, so no
# demo value leaks into a real run).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# One-line errors for people, from the process they started (a cluster job's Snakemake reads the
# config that process checked, and skips loading every backbone again; so does the next run of the
# same backbones); snakemake's own check below fills the defaults.
try:
    validate_config(config, "extract" if workflow.is_main_process else "finalize", remember=True)
except ConfigError as exc:
    sys.exit(f"featinv: {exc}")
GIVEN = json.loads(json.dumps(config))  # what the user set, before the schema's defaults
validate(config, str(SCHEMA_PATH), set_default=True)

DEMO = "data/demo"
DEMO_VAE = "data/demo_vae"
FEATINV = f"{sys.executable} -m pipeline.cli"
_store_id = hashlib.sha256(public_config(config)["store"].encode()).hexdigest()[:10]
WORK = f"{config['work_dir']}/{Path(config['store'].rstrip('/')).name}-{_store_id}"
CONFIG_JSON = f"{WORK}/config.json"


def _write_effective_config() -> None:
    """The config as given (CLI overrides included) for the featinv jobs, which fill the defaults
    themselves; rewritten only when it changes, so an unchanged rerun does nothing, nor does a
    featinv version whose schema grew a default."""
    text = json.dumps(GIVEN, indent=1, sort_keys=True)
    path = Path(CONFIG_JSON)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(text)
    path.chmod(0o600)  # it may hold a source URL's password: its owner's only


_write_effective_config()

# The store is the authority: markers of a store that is gone or was replaced are removed, so the
# run rebuilds it (one read of the store's root metadata, by the main process only).
if workflow.is_main_process:
    try:
        check_markers(Path(WORK), config["store"], workflow.dryrun)
    except StoreError as exc:
        sys.exit(f"featinv: {exc}")
FINALIZED = finalized_markers(Path(WORK))


STAGES = [stage for stage in ("features", "latents") if stage_groups(config, stage)]
TRAINING = config.get("training")
MODEL = f"{TRAINING['output_dir']}/{TRAINING['run']}" if TRAINING else None


# What is sampled, evaluated and reported: sampling.model, else the model trained here; its
# up-convolutional baseline sits beside it (trained here only for the model trained here).
SAMPLING = config["sampling"]
SAMPLED = SAMPLING["model"] or MODEL
BASELINE = f"{SAMPLED}-updecoder" if SAMPLED and SAMPLING["baselines"]["updecoder"] else None
SAMPLES = f"{SAMPLING['output_dir']}/{SAMPLING['name'] or Path(SAMPLED).name}" if SAMPLED else None
GUIDED = config["guided"]
GUIDED_MARKER = f"{SAMPLES}/guided{'-pooled' if GUIDED['pooled'] else ''}.json"

# What each job asks a cluster for (profiles/slurm); the light bookkeeping rules run where
# snakemake runs.
RESOURCES = config["resources"]
SAMPLING_RESOURCES = RESOURCES["sampling"]
SAMPLING_JOB = {
    "mem_mb": SAMPLING_RESOURCES["mem_mb"],
    "runtime": SAMPLING_RESOURCES["runtime"],
    "gpu": SAMPLING_RESOURCES["gpus"]
    if SAMPLING_RESOURCES["gpus"] is not None
    else int(bool(TRAINING and TRAINING["gpus"])),
}

# Training: one SLURM task per node, each running `accelerate launch` for its GPUs (`--gres` is per
# node; `tasks_per_gpu: 0` keeps the executor from adding --ntasks-per-gpu).
TRAIN_JOB = {}
if TRAINING:
    TRAIN_JOB = {
        "mem_mb": TRAINING["mem_mb"],
        "runtime": TRAINING["runtime_min"],
        "nodes": TRAINING["nodes"],
        "tasks": TRAINING["nodes"],
        "slurm_extra": "--ntasks-per-node=1",
    }
    if TRAINING["gpus"]:
        TRAIN_JOB |= {"gres": f"gpu:{TRAINING['gpus']}", "tasks_per_gpu": 0}


# On a cluster Snakemake still caps each job's threads at --cores (the workflow profile says `all`:
# the CPUs of the submit host); say so rather than let jobs shrink unnoticed. (A cluster run is
# one with a job limit: --jobs, which the cluster profiles set.)
_cluster_run = workflow.global_resources["_nodes"].value is not None
if _cluster_run and workflow.is_main_process and not workflow.dryrun:
    _threads = {
        "threads": config["threads"],
        "training.threads": TRAINING["threads"] if TRAINING else 0,
        "resources.finalize.threads": RESOURCES["finalize"]["threads"],
        "resources.sampling.threads": RESOURCES["sampling"]["threads"],
    }
    _key = max(_threads, key=_threads.get)
    if _threads[_key] > workflow.cores:
        print(f"featinv: --cores {workflow.cores} caps {_key} ({_threads[_key]}) on the cluster; "
              "pass --cores N, the most CPUs one job may ask for", file=sys.stderr)


localrules:
    all,
    extract_features,
    encode_latents,
    demo_images,
    demo_vae,
    plan,


rule all:
    default_target: True
    input:
        [f"{WORK}/finalized-{stage}.json" for stage in STAGES],
        [f"{SAMPLES}/report.html"] if SAMPLED else [],


onsuccess:
    if finalized_markers(Path(WORK)) != FINALIZED:  # once per run, however many stages finished
        from pipeline.summary import print_summary

        print_summary(config["store"])
    if SAMPLED and Path(f"{SAMPLES}/report.html").exists():
        print(f"featinv report: {Path(SAMPLES, 'report.html').resolve()}")


rule extract_features:
    input:
        f"{WORK}/finalized-features.json",


rule encode_latents:
    input:
        f"{WORK}/finalized-latents.json" if "latents" in STAGES else [],


rule demo_images:
    output:
        f"{DEMO}/.complete",
    shell:
        "{FEATINV} demo-images {DEMO}"


rule demo_vae:
    output:
        f"{DEMO_VAE}/.complete",
    shell:
        "{FEATINV} demo-vae {DEMO_VAE}"


def demo_inputs(wildcards):
    """The demo collection and VAE are built on first use, when the config names them."""
    uses_vae = any(t.get("model", "").rstrip("/") == DEMO_VAE for t in config["targets"])
    return [f"{DEMO}/.complete"] * (config["source"].rstrip("/") == DEMO) + [
        f"{DEMO_VAE}/.complete"
    ] * uses_vae


checkpoint plan:
    input:
        demo_inputs,
        config=CONFIG_JSON,
    output:
        f"{WORK}/plan.json",
    shell:
        "{FEATINV} plan {input.config} --out {output}"


rule extract_shard:
    """A run of shards of one group (pipeline.jobs.shard_batches): models load once per job and
    each shard is committed in the store as soon as it is whole, so a rerun of a killed job redoes
    only its uncommitted shards."""
    input:
        config=CONFIG_JSON,
        plan=f"{WORK}/plan.json",
    output:
        f"{WORK}/shards/{{group}}/{{first}}-{{last}}.json",
    wildcard_constraints:
        first=r"\d+",
        last=r"\d+",
    threads: config["threads"]
    resources:
        mem_mb=RESOURCES["extract"]["mem_mb"],
        runtime=RESOURCES["extract"]["runtime"],
        gpu=RESOURCES["extract"]["gpus"],
    shell:
        "{FEATINV} extract-shard {input.config} --group {wildcards.group} "
        "--shard {wildcards.first}-{wildcards.last} --threads {threads} --out {output}"


def shard_markers(wildcards):
    from pipeline.jobs import shard_batches

    plan = json.loads(Path(checkpoints.plan.get().output[0]).read_text())
    return [
        f"{WORK}/shards/{group}/{first}-{last}.json"
        for group in plan["stages"][wildcards.stage]
        for first, last in shard_batches(plan["n_shards"], plan["shard_size"])
    ]


rule finalize:
    input:
        shard_markers,
        config=CONFIG_JSON,
    output:
        f"{WORK}/finalized-{{stage}}.json",
    wildcard_constraints:
        stage="features|latents",
    threads: RESOURCES["finalize"]["threads"]
    resources:
        finalize=1,  # one finalize at a time per store (the profiles cap it at 1)
        mem_mb=RESOURCES["finalize"]["mem_mb"],
        runtime=RESOURCES["finalize"]["runtime"],
    shell:
        "{FEATINV} finalize {input.config} --stage {wildcards.stage} --out {output}"



if TRAINING:

    rule train:
        """The model folder's training record is written last: its presence means the run
        finished.  The checkpoints beside it are no outputs, so Snakemake never deletes them, and
        a rerun after a failure resumes from the latest one."""
        input:
            [f"{WORK}/finalized-{stage}.json" for stage in STAGES],
            config=CONFIG_JSON,
        output:
            f"{MODEL}/featinv_training.json",
        threads: TRAINING["threads"]
        resources:
            **TRAIN_JOB,
        shell:
            "{FEATINV} launch-train {input.config}"

else:

    rule train:
        shell:
            "echo 'featinv: the config has no training: section (see README)' >&2; exit 2"


if BASELINE and SAMPLED == MODEL:

    rule train_baseline:
        """The up-convolutional decoder (Dosovitskiy & Brox) on the same cache: the deterministic
        baseline of the evaluation, trained by the same trainer (`training.updecoder`)."""
        input:
            [f"{WORK}/finalized-{stage}.json" for stage in STAGES],
            config=CONFIG_JSON,
        output:
            f"{BASELINE}/featinv_training.json",
        threads: TRAINING["threads"]
        resources:
            **TRAIN_JOB,
        shell:
            "{FEATINV} launch-train {input.config} --baseline updecoder"


if SAMPLED:

    def trained_models(wildcards):
        """The model (trained here unless sampling.model names one) and the baseline decoder."""
        models = [] if SAMPLING["model"] else [f"{MODEL}/featinv_training.json"]
        return models + ([f"{BASELINE}/featinv_training.json"] if BASELINE else [])


    rule sample:
        """Samples of the held-out maps (or sampling.keys) by the model and its baselines; the store
        beside the marker is no output, so a failed or killed run resumes where it stopped."""
        input:
            trained_models,
            [f"{WORK}/finalized-{stage}.json" for stage in STAGES],
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/sampled.json",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} sample {input.config} --out {output}"


    rule guided_decode:
        """The training-free guided decoder (and pixel optimisation) on the sampler's entries,
        into guided.zarr beside samples.zarr; resumes like `sample`."""
        input:
            [f"{MODEL}/featinv_training.json"] if not (GUIDED["prior"] or SAMPLING["model"]) else [],
            [f"{WORK}/finalized-{stage}.json" for stage in STAGES],
            config=CONFIG_JSON,
        output:
            GUIDED_MARKER,
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} guided-decode {input.config} --out {output}"


    rule evaluate:
        """Re-extraction with the recorded backbone; the one job after extraction that runs it.
        It scores every samples store of the folder: the sampler's and, when `guided.enabled`,
        the guided decoder's."""
        input:
            f"{SAMPLES}/sampled.json",
            [GUIDED_MARKER] if GUIDED["enabled"] else [],
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/evaluation.json",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} evaluate {input.config}"


    rule steer:
        input:
            trained_models,
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/analyses/steering/manifest.json",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} steer {input.config}"


    rule composite:
        input:
            trained_models,
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/analyses/composite/manifest.json",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} composite {input.config}"


    rule report:
        input:
            f"{SAMPLES}/evaluation.json",
            f"{SAMPLES}/analyses/steering/manifest.json",
            f"{SAMPLES}/analyses/composite/manifest.json",
            [f"{SAMPLES}/robustness/robustness.json"] if config["robustness"]["enabled"] else [],
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/report.html",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} report {input.config} --out {output}"


if SAMPLED:

    rule variants:
        """Corrupted and adversarial variants of held-out images (config `robustness:`)."""
        input:
            trained_models,
            [f"{WORK}/finalized-{stage}.json" for stage in STAGES],
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/robustness/variants/manifest.json",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} variants {input.config}"


    rule robustness:
        """The variants' features through the extraction stage, reconstructed and evaluated."""
        input:
            f"{SAMPLES}/robustness/variants/manifest.json",
            config=CONFIG_JSON,
        output:
            f"{SAMPLES}/robustness/robustness.json",
        threads: SAMPLING_RESOURCES["threads"]
        resources:
            **SAMPLING_JOB,
        shell:
            "{FEATINV} robustness {input.config}"
