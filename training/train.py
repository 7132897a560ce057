"""`featinv train`: fit the feature-conditioned diffusion model from a store, and nothing else.

The loop reads top to bottom: pairs from the store (read ahead in worker processes), a latent
sample or pixels as x0, noise at a random timestep, the denoiser's prediction of the noise (or of
v) given the feature map (dropped for `condition_dropout` of the pairs), an MSE step.  The
updecoder baseline takes the same pairs and steps, its loss the MSE of its x0 (`batch_loss` picks
the mode's loss once).  The components it calls each own one job: `data` (which pairs, in which
order, for which rank), `denoisers` (what is trained), `checkpoint` (exact resume), `preview`
(held-out grids).

Every random draw of a step comes from a generator seeded by (seed, step, micro-batch, rank), so
an interrupted and resumed run repeats the uninterrupted one bit for bit.  Runs unchanged under
`accelerate launch` (any number of processes and machines).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from storage_specs.provenance import provenance
from training.checkpoint import Checkpoints
from training.data import EpochBatches, TrainingData, open_training_data
from training.denoisers import RECORD, Trainee, new_trainee
from training.models import FeatureNorm
from training.preview import Preview

# Settings a resumed run must share with its checkpoints (the rest may change between runs).
RESUME_SETTINGS = ("mode", "features", "target", "views", "heldout", "compact", "featinv",
                   "updecoder", "prediction_type", "noise_schedule", "condition_dropout", "seed",
                   "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                   "lr_warmup_steps")  # fmt: skip
# (the optimizer and its schedule come back with a checkpoint: a new rate would be recorded only)
DEFAULT_LR = {"compact": 2e-4, "featinv": 1e-5, "updecoder": 1e-4}  # updecoder: Dosovitskiy & Brox


def resume_settings(spec: dict) -> dict:
    """What a resumed run must share with its checkpoints; the baseline's `updecoder.steps`, like
    `steps`, may grow (`featinv train --baseline` continues the run)."""
    settings = {key: spec[key] for key in RESUME_SETTINGS}
    settings["updecoder"] = {k: v for k, v in spec["updecoder"].items() if k != "steps"}
    return settings


def step_generator(seed: int, step: int, micro: int, rank: int, device) -> torch.Generator:
    """The generator of one micro-batch: its draws depend on nothing but these numbers."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def diffusion_loss(denoiser, trainee: Trainee, data: TrainingData, batch: dict, dropout: float,
                   generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """The denoising loss of one batch (epsilon or v prediction, as the noise schedule says)."""
    schedule = trainee.noise_scheduler
    x0 = data.to_model_space(batch, generator)
    n, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t = torch.randint(0, schedule.config.num_train_timesteps, (n,), generator=generator,
                      device=device)  # fmt: skip
    keep = (torch.rand(n, generator=generator, device=device) >= dropout).float()
    x_t = schedule.add_noise(x0, noise, t)
    if schedule.config.prediction_type == "v_prediction":
        target = schedule.get_velocity(x0, noise, t)
    else:
        target = noise
    prediction = denoiser(x_t, t, batch["features"], keep_hint=keep, keep_prompt=keep)
    return F.mse_loss(prediction.float(), target.float())


def reconstruction_loss(decoder, data: TrainingData, batch: dict,
                        generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """The updecoder's loss: MSE of its x0 to the target's (no noise, timestep or dropout)."""
    x0 = data.to_model_space(batch, generator)
    return F.mse_loss(decoder(batch["features"]).float(), x0.float())


def batch_loss(trainee: Trainee, model, data: TrainingData, spec: dict):
    """The run's loss as `loss(batch, generator=...)`, around `model` (the accelerate-wrapped)."""
    if trainee.noise_scheduler is None:
        return partial(reconstruction_loss, model, data)
    return partial(diffusion_loss, trainee.denoiser(model), trainee, data,
                   dropout=spec["condition_dropout"])  # fmt: skip


class StepMeter:
    """Wall time, time spent waiting for data, and loss since the last report."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.losses, self.pairs = time.perf_counter(), 0.0, [], 0

    def batches(self, loader):
        """The loader's batches, timing how long each was waited for."""
        iterator = iter(loader)
        while True:
            begin = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - begin
            yield batch

    def report(self, accelerator: Accelerator, lr: float) -> dict:
        elapsed = time.perf_counter() - self.start
        loss = torch.tensor(float(np.mean(self.losses)), device=accelerator.device)
        values = {
            "loss": accelerator.reduce(loss, "mean").item(),
            "lr": lr,
            "samples_per_s": self.pairs * accelerator.num_processes / elapsed,
            "data_wait_fraction": self.wait / elapsed,
        }
        self.reset()
        return values


def _flat(prefix: str, value) -> dict:
    """Hyperparameters as TensorBoard takes them: flat scalars and strings."""
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in _flat(f"{prefix}{key}/", sub).items()
        }
    if isinstance(value, int | float | str | bool):
        return {prefix.rstrip("/"): value}
    return {prefix.rstrip("/"): json.dumps(value)}


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def make_accelerator(spec: dict, out: Path) -> Accelerator:
    return Accelerator(
        # processes launched on a machine without GPUs form a gloo group (accelerate's MULTI_CPU)
        cpu=int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available(),
        mixed_precision=spec["mixed_precision"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"],
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def make_optimizer(model: torch.nn.Module, spec: dict, world: int):
    """AdamW and a diffusers LR schedule (counted in process-steps, as accelerate steps it)."""
    lr = spec["learning_rate"] or DEFAULT_LR[spec["mode"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(spec["adam_betas"]),
                                  weight_decay=spec["weight_decay"])  # fmt: skip
    schedule = get_scheduler(
        spec["lr_scheduler"], optimizer, num_warmup_steps=spec["lr_warmup_steps"] * world,
        num_training_steps=spec["steps"] * world,
    )  # fmt: skip
    return optimizer, schedule


def make_loader(dataset, sampler: EpochBatches, spec: dict, device: torch.device):
    """Whole batches read by `num_workers` processes, `prefetch_factor` batches ahead each."""
    workers = spec["num_workers"]
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers,
        prefetch_factor=spec["prefetch_factor"] if workers else None,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


@contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module):
    """The EMA weights swapped into the model for a while (nothing without EMA)."""
    if ema is None:
        yield
        return
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def train(config: dict, progress: bool = True) -> Path:
    """Train (or resume) the run of `config["training"]` on `config["store"]`; the model folder."""
    spec = config["training"]
    out = Path(spec["output_dir"]) / spec["run"]
    data = open_training_data(config["store"], spec)  # every store problem, before any work
    accelerator = make_accelerator(spec, out)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    trainee = new_trainee(spec, data).to(device)
    if trainee.unet is not None and spec["mixed_precision"] != "no" and device.type == "cuda":
        # the frozen UNet in half precision: half its memory (CPU autocast lacks group_norm)
        trainee.unet.to({"fp16": torch.float16, "bf16": torch.bfloat16}[spec["mixed_precision"]])
    model, optimizer, lr_scheduler = accelerator.prepare(
        trainee.model.train(), *make_optimizer(trainee.model, spec, world)
    )
    unwrapped = accelerator.unwrap_model(model)
    ema = EMAModel(unwrapped.parameters(), decay=spec["ema"]["decay"]) if (
        spec["ema"]["enabled"]) else None  # fmt: skip
    settings = {**resume_settings(spec), "store_id": data.record["store_id"]}  # not another store
    checkpoints = Checkpoints(out / "checkpoints", spec["checkpoints_total_limit"], accelerator)
    step, start = checkpoints.resume(ema, settings)
    if step >= spec["steps"] and (out / RECORD).exists():  # finished: its record stays as it is
        accelerator.end_training()
        return out

    accum = spec["gradient_accumulation_steps"]
    dataset = data.dataset()
    sampler = EpochBatches(len(dataset), spec["batch_size"], world, rank, spec["seed"], start,
                           count=max(0, spec["steps"] - step) * accum)  # fmt: skip
    loss_of = batch_loss(trainee, model, data, spec)
    preview = Preview(data, trainee, spec, out) if accelerator.is_main_process else None
    accelerator.init_trackers("featinv", config=_flat("", spec))
    bar = tqdm(total=spec["steps"], initial=step, unit="step", desc=f"train {spec['run']}",
               disable=not (progress and accelerator.is_main_process),
               mininterval=1 if sys.stderr.isatty() else 30)  # fmt: skip
    meter, micro, logged = StepMeter(), 0, {}

    for batch in meter.batches(make_loader(dataset, sampler, spec, device)):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}  # fmt: skip
        with accelerator.accumulate(model), accelerator.autocast():
            generator = step_generator(spec["seed"], step, micro % accum, rank, device)
            loss = loss_of(batch, generator=generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and spec["max_grad_norm"]:
                accelerator.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        meter.losses.append(loss.item())
        meter.pairs += len(batch["key"])
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step(unwrapped.parameters())
        bar.update()
        last = step == spec["steps"]
        if step % spec["log_every"] == 0 or last:
            logged = meter.report(accelerator, lr_scheduler.get_last_lr()[0])
            accelerator.log(logged, step=step)
            bar.set_postfix(loss=f"{logged['loss']:.4f}",
                            wait=f"{logged['data_wait_fraction']:.0%}")  # fmt: skip
        if step % spec["checkpoint_every"] == 0 or last:
            checkpoints.save(step, sampler.advance(start, micro), ema, settings)
        if spec["preview_every"] and (step % spec["preview_every"] == 0 or last):
            if preview is not None:
                with ema_weights(ema, unwrapped), accelerator.autocast():
                    preview.log(accelerator, unwrapped, step)
            accelerator.wait_for_everyone()
    bar.close()
    run = {"steps": step, "final_loss": logged.get("loss"), "world_size": world}
    _save_final(accelerator, unwrapped, ema, trainee, data, spec, out, run)
    accelerator.end_training()
    return out


def _save_final(accelerator, model, ema, trainee: Trainee, data: TrainingData, spec: dict,
                out: Path, run: dict) -> None:  # fmt: skip
    """The model (EMA weights when kept) with `save_pretrained`, its noise schedule (if it has
    one), and the training record, written last: its presence means the folder is whole."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    (out / RECORD).unlink(missing_ok=True)  # a continued run: the folder is not whole until the end
    with ema_weights(ema, model):
        model.save_pretrained(out, safe_serialization=True)
    if trainee.noise_scheduler is not None:
        trainee.noise_scheduler.save_pretrained(out / "scheduler")
    _write_json_atomic(out / RECORD, training_record(trainee, data, spec, run))


def training_record(trainee: Trainee, data: TrainingData, spec: dict, run: dict) -> dict:
    """What a sampler, an evaluation or a person needs to know about the model (SPEC-like)."""
    schedule = trainee.noise_scheduler
    return {
        "featinv_training": 1,
        "mode": trainee.mode,
        "model_class": type(trainee.model).__name__,
        "base": trainee.base,
        "store": {k: v for k, v in data.record.items() if k != "split"},
        "split": data.record["split"],
        "normalisation": {
            "kind": "per-channel (x - mean) / std, from the array's channel_stats",
            "in_model": _norm_buffers(trainee.model),
        },
        "noise_schedule": None if schedule is None else _noise_record(schedule.config),
        "prediction_type": "x0" if schedule is None else schedule.config["prediction_type"],
        "unconditional": trainee.unconditional,
        **run,  # steps, final_loss, world_size
        "seed": spec["seed"],
        "ema": spec["ema"],
        "mixed_precision": spec["mixed_precision"],
        "training": spec,
        "provenance": provenance({"store": data.url, "training": spec}),
    }


def _noise_record(schedule: dict) -> dict:
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    return {k: schedule[k] for k in keys if k in schedule}


def _norm_buffers(model: torch.nn.Module) -> str:
    """Where the model keeps its feature normalisation (state-dict names)."""
    name = next(n for n, m in model.named_modules() if isinstance(m, FeatureNorm))
    return f"{name}.mean, {name}.std buffers"
