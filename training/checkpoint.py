"""Checkpoints: `accelerator.save_state` folders, written whole, the last few kept, exact resume.

A checkpoint is the model, optimizer, learning-rate scheduler and RNG states (accelerate, model
weights as safetensors), the EMA weights (safetensors, written here rather than through
`register_for_checkpointing`, whose loader unpickles), and `trainer_state.json`: the step, the
position in the stream of pairs, and the settings a resumed run must share.  It is written into
a hidden folder and renamed when whole, so a run killed while saving leaves only debris that the
next run deletes, never a torn checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from training.data import Position
from training.denoisers import one_line

STATE = "trainer_state.json"
EMA = "ema.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from; the message is one line."""


class Checkpoints:
    """`<folder>/checkpoint-<step>/`, at most `keep` of them."""

    def __init__(self, folder: Path, keep: int, accelerator: Accelerator):
        self.folder, self.keep, self.accelerator = Path(folder), keep, accelerator

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        found = [
            (int(m.group(1)), p)
            for p in (self.folder.iterdir() if self.folder.is_dir() else [])
            if (m := _NAME.match(p.name)) and (p / STATE).is_file()
        ]
        return [p for _, p in sorted(found)]

    def clear_debris(self) -> None:
        """Delete half-written checkpoints of a killed run (main process)."""
        if self.accelerator.is_main_process and self.folder.is_dir():
            for path in self.folder.glob(".tmp-checkpoint-*"):
                shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, step: int, position: Position, ema: EMAModel | None, settings: dict) -> Path:
        """Every process calls this (accelerate saves each rank's RNG state)."""
        final = self.folder / f"checkpoint-{step}"
        tmp = self.folder / f".tmp-checkpoint-{step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        # Every rank writes its RNG state into tmp: all of them must be done before it moves.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if ema is not None:
                save_file({str(i): p.detach().cpu().contiguous()
                           for i, p in enumerate(ema.shadow_params)}, tmp / EMA)  # fmt: skip
                # decay bookkeeping beside the weights (plain numbers, no pickle)
                settings = {**settings, "ema_optimization_step": ema.optimization_step}
            state = {"step": step, "position": asdict(position), "settings": settings}
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, ema: EMAModel | None, settings: dict) -> tuple[int, Position]:
        """Load the latest checkpoint if there is one: (step, position); (0, start) otherwise."""
        self.clear_debris()
        found = self.complete()
        if not found:
            return 0, Position()
        path = found[-1]
        try:
            state = json.loads((path / STATE).read_text())
            _check_settings(path, state["settings"], settings)
            self.accelerator.load_state(str(path))
            if ema is not None:
                weights = load_file(path / EMA)
                for i, param in enumerate(ema.shadow_params):
                    param.data.copy_(weights[str(i)].to(param.device))
                ema.optimization_step = state["settings"]["ema_optimization_step"]
        except ResumeError:
            raise
        except Exception as exc:  # a file lost or torn after the checkpoint was made whole
            raise ResumeError(f"checkpoint {path} cannot be loaded ({one_line(exc)}): delete it "
                              "to resume from the one before") from exc  # fmt: skip
        return state["step"], Position(**state["position"])


def _check_settings(path: Path, saved: dict, now: dict) -> None:
    for key, value in now.items():
        if key in saved and saved[key] != json.loads(json.dumps(value)):
            what = "a store of store_id" if key == "store_id" else f"training.{key} ="
            raise ResumeError(
                f"{path} was written with {what} {saved[key]!r}, this run has "
                f"{value!r}: use another training.run, or delete {path.parent}"
            )
