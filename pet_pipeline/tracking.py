"""Experiment tracking: Accelerate's trackers (W&B, TensorBoard) and metrics.jsonl.

W&B is imported only when it is used. Without credentials it runs in offline mode, writing
the run under output_dir/wandb, and the end of the run prints the `wandb sync` command.
"""

from __future__ import annotations

import json
import netrc
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


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


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def init_trackers(accelerator, *, report_to: str, project: str, run_name: str, run_id: str,
                  output_dir: str, config: dict) -> None:
    """Start the trackers on the main process; a resumed run logs into the same W&B run."""
    if report_to == "none":
        return
    init_kwargs = {}
    if "wandb" in trackers_for(report_to):
        init_kwargs["wandb"] = {"name": run_name, "id": run_id, "resume": "allow",
                                "dir": str(output_dir)}
    accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)


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
    are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
