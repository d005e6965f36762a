"""Writing the run's own files (metrics.jsonl, summary.csv, the report, the plots, the model
card, config.yaml) the way checkpoints are written: a full or read-only disk ends in one
sentence naming the file and what to do, the partial file is removed, and the previous
complete file is left as it was.

    with replaced(out / "summary.csv", "w", newline="") as f:   # written aside, renamed into place
        f.write(...)
    append_line(out / "metrics.jsonl", json.dumps(record))       # cut back if the write fails
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from pet_pipeline.errors import UserError


def write_failed(error: OSError, path: Path) -> UserError:
    """The one sentence for a write of `path` that failed."""
    from pet_pipeline.checkpoint import write_error_reason

    return UserError(f"{path}: could not be written ({write_error_reason(error, path.parent)}); free space "
                     "there or make it writable, then rerun the same command: the checkpoints and the "
                     "files written before are intact.")


@contextmanager
def replaced(path: str | Path, mode: str = "w", **open_options):
    """A file object for the new content of `path`: written beside it, renamed into place when
    the block ends. On an OSError the aside file is removed, `path` keeps its old content and
    a UserError says what happened."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(aside, mode, **open_options) as handle:
            yield handle
        os.replace(aside, path)
    except OSError as error:
        aside.unlink(missing_ok=True)
        raise write_failed(error, path) from None


def append_line(path: str | Path, line: str) -> None:
    """`line` and a newline at the end of `path`; on an OSError the file is cut back to what it
    held before (no half line), and a UserError says what happened."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as handle:
            handle.write(line + "\n")
    except OSError as error:
        try:
            os.truncate(path, size)
        except OSError:
            pass  # a reader drops a line cut short (tracking.MetricsLog on resume)
        raise write_failed(error, path) from None
