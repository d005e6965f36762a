"""The run directory: one owner at a time, and what a start in it means.

    run_dir = RunDirectory(config.output_dir)
    run_dir.lock()                          # main process, before any heavy work
    plan = run_dir.begin(config, num_processes=2, argv=sys.argv[1:])
    plan.action                             # "new", "resume" or "re-evaluate"
    plan.checkpoint                         # the verified checkpoint to resume from

What `begin` decides, from what the folder holds:
- nothing (or a start killed before its first checkpoint): a new run;
- checkpoints of a run with the same training-defining config: resume the newest one that
  passes verification (`resume: auto`), or re-evaluate it when it is finished;
- a different config: keys that change what is trained are refused, naming them; the others
  (logging, workers, checkpoint cadence, a larger `epochs` or `max_steps`) are accepted;
- `resume: none` where a run is: refused; `resume: overwrite` moves that run aside first;
- `resume: PATH` to an earlier checkpoint of the run: the later lineage (its checkpoints and
  what it wrote beside them: model/, eval/, ...) goes to checkpoints-discarded/TIME/.

A resumed checkpoint puts model/ back as it was when the checkpoint was saved (its
best_model/, where it has one), so that model/ goes with the state it continues from.

config.yaml is written by the start that creates the run and never rewritten; every start
appends a line to starts.jsonl (when, where, what it did, which keys it changed).

The lock is `output_dir/.lock`, held with flock(2) for the life of the process and naming
its holder (pid, host, SLURM job). The kernel drops it when the process dies, so a stale lock
is taken over. On shared cluster filesystems flock works across nodes where the filesystem
supports it (NFSv4, GPFS, BeeGFS, Lustre mounted with `-o flock`); where it is node-local
(Lustre `localflock`, NFS `nolock`) two jobs on different nodes are not kept apart, and
where flock is refused outright the holder named in the file decides (same host: is it alive;
same SLURM job: an earlier attempt of this job, taken over; otherwise refused).
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pet_pipeline.checkpoint import (
    EXPORT_FILES,
    STATE_FILE,
    TrainState,
    check_same_split,
    list_checkpoints,
    read_train_state,
    read_validated,
    recover_leftovers,
    restore_best_model,
    verify_checkpoint,
)
from pet_pipeline.errors import UserError

LOCK_FILE = ".lock"
STARTS_FILE = "starts.jsonl"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# what a lineage writes outside checkpoints/: set aside with its checkpoints when a start goes
# back to an earlier one (resume: PATH), so that they are never taken for the new lineage's
LINEAGE_OUTPUTS = ("model", "eval", "training_curves.png", "summary.csv")

# Keys that don't change what is trained: a resumed run may change them.
FREE_KEYS = ("report_to", "wandb_project", "run_name", "log_every", "num_workers", "gradcam_images",
             "eval_batch_size", "checkpoint_steps", "keep_checkpoints", "compile", "channels_last",
             "mixed_precision", "strict_data", "collective_timeout_s",
             "push_to_hub", "hub_model_id", "hub_private",
             # the checkpoint holds the weights; the split fingerprint guards the images
             "pretrained_path", "data_dir")
# Keys that say where and how to start, not what the run is: never compared.
START_KEYS = ("resume", "output_dir")
# Keys that may grow to train for longer (the schedule then follows the new length).
EXTENDABLE_KEYS = ("epochs", "max_steps")


# ----------------------------------------------------------------------------- the decision


@dataclass
class StartPlan:
    action: str  # "new", "resume" or "re-evaluate"
    checkpoint: str | None = None
    step: int | None = None  # the checkpoint's global step
    messages: list[str] = field(default_factory=list)  # printed once, before the summary
    changed: dict = field(default_factory=dict)  # key -> [run's value, this start's value]
    # the checkpoint was saved before the validation of its step: the records that validation
    # (and a report after it) left in metrics.jsonl came after the checkpoint
    before_validation: bool = False
    # the checkpoint was saved before its last validation, which was made since: the state
    # after it (validated.json), which these limits find finished; every rank continues from it
    validated: dict | None = None
    # model/ lacks the weights of the checkpoint's best validation accuracy: every rank
    # forgets that accuracy, so that the next validation exports its weights
    forget_best_accuracy: bool = False


def config_changes(before: dict, after: dict) -> tuple[dict, dict]:
    """(refused, accepted) changes between a run's config and this start's, key -> [old, new].

    A key the run's config lacks (added to pet-pipeline since) counts as its default."""
    from pet_pipeline.config import Config

    defaults = {f.name: f.default for f in dataclasses.fields(Config)
                if f.default is not dataclasses.MISSING}
    refused, accepted = {}, {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, defaults.get(key)), after.get(key)
        if old == new or key not in after or key in START_KEYS:  # key not in after: an old key
            continue
        if key == "mixed_precision" and "fp16" in (old, new):
            refused[key] = [old, new]  # fp16 adds a loss scaler to the state; bf16 <-> no is fine
        elif key in FREE_KEYS or (key in EXTENDABLE_KEYS and _extends(old, new)):
            accepted[key] = [old, new]
        else:
            refused[key] = [old, new]
    return refused, accepted


def _extends(old, new) -> bool:
    """`new` allows at least as much training as `old` (None: no limit)."""
    return new is None or (old is not None and new >= old)


def _describe(changes: dict) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


# ----------------------------------------------------------------------------- the directory


class RunDirectory:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir)
        self._lock_fd: int | None = None
        self.took_over: dict | None = None  # the dead holder whose lock this start took over

    # ------------------------------------------------------------------ lock

    def lock(self) -> None:
        """Create the folder and hold its lock until the process ends; UserError when another
        live process holds it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"output_dir: {self.path} can't be written ({os.strerror(e.errno or 0)}); "
                            "choose a folder you can write to.") from None
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise UserError(self._busy(holder)) from None
            if not _holder_gone(holder):  # flock not supported here: the holder's record decides
                os.close(fd)
                raise UserError(self._busy(holder)) from None
        self._lock_fd = fd
        self.took_over = holder if holder and holder.get("pid") != os.getpid() else None
        atexit.register(self.unlock)  # a normal end, error exits included, leaves no holder
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)

    def _busy(self, holder: dict | None) -> str:
        who = "another process"
        if holder:
            who = (f"process {holder.get('pid')} on {holder.get('host')}"
                   + (f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else "")
                   + (f", since {holder['since']}" if holder.get("since") else ""))
        return (f"output_dir: {self.path} is in use by {who}; wait for that run to end, stop it, "
                "or give this one another output_dir.")

    def unlock(self) -> None:
        """Release the lock at a normal end (the kernel does it at any other end)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)  # no holder: the next start has nothing to take over
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ what a start means

    def begin(self, config, *, num_processes: int, argv: list[str], split: str | None = None) -> StartPlan:
        """Decide what this start does, act on it (clean up, move aside, write config.yaml)
        and record it in starts.jsonl. Main process only, with the lock held, after every
        other check that can refuse the start (the data is loaded: `split` is its train/val
        fingerprint, which a resumed checkpoint must match; None: not checked)."""
        from pet_pipeline.config import save_config, to_dict

        plan = StartPlan(action="new")
        plan.messages += recover_leftovers(self.path)
        wanted = to_dict(config)
        used = list_checkpoints(self.path, complete_only=False)
        resume = config.resume
        job = os.environ.get("SLURM_JOB_ID")
        if resume != "auto" and job and any(s.get("slurm_job") == job for s in read_starts(self.path)):
            # a requeued attempt repeats the job's arguments: overwriting or going back to the
            # same checkpoint again would undo what the earlier attempt trained
            plan.messages.append(f"resume: {resume} was for the first attempt of SLURM job {job}; "
                                 "this attempt continues it (resume: auto)")
            resume = "auto"
        if resume == "overwrite":
            if self._holds_a_run():
                plan.messages.append(f"moved the earlier run to {self._move_aside()} (resume: overwrite)")
        elif resume == "none":
            if used:
                raise UserError(
                    f"output_dir: {self.path} holds a run (checkpoints up to {used[-1].name}); continue it "
                    "with resume: auto, replace it with resume: overwrite (the old run is moved to a "
                    "sibling folder, not deleted), or give another output_dir.")
        else:
            if not used and self._has_results():  # checkpoints deleted, results kept
                raise UserError(
                    f"output_dir: {self.path} holds a run's results (model/, eval/) but no checkpoints; "
                    "use another output_dir, or resume: overwrite to move that run aside and start over.")
            checkpoint = self._checkpoint_to_resume(resume, used, plan)
            if checkpoint is not None:
                state = TrainState().load_state_dict(read_train_state(checkpoint))
                before = state.config or self._config_yaml() or {}
                before = {**before, "processes": state.num_processes or num_processes}
                refused, accepted = config_changes(before, {**wanted, "processes": num_processes})
                if refused:
                    raise UserError(
                        f"output_dir: {self.path} holds a run trained with other values of "
                        f"{_describe(refused)}, which change what is trained; rerun with the run's own "
                        f"values (its {STATE_FILE} and {CONFIG_FILE}) to continue it, or start a new run "
                        "with another output_dir or resume: overwrite.")
                if split is not None:
                    check_same_split(state, split, checkpoint=checkpoint)
                # nothing has been moved before this point: a refused start leaves the folder as it was
                newer = [p for p in used if p.name > checkpoint.name] if resume != "auto" else []
                if state.validation_due and not newer:  # was its last validation made since?
                    validated = read_validated(checkpoint)
                    if validated is not None and TrainState().load_state_dict(validated).trained(
                            epochs=config.epochs, max_steps=config.max_steps):
                        plan.validated = validated  # the same limits: finished, model/ as it is
                        state = TrainState().load_state_dict(validated)
                if newer:  # an earlier point of this run: its later lineage goes aside, whole
                    plan.messages.append(self._discard(newer, back_to=checkpoint, state=state))
                elif plan.validated is None and restore_best_model(checkpoint, self.path / "model"):
                    plan.messages.append(f"model/: back to the best weights as of {checkpoint.name} "
                                         "(those exported after it, by the validation that followed it, "
                                         "are replaced)")
                plan.checkpoint, plan.step, plan.changed = str(checkpoint), state.global_step, accepted
                plan.before_validation = state.validation_due
                plan.forget_best_accuracy = (state.best_accuracy is not None
                                             and not (self.path / "model" / EXPORT_FILES[0]).is_file())
                trained = state.trained(epochs=config.epochs, max_steps=config.max_steps)
                plan.action = "re-evaluate" if trained else "resume"
                if accepted:
                    plan.messages.append(f"config: accepted changes that keep what was trained: "
                                         f"{_describe(accepted)}")
                if trained:
                    longer = ("it stopped early (early stopping)" if state.early_stopped
                              else "to train longer, raise epochs or max_steps")
                    if state.validation_due:  # saved before its last validation; stopped during it?
                        plan.messages.append(
                            f"output_dir: {self.path} holds a run trained to its end (step "
                            f"{state.global_step}) whose checkpoint comes before its last validation; "
                            f"validating and re-evaluating it ({longer}).")
                    else:
                        plan.messages.append(f"output_dir: {self.path} holds a finished run (step "
                                             f"{state.global_step}); re-evaluating it ({longer}).")
        if plan.action == "new":
            if resume == "auto" and (self.path / CONFIG_FILE).is_file():
                plan.messages.append(f"output_dir: {self.path} holds no checkpoint of the earlier start "
                                     "(it ended before its first one); starting a new run")
        if plan.action == "new" or not (self.path / CONFIG_FILE).is_file():
            save_config(config, self.path / CONFIG_FILE)  # the run's config, once
        self._record_start(plan, num_processes=num_processes, argv=argv)
        return plan

    def _checkpoint_to_resume(self, resume: str, used: list[Path], plan: StartPlan) -> Path | None:
        """The checkpoint a start continues from, verified; None for a new run."""
        if resume != "auto":  # an explicit checkpoint folder
            checkpoint = Path(resume)
            problem = verify_checkpoint(checkpoint)
            if problem:
                raise UserError(f"resume: {checkpoint} can't be used ({problem}); give another "
                                "checkpoint, or resume: auto.")
            if used and checkpoint.resolve() not in [p.resolve() for p in used]:
                raise UserError(f"output_dir: {self.path} holds another run; resume from {checkpoint} "
                                "into an empty output_dir, or use resume: overwrite here first.")
            return checkpoint
        skipped = []
        for checkpoint in reversed(used):  # newest first
            problem = verify_checkpoint(checkpoint)
            if problem is None:
                plan.messages += skipped
                return checkpoint
            skipped.append(f"skipping checkpoint {checkpoint.name}: {problem}")
        if used:
            raise UserError(
                f"output_dir: none of the {len(used)} checkpoint(s) in {self.path / 'checkpoints'} can "
                f"be used ({'; '.join(s.split(': ', 1)[1] for s in skipped)}); restore one from a "
                "backup, or start over with resume: overwrite.")
        return None

    # ------------------------------------------------------------------ helpers

    def _has_results(self) -> bool:
        return (self.path / "model").is_dir() or (self.path / "eval").is_dir()

    def _holds_a_run(self) -> bool:
        return any(p.name != LOCK_FILE for p in self.path.iterdir())

    def _move_aside(self) -> Path:
        """Move everything but the lock to a sibling folder named after now; returns it."""
        here = self.path.resolve()
        target = here.with_name(f"{here.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while target.exists():
            target, n = target.with_name(f"{target.name.split('~')[0]}~{n}"), n + 1
        target.mkdir()
        for entry in sorted(self.path.iterdir(), key=lambda p: p.name != "checkpoints"):
            if entry.name != LOCK_FILE:
                entry.rename(target / entry.name)
        return target

    def _discard(self, checkpoints: list[Path], *, back_to: Path, state: TrainState) -> str:
        """Move the lineage after `back_to` aside: its checkpoints and what it wrote outside them
        (model/, eval/, training_curves.png, summary.csv; a copy of metrics.jsonl, which the
        resumed run trims). Nothing is deleted. Then model/ becomes `back_to`'s best_model/
        again. Returns the start's one line about it."""
        target = self.path / "checkpoints-discarded" / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while target.exists():
            target, n = target.with_name(f"{target.name.split('~')[0]}~{n}"), n + 1
        moved = []
        try:
            target.mkdir(parents=True)
            if (self.path / METRICS_FILE).is_file():  # the one copy; the rest are renames
                shutil.copy2(self.path / METRICS_FILE, target / METRICS_FILE)
            # the outputs first, the checkpoints last: a start killed in between still finds
            # the later checkpoints and repeats resume: PATH, never outputs without their lineage
            for name in LINEAGE_OUTPUTS:
                if (self.path / name).exists():
                    (self.path / name).rename(target / name)
                    moved.append(name + ("/" if (target / name).is_dir() else ""))
            for checkpoint in checkpoints:
                checkpoint.rename(target / checkpoint.name)
        except OSError as e:
            raise UserError(f"output_dir: the later checkpoints and results could not be moved to "
                            f"{target} ({os.strerror(e.errno or 0).lower()}); fix the folder and rerun "
                            "the same command.") from None
        line = (f"moved {len(checkpoints)} newer checkpoint(s)"
                + (f" and the later run's {', '.join(moved)}" if moved else "")
                + f" to {target} (resuming from the earlier {back_to.name})")
        if restore_best_model(back_to, self.path / "model") is not None:
            line += f"; model/ holds its best weights as of {back_to.name} again"
        elif state.best_accuracy is not None and "model/" in moved:
            line += (f"; {back_to.name} keeps no copy of its best weights (an older pet-pipeline), so "
                     "the next validation's weights become model/")
        return line

    def _config_yaml(self) -> dict | None:
        from pet_pipeline.config import read_yaml

        path = self.path / CONFIG_FILE
        return read_yaml(str(path)) if path.is_file() else None

    def _record_start(self, plan: StartPlan, *, num_processes: int, argv: list[str]) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                  "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "processes": num_processes, "argv": list(argv), **dataclasses.asdict(plan)}
        record.pop("messages")
        record["validated"] = plan.validated is not None
        with open(self.path / STARTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_starts(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / STARTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _holder_gone(holder: dict | None) -> bool:
    """Without flock: is the recorded holder certainly not running any more?"""
    if not holder:
        return True
    if holder.get("slurm_job") and holder.get("slurm_job") == os.environ.get("SLURM_JOB_ID"):
        return True  # an earlier attempt of this (requeued) job
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError):
        return False
    return False
