"""Run train.py with faults injected at exact points, for tests of what survives them.

    python tests/faults.py FAULT[,FAULT...] train.py --key value ...

Faults:
    kill-at-commit:N   SIGKILL this process at the N-th rename of a finished `.tmp-step_*`
                       checkpoint into place (for a re-save: after the old one moved aside)
    sigterm-at-step:K  send this process a real SIGTERM when the loop or an evaluation asks
                       about stopping for the K-th time (after each optimizer step and each
                       evaluation batch)
    enospc-at-save:N   the N-th checkpoint save writes part of a file, then fails with
                       OSError(ENOSPC), as on a full disk
    sigterm-in-data:S  a real SIGTERM as the data starts loading, which then takes S seconds
    delete-after-epoch:E  rank 0 deletes the file $FAULT_IMAGE when the run moves past epoch E
                       (an image gone from a shared folder mid-run)
    count-collectives  not a fault: count torch.distributed's collectives issued from Python
                       between consecutive optimizer steps (the loop's stop checks) and write
                       {"steps": [...], "per_step": [...]} to $COLLECTIVES_DIR/rank-R.json at exit

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
        n = int(count or 0)
        if name == "kill-at-commit":
            _kill_at_commit(n)
        elif name == "sigterm-at-step":
            _sigterm_at_step(n)
        elif name == "enospc-at-save":
            _enospc_at_save(n)
        elif name == "sigterm-in-data":
            _sigterm_in_data(n)
        elif name == "count-collectives":
            _count_collectives()
        elif name == "delete-after-epoch":
            _delete_after_epoch(n)
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

    check, poll, seen = StopFlag.check, StopFlag.poll, [0]

    def asked():
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the flag

    def counted_check(self, accelerator, step):  # after each optimizer step
        asked()
        return check(self, accelerator, step)

    def counted_poll(self, accelerator, batch):  # after each evaluation batch
        asked()
        return poll(self, accelerator, batch)

    StopFlag.check, StopFlag.poll = counted_check, counted_poll


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

    original = pet_pipeline.data.load_data

    def load_data(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(seconds)  # a slow scan (a big folder, a slow mount)
        return original(**kwargs)

    pet_pipeline.data.load_data = load_data


def _delete_after_epoch(epoch: int) -> None:
    from pet_pipeline.checkpoint import TrainState

    original = TrainState.next_epoch

    def next_epoch(self):
        path = os.environ["FAULT_IMAGE"]
        if self.epoch == epoch and os.environ.get("RANK", "0") == "0" and os.path.exists(path):
            os.unlink(path)
        original(self)

    TrainState.next_epoch = next_epoch


def _count_collectives() -> None:
    """DDP's gradient all-reduce runs in C++ and is not counted: every step needs it."""
    import atexit
    import json

    import torch.distributed as dist

    from pet_pipeline.preemption import StopFlag

    issued = [0]
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
                 "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "barrier"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            issued[0] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)

    arm, check = StopFlag.arm, StopFlag.check
    steps, per_step, counted_until = [], [], [0]

    def counting_arm(self, *args, **kwargs):
        counted_until[0] = issued[0]  # what came before the first step is setup
        return arm(self, *args, **kwargs)

    def counting_check(self, accelerator, step):
        try:
            return check(self, accelerator, step)
        finally:  # the step's own collectives and its check's
            steps.append(step)
            per_step.append(issued[0] - counted_until[0])
            counted_until[0] = issued[0]

    StopFlag.arm, StopFlag.check = counting_arm, counting_check

    def write():
        path = os.path.join(os.environ["COLLECTIVES_DIR"], f"rank-{os.environ.get('RANK', '0')}.json")
        with open(path, "w") as f:
            json.dump({"steps": steps, "per_step": per_step}, f)

    atexit.register(write)


if __name__ == "__main__":
    script = sys.argv[2]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # before the hooks import it
    install(sys.argv[1].split(","))
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
