"""Stop requests from SLURM (USR1 ahead of the time limit), a scheduler (SIGTERM) or a person
at the terminal (Ctrl-C: SIGINT; a second Ctrl-C quits at once, without saving).

The handler only raises a flag. The training loop calls `StopFlag.check(accelerator, step)`
after every optimizer step and evaluation calls `poll` after every batch. With several
processes the ranks must agree, so that they stop, checkpoint and exit at the same step even
if only one got the signal; agreeing is a collective and a host-device sync, which keeps the
CPU from queueing the next step while the GPU works. So the ranks agree only every `every`
steps (train.py: `log_every`, where the loss is synced anyway), or sooner when steps are
slow, so that a signal is acted on within AGREE_WITHIN_S seconds (SLURM's USR1 comes 120 s
ahead: slurm/). One process has nothing to agree on: its flag is read at every call, for
free. `check` raises `StopRequested`, which train.py handles in one place.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import torch

from pet_pipeline.errors import (  # noqa: F401 (PREEMPTED_EXIT_CODE re-exported)
    PREEMPTED_EXIT_CODE,
    QuitWithoutSaving,
    StoppedBeforeTraining,
    StoppedWhileClosing,
)

AGREE_WITHIN_S = 30.0  # leaves most of SLURM's 120 s warning to the checkpoint


class StopRequested(Exception):
    """Every rank agreed to stop: checkpoint and exit with PREEMPTED_EXIT_CODE."""


class Cadence:
    """When the ranks next agree: at the first count, then at the multiples of `every`, or
    every few counts when `every` of them would take longer than `budget_s`. Every rank
    computes the same answer from the same shared figures."""

    def __init__(self, every: int, budget_s: float = AGREE_WITHIN_S):
        self.every, self.budget_s = max(1, every), budget_s
        self.next: int | None = None  # None: agree at the first count
        self._since, self._count_since = time.perf_counter(), None

    def due(self, count: int) -> bool:
        return self.next is None or count >= self.next

    def seconds_per_count(self, count: int) -> float:
        counted = count - (self._count_since if self._count_since is not None else count - 1)
        return (time.perf_counter() - self._since) / max(1, counted)

    def agreed_at(self, count: int, slowest_seconds_per_count: float) -> None:
        fits = int(self.budget_s / max(slowest_seconds_per_count, 1e-9))
        if fits >= self.every:
            self.next = (count // self.every + 1) * self.every  # on the log steps
        else:
            self.next = count + max(1, fits)
        self._since, self._count_since = time.perf_counter(), count


class StopFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT), *, announce: bool = True):
        self.requested = False
        self.signal_name = None
        self.armed = False  # until arm(): a signal ends the process at once
        self.closing = False  # after closing(): the same, the run being saved
        self.announce = announce  # say what a Ctrl-C does (the main process; the others stay quiet)
        self.interrupts = 0  # Ctrl-Cs so far
        self.steps = self.batches = Cadence(1)
        self.pid = os.getpid()  # forked children (a map pool, loader workers) inherit the handler
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    @classmethod
    @contextmanager
    def installed(cls, **options):
        """A StopFlag for the length of a `with` block; the handlers before it are put back
        after (train.main called from a notebook leaves Ctrl-C as it found it)."""
        flag = cls(**options)
        try:
            yield flag
        finally:
            for sig, handler in flag._previous.items():
                signal.signal(sig, handler)

    def arm(self, every: int = 1) -> None:
        """From here on (the first step), a signal asks for a checkpoint at the next
        agreement: every `every` optimizer steps at most."""
        self.armed, self.steps = True, Cadence(every)

    def closing_now(self) -> None:
        """The run has ended and is saved (Trainer.close: the trackers' end, the Hub push): a
        signal from here on ends the process at once, instead of announcing a checkpoint."""
        self.armed, self.closing = False, True

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked child: the main process decides and ends it
            return
        name = signal.Signals(signum).name
        if self.closing:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise StoppedWhileClosing(name)
        self.interrupts += name == "SIGINT"
        if self.interrupts > 1 and self.armed:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # one more Ctrl-C ends the process outright
            raise QuitWithoutSaving(name)  # Ctrl-C again: the person does not want to wait
        self.requested = True
        self.signal_name = self.signal_name or name
        if not self.armed:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise StoppedBeforeTraining(self.signal_name)
        if name == "SIGINT" and self.announce:  # os.write: print() may be mid-write to stderr
            os.write(2, b"\nstopping after this step: saving a checkpoint (Ctrl-C again to quit without "
                        b"saving)\n")

    def check(self, accelerator, step: int) -> None:
        """After optimizer step `step`: raise StopRequested on every rank, at the same step,
        once any rank was signalled."""
        if self._agree(accelerator, self.steps, step):
            raise StopRequested(self.signal_name or "a signal")

    def poll(self, accelerator, batch: int) -> bool:
        """After evaluation batch `batch` (from 1): True on every rank, at the same batch,
        once any rank was signalled."""
        if batch == 1:
            self.batches = Cadence(self.steps.every)
        return self._agree(accelerator, self.batches, batch)

    def _agree(self, accelerator, cadence: Cadence, count: int) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        if not cadence.due(count):
            return False
        mine = torch.tensor([[float(self.requested), cadence.seconds_per_count(count)]],
                            device=accelerator.device)
        everyone = accelerator.gather(mine).cpu()  # the one collective: [ranks, 2]
        cadence.agreed_at(count, float(everyone[:, 1].max()))
        return bool(everyone[:, 0].max() > 0)
