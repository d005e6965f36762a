"""Resumable checkpoints: Accelerate's `save_state` plus the loop's `TrainState`, complete or absent.

    output_dir/checkpoints/step_00000120/   model, optimizer, RNG states (Accelerate),
                                            train_state.json (TrainState: position, model
                                            selection, schedule, W&B run id, what was
                                            trained), ema.safetensors (when EMA is on)

A checkpoint is written to `.tmp-step_N`, flushed to disk (fsync) and renamed into place;
only then are older ones rotated away, so the newest complete checkpoint always survives.
Saving a step that already has a checkpoint moves the old folder to `.replaced-step_N`
first; `recover_leftovers` (run at every start) puts it back if the save was killed in
between and removes any `.tmp-` folder. A resume verifies a checkpoint before trusting it
(`verify_checkpoint`). Nothing is unpickled: the model is safetensors, our state is JSON,
and Accelerate's files are loaded with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pet_pipeline.errors import UserError

STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"  # Accelerate's name for the first prepared model
OPTIMIZER_FILE = "optimizer.bin"
RNG_FILE = "random_states_{}.pkl"  # one per process
_NAME = re.compile(r"^step_(\d{8})$")
TMP_PREFIX, REPLACED_PREFIX = ".tmp-", ".replaced-"


# ----------------------------------------------------------------------------- the loop's state


@dataclass
class TrainState:
    """Everything the training loop carries from step to step, and nothing else.

    Saved as train_state.json in every checkpoint; `state_dict` / `load_state_dict` as in
    torch. The last group says what was trained, so that a resume can refuse other weights.
    """

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # micro-batches done in the current epoch (per process)
    global_step: int = 0  # optimizer steps
    best_accuracy: float | None = None  # on validation, for model selection
    epochs_since_best: int = 0
    early_stopped: bool = False
    # training reached a validation point (an epoch's end, a cut by max_steps) whose validation
    # is not made yet: a checkpoint saved now validates first (pet_pipeline/schedule.py)
    validation_due: bool = False
    loss_sum: float = 0.0  # training loss not yet logged: summed means over micro-batches
    loss_count: int = 0
    scheduler: dict | None = None  # plateau's state (cosine and constant follow the step)
    unreadable: list[str] = field(default_factory=list)  # training images gone since the scan
    left_out: list[str] | None = None  # images the first start left out: a resume leaves out these
    wandb_run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # one W&B run
    # what the weights are
    model: str = ""
    class_names: list[str] = field(default_factory=list)
    data_config: dict = field(default_factory=dict)
    split: str = ""  # fingerprint of the train/val images
    num_processes: int | None = None
    config: dict | None = None  # the run's config as of this checkpoint
    ema: bool = False

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, values: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key in known:
                setattr(self, key, value)
        return self


def read_train_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


# ----------------------------------------------------------------------------- finding checkpoints


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name).group(1))


def list_checkpoints(output_dir: str | Path, *, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders, oldest first. With `complete_only`, those with their state file
    (written last); else every step_N folder, to tell a used run directory."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and p.is_dir()
             and (not complete_only or (p / STATE_FILE).is_file())]
    return sorted(found, key=step_of)


def recover_leftovers(output_dir: str | Path) -> list[str]:
    """Undo what a killed save left behind; returns a line per thing done. Main process only."""
    folder, done = checkpoints_dir(output_dir), []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        if path.name.startswith(REPLACED_PREFIX):  # killed between the two renames of a re-save
            final = folder / path.name[len(REPLACED_PREFIX):]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(final)
                done.append(f"restored {final.name}, whose re-save was interrupted")
        elif path.name.startswith(TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, an incomplete checkpoint left by a killed save")
    return done


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None when every file of the checkpoint reads back; else why not, in a few words.

    Reads headers and structure, not every byte of the tensors: safetensors headers must
    cover the file, torch files are opened memory-mapped with weights_only=True.
    """
    from accelerate.utils import load as accelerate_load  # weights_only, with numpy's RNG types

    try:
        state = read_train_state(checkpoint)
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return f"{STATE_FILE} is not a train state"
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError):
        return f"{STATE_FILE} is not valid JSON"
    processes = state.get("num_processes") or 1
    required = [MODEL_FILE, OPTIMIZER_FILE, *(RNG_FILE.format(i) for i in range(processes))]
    if state.get("ema"):
        required.append(EMA_FILE)
    for name in required:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    f.keys()
            elif path.name.startswith("random_states_"):
                rng = accelerate_load(str(path), map_location="cpu")
                if not {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(rng):
                    return f"{path.name} holds no RNG states"
            elif path.suffix in (".bin", ".pkl", ".pt"):  # .pt: fp16's loss scaler
                torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated, garbage, unreadable: each library has its own error
            return f"{path.name} can't be read ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


# ----------------------------------------------------------------------------- saving


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the previous one is intact."""


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (threads run)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(folder: Path) -> None:
    """Files as the user's umask allows (safetensors writes them 0600)."""
    mode = 0o666 & ~umask()
    for path in folder.iterdir():
        if path.is_file():
            try:
                os.chmod(path, mode)
            except OSError:  # some FUSE and CIFS mounts refuse chmod: the files stay as written
                pass


def _fsync_tree(folder: Path) -> None:
    normal_permissions(folder)
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems can't sync a directory; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_error_reason(error: BaseException, folder: Path) -> str:
    """A few words for a write error; torch and safetensors bury a full disk in their own
    messages ("unexpected pos 576 vs 534", "os error 28"), so ask the filesystem too."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if "os error 28" in str(error) or (free is not None and free < 64 * 2**20):
        return f"no space left on device ({free / 2**20:.0f} MiB free)" if free is not None \
            else "no space left on device"
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__


class Checkpointer:
    """Writes checkpoints of one run directory; every rank calls `save` at the same step.

    A save that would write exactly the state already saved last is skipped (a stop right
    after a scheduled checkpoint); a save of an existing step with another state replaces it.
    """

    def __init__(self, accelerator, output_dir: str | Path, *, ema=None, keep: int = 2):
        self.accelerator, self.ema, self.keep = accelerator, ema, keep
        self.folder = checkpoints_dir(output_dir)
        self._last_saved: dict | None = None

    def mark_saved(self, state: TrainState) -> None:
        """`state` was just loaded from a checkpoint: saving it unchanged is a no-op."""
        self._last_saved = state.state_dict()

    def save(self, state: TrainState) -> Path | None:
        """The checkpoint folder, or None when this state is the one saved last.

        Raises CheckpointWriteError (on every rank) when any rank fails to write.
        """
        accelerator = self.accelerator
        values = state.state_dict()
        if values == self._last_saved:
            return None
        final = self.folder / f"step_{state.global_step:08d}"
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"
        error = None
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as e:
            error = e
        accelerator.wait_for_everyone()
        if error is None and tmp.is_dir():
            try:
                accelerator.save_state(str(tmp))
                if accelerator.is_main_process:
                    if self.ema is not None:
                        save_file({k: v.detach().cpu().contiguous()
                                   for k, v in self.ema.state_dict().items()}, str(tmp / EMA_FILE))
                    (tmp / STATE_FILE).write_text(json.dumps(values, indent=2))  # last: marks complete
            except Exception as e:  # OSError; torch's RuntimeError; SafetensorError on a full disk
                error = e
        if self._any_rank_failed(error is not None or not tmp.is_dir()):
            reason = (write_error_reason(error, self.folder) if error
                      else "another process failed to write its part")
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.newest_complete()
            raise CheckpointWriteError(
                f"checkpoint {final.name} could not be written to {self.folder}: {reason}; freed the "
                f"partial copy{f' and kept {previous.name}' if previous else ''}; free some space "
                "(or fix the folder) and rerun the same command to resume.")
        commit_error = None
        if accelerator.is_main_process:
            try:
                _fsync_tree(tmp)
                self._commit(tmp, final)
                self._rotate(newest=final)
            except OSError as e:
                commit_error = e
                shutil.rmtree(tmp, ignore_errors=True)
        if self._any_rank_failed(commit_error is not None):  # every rank ends, not only the main one
            where = "freed the partial copy" if not final.exists() else f"{final.name} is in place"
            reason = (write_error_reason(commit_error, self.folder) if commit_error
                      else "the main process failed")
            raise CheckpointWriteError(
                f"checkpoint {final.name} could not be committed in {self.folder}: {reason}; "
                f"{where}; fix the folder and rerun the same command to resume.")
        accelerator.wait_for_everyone()
        self._last_saved = values
        return final

    def _any_rank_failed(self, failed: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _commit(self, tmp: Path, final: Path) -> None:
        if final.exists():  # a re-save of this step: keep the old one until the new is in place
            replaced = final.with_name(REPLACED_PREFIX + final.name)
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
            tmp.rename(final)
            _fsync_dir(self.folder)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            tmp.rename(final)
            _fsync_dir(self.folder)

    def _rotate(self, newest: Path) -> None:
        """Keep the `keep` newest complete checkpoints up to `newest`; never `newest` itself."""
        older = [p for p in list_checkpoints(self.folder.parent) if step_of(p) < step_of(newest)]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            # renamed first: a kill during the delete leaves a .tmp- folder, which is never
            # taken for a checkpoint and which the next start removes (recover_leftovers),
            # rather than a step_N folder with half its files
            doomed = old.with_name(f"{TMP_PREFIX}rotated-{old.name}")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def newest_complete(self) -> Path | None:
        found = list_checkpoints(self.folder.parent)
        return found[-1] if found else None


# ----------------------------------------------------------------------------- loading


def load_checkpoint(accelerator, checkpoint: str | Path, *, ema=None,
                    forget_best_accuracy: bool = False) -> TrainState:
    """Restore model, optimizer, RNG (Accelerate) and EMA; return the loop's state.

    `forget_best_accuracy`, decided by the main process in RunDirectory.begin and the same on
    every rank: the best validation accuracy's weights are not in this output_dir's model/ (a
    start from another run's checkpoint, or model/ deleted), so model selection starts over
    and the next validation exports its weights."""
    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint))
    if ema is not None and (checkpoint / EMA_FILE).is_file():
        ema.load_state_dict(load_file(str(checkpoint / EMA_FILE)))
    loaded = TrainState().load_state_dict(read_train_state(checkpoint))
    if forget_best_accuracy:
        loaded.best_accuracy, loaded.epochs_since_best = None, 0
    return loaded


def check_same_split(state: TrainState, split: str, *, checkpoint: Path) -> None:
    """Refuse to resume on other train/val images than the checkpoint was trained on."""
    if state.split != split:
        raise UserError(
            f"resume: {checkpoint} was trained on another train/val split (other data, seed, "
            "val_fraction or breeds); rerun with the settings it was made with, or resume: overwrite."
        )


def json_safe(value):
    """Scheduler states hold floats, ints and lists; tensors become lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
