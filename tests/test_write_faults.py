"""A full disk at any of the run's own writes (issue 24, part 3): metrics.jsonl, summary.csv, the
report files, the plots, the model card and config.yaml end in one sentence naming the file,
with exit status 2; the partial file is removed and the previous complete file stays as it was.

The disk fills by injection: pet_pipeline/files.py opens every one of those files, and the
test makes its N-th write of a file write half its bytes, then fail with ENOSPC, as a full
disk does. metrics.json is written by evaluate.save, which fails the same way here.
"""

from __future__ import annotations

import builtins
import errno
import json
from pathlib import Path

import pytest
from conftest import TINY, ok, refused

import pet_pipeline.files

RUN = {**TINY, "breeds": ["Abyssinian", "Bengal", "Birman"], "epochs": 2, "val_fraction": 0.25}


class FullDisk:
    """A file object whose writes store half their bytes, then raise ENOSPC."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def fill_the_disk_at(monkeypatch, name: str, nth: int = 1) -> None:
    """The `nth` write of a file called `name` (written aside, or appended to) hits a full disk."""
    seen = [0]

    def fake_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        file_name = Path(path).name
        if file_name.startswith(f".{name}.tmp-") or (file_name == name and "a" in mode):
            seen[0] += 1
            if seen[0] == nth:
                return FullDisk(handle)
        return handle

    monkeypatch.setattr(pet_pipeline.files, "open", fake_open, raising=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp-*"))


@pytest.mark.parametrize("relative, nth", [
    ("config.yaml", 1),
    ("metrics.jsonl", 3),  # a record in the middle of training
    ("summary.csv", 2),  # the second epoch's: the first one's file is kept
    ("eval/predictions.csv", 1),
    ("eval/confusion_matrix.csv", 1),
    ("eval/classification_report.txt", 1),
    ("eval/confusion_matrix.png", 1),
    ("training_curves.png", 1),
    ("model/README.md", 1),
])
def test_a_full_disk_at_each_write_ends_in_one_sentence_keeping_what_was_complete(
        tmp_path, monkeypatch, train_run, relative, nth):
    out = tmp_path / "run"
    name = Path(relative).name
    fill_the_disk_at(monkeypatch, name, nth)
    line = refused(train_run({**RUN, "output_dir": out}),
                   f"{out / relative}: could not be written (no space left on device); free space "
                   "there or make it writable, then rerun the same command")
    assert "checkpoints and the files written before are intact" in line
    assert leftovers(out) == []  # the half-written file is gone
    if name == "metrics.jsonl":  # the records before the failed one, each whole
        records = [json.loads(line) for line in (out / relative).read_text().splitlines()]
        assert [r["step"] for r in records if "train_loss" in r] == [1]
    if name == "summary.csv":  # the first epoch's file, complete
        assert [row.split(",")[0] for row in (out / relative).read_text().splitlines()] == ["epoch", "0"]


def test_metrics_json_on_a_full_disk_keeps_the_previous_report(tmp_path, monkeypatch, train_run):
    """A finished run re-evaluated on a full disk: the first report's files stay whole."""
    import pet_pipeline.evaluation

    out = tmp_path / "run"
    ok(train_run({**RUN, "output_dir": out}))
    before = {name: (out / "eval" / name).read_bytes() for name in ("metrics.json", "predictions.csv")}
    original = pet_pipeline.evaluation.save_results

    def save_results(folder, results, *, file_name=None):
        Path(folder, file_name).write_text('{"accuracy": 0.')  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pet_pipeline.evaluation, "save_results", save_results)
    refused(train_run({**RUN, "output_dir": out}),
            f"{out / 'eval' / 'metrics.json'}: could not be written (no space left on device)")
    assert {name: (out / "eval" / name).read_bytes() for name in before} == before
    assert leftovers(out) == []
    monkeypatch.setattr(pet_pipeline.evaluation, "save_results", original)
    fill_the_disk_at(monkeypatch, "predictions.csv")
    refused(train_run({**RUN, "output_dir": out}),
            f"{out / 'eval' / 'predictions.csv'}: could not be written")
    assert (out / "eval" / "predictions.csv").read_bytes() == before["predictions.csv"]
    assert json.loads((out / "eval" / "metrics.json").read_text())["n"] == 24  # rewritten, whole
    assert leftovers(out) == []
