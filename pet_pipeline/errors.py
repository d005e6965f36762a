"""Errors a user can cause, and the one place that turns them into a clean exit."""

from __future__ import annotations

import sys

USAGE_EXIT_CODE = 2
# Exit status of a run that stopped on a signal (after saving a checkpoint, or before its
# first step). The sbatch scripts requeue on it; rerun with resume: auto to continue.
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL
# Exit status after Ctrl-C (128 + SIGINT, as a shell reports it): a person stopped the run,
# which a scheduler must not requeue; the same command resumes it.
INTERRUPTED_EXIT_CODE = 130


def stop_exit_code(signal_name: str | None) -> int:
    """The exit status of a run stopped by `signal_name`: 130 for Ctrl-C, else 75 (requeue)."""
    return INTERRUPTED_EXIT_CODE if signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


class UserError(Exception):
    """A problem the user can fix (bad value, bad path, missing weights offline).

    The message is one sentence that says what to do; it is printed without a traceback
    and the program exits with status 2.
    """


def exit_with(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_CODE)


class StoppedBeforeTraining(BaseException):
    """A stop signal before the first step (data scan, model download, resume): there is
    nothing new to save, so the process ends at once instead of after the setup. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (a
    checkpoint check, a download retry) takes it for a failure of its own."""


class StoppedWhileClosing(BaseException):
    """A stop signal after the run ended (W&B's upload, the Hub push): everything is saved, so
    the process ends at once. A BaseException for the same reason as StoppedBeforeTraining."""


class QuitWithoutSaving(BaseException):
    """A second Ctrl-C: end now, without the checkpoint the first one asked for. A
    BaseException for the same reason as StoppedBeforeTraining. Checkpoints are written aside
    and renamed into place, so the newest complete one stays intact whatever this cuts short."""
