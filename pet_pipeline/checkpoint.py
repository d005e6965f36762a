"""Resumable checkpoints: Accelerate's `save_state` plus our own small state, atomically.

    output_dir/checkpoints/step_00000120/   model, optimizer, RNG states (Accelerate),
                                            train_state.json (epoch, step, early stopping,
                                            scheduler, W&B run id, model and classes),
                                            ema.safetensors (when EMA is on)

A checkpoint is written to `.tmp-step_...` and renamed when complete, so a job killed while
saving leaves no folder that `resume: auto` could pick up. Nothing is unpickled: the model
is safetensors, our state is JSON, and Accelerate loads the rest with weights_only=True.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pet_pipeline.errors import UserError

STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones have a .tmp- name)."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_resume_checkpoint(resume: str, output_dir: str | Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                        "use resume: auto, none, or another checkpoint folder.")
    return path


def read_train_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def check_compatible(state: dict, *, model_name: str, class_names: list[str], checkpoint: Path) -> None:
    if state["model"] != model_name:
        raise UserError(f"resume: {checkpoint} holds a {state['model']} model, not {model_name}; "
                        "use another output_dir or resume: none.")
    if state["class_names"] != list(class_names):
        raise UserError(
            f"resume: {checkpoint} was trained on other classes ({len(state['class_names'])} "
            f"breeds) than this run ({len(class_names)}); use another output_dir or resume: none."
        )


def check_same_split(state: dict, split: str, *, checkpoint: Path) -> None:
    """Refuse to resume on other train/val images than the checkpoint was trained on."""
    if state.get("split") != split:
        raise UserError(
            f"resume: {checkpoint} was trained on another train/val split (other data, seed, "
            "val_fraction or breeds, or a pet-pipeline from before 2026-11-28, whose split "
            "differed); rerun with the settings it was made with, or resume: none."
        )


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, *, ema=None,
                    keep: int = 2) -> Path:
    """Every rank calls this at the same step; returns the final folder."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"step_{state['global_step']:08d}"
    tmp = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / EMA_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, *, ema=None) -> dict:
    """Restore model, optimizer, RNG (Accelerate) and EMA; return our train state."""
    accelerator.load_state(str(checkpoint))
    if ema is not None and (checkpoint / EMA_FILE).is_file():
        ema.load_state_dict(load_file(str(checkpoint / EMA_FILE)))
    return read_train_state(checkpoint)


def json_safe(value):
    """Scheduler states hold floats, ints and lists; tensors become lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
