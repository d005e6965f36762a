"""Experiment tracking: Accelerate's trackers (W&B, TensorBoard) and metrics.jsonl.

W&B is imported only when it is used. Without credentials it runs in offline mode, writing
the run under output_dir/wandb, and the end of the run prints the `wandb sync` command.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pet_pipeline.files import append_line, replaced


def trackers_for(report_to: str) -> list[str]:
    return {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"],
            "none": []}[report_to]


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
        hosts = netrc.netrc(path).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def choose_wandb_mode() -> str:
    """Respect WANDB_MODE; otherwise go offline when there is no API key to log in with."""
    if not os.environ.get("WANDB_MODE") and not has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def check_wandb_online(timeout_s: float) -> None:
    """`wandb_required: true`: refuse now, before any heavy work, where W&B would log offline
    (no login, WANDB_MODE) or its server does not answer within `timeout_s`."""
    import urllib.error
    import urllib.request

    from pet_pipeline.errors import UserError

    mode = choose_wandb_mode()
    if mode != "online":
        why = "no W&B login (WANDB_API_KEY or `wandb login`)" if not has_wandb_credentials() \
            else f"WANDB_MODE={mode}"
        raise UserError(f"wandb_required: W&B would log offline here ({why}); log in, or set "
                        "wandb_required: false to log offline and upload later with `wandb sync`.")
    outcome = {}

    def ask():
        try:
            urllib.request.urlopen(wandb_server(), timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable
        except (urllib.error.URLError, OSError) as error:
            outcome["error"] = getattr(error, "reason", error)

    # urlopen's timeout bounds the connection, not the name lookup before it (a resolver that
    # never answers takes minutes): the whole question runs in a thread, waited for this long
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout_s)
    if asking.is_alive():
        outcome["error"] = "no answer, not even to the name lookup"
    if "error" in outcome:
        raise UserError(f"wandb_required: the W&B server {wandb_server()} did not answer within "
                        f"{timeout_s:g} s ({outcome['error']}); check the network or proxy, or set "
                        "wandb_required: false to log offline and upload later with `wandb sync`.")


def init_trackers(accelerator, config, *, run_id: str) -> str | None:
    """Start the trackers of `config.report_to` on the main process; a resumed run logs into
    the same W&B run (`run_id`), named after output_dir unless `run_name` says otherwise.

    W&B waits for its server at most `wandb_init_timeout_s`; when that fails (a key but no
    route to the server, a server that does not answer), it starts again offline with the same
    run id and folder, and the line to print is returned (None otherwise). The end of the run
    waits for uploads at most `wandb_finish_timeout_s`."""
    from pet_pipeline.config import to_dict

    if config.report_to == "none":
        return None
    init_kwargs = {}
    uses_wandb = "wandb" in trackers_for(config.report_to)
    if uses_wandb:
        import wandb

        init_kwargs["wandb"] = {
            "name": config.run_name or Path(config.output_dir).name, "id": run_id, "resume": "allow",
            "dir": str(config.output_dir),
            "settings": wandb.Settings(init_timeout=config.wandb_init_timeout_s,
                                       finish_timeout=config.wandb_finish_timeout_s)}
    try:
        accelerator.init_trackers(config.wandb_project, config=to_dict(config), init_kwargs=init_kwargs)
    except Exception as error:  # W&B raises its own errors, timeouts and OSErrors here
        if not _wandb_could_not_reach_its_server(error):
            raise
        return _wandb_offline_instead(accelerator, config, init_kwargs, error)
    return None


def _wandb_could_not_reach_its_server(error: Exception) -> bool:
    """An error of W&B's online start (its own errors, timeouts, connections), not TensorBoard's
    nor an offline W&B's."""
    wandb = sys.modules.get("wandb")
    if wandb is None or os.environ.get("WANDB_MODE", "online") != "online":
        return False
    return isinstance(error, (wandb.errors.Error, TimeoutError, ConnectionError))


def _wandb_offline_instead(accelerator, config, init_kwargs: dict, error: Exception) -> str:
    """The trackers started again with W&B offline; the line that says so."""
    import wandb

    from pet_pipeline.config import to_dict
    from pet_pipeline.errors import UserError

    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if config.wandb_required:
        raise UserError(f"wandb_required: W&B could not start online ({reason}); check the network "
                        "and login, or set wandb_required: false to log offline.") from None
    with contextlib.suppress(Exception):  # an internal module (wandb 0.31): gone in others is fine
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        # W&B's own usage analytics would try the same server again as the process exits
        # (~10 s more against one that never answers)
        opentelemetry_proxy.disable()
    wandb.teardown()  # the failed online attempt still holds the run id in W&B's service
    accelerator.trackers = []
    os.environ["WANDB_MODE"] = "offline"
    accelerator.init_trackers(config.wandb_project, config=to_dict(config), init_kwargs=init_kwargs)
    folder = Path(wandb.run.dir).parent if wandb.run is not None else Path(config.output_dir) / "wandb"
    return (f"W&B server {wandb_server()} unreachable after {config.wandb_init_timeout_s:g} s ({reason}): "
            f"logging offline to {folder}; upload later with `wandb sync {folder}`")


def wandb_sync_hint(accelerator) -> str | None:
    """`wandb sync DIR` for an offline W&B run, else None."""
    if os.environ.get("WANDB_MODE") != "offline":
        return None
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
        return f"wandb sync {Path(run.dir).parent}"
    except Exception:  # no wandb tracker in this run
        return None


class MetricsLog:
    """output_dir/metrics.jsonl: one JSON object per logged step or epoch, main process only.

    On resume from step K, records after K (logged before the stop but after the checkpoint)
    are dropped, so the file reads as one uninterrupted run; with `before_validation` (the
    checkpoint was saved before the validation of step K) so are step K's validation and test
    records.
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None,
                 before_validation: bool = False):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            with replaced(self.path):  # an empty history
                pass
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:  # a line cut short by a kill or a full disk is dropped, not fatal
                    record = json.loads(line)
                    step = record.get("step", 0)
                    evaluation = "val_accuracy" in record or "test_accuracy" in record
                    if step < resume_step or (step == resume_step and not (before_validation and evaluation)):
                        kept.append(line)
                except ValueError:
                    continue
            with replaced(self.path) as handle:  # the history is never half rewritten
                handle.write("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """One line of strict JSON: a non-finite number is written as null."""
        if self.enabled:
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}
            append_line(self.path, json.dumps(finite, allow_nan=False))  # no half line on a full disk


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


SUMMARY_COLUMNS = ("epoch", "step", "train_loss", "val_accuracy", "val_macro_f1", "lr",
                   "images_per_s", "wall_time_s", "unreadable_images")


def write_summary_csv(records: list[dict], path: str | Path) -> None:
    """summary.csv, one row per epoch, from metrics.jsonl's records (so a resumed run's file
    is rebuilt from the same history): the epoch's mean training loss and images/s, its
    validation accuracy and macro-F1, the lr, the process's wall time at its last step and the
    training images first found unreadable in it."""
    import csv

    epochs: dict[int, dict] = {}
    for r in records:
        if "epoch" not in r:
            continue
        row = epochs.setdefault(r["epoch"], {"epoch": r["epoch"], "losses": [], "speeds": [],
                                             "unreadable_images": 0})
        row["step"] = r["step"]
        row["unreadable_images"] += "unreadable_image" in r  # first seen in this epoch
        if "train_loss" in r:
            row["losses"].append(r["train_loss"])
            row["speeds"].append(r["images_per_s"])
            row["lr"], row["wall_time_s"] = r["lr"], r.get("time/elapsed_s")
        if "val_accuracy" in r:
            row["val_accuracy"], row["val_macro_f1"] = r["val_accuracy"], r["val_macro_f1"]
    with replaced(path, "w", newline="") as f:  # a full disk: the previous epoch's file intact
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in epochs.values():
            losses = [x for x in row.pop("losses") if x is not None]
            speeds = [x for x in row.pop("speeds") if x is not None]
            row["train_loss"] = sum(losses) / len(losses) if losses else None
            row["images_per_s"] = sum(speeds) / len(speeds) if speeds else None
            writer.writerow(row)


class PhaseClock:
    """Where a run's wall time went: named phases timed with `phase`, the rest is training.

        clock = PhaseClock()
        with clock.phase("validation"):
            ...
        clock.summary()  # {"time/setup_s": ..., "time/training_s": ..., "time/total_s": ...}
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        total = self.elapsed()
        training = total - sum(self.seconds.values())
        phases = {**self.seconds, "training": training, "total": total}
        return {f"time/{name.replace(' ', '_')}_s": round(seconds, 3) for name, seconds in phases.items()}


class Progress:
    """Training progress on the main process's console.

    In a terminal: tqdm's bar, with the loss, lr and images/s of the last log interval.
    Redirected to a file (every SLURM job, nohup, CI), a bar is a carriage-return redraw per
    step that buries everything else; there, one plain line per log interval instead, flushed
    at once:

        step 40/300 (13%) | epoch 1 | loss 0.6931 | lr 2.00e-04 | 58 img/s | ETA 4m21s
    """

    def __init__(self, total: int, initial: int, *, enabled: bool, interactive: bool | None = None):
        self.enabled, self.total, self.step = enabled, total, initial
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self._first_step, self._start = initial, time.perf_counter()
        self.bar = None
        if enabled and self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        """One optimizer step done."""
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)

    def show(self, record: dict) -> None:
        """The numbers of a log interval: into the bar, or as a line of their own."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.0f}")
        elif self.enabled:
            print(self.line(record), flush=True)

    def line(self, record: dict) -> str:
        percent = 100 * self.step / max(1, self.total)
        return (f"step {self.step}/{self.total} ({percent:.0f}%) | epoch {record['epoch']} | "
                f"loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
                f"{record['images_per_s']:.0f} img/s | ETA {_duration(self.eta_s())}")

    def eta_s(self) -> float | None:
        """Wall time left at the pace of this process so far (validation included)."""
        done = self.step - self._first_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._start) / done * max(0, self.total - self.step)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)  # above the bar, which is redrawn below it
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunLog:
    """Everything a run reports, in one place: the console (once per job), metrics.jsonl,
    the trackers, the training throughput and where the wall time went.

        run_log.print("...")                     # main process only; keeps the progress bar intact
        progress = run_log.start_progress(total_steps, initial_step)  # a bar, or plain lines
        run_log.log({"step": 3, "train_loss": 0.7})
        with run_log.phase("validation"):        # timed, and left out of images/s
            ...
        run_log.count_images(64); run_log.images_per_s()
    """

    def __init__(self, accelerator, metrics_path: str | Path, *, resume_step: int | None,
                 before_validation: bool = False, clock: PhaseClock | None = None):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.metrics = MetricsLog(metrics_path, enabled=self.is_main, resume_step=resume_step,
                                  before_validation=before_validation)
        self.clock = clock or PhaseClock()
        self._images, self._since, self._paused = 0, time.perf_counter(), 0.0
        self.progress: Progress | None = None

    def start_progress(self, total: int, initial: int) -> Progress:
        self.progress = Progress(total, initial, enabled=self.is_main)
        return self.progress

    def print(self, message: str) -> None:
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

    def log(self, record: dict) -> None:
        """One record for metrics.jsonl and the trackers; `record["step"]` is the step."""
        self.metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        with self.clock.phase(name):
            yield
        self._paused += time.perf_counter() - start

    def count_images(self, n: int) -> None:
        self._images += n

    def images_per_s(self) -> float:
        """Training images per second since the last call, phases excluded."""
        now = time.perf_counter()
        rate = self._images / max(1e-9, now - self._since - self._paused)
        self._images, self._since, self._paused = 0, now, 0.0
        return rate

    def write_summary(self) -> None:
        if self.is_main:
            write_summary_csv(read_metrics(self.metrics.path), self.metrics.path.parent / "summary.csv")

    def log_timing(self, step: int) -> None:
        """Where this process's wall time went, from the start of train() (imports not
        counted; a resumed run accounts for its own process only). training is the rest:
        the loop itself, with worker start-up and any compilation."""
        timing = self.clock.summary()
        if self.is_main:
            self.log({"step": step, **timing})
            self.print("time: " + ", ".join(f"{key[5:-2].replace('_', ' ')} {seconds:.1f} s"
                                            for key, seconds in timing.items()))


class RunningLoss:
    """The training loss summed on the device between logs: no host-device sync per step."""

    def __init__(self, device):
        import torch

        self.total = torch.zeros((), device=device)
        self.count = 0

    def add(self, loss) -> None:
        self.total += loss.detach()
        self.count += 1

    def move_into(self, state, accelerator) -> None:
        """Add the sum (averaged over ranks) to the train state, which checkpoints carry.
        A host-device sync point and a collective: every rank calls it at the same step.

        Raises FloatingPointError on every rank when the loss is not finite, before anything
        (a log line, a checkpoint, an export) is made of it.
        """
        total = accelerator.reduce(self.total, "mean").item()
        if not math.isfinite(total):
            raise FloatingPointError(f"training loss became {total} by step {state.global_step}")
        state.loss_sum += total
        state.loss_count += self.count
        self.total.zero_()
        self.count = 0
