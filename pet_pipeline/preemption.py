"""Stop requests from SLURM (USR1 ahead of the time limit) or a scheduler (SIGTERM).

The handler only raises a flag. The training loop calls `StopFlag.check(accelerator)` at
every optimizer step and evaluation asks `agreed` after every batch; all ranks reduce the
flag together, so they stop, checkpoint and exit at the same step even if only one got the
signal. `check` raises `StopRequested`, which train.py handles in one place.
"""

from __future__ import annotations

import signal

import torch

from pet_pipeline.errors import PREEMPTED_EXIT_CODE, StoppedBeforeTraining  # noqa: F401 (re-exported)


class StopRequested(Exception):
    """Every rank agreed to stop: checkpoint and exit with PREEMPTED_EXIT_CODE."""


class StopFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name = None
        self.armed = False  # until arm(): a signal ends the process at once
        for sig in signals:
            signal.signal(sig, self._handle)

    def arm(self) -> None:
        """From here on (the first step), a signal asks for a checkpoint at the next step."""
        self.armed = True

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self.armed:
            raise StoppedBeforeTraining(self.signal_name)

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank was signalled (one tiny all-reduce when
        several processes run: a host-device sync point, once per optimizer step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def check(self, accelerator) -> None:
        """Raise StopRequested on every rank when any rank was signalled."""
        if self.agreed(accelerator):
            raise StopRequested(self.signal_name or "a signal")
