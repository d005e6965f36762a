"""The run directory: one owner, what a start means, checkpoints that can't lose progress.

What a start means is tested as a table on the pure `plan` (no model, no files), then on
`RunDirectory.begin` with the checkpoints of one real tiny run;
what must hold for the real script (exit status, messages, a full disk) runs train.main in
this process, and kills and signals at exact points run train.py as a process of its own, with
faults injected by tests/faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COATNET_MODEL, TINY, Finished, cli, ok, refused, train_in_process, train_in_subprocess
from safetensors.torch import load_file

from pet_pipeline.checkpoint import (
    TrainState,
    list_checkpoints,
    read_train_state,
    recover_leftovers,
    verify_checkpoint,
)
from pet_pipeline.config import build_config
from pet_pipeline.errors import UserError
from pet_pipeline.preemption import PREEMPTED_EXIT_CODE
from pet_pipeline.rundir import RunDirectory, config_changes, read_starts
from pet_pipeline.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run_train(values: dict, env, *, faults: str | None = None) -> Finished:
    """train.py in this process; with `faults` (tests/faults.py: kills and signals at exact
    points) as a process of its own."""
    if faults:
        return train_in_subprocess(values, env, faults=faults)
    return train_in_process(values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, env):
    """A finished run of 4 steps with a checkpoint after each (step 1..4 kept), ~5 MB."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(run_train({**TINY, "max_steps": 4, "checkpoint_steps": 1, "keep_checkpoints": 5,
                  "output_dir": out}, env))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


def config(out: Path, **changes):
    return build_config({**TINY, "max_steps": 4, "checkpoint_steps": 1, "keep_checkpoints": 5,
                         "output_dir": str(out), **changes})


def begin(out: Path, **changes):
    return RunDirectory(out).begin(config(out, **changes), num_processes=1, argv=[])


# --------------------------------------------------------------------------- what a start means


def _state(**changes) -> dict:
    """A checkpoint's train state: 4 steps of `config(...)`, the best validation 0.5."""
    from pet_pipeline.config import to_dict

    values = {"global_step": 4, "epoch": 0, "step_in_epoch": 4, "best_accuracy": 0.5, "split": "s",
              "num_processes": 1, "config": to_dict(config(Path("/runs/a")))}
    return TrainState(**{**values, **changes}).state_dict()


def _folder(*steps, problems=(), model=True, results=True, starts=(), source=None, **state):
    """A Folder as `survey` reads it: checkpoints step_N of /runs/a, those in `problems` unusable."""
    from pet_pipeline.rundir import Folder, Found

    paths = [Path(f"/runs/a/checkpoints/step_{n:08d}") for n in steps]
    newest = []
    for path, n in zip(reversed(paths), reversed(steps)):
        usable = n not in problems
        newest.append(Found(path, None if usable else "optimizer.bin is missing",
                            _state(global_step=n, **state) if usable else None))
        if usable:
            break
    return Folder(Path("/runs/a"), checkpoints=paths, newest=newest, source=source,
                  has_results=results and bool(steps or model), has_model=model and bool(steps),
                  has_config=bool(steps or starts), holds_anything=bool(steps or starts),
                  starts=list(starts))


ELSEWHERE = Path("/runs/b/checkpoints/step_00000002")


def _from_elsewhere(**state):
    from pet_pipeline.rundir import Found

    return Found(ELSEWHERE, None, _state(global_step=2, **state))


# name: (folder, config changes, expected plan fields, a fragment of the refusal or of a message)
PLANS = {
    "an empty folder": (lambda: _folder(model=False, results=False), {},
                        {"action": "new", "write_config": True}, None),
    "a finished run": (lambda: _folder(3, 4), {}, {"action": "re-evaluate", "step": 4},
                       "holds a finished run (step 4)"),
    "a larger max_steps": (lambda: _folder(3, 4), {"max_steps": 6},
                           {"action": "resume", "changed": {"max_steps": [4, 6]}}, "max_steps 4 -> 6"),
    "a stop during the last validation": (lambda: _folder(4, validation_due=True), {},
                                          {"action": "resume", "before_validation": True},
                                          "validating and re-evaluating"),
    "another lr": (lambda: _folder(4), {"lr": 1e-3}, {"action": "refuse"}, "lr 0.002 -> 0.001"),
    "another split": (lambda: _folder(4, split="other"), {}, {"action": "refuse"},
                      "another train/val split"),
    "resume: none over a run": (lambda: _folder(4), {"resume": "none"}, {"action": "refuse"},
                                "resume: overwrite"),
    "resume: overwrite over a run": (lambda: _folder(4), {"resume": "overwrite"},
                                     {"action": "new", "move_aside": True, "write_config": True}, None),
    "results without checkpoints": (lambda: _folder(model=True, results=True), {}, {"action": "refuse"},
                                    "no checkpoints"),
    "the newest checkpoint unusable": (lambda: _folder(3, 4, problems=(4,)), {"max_steps": 6},
                                       {"action": "resume", "step": 3}, "skipping checkpoint step_00000004"),
    "every checkpoint unusable": (lambda: _folder(3, 4, problems=(3, 4)), {}, {"action": "refuse"},
                                  "none of the 2"),
    "model/ deleted": (lambda: _folder(4, model=False), {"max_steps": 6},
                       {"action": "resume", "forget_best_accuracy": True}, None),
    "another run's checkpoint, into an empty folder": (
        lambda: _folder(model=False, results=False, source=_from_elsewhere()),
        {"resume": str(ELSEWHERE)}, {"action": "resume", "step": 2, "forget_best_accuracy": True},
        "starting from /runs/b"),
    "another run's checkpoint, into a used folder": (
        lambda: _folder(4, source=_from_elsewhere()), {"resume": str(ELSEWHERE)}, {"action": "refuse"},
        "holds another run"),
    "the same command again, after a start from another run": (
        lambda: _folder(3, source=_from_elsewhere(), starts=[{"checkpoint": str(ELSEWHERE)}]),
        {"resume": str(ELSEWHERE), "max_steps": 6}, {"action": "resume", "step": 3},
        "continuing its own newest"),
    "a requeued SLURM attempt repeating overwrite": (
        lambda: _folder(2, starts=[{"slurm_job": "77"}]), {"resume": "overwrite", "max_steps": 6},
        {"action": "resume", "move_aside": False}, "this attempt continues it"),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_what_a_start_means_as_a_table(name):
    from dataclasses import asdict

    from pet_pipeline.rundir import plan

    make_folder, changes, expected, fragment = PLANS[name]
    changes = dict(changes)
    folder, resume = make_folder(), changes.pop("resume", "auto")
    wanted = config(Path("/runs/a"), **changes)
    wanted.resume = resume  # set after the config's checks, which look for the path on disk
    chosen = plan(folder, wanted, num_processes=1, split="s", slurm_job="77" if "SLURM" in name else None)
    assert {key: asdict(chosen)[key] for key in expected} == expected, chosen
    if fragment:
        assert fragment in " ".join([chosen.refusal or "", *chosen.messages]), chosen
    assert (chosen.refusal is not None) == (chosen.action == "refuse")
    if chosen.action == "refuse":  # one sentence that says what to do
        assert chosen.refusal.count(";") >= 1 and chosen.refusal.endswith("."), chosen.refusal


def test_the_plan_reads_only_what_survey_found():
    """plan is pure: the same Folder and config give the same plan, and a Folder of a path that
    does not exist is planned without touching the disk."""
    from pet_pipeline.rundir import plan

    folder = _folder(3, 4)
    first = plan(folder, config(Path("/runs/a"), max_steps=6), num_processes=1, split="s")
    second = plan(folder, config(Path("/runs/a"), max_steps=6), num_processes=1, split="s")
    assert first == second and not Path("/runs/a").exists()
    assert plan(folder, config(Path("/runs/a")), num_processes=2, split="s").refusal.count("processes 1 -> 2")




def test_a_finished_run_is_re_evaluated_and_a_larger_max_steps_resumes_it(run_copy):
    state = read_train_state(list_checkpoints(run_copy)[-1])
    assert state["num_processes"] == 1 and state["config"]["max_steps"] == 4  # what was trained
    plan = begin(run_copy)
    assert plan.action == "re-evaluate" and Path(plan.checkpoint).name == "step_00000004"
    plan = begin(run_copy, max_steps=6, num_workers=1)
    assert plan.action == "resume" and Path(plan.checkpoint).name == "step_00000004"
    assert plan.changed == {"max_steps": [4, 6], "num_workers": [0, 1]}
    assert any("accepted" in m and "max_steps 4 -> 6" in m for m in plan.messages)
    assert [s["action"] for s in read_starts(run_copy)] == ["new", "re-evaluate", "resume"]


@pytest.mark.parametrize("changes, keys", [
    ({"lr": 1e-3}, ["lr"]),
    ({"batch_size": 16, "image_size": 48}, ["batch_size", "image_size"]),
    ({"max_steps": 3}, ["max_steps"]),  # fewer steps than trained: not an extension
    ({"seed": 1, "augment": "strong"}, ["augment", "seed"]),
])
def test_a_config_that_changes_what_is_trained_is_refused_naming_the_keys(run_copy, changes, keys):
    before = (run_copy / "config.yaml").read_bytes()
    with pytest.raises(UserError) as error:
        begin(run_copy, **changes)
    message = str(error.value)
    assert all(f"{key} " in message for key in keys), message
    assert "resume: overwrite" in message and "another output_dir" in message
    assert (run_copy / "config.yaml").read_bytes() == before


def test_a_requeued_slurm_attempt_continues_instead_of_repeating_overwrite(run_copy, monkeypatch):
    """sbatch ... --resume overwrite: the requeued attempt gets the same arguments."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = begin(run_copy, resume="overwrite")  # the job's first attempt moves the old run aside
    assert first.action == "new"
    (run_copy / "checkpoints" / "step_00000001").mkdir(parents=True)  # what it trained
    shutil.copytree(next(run_copy.parent.glob("run.replaced-*")) / "checkpoints" / "step_00000004",
                    run_copy / "checkpoints" / "step_00000001", dirs_exist_ok=True)
    again = begin(run_copy, resume="overwrite")  # the requeued attempt
    assert again.action == "re-evaluate" and Path(again.checkpoint).name == "step_00000001"
    assert any("this attempt continues it (resume: auto)" in m for m in again.messages)
    assert len(list(run_copy.parent.glob("run.replaced-*"))) == 1


def test_results_without_checkpoints_are_not_overwritten(run_copy):
    shutil.rmtree(run_copy / "checkpoints")  # deleted to save space; model/ and eval/ kept
    with pytest.raises(UserError, match="no checkpoints.*resume: overwrite"):
        begin(run_copy)


def test_the_process_count_is_part_of_what_is_trained(run_copy):
    with pytest.raises(UserError, match="processes 1 -> 2"):
        RunDirectory(run_copy).begin(config(run_copy), num_processes=2, argv=[])


def test_config_changes_sorts_keys_into_refused_and_accepted():
    refused_keys, accepted = config_changes(
        {"lr": 1e-3, "epochs": 2, "max_steps": None, "log_every": 10, "model": "a"},
        {"lr": 1e-3, "epochs": 3, "max_steps": 100, "log_every": 5, "model": "b"})
    assert accepted == {"epochs": [2, 3], "log_every": [10, 5]}
    assert refused_keys == {"max_steps": [None, 100], "model": ["a", "b"]}  # a limit is not an extension
    # a key added to pet-pipeline after the run was saved counts as its default
    assert config_changes({"lr": 1e-3}, {"lr": 1e-3, "sync_bn": False}) == ({}, {})
    assert config_changes({"lr": 1e-3}, {"lr": 1e-3, "sync_bn": True})[0] == {"sync_bn": [False, True]}
    # fp16 brings a loss scaler into the checkpoint: switching to or from it is refused
    assert config_changes({"mixed_precision": "no"}, {"mixed_precision": "bf16"})[0] == {}
    assert "mixed_precision" in config_changes({"mixed_precision": "bf16"}, {"mixed_precision": "fp16"})[0]


def test_resume_none_in_a_used_folder_is_refused_and_overwrite_moves_the_old_run_aside(run_copy):
    with pytest.raises(UserError, match="holds a run.*resume: overwrite"):
        begin(run_copy, resume="none")
    old_steps = [p.name for p in list_checkpoints(run_copy)]
    plan = begin(run_copy, resume="overwrite")
    assert plan.action == "new" and plan.checkpoint is None
    (aside,) = run_copy.parent.glob("run.replaced-*")
    assert [p.name for p in list_checkpoints(aside)] == old_steps  # moved, not deleted
    assert list_checkpoints(run_copy) == [] and (run_copy / "config.yaml").is_file()
    assert any(str(aside) in m for m in plan.messages)


def test_going_back_to_an_earlier_checkpoint_in_place_is_refused_and_changes_nothing(run_copy):
    """resume: PATH to step 2 of the run in output_dir (steps 3 and 4 after it): refused in one
    sentence that says how (a new output_dir from it); nothing in the folder moves."""
    earlier = run_copy / "checkpoints" / "step_00000002"
    before = {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()}
    with pytest.raises(UserError, match="earlier checkpoint.*step_00000004.*another output_dir"):
        begin(run_copy, resume=str(earlier), max_steps=6)
    assert [p.name for p in list_checkpoints(run_copy)] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    assert {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()} == before
    newest = begin(run_copy, resume=str(run_copy / "checkpoints" / "step_00000004"), max_steps=6)
    assert newest.action == "resume" and newest.checkpoint.endswith("step_00000004")  # its own newest


def test_a_new_output_dir_starts_from_another_runs_checkpoint_and_never_changes_it(run_copy, tmp_path):
    """resume: PATH into an empty output_dir: PATH's weights and state, a new W&B run, model/
    chosen anew (every rank forgets the best accuracy); a rerun continues the new run's own
    checkpoints, not PATH again."""
    earlier = run_copy / "checkpoints" / "step_00000002"
    files = {p.name: p.read_bytes() for p in earlier.iterdir()}
    state = read_train_state(earlier)
    new = tmp_path / "branch"
    plan = begin(new, resume=str(earlier), max_steps=6)
    assert plan.action == "resume" and plan.checkpoint == str(earlier) and plan.step == 2
    assert plan.wandb_run_id and plan.wandb_run_id != state["wandb_run_id"]
    assert any(f"starting from {earlier}" in m for m in plan.messages), plan.messages
    assert (new / "config.yaml").is_file() and not (new / "checkpoints").exists()
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == files
    shutil.copytree(run_copy / "checkpoints" / "step_00000003", new / "checkpoints" / "step_00000003")
    again = begin(new, resume=str(earlier), max_steps=6)  # the same command, after a stop
    assert again.action == "resume" and again.checkpoint.endswith("branch/checkpoints/step_00000003")
    assert any("continuing its own newest checkpoint" in m for m in again.messages), again.messages


def test_a_refused_start_from_a_checkpoint_writes_nothing(run_copy, tmp_path):
    earlier = run_copy / "checkpoints" / "step_00000002"
    new = tmp_path / "branch"
    new.mkdir()
    with pytest.raises(UserError, match="lr 0.002 -> 0.001"):
        begin(new, resume=str(earlier), lr=1e-3)
    assert list(new.iterdir()) == []  # no config.yaml, no starts.jsonl
    assert [p.name for p in list_checkpoints(run_copy)] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]


def test_a_start_from_a_checkpoint_refused_after_loading_the_data_writes_nothing(run_copy, tmp_path, env):
    """The split check needs the data: resume: PATH is refused (exit 2) before anything is written."""
    earlier = run_copy / "checkpoints" / "step_00000002"
    state = read_train_state(earlier)
    (earlier / "train_state.json").write_text(json.dumps({**state, "split": "trained-elsewhere"}))
    new = tmp_path / "branch"
    result = run_train({**TINY, "max_steps": 6, "checkpoint_steps": 1, "keep_checkpoints": 5,
                        "output_dir": new, "resume": earlier}, env)
    refused(result, "another train/val split")
    assert sorted(p.name for p in new.iterdir()) == [".lock"]
    assert [p.name for p in list_checkpoints(run_copy)] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]


# --------------------------------------------------------------------------- the last validation

# 4 cat breeds x 8 trainval images, a quarter held out: 3 steps an epoch, one validation batch;
# the plateau schedule and early stopping keep count of the validations
VALIDATED = {**TINY, "breeds": ["Abyssinian", "Bengal", "Birman", "Bombay"], "val_fraction": 0.25,
             "scheduler": "plateau", "warmup_epochs": 0, "early_stopping_patience": 3, "epochs": 3}


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, env):
    """Uninterrupted, max_steps 5: epoch 0 (steps 1-3) validated at its end, epoch 1 cut short
    by max_steps at step 5 and validated there; checkpoints of steps 3 and 5."""
    out = tmp_path_factory.mktemp("validated") / "run"
    ok(run_train({**VALIDATED, "max_steps": 5, "output_dir": out}, env))
    return out


def assert_same_end(out: Path, reference: Path) -> None:
    """The same validations, model selection, schedule, model/ and test report as `reference`."""
    def validations(run):
        return [(r["step"], r["epoch"], r["val_accuracy"]) for r in read_metrics(run / "metrics.jsonl")
                if "val_accuracy" in r]

    def bookkeeping(run):
        state = read_train_state(list_checkpoints(run)[-1])
        return {key: state[key] for key in ("global_step", "epoch", "step_in_epoch", "best_accuracy",
                                            "epochs_since_best", "early_stopped", "scheduler")}

    assert validations(out) == validations(reference)
    assert bookkeeping(out) == bookkeeping(reference)
    mine, theirs = (load_file(str(run / "model" / "model.safetensors")) for run in (out, reference))
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
    test = [json.loads((run / "eval" / "metrics.json").read_text()) for run in (out, reference)]
    assert test[0]["accuracy"] == test[1]["accuracy"] and test[0]["n"] == test[1]["n"]


@pytest.mark.slow
def test_a_stop_during_the_last_validation_is_completed_by_the_rerun(validated_run, tmp_path, env):
    """SIGTERM during the validation of the epoch that max_steps cuts short (the 6th time the
    run asks about stopping: steps 1-3, epoch 0's validation batch, step 4, then that
    validation): step 5's training is kept in a checkpoint, and the rerun validates and
    reports without training again, ending as the uninterrupted run did."""
    out = tmp_path / "run"
    values = {**VALIDATED, "max_steps": 5, "output_dir": out}
    stopped = run_train(values, env, faults="sigterm-at-step:6")
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "epoch 0: val accuracy" in stopped.stdout and "epoch 1: val accuracy" not in stopped.stdout
    assert read_train_state(list_checkpoints(out)[-1])["global_step"] == 5, "step 5 was not kept"
    rerun = ok(run_train(values, env))
    assert "validating and re-evaluating" in rerun.stdout, rerun.stdout[-2000:]
    assert "step 5/5" not in rerun.stdout, "the rerun trained again"
    assert_same_end(out, validated_run)


@pytest.mark.slow
def test_a_larger_max_steps_counts_the_cut_short_epoch_once(validated_run, tmp_path, env):
    """max_steps 4 cuts epoch 1 short and validates it at step 4, which only chooses model/;
    max_steps 5 then continues that epoch: the same training as the run given max_steps 5 from
    the start, the same plateau schedule, and one more validation (step 4's) to choose from."""
    out = tmp_path / "run"
    first = ok(run_train({**VALIDATED, "max_steps": 4, "output_dir": out}, env))
    assert "epoch 1: val accuracy" in first.stdout  # the cut-short epoch, validated at step 4
    ok(run_train({**VALIDATED, "max_steps": 5, "output_dir": out}, env))

    def validations(run):
        return [(r["step"], r["epoch"], r["val_accuracy"]) for r in read_metrics(run / "metrics.jsonl")
                if "val_accuracy" in r]

    reference = validations(validated_run)
    assert validations(out) == [reference[0], validations(out)[1], *reference[1:]]
    assert validations(out)[1][:2] == (4, 1)
    mine, theirs = (read_train_state(list_checkpoints(run)[-1]) for run in (out, validated_run))
    for key in ("global_step", "epoch", "step_in_epoch", "scheduler", "early_stopped"):
        assert mine[key] == theirs[key], key
    assert mine["best_accuracy"] == max(accuracy for _, _, accuracy in validations(out))
    weights = [load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
               for run in (out, validated_run)]
    for key in weights[0]:  # validating at step 4 changed nothing in the training
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


def begin_validated(out: Path, **changes):
    values = {**VALIDATED, "max_steps": 5, "output_dir": str(out), **changes}
    return RunDirectory(out).begin(build_config(values), num_processes=1, argv=[])


def test_a_finished_run_whose_last_epoch_was_cut_short_is_only_re_evaluated(validated_run, tmp_path):
    """Its final checkpoint comes after its last validation: the same limits (and an accepted
    change) find the run finished, model/ is left as it is and nothing is validated again. A
    larger max_steps goes on with the cut-short epoch from there."""
    run = copy_run(validated_run, tmp_path)
    assert read_train_state(list_checkpoints(run)[-1])["validation_due"] is False
    model = run / "model" / "model.safetensors"
    before = (model.stat().st_ino, model.read_bytes())
    plan = begin_validated(run, eval_batch_size=3)
    assert plan.action == "re-evaluate" and not plan.before_validation, plan
    assert any("holds a finished run (step 5)" in m for m in plan.messages), plan.messages
    assert (model.stat().st_ino, model.read_bytes()) == before
    longer = begin_validated(run, max_steps=6)
    assert longer.action == "resume" and not longer.before_validation


@pytest.mark.slow
def test_rerunning_a_finished_cut_short_run_leaves_model_and_validations_alone(validated_run, tmp_path, env):
    run = copy_run(validated_run, tmp_path)
    model = (run / "model" / "model.safetensors").read_bytes()
    rerun = ok(run_train({**VALIDATED, "max_steps": 5, "output_dir": run, "eval_batch_size": 3}, env))
    assert "val accuracy" not in rerun.stdout and "finished run" in rerun.stdout, rerun.stdout[-2000:]
    assert (run / "model" / "model.safetensors").read_bytes() == model
    assert_same_end(run, validated_run)


def test_every_rank_applies_the_main_process_decision_on_best_accuracy(validated_run, tmp_path):
    """load_checkpoint forgets best_accuracy only when the plan says so, whatever model/ looks
    like from the rank that loads (another node may not see the main process's model/)."""
    from pet_pipeline.checkpoint import load_checkpoint

    class Loads:  # what load_checkpoint asks of the accelerator
        def load_state(self, path):
            pass

    run = copy_run(validated_run, tmp_path)
    step_5 = run / "checkpoints" / "step_00000005"
    best = read_train_state(step_5)["best_accuracy"]
    assert best is not None
    assert not begin_validated(run, max_steps=6).forget_best_accuracy  # model/ holds its weights
    assert begin_validated(tmp_path / "branch", resume=str(step_5), max_steps=6).forget_best_accuracy
    shutil.rmtree(run / "model")  # this rank's view: no model/
    assert load_checkpoint(Loads(), step_5, forget_best_accuracy=False).best_accuracy == best
    forgotten = load_checkpoint(Loads(), step_5, forget_best_accuracy=True)
    assert forgotten.best_accuracy is None and forgotten.epochs_since_best == 0


# --------------------------------------------------------------------------- verification


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated model.safetensors": lambda c: truncate(c / "model.safetensors"),
    "garbage optimizer.bin": lambda c: (c / "optimizer.bin").write_bytes(os.urandom(2000)),
    "empty train_state.json": lambda c: (c / "train_state.json").write_text(""),
    "deleted optimizer.bin": lambda c: (c / "optimizer.bin").unlink(),
    "garbage RNG file": lambda c: (c / "random_states_0.pkl").write_bytes(os.urandom(500)),
    "RNG file of something else": lambda c: torch.save({"x": torch.zeros(1)}, c / "random_states_0.pkl"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_message(run_copy, kind):
    newest = run_copy / "checkpoints" / "step_00000004"
    assert verify_checkpoint(newest) is None
    CORRUPTIONS[kind](newest)
    assert verify_checkpoint(newest) is not None
    plan = begin(run_copy)
    assert Path(plan.checkpoint).name == "step_00000003"
    (line,) = [m for m in plan.messages if m.startswith("skipping")]
    assert "step_00000004" in line


def test_all_checkpoints_corrupt_is_refused_never_a_silent_new_run(run_copy):
    for checkpoint in list_checkpoints(run_copy):
        (checkpoint / "optimizer.bin").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="none of the 4 checkpoint"):
        begin(run_copy)
    assert not any(s["action"] == "new" for s in read_starts(run_copy)[1:])


def test_leftovers_of_a_killed_save_are_cleaned_up_and_an_interrupted_re_save_restored(run_copy):
    folder = run_copy / "checkpoints"
    shutil.copytree(folder / "step_00000004", folder / ".tmp-step_00000005")
    (folder / "step_00000004").rename(folder / ".replaced-step_00000004")  # killed mid re-save
    done = recover_leftovers(run_copy)
    assert len(done) == 2
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert verify_checkpoint(folder / "step_00000004") is None


def test_a_torn_line_in_metrics_jsonl_does_not_stop_a_resume(tmp_path):
    from pet_pipeline.tracking import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5}\n{"step": 3, "tra')
    MetricsLog(path, enabled=True, resume_step=2)
    assert read_metrics(path) == [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}]


def test_a_stop_signal_is_not_an_exception_that_checks_could_swallow():
    """`except Exception` in a checkpoint check or a download retry must not take a SIGTERM
    before the first step for its own failure (it would skip a good checkpoint)."""
    from pet_pipeline.errors import StoppedBeforeTraining

    try:
        try:
            raise StoppedBeforeTraining("SIGTERM")
        except Exception:  # what verify_checkpoint and the data loaders do
            pytest.fail("swallowed as an ordinary error")
    except StoppedBeforeTraining:
        pass


# --------------------------------------------------------------------------- the lock


def test_a_second_start_on_the_same_folder_exits_2_naming_the_holder(tmp_path, env):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pet_pipeline.rundir import RunDirectory; "
         f"RunDirectory({str(out)!r}).lock(); print('locked', flush=True); time.sleep(600)"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = holder.stdout.readline().strip()
        assert first == "locked", first + holder.stdout.read() if holder.poll() is not None else first
        line = refused(run_train({**TINY, "output_dir": out}, env), str(out), f"process {holder.pid}")
        assert "in use" in line
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock is stale and the next start takes it over
    lock = RunDirectory(out)
    lock.lock()
    assert lock.took_over and lock.took_over["pid"] == holder.pid
    lock.unlock()


def test_the_lock_is_held_for_the_with_block_only(tmp_path):
    """train.main() called twice in one process (a notebook, the in-process tests) finds the
    folder free again after the first run; during a run a second start is refused."""
    out = tmp_path / "run"
    with RunDirectory(out).held():
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            RunDirectory(out).lock()
    again = RunDirectory(out)
    again.lock()
    assert again.took_over is None  # released cleanly, not taken over from a dead holder
    again.unlock()
    with RunDirectory(out).held(lock=False):  # another rank: no lock, nothing written
        assert (out / ".lock").read_text() == ""


# --------------------------------------------------------------------------- the real script


@pytest.mark.slow
def test_refused_and_accepted_changes_end_to_end(run_copy, env):
    before = (run_copy / "config.yaml").read_bytes()
    refused(run_train({**TINY, "max_steps": 4, "output_dir": run_copy, "lr": 1e-3}, env),
            "lr 0.002 -> 0.001", "resume: overwrite")
    result = ok(run_train({**TINY, "max_steps": 6, "checkpoint_steps": 1, "output_dir": run_copy,
                           "log_every": 2}, env))
    assert "accepted changes" in result.stdout and "resuming from step_00000004, step 4" in result.stdout
    assert read_train_state(list_checkpoints(run_copy)[-1])["global_step"] == 6
    assert (run_copy / "config.yaml").read_bytes() == before  # still the run's own config
    assert read_starts(run_copy)[-1]["changed"] == {"keep_checkpoints": [5, 2], "log_every": [1, 2],
                                                    "max_steps": [4, 6]}
    steps = [r["step"] for r in read_metrics(run_copy / "metrics.jsonl") if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 6], "the continued run's records follow the first's"


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_end_to_end(run_copy, env):
    truncate(run_copy / "checkpoints" / "step_00000004" / "model.safetensors")
    result = ok(run_train({**TINY, "max_steps": 5, "checkpoint_steps": 1, "keep_checkpoints": 5,
                           "output_dir": run_copy}, env))
    assert "skipping checkpoint step_00000004: model.safetensors can't be read" in result.stdout
    assert "resuming from step_00000003, step 3" in result.stdout
    assert verify_checkpoint(run_copy / "checkpoints" / "step_00000004") is None  # written anew
    # a checkpoint's report goes to the run folder, not among the checkpoints
    ok(subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model_dir",
                       str(run_copy / "checkpoints" / "step_00000005"), "--gradcam_images", "0"],
                      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert (run_copy / "eval_test_step_00000005" / "metrics.json").is_file()
    assert [p.name for p in (run_copy / "checkpoints").iterdir() if not p.name.startswith("step_")] == []


@pytest.mark.slow
def test_a_stop_while_re_evaluating_leaves_the_final_checkpoint_alone(run_copy, env):
    """A finished run re-evaluated with another eval_batch_size (a free key) gets SIGTERM at
    its first evaluation batch: the final checkpoint must not be re-saved (the model holds
    the best weights for the report by then, not the last ones)."""
    final = run_copy / "checkpoints" / "step_00000004"
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    result = run_train({**TINY, "max_steps": 4, "checkpoint_steps": 1, "keep_checkpoints": 5,
                        "eval_batch_size": 4, "output_dir": run_copy}, env, faults="sigterm-at-step:1")
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-2000:]
    assert "re-evaluating from step_00000004" in result.stdout
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before


@pytest.mark.slow
def test_overwrite_end_to_end_never_deletes_the_new_run_nor_continues_the_old(run_copy, env):
    refused(run_train({**TINY, "max_steps": 4, "output_dir": run_copy, "resume": "none"}, env),
            "resume: overwrite")
    ok(run_train({**TINY, "max_steps": 2, "keep_checkpoints": 1, "output_dir": run_copy,
                  "resume": "overwrite"}, env))
    assert [p.name for p in list_checkpoints(run_copy)] == ["step_00000002"]  # not rotated away
    result = ok(run_train({**TINY, "max_steps": 2, "keep_checkpoints": 1, "output_dir": run_copy}, env))
    assert "re-evaluating from step_00000002" in result.stdout  # the new run, not the old step 4


@pytest.mark.slow
def test_killed_while_committing_a_checkpoint_resumes_from_the_newest_complete_one(tmp_path, env):
    out = tmp_path / "run"
    values = {**TINY, "max_steps": 5, "checkpoint_steps": 1, "keep_checkpoints": 1, "output_dir": out}
    killed = run_train(values, env, faults="kill-at-commit:3")
    assert killed.returncode == -9
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    result = ok(run_train(values, env))
    assert "removed .tmp-step_00000003" in result.stdout
    assert "resuming from step_00000002, step 2" in result.stdout
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_killed_during_the_stop_save_with_one_checkpoint_kept_loses_nothing_saved(tmp_path, env):
    """keep_checkpoints 1: SIGTERM at step 4 (step 3 saved), SIGKILL inside the stop-save."""
    out = tmp_path / "run"
    values = {**TINY, "max_steps": 6, "checkpoint_steps": 3, "keep_checkpoints": 1, "output_dir": out}
    killed = run_train(values, env, faults="sigterm-at-step:4,kill-at-commit:2")
    assert killed.returncode == -9, killed.stdout[-2000:]
    assert "stopping on SIGTERM at step 4" in killed.stdout
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    result = ok(run_train(values, env))
    assert "resuming from step_00000003, step 3" in result.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_killed_while_re_saving_a_step_restores_the_earlier_save(tmp_path, env):
    """A stop during the epoch's validation saves step 9 before it; the rerun validates and
    saves step 9 again, and is killed between moving the first save aside and renaming the
    second into place: the next start puts the first back and validates once more."""
    out = tmp_path / "run"
    values = {**TINY, "val_fraction": 0.25, "epochs": 1, "keep_checkpoints": 1, "output_dir": out}
    stopped = run_train(values, env, faults="sigterm-at-step:10")  # 9 steps, then a validation batch
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert read_train_state(list_checkpoints(out)[-1])["validation_due"] is True
    killed = run_train(values, env, faults="kill-at-commit:1")
    assert killed.returncode == -9
    assert list_checkpoints(out) == [] and (out / "checkpoints" / ".replaced-step_00000009").is_dir()
    result = ok(run_train(values, env))
    assert "restored step_00000009" in result.stdout
    assert "resuming from step_00000009, step 9" in result.stdout and "val accuracy" in result.stdout
    final = read_train_state(list_checkpoints(out)[-1])
    assert (final["global_step"], final["epoch"], final["step_in_epoch"]) == (9, 1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("sent, exit_code", [("SIGTERM", PREEMPTED_EXIT_CODE), ("SIGINT", 130)])
def test_a_stop_signal_to_the_whole_process_group_stops_with_a_checkpoint(tmp_path, env, sent, exit_code):
    """scancel, `pkill -f train.py` and Ctrl-C at a terminal signal the loader workers too:
    the run must still stop at the next step with a checkpoint and exit 75 (130 for Ctrl-C),
    not die of a killed worker."""
    import signal

    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                                *cli({**TINY, "num_workers": 1, "epochs": 3, "output_dir": out})],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and read_metrics(out / "metrics.jsonl")):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(process.pid, getattr(signal, sent))  # every process of the group, workers included
    output, _ = process.communicate(timeout=300)
    assert process.returncode == exit_code, output[-3000:]
    assert f"stopping on {sent}" in output and "Traceback" not in output
    assert list_checkpoints(out)


def test_a_signal_before_the_first_step_ends_the_process_at_once(tmp_path, env):
    """SIGTERM while the data loads (a 60 s scan here): nothing to save, so no waiting for the
    setup to finish; the exit status asks the scheduler to requeue."""
    out = tmp_path / "run"
    started = time.time()
    result = run_train({**TINY, "output_dir": out}, env, faults="sigterm-in-data:60")
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-2000:]
    assert time.time() - started < 45
    assert "stopped on SIGTERM before the first step" in result.stderr
    assert "Traceback" not in result.stderr and list_checkpoints(out) == []


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_ends_in_one_sentence_keeping_the_previous(tmp_path, env):
    out = tmp_path / "run"
    values = {**TINY, "max_steps": 4, "checkpoint_steps": 2, "keep_checkpoints": 1, "output_dir": out}
    line = refused(run_train(values, env, faults="enospc-at-save:2"),
                   "checkpoint step_00000004 could not be written", "no space left on device",
                   "freed the partial copy", "kept step_00000002")
    assert "rerun" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]  # no .tmp left
    assert verify_checkpoint(out / "checkpoints" / "step_00000002") is None
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (out / "checkpoints" / "step_00000002").iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~_umask())}, modes  # safetensors alone writes 0600


def test_a_full_disk_at_model_export_ends_in_one_sentence_keeping_the_previous_model(tmp_path, env,
                                                                                    monkeypatch):
    """model/ is written aside and renamed, like a checkpoint: a full disk while writing it
    (safetensors' own error, as on a real disk) ends in one sentence, the partial file freed,
    the model/ of the run's earlier end left as it was."""
    from safetensors import SafetensorError

    from pet_pipeline import model as model_module

    out = tmp_path / "run"
    values = {**TINY, "max_steps": 2, "output_dir": out}
    ok(run_train(values, env))
    before = (out / "model" / "model.safetensors").read_bytes()

    def disk_full(state, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(model_module, "save_file", disk_full)
    line = refused(run_train({**values, "max_steps": 3}, env),
                   f"model/ could not be written to {out / 'model'}", "no space left on device",
                   "freed the partial copy and kept the previous model/", "rerun the same command to resume")
    assert line.count(";") >= 2
    assert [p.name for p in (out / "model").iterdir() if p.name.startswith(".")] == []  # no .tmp left
    assert (out / "model" / "model.safetensors").read_bytes() == before


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_a_real_full_disk_ends_in_one_sentence_keeping_the_previous(tmp_path, env):
    """On a 250 MiB tmpfs a checkpoint of CoAtNet-nano (168 MiB: weights and AdamW moments) fits once."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=250m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        values = {**TINY, **COATNET_MODEL, "max_steps": 4, "checkpoint_steps": 2, "keep_checkpoints": 1,
                  "output_dir": out}
        refused(run_train(values, env), "checkpoint step_00000004 could not be written",
                "no space left on device", "freed the partial copy", "kept step_00000002")
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
        assert verify_checkpoint(out / "checkpoints" / "step_00000002") is None
    finally:
        subprocess.run(["umount", str(disk)], check=False)



def test_a_kill_while_rotating_an_old_checkpoint_away_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    """Rotation deletes a whole folder; killed in the middle, what is left is never listed as
    a checkpoint (a resume could fall back to it) and the next start removes it."""
    import pet_pipeline.checkpoint as checkpoint

    folder = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        (folder / f"step_{step:08d}").mkdir(parents=True)
        (folder / f"step_{step:08d}" / "model.safetensors").write_bytes(b"weights")
        (folder / f"step_{step:08d}" / checkpoint.STATE_FILE).write_text("{}")
    saver = object.__new__(checkpoint.Checkpointer)  # _rotate needs only its folder and keep
    saver.folder, saver.keep = folder, 2

    def killed_midway(path, ignore_errors=False):  # the weights go, then the process dies
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        saver._rotate(folder / "step_00000003")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]
    assert recover_leftovers(tmp_path / "run") == [
        "removed .tmp-rotated-step_00000001, an incomplete checkpoint left by a killed save"]
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000003"]
