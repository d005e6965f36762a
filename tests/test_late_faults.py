"""Images that become unreadable after the start-up scan (issue 24, part 2): a training image
damaged or deleted between epochs is named once, replaced by a stand-in of its class on every
epoch and rerun (resume stays exact) and counted; `strict_data` or too large a share stops the
run with a checkpoint and one sentence; an unreadable test image is left out of the report and
named there.

The damage is done in this process between two epochs (TrainState.next_epoch), where a real
filesystem would change under a running job.
"""

from __future__ import annotations

import csv
import json

import pytest
from conftest import TINY, ok, refused, write_pet_folder
from safetensors.torch import load_file

from pet_pipeline.checkpoint import TrainState, list_checkpoints, read_train_state
from pet_pipeline.tracking import read_metrics

BREEDS = ["Abyssinian", "Bengal", "Birman", "Bombay"]
RUN = {**TINY, "breeds": BREEDS, "epochs": 3, "batch_size": 4, "image_size": 32,
       "max_unreadable_fraction": 0.2}  # 2 of 24 images may go: the default 1% stops at one
DAMAGED, DELETED = "Bengal_2", "Birman_3"  # trainval images (6 a breed: ids 1-6)


@pytest.fixture
def pets(tmp_path):
    """A fresh Oxford-layout folder of its own (the run damages it): 6 trainval + 2 test a breed."""
    return write_pet_folder(tmp_path / "pets", {breed: (6, 2) for breed in BREEDS}, image_size=48)


def damage_after_epoch(monkeypatch, folder, epoch: int, *, cut=(DAMAGED,), delete=(DELETED,)):
    """Truncate and delete images when the run moves past `epoch` (once)."""
    original, done = TrainState.next_epoch, []

    def next_epoch(self):
        if self.epoch == epoch and not done:
            done.append(True)
            for image_id in cut:
                path = folder / "images" / f"{image_id}.jpg"
                path.write_bytes(path.read_bytes()[:100])
            for image_id in delete:
                (folder / "images" / f"{image_id}.jpg").unlink()
        original(self)

    monkeypatch.setattr(TrainState, "next_epoch", next_epoch)


def test_images_damaged_between_epochs_are_named_once_replaced_and_counted(tmp_path, pets, monkeypatch,
                                                                          train_run):
    damage_after_epoch(monkeypatch, pets, 0)
    out = tmp_path / "run"
    result = ok(train_run({**RUN, "data_dir": pets, "output_dir": out}))
    named = [line for line in result.stdout.splitlines() if line.startswith("unreadable during training")]
    assert sorted(named) == [
        f"unreadable during training: {DAMAGED} (unreadable header (Truncated File Read)); a readable "
        "image of its class stands in for it",
        f"unreadable during training: {DELETED} (missing file); a readable image of its class stands "
        "in for it",
    ], result.stdout[-3000:]  # once each, though every later epoch meets them again
    records = [r for r in read_metrics(out / "metrics.jsonl") if "unreadable_image" in r]
    assert sorted(r["unreadable_image"] for r in records) == [DAMAGED, DELETED]
    assert {r["epoch"] for r in records} == {1}
    with open(out / "summary.csv", newline="") as f:
        assert [int(row["unreadable_images"]) for row in csv.DictReader(f)] == [0, 2, 0]
    assert sorted(read_train_state(list_checkpoints(out)[-1])["unreadable"]) == [DAMAGED, DELETED]
    assert "unreadable images (named in metrics.jsonl and eval/metrics.json): 2 in training" in result.stdout


def test_a_run_resumed_after_the_damage_replaces_the_same_samples_the_same_way(tmp_path, monkeypatch,
                                                                             train_run):
    """The stand-in depends on (seed, epoch, index) and the files only: stopped in epoch 1 (as
    by SIGTERM) and resumed on the damaged files, the run ends with the weights of the one
    that went through."""
    from pet_pipeline.preemption import StopFlag, StopRequested

    whole, parts = (write_pet_folder(tmp_path / name, {b: (6, 2) for b in BREEDS}, image_size=48)
                    for name in ("whole", "parts"))
    damage_after_epoch(monkeypatch, whole, 0)
    ok(train_run({**RUN, "data_dir": whole, "output_dir": tmp_path / "a"}))
    monkeypatch.undo()
    damage_after_epoch(monkeypatch, parts, 0)
    original = StopFlag.check

    def check(self, accelerator, step):  # a stop request after step 9, in the damaged epoch
        if step == 9:
            self.signal_name = "SIGTERM"
            raise StopRequested("SIGTERM")
        original(self, accelerator, step)

    monkeypatch.setattr(StopFlag, "check", check)
    stopped = train_run({**RUN, "data_dir": parts, "output_dir": tmp_path / "b"})
    assert stopped.returncode == 75 and "unreadable during training" in stopped.stdout, stopped.stdout[-2000:]
    monkeypatch.undo()  # the files stay as they are now: damaged
    resumed = ok(train_run({**RUN, "data_dir": parts, "output_dir": tmp_path / "b"}))
    assert "resuming from step_00000009" in resumed.stdout

    def named(result):
        return {line.split()[3] for line in result.stdout.splitlines()
                if line.startswith("unreadable during training: ")}

    # each named once over the two processes: the resumed one knows what the first one met
    assert named(stopped) | named(resumed) == {DAMAGED, DELETED}
    assert named(stopped) and not named(stopped) & named(resumed)
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_strict_data_stops_at_the_next_step_with_a_checkpoint_naming_the_file(tmp_path, pets, monkeypatch,
                                                                            train_run):
    damage_after_epoch(monkeypatch, pets, 0, delete=())
    out = tmp_path / "run"
    backup = (pets / "images" / f"{DAMAGED}.jpg").read_bytes()
    line = refused(train_run({**RUN, "data_dir": pets, "output_dir": out, "strict_data": True}),
                   f"strict_data: {DAMAGED} (unreadable header", "became unreadable during training; "
                   "the run stopped with a checkpoint: restore or remove the file and rerun")
    assert line
    (step,) = [read_train_state(c)["global_step"] for c in list_checkpoints(out)[-1:]]
    assert 6 < step < 18  # in the second epoch, at the log step after the first bad batch
    monkeypatch.undo()
    (pets / "images" / f"{DAMAGED}.jpg").write_bytes(backup)  # the file restored: the run goes on
    resumed = ok(train_run({**RUN, "data_dir": pets, "output_dir": out, "strict_data": True}))
    assert f"step {step}" in resumed.stdout and (out / "eval" / "metrics.json").is_file()


def test_too_large_a_share_unreadable_stops_the_run(tmp_path, pets, monkeypatch, train_run):
    damage_after_epoch(monkeypatch, pets, 0, cut=(), delete=("Abyssinian_1", "Bengal_1", "Birman_1"))
    out = tmp_path / "run"
    refused(train_run({**RUN, "data_dir": pets, "output_dir": out, "max_unreadable_fraction": 0.1}),
            "max_unreadable_fraction: 3 of 24 training images (12.5%) became unreadable during training, "
            "over 10.0%", "the data is gone, not one file")
    assert list_checkpoints(out)


def test_an_unreadable_test_image_is_left_out_of_the_report_and_named(tmp_path, pets, monkeypatch, train_run):
    from pet_pipeline.trainer import Trainer

    original = Trainer.final_report

    def final_report(self):  # the test image disappears after the scan, before the report
        (pets / "images" / "Bombay_8.jpg").unlink()
        original(self)

    monkeypatch.setattr(Trainer, "final_report", final_report)
    out = tmp_path / "run"
    result = ok(train_run({**RUN, "data_dir": pets, "output_dir": out, "epochs": 1}))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["unreadable"] == ["Bombay_8"] and metrics["n"] == 4 * 2 - 1
    with open(out / "eval" / "predictions.csv", newline="") as f:
        assert "Bombay_8" not in [row["image_id"] for row in csv.DictReader(f)]
    assert "1 in the test split" in result.stdout


def test_a_resume_leaves_out_what_the_first_start_left_out_even_if_fixed_since(tmp_path, pets, monkeypatch,
                                                                            train_run):
    """The first start's verdicts travel in the checkpoint: a file bad then and repaired before
    the resume stays out, so the rows (and the data order) are the checkpoint's."""
    from pet_pipeline.preemption import StopFlag, StopRequested

    broken = pets / "images" / "Bombay_4.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"")
    original = StopFlag.check

    def check(self, accelerator, step):
        if step == 3:
            self.signal_name = "SIGTERM"
            raise StopRequested("SIGTERM")
        original(self, accelerator, step)

    monkeypatch.setattr(StopFlag, "check", check)
    out = tmp_path / "run"
    first = train_run({**RUN, "data_dir": pets, "output_dir": out})
    assert first.returncode == 75 and "images/Bombay_4.jpg: empty file" in first.stdout
    monkeypatch.undo()
    broken.write_bytes(good)  # repaired while the run was stopped
    resumed = ok(train_run({**RUN, "data_dir": pets, "output_dir": out}))
    assert "resuming from step_00000003" in resumed.stdout
    assert "images/Bombay_4.jpg: bad at the run's first start" in resumed.stdout
    assert read_train_state(list_checkpoints(out)[-1])["left_out"] == ["Bombay_4"]
