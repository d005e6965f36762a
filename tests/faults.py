"""Run train.py with faults injected at exact points, for tests of what survives them.

    python tests/faults.py FAULT[,FAULT...] train.py --key value ...

Faults:
    kill-at-commit:N   SIGKILL this process at the N-th rename of a finished `.tmp-step_*`
                       checkpoint into place (for a re-save: after the old one moved aside)
    sigterm-at-step:K  send this process a real SIGTERM when the loop asks about stopping
                       for the K-th time (once per optimizer step)
    enospc-at-save:N   the N-th checkpoint save writes part of a file, then fails with
                       OSError(ENOSPC), as on a full disk
    sigterm-in-data:S  a real SIGTERM as the data starts loading, which then takes S seconds

The hooks patch os/pathlib and torch from outside; train.py runs unchanged via runpy.
"""

from __future__ import annotations

import errno
import os
import pathlib
import runpy
import signal
import sys


def install(faults: list[str]) -> None:
    for fault in faults:
        name, _, count = fault.partition(":")
        n = int(count)
        if name == "kill-at-commit":
            _kill_at_commit(n)
        elif name == "sigterm-at-step":
            _sigterm_at_step(n)
        elif name == "enospc-at-save":
            _enospc_at_save(n)
        elif name == "sigterm-in-data":
            _sigterm_in_data(n)
        else:
            raise SystemExit(f"unknown fault {fault!r}")


def _kill_at_commit(n: int) -> None:
    original, seen = pathlib.Path.rename, [0]

    def rename(self, target):
        if self.name.startswith(".tmp-step_"):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, target)

    pathlib.Path.rename = rename


def _sigterm_at_step(k: int) -> None:
    from pet_pipeline.preemption import StopFlag

    original, seen = StopFlag.agreed, [0]

    def agreed(self, accelerator):
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the flag
        return original(self, accelerator)

    StopFlag.agreed = agreed


def _enospc_at_save(n: int) -> None:
    import accelerate

    original, seen = accelerate.Accelerator.save_state, [0]

    def save_state(self, output_dir=None, **kwargs):
        seen[0] += 1
        if seen[0] == n:
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"\0" * 4096)  # a partial copy, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, output_dir, **kwargs)

    accelerate.Accelerator.save_state = save_state


def _sigterm_in_data(seconds: int) -> None:
    import time

    import pet_pipeline.data

    original = pet_pipeline.data.load_pets

    def load_pets(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(seconds)  # a slow scan (a big folder, a slow mount)
        return original(**kwargs)

    pet_pipeline.data.load_pets = load_pets


if __name__ == "__main__":
    install(sys.argv[1].split(","))
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
