"""The run directory: one owner at a time, and what a start in it means.

    with RunDirectory(config.output_dir).held() as run_dir:  # the lock: main process only
        plan = run_dir.begin(config, num_processes=2, argv=sys.argv[1:], split=fingerprint)
        plan.action                         # "new", "resume" or "re-evaluate"
        plan.checkpoint                     # the verified checkpoint to go on from

`begin` decides, then acts: `survey` reads what the folder holds (checkpoints, verified
newest first; results; earlier starts), the pure `plan` turns that and the config into a
StartPlan (or the one sentence that refuses the start), and `carry_out` does the little a plan
asks (move an old run aside, write config.yaml, record the start). The rules:
- nothing there (or a start killed before its first checkpoint): a new run;
- checkpoints of a run with the same training-defining config: resume the newest one that
  passes verification (`resume: auto`), or re-evaluate it when it is finished;
- a different config: keys that change what is trained are refused, naming them; the others
  (logging, workers, checkpoint cadence, a larger `epochs` or `max_steps`) are accepted;
- `resume: none` where a run is: refused; `resume: overwrite` moves that run aside first;
- `resume: PATH` starts this output_dir from PATH's weights and state (PATH is never
  changed): into an output_dir without checkpoints, or this run's own newest checkpoint.
  Started from another run, model selection starts over (model/ is chosen anew) and W&B
  logs a new run. Going back to an earlier checkpoint of a run means starting a new
  output_dir from it; a rerun of the same command continues the run it started.

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
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pet_pipeline.checkpoint import (
    STATE_FILE,
    TrainState,
    check_same_split,
    list_checkpoints,
    read_train_state,
    recover_leftovers,
    verify_checkpoint,
)
from pet_pipeline.errors import UserError
from pet_pipeline.schedule import trained_under

LOCK_FILE = ".lock"
STARTS_FILE = "starts.jsonl"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MODEL_WEIGHTS = Path("model") / "model.safetensors"  # what export_model writes, with config.json

# Keys that don't change what is trained: a resumed run may change them.
FREE_KEYS = ("report_to", "wandb_project", "wandb_init_timeout_s", "wandb_finish_timeout_s", "wandb_required",
             "run_name", "log_every", "num_workers", "gradcam_images",
             "eval_batch_size", "checkpoint_steps", "keep_checkpoints", "compile", "channels_last",
             "mixed_precision", "strict_data", "max_unreadable_fraction", "collective_timeout_s",
             "push_to_hub", "hub_model_id", "hub_private",
             # the checkpoint holds the weights; the split fingerprint guards the images
             "pretrained_path", "data_dir")
# Keys that say where and how to start, not what the run is: never compared.
START_KEYS = ("resume", "output_dir")
# Keys that may grow to train for longer (the schedule then follows the new length).
EXTENDABLE_KEYS = ("epochs", "max_steps")


# ----------------------------------------------------------------------------- what is there


@dataclass
class Found:
    """A checkpoint folder as a start finds it."""

    path: Path
    problem: str | None = None  # why it can't be used (verify_checkpoint); None: it can
    state: dict | None = None  # its train_state.json, when it can be used


@dataclass
class Folder:
    """What a start finds in output_dir, read once by `survey`: the input of `plan`."""

    path: Path
    checkpoints: list[Path] = field(default_factory=list)  # every step_N folder, oldest first
    newest: list[Found] = field(default_factory=list)  # newest first, down to the first usable one
    source: Found | None = None  # resume: PATH, verified
    has_results: bool = False  # model/ or eval/
    has_model: bool = False  # model/'s weights (the best so far)
    has_config: bool = False
    holds_anything: bool = False  # any entry but the lock
    starts: list[dict] = field(default_factory=list)  # starts.jsonl


def found(checkpoint: Path) -> Found:
    problem = verify_checkpoint(checkpoint)
    return Found(checkpoint, problem, read_train_state(checkpoint) if problem is None else None)


def survey(path: str | Path, resume: str) -> Folder:
    """Read what output_dir holds; changes nothing."""
    path = Path(path)
    folder = Folder(path, checkpoints=list_checkpoints(path, complete_only=False),
                    has_results=(path / "model").is_dir() or (path / "eval").is_dir(),
                    has_model=(path / MODEL_WEIGHTS).is_file(), has_config=(path / CONFIG_FILE).is_file(),
                    holds_anything=path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()),
                    starts=read_starts(path))
    for checkpoint in reversed(folder.checkpoints):
        folder.newest.append(found(checkpoint))
        if folder.newest[-1].problem is None:
            break
    if resume not in ("auto", "none", "overwrite"):
        folder.source = found(Path(resume))
    return folder


# ----------------------------------------------------------------------------- the decision


@dataclass
class StartPlan:
    action: str  # "new", "resume", "re-evaluate", or "refuse" (then `refusal` says why)
    checkpoint: str | None = None
    step: int | None = None  # the checkpoint's global step
    messages: list[str] = field(default_factory=list)  # printed once, before the summary
    changed: dict = field(default_factory=dict)  # key -> [run's value, this start's value]
    refusal: str | None = None  # the one sentence of a refused start
    move_aside: bool = False  # resume: overwrite over a run: it goes to a sibling folder first
    write_config: bool = False  # config.yaml (the run's config, written once)
    # the checkpoint was saved before the validation of its step: that validation's records
    # (and a report after it) in metrics.jsonl came after the checkpoint
    before_validation: bool = False
    # model/ lacks the weights of the checkpoint's best validation accuracy: every rank
    # forgets that accuracy, so that the next validation exports its weights
    forget_best_accuracy: bool = False
    wandb_run_id: str | None = None  # a new W&B run for a start from another run's checkpoint


def refuse(sentence: str) -> StartPlan:
    return StartPlan(action="refuse", refusal=sentence)


def plan(folder: Folder, config, *, num_processes: int, split: str | None = None,
         slurm_job: str | None = None) -> StartPlan:
    """What a start with `config` means in `folder`; a pure function of the two. `split`:
    the loaded data's train/val fingerprint, which a resumed checkpoint must match (None:
    not checked); `slurm_job`: this process's SLURM job id."""
    resume, why = _effective_resume(folder, config.resume, slurm_job)
    messages = [why] if why else []
    if resume == "overwrite":
        chosen = StartPlan(action="new", move_aside=folder.holds_anything)
    elif resume == "none":
        chosen = StartPlan(action="new") if not folder.checkpoints else refuse(
            f"output_dir: {folder.path} holds a run (checkpoints up to {folder.checkpoints[-1].name}); "
            "continue it with resume: auto, replace it with resume: overwrite (the old run is moved to "
            "a sibling folder, not deleted), or give another output_dir.")
    elif not folder.checkpoints and folder.has_results:  # checkpoints deleted, results kept
        chosen = refuse(
            f"output_dir: {folder.path} holds a run's results (model/, eval/) but no checkpoints; "
            "use another output_dir, or resume: overwrite to move that run aside and start over.")
    else:
        source = _source(folder, resume, messages)
        chosen = source if isinstance(source, StartPlan) else StartPlan(action="new") if source is None \
            else _continue(folder, source, config, num_processes=num_processes, split=split)
    if chosen.action == "new" and resume == "auto" and folder.has_config:
        messages.append(f"output_dir: {folder.path} holds no checkpoint of the earlier start (it ended "
                        "before its first one); starting a new run")
    chosen.messages = messages + chosen.messages
    chosen.write_config = chosen.action == "new" or not folder.has_config
    return chosen


def _effective_resume(folder: Folder, resume: str, slurm_job: str | None) -> tuple[str, str | None]:
    """(`resume`, None), or ("auto", why) where repeating it would undo what was trained since."""
    if resume == "auto":
        return resume, None
    if slurm_job and any(s.get("slurm_job") == slurm_job for s in folder.starts):
        # a requeued attempt repeats the job's arguments: overwriting or starting from the
        # same checkpoint again would undo what the earlier attempt trained
        return ("auto", f"resume: {resume} was for the first attempt of SLURM job {slurm_job}; "
                        "this attempt continues it (resume: auto)")
    if folder.source is not None and folder.checkpoints and _started_from(folder, folder.source.path):
        return ("auto", f"output_dir: {folder.path} was started from {folder.source.path}; continuing "
                        "its own newest checkpoint (resume: auto)")
    return resume, None


def _started_from(folder: Folder, source: Path) -> bool:
    return any(s.get("checkpoint") and Path(s["checkpoint"]).resolve() == source.resolve()
               for s in folder.starts) and source.resolve() not in [p.resolve() for p in folder.checkpoints]


def _source(folder: Folder, resume: str, messages: list[str]) -> Found | StartPlan | None:
    """The checkpoint this start goes on from (None: a new run), or the refusal."""
    if resume != "auto":  # resume: PATH
        source = folder.source
        if source.problem:
            return refuse(f"resume: {source.path} can't be used ({source.problem}); give another "
                          "checkpoint, or resume: auto.")
        mine = [p for p in folder.checkpoints if p.resolve() == source.path.resolve()]
        if folder.checkpoints and not mine:
            return refuse(f"output_dir: {folder.path} holds another run; start from {source.path} in an "
                          "empty output_dir, or use resume: overwrite here first.")
        if mine and mine[0] != folder.checkpoints[-1]:
            return refuse(f"resume: {source.path} is an earlier checkpoint of the run in {folder.path} "
                          f"(its newest is {folder.checkpoints[-1].name}); to go back to it, start a new "
                          f"run from it with another output_dir and resume: {source.path} (it is never "
                          "changed), or use resume: auto here.")
        return source
    for skipped in folder.newest:
        if skipped.problem is None:
            return skipped
        messages.append(f"skipping checkpoint {skipped.path.name}: {skipped.problem}")
    if folder.checkpoints:
        return refuse(
            f"output_dir: none of the {len(folder.checkpoints)} checkpoint(s) in "
            f"{folder.path / 'checkpoints'} can be used ({'; '.join(f.problem for f in folder.newest)}); "
            "restore one from a backup, or start over with resume: overwrite.")
    return None


def _continue(folder: Folder, source: Found, config, *, num_processes: int, split: str | None) -> StartPlan:
    """Resume or re-evaluate from `source`, unless its run was trained otherwise."""
    from pet_pipeline.config import to_dict

    state = TrainState().load_state_dict(source.state)
    before = {**(state.config or {}), "processes": state.num_processes or num_processes}
    refused, accepted = config_changes(before, {**to_dict(config), "processes": num_processes})
    if refused:
        return refuse(
            f"output_dir: {folder.path} holds a run trained with other values of {_describe(refused)}, "
            f"which change what is trained; rerun with the run's own values (its {STATE_FILE} and "
            f"{CONFIG_FILE}) to continue it, or start a new run with another output_dir or resume: "
            "overwrite.")
    try:
        if split is not None:
            check_same_split(state, split, checkpoint=source.path)
    except UserError as error:
        return refuse(str(error))
    elsewhere = source.path.resolve() not in [p.resolve() for p in folder.checkpoints]
    trained = trained_under(state, epochs=config.epochs, max_steps=config.max_steps)
    chosen = StartPlan(
        action="re-evaluate" if trained and not state.validation_due else "resume",
        checkpoint=str(source.path), step=state.global_step, changed=accepted,
        before_validation=state.validation_due,
        forget_best_accuracy=state.best_accuracy is not None and not folder.has_model,
        wandb_run_id=uuid.uuid4().hex[:12] if elsewhere else None)
    if elsewhere:
        chosen.messages.append(f"starting from {source.path} (step {state.global_step}), which stays as "
                               "it is; model/ is chosen anew in this output_dir")
    if accepted:
        chosen.messages.append(f"config: accepted changes that keep what was trained: {_describe(accepted)}")
    if trained:
        longer = ("it stopped early (early stopping)" if state.early_stopped
                  else "to train longer, raise epochs or max_steps")
        if state.validation_due:  # stopped during its last validation
            chosen.messages.append(f"output_dir: {folder.path} holds a run trained to its end (step "
                                   f"{state.global_step}) whose last validation was stopped; validating "
                                   f"and re-evaluating it ({longer}).")
        else:
            chosen.messages.append(f"output_dir: {folder.path} holds a finished run (step "
                                   f"{state.global_step}); re-evaluating it ({longer}).")
    return chosen


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

    @contextlib.contextmanager
    def held(self, *, lock: bool = True):
        """This folder, locked (`lock`: the job's global main process; other ranks pass False)
        for the length of the `with` block, so that train.main() called twice in one process
        (a notebook, the tests) finds it free again."""
        if lock:
            self.lock()
        try:
            yield self
        finally:
            self.unlock()
            atexit.unregister(self.unlock)

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
        """Decide what this start does and act on it. Main process only, with the lock held,
        after every other check that can refuse the start (the data is loaded: `split` is its
        train/val fingerprint). A refused start raises UserError and has changed nothing
        (but for the leftovers of a killed checkpoint save, cleaned up first)."""
        leftovers = recover_leftovers(self.path)
        chosen = plan(survey(self.path, config.resume), config, num_processes=num_processes,
                      split=split, slurm_job=os.environ.get("SLURM_JOB_ID"))
        if chosen.refusal:
            raise UserError(chosen.refusal)
        chosen.messages = leftovers + chosen.messages
        self.carry_out(chosen, config, num_processes=num_processes, argv=argv)
        return chosen

    def carry_out(self, chosen: StartPlan, config, *, num_processes: int, argv: list[str]) -> None:
        """What a plan asks of the folder: move an old run aside, write config.yaml, and
        record the start in starts.jsonl."""
        from pet_pipeline.config import save_config

        if chosen.move_aside:
            chosen.messages.append(f"moved the earlier run to {self._move_aside()} (resume: overwrite)")
        if chosen.write_config:
            save_config(config, self.path / CONFIG_FILE)  # the run's config, once
        self._record_start(chosen, num_processes=num_processes, argv=argv)

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

    def _record_start(self, plan: StartPlan, *, num_processes: int, argv: list[str]) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                  "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "processes": num_processes, "argv": list(argv), **dataclasses.asdict(plan)}
        for internal in ("messages", "refusal", "move_aside", "write_config", "wandb_run_id"):
            record.pop(internal)
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
