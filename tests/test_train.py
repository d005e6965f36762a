"""train.py end to end: learning, outputs, accumulation, resume after SIGTERM, 2 processes.

Runs call `train.main` in this process (conftest.train_in_process) on generated pets at 32 px;
what only a process shows (a signal from outside, torchrun's ranks) runs train.py as one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COATNET_MODEL, TINY, cli, ok, refused, train_in_subprocess
from safetensors.torch import load_file

from pet_pipeline.checkpoint import TrainState, check_same_split, list_checkpoints, verify_checkpoint
from pet_pipeline.errors import UserError
from pet_pipeline.model import build_model
from pet_pipeline.preemption import PREEMPTED_EXIT_CODE
from pet_pipeline.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from wandb_offline import read_offline_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the job's own model family where what is checked depends on it (learning, DDP's buckets)
COATNET = {**COATNET_MODEL, "gradcam_images": 3}


def offline_runs(out: Path) -> list[Path]:
    return sorted(out.glob("wandb/offline-run-*/run-*.wandb"))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_learns_writes_every_output_and_logs_wandb_offline(tmp_path, train_run):
    out = tmp_path / "run"
    result = ok(train_run({**TINY, **COATNET, "epochs": 5, "val_fraction": 0.25, "report_to": "wandb",
                           "output_dir": out}))
    assert "1 process(es)" in result.stdout
    assert "12 classes" in result.stdout and "0 bad input(s) left out" in result.stdout

    records = read_metrics(out / "metrics.jsonl")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, "training loss did not fall"
    val = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert len(val) == 5 and max(val) >= 0.5, f"validation accuracy too low: {val} (chance 0.083)"

    # summary.csv: one row per epoch, as timm writes it
    import csv

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["val_accuracy"]) for r in rows] == pytest.approx(val)
    assert all(float(r["train_loss"]) > 0 and float(r["images_per_s"]) > 0 and float(r["wall_time_s"]) > 0
               for r in rows)
    assert float(rows[-1]["wall_time_s"]) > float(rows[0]["wall_time_s"])
    for name in ["config.yaml", "metrics.jsonl", "model/model.safetensors", "model/config.json",
                 "eval/metrics.json", "eval/confusion_matrix.csv", "eval/predictions.csv",
                 "eval/classification_report.txt"]:
        assert (out / name).is_file(), f"{name} missing"
    assert list_checkpoints(out), "no checkpoint"
    test_metrics = json.loads((out / "eval/metrics.json").read_text())
    assert test_metrics["n"] == 96 and test_metrics["accuracy"] > 0.5

    # where the time went: every phase, none negative, adding up to the total
    (timing,) = [r for r in records if "time/total_s" in r]
    phases = ["setup", "training", "validation", "checkpoints", "test_evaluation_and_report"]
    assert all(timing[f"time/{name}_s"] > 0 for name in phases), timing
    assert sum(timing[f"time/{name}_s"] for name in phases) == pytest.approx(
        timing["time/total_s"], abs=0.01)
    assert "time: setup" in result.stdout

    # the exported model loads with plain timm and gives the same outputs as ours
    import timm

    from pet_pipeline.model import load_trained_model

    ours, config = load_trained_model(out / "model")
    plain = timm.create_model(config["architecture"], num_classes=config["num_classes"],
                              img_size=32, pretrained=True,
                              pretrained_cfg_overlay={"file": str(out / "model/model.safetensors"),
                                                      "num_classes": config["num_classes"]})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), ours(x))
    assert config["label_names"][0] == "Abyssinian" and len(config["label_names"]) == 12

    # the offline W&B run holds the same metrics and the resolved config
    (run_file,) = offline_runs(out)
    wandb_run = read_offline_run(run_file)
    logged = [h["train_loss"] for h in wandb_run["history"] if "train_loss" in h]
    assert logged == pytest.approx(losses)
    assert wandb_run["config"]["lr"] == 2e-3 and wandb_run["config"]["image_size"] == 32
    assert "wandb sync" in result.stdout
    # the final report went to the run too: the predictions table and the confusion matrix
    logged = set().union(*[h.keys() for h in wandb_run["history"]])
    for prefix in ("eval/predictions/", "eval/confusion_matrix_plot", "eval/confusion_matrix/",
                   "eval/prediction_samples/"):
        assert any(k.startswith(prefix) for k in logged), f"{prefix} not logged: {sorted(logged)}"
    # ... and the final numbers reached the history at the final step, after the report
    final_step = max(r["step"] for r in records)
    at_end = set().union(*[h.keys() for h in wandb_run["history"] if h.get("_step") == final_step])
    for key in ("test_accuracy", "test_macro_f1", "time/total_s", "eval/predictions"):
        assert any(k == key or k.startswith(key + "/") for k in at_end), f"{key} not at step {final_step}"
    # the predictions table shows the misclassified images as thumbnails, and only those; a
    # table with media is logged as an artifact, its files staged until `wandb sync`
    (files,) = [a["files"] for a in wandb_run["artifacts"] if "eval/predictions.table.json" in a["files"]]
    table = json.loads(Path(files["eval/predictions.table.json"]).read_text())
    assert table["columns"] == ["image_id", "true", "predicted", "confidence", "image"]
    assert len(table["data"]) == 96
    assert any(row[1] != row[2] for row in table["data"]), "no misclassified image to show"
    for image_id, true, predicted, _, image in table["data"]:
        if true == predicted:
            assert image is None, f"{image_id} is right but has a thumbnail"
        else:
            assert image and image["_type"] == "image-file", f"{image_id} is wrong but has no thumbnail"
            assert Path(files[image["path"]]).is_file() and max(image["width"], image["height"]) <= 96


# --------------------------------------------------------------------------- accumulation


@pytest.mark.slow
def test_gradient_accumulation_matches_one_large_batch(tmp_path, train_run):
    """2 micro-batches of 8 == 1 batch of 16, and the LR schedule steps per optimizer step.

    A ViT (LayerNorm, no BatchNorm) so that batch statistics can't differ.
    """
    common = {**TINY, "model": "vit_tiny_patch16_224", "augment": "none", "label_smoothing": 0,
              "max_steps": 3, "warmup_epochs": 0.5, "clip_grad_norm": 1.0}
    accumulated, large = tmp_path / "accumulated", tmp_path / "large"
    ok(train_run({**common, "batch_size": 8, "grad_accum_steps": 2, "output_dir": accumulated}))
    ok(train_run({**common, "batch_size": 16, "grad_accum_steps": 1, "output_dir": large}))
    a = load_file(str(accumulated / "model/model.safetensors"))
    b = load_file(str(large / "model/model.safetensors"))
    initial = build_model("vit_tiny_patch16_224", num_classes=12, pretrained=False, image_size=32)
    moved = max((a[k] - initial.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-4, "the weights did not change: nothing was compared"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)

    def lrs(out):
        return [(r["step"], r["lr"]) for r in read_metrics(out / "metrics.jsonl") if "lr" in r]

    assert [s for s, _ in lrs(accumulated)] == [1, 2, 3]  # one entry per optimizer step
    assert [s for s, _ in lrs(large)] == [1, 2, 3]
    assert [lr for _, lr in lrs(accumulated)] == pytest.approx([lr for _, lr in lrs(large)])


# --------------------------------------------------------------------------- resume


def wait_for_step(path: Path, step: int, process, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training ended before it could be stopped"
        if path.exists() and any(r.get("step", 0) >= step for r in read_metrics(path)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


# CoAtNet's ~1 s steps: a signal sent once step 3 is logged lands inside epoch 0
STOPPABLE = {**TINY, **COATNET_MODEL, "epochs": 2, "val_fraction": 0.25, "drop_path_rate": 0.2,
             "augment": "strong", "ema_decay": 0.9, "report_to": "wandb", "num_workers": 1, "pre_resize": 40}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, train_run) -> Path:
    """STOPPABLE, never stopped: the reference of the stop-and-resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    ok(train_run({**STOPPABLE, "output_dir": out}))
    return out


def start_stoppable(out: Path, env) -> subprocess.Popen:
    """STOPPABLE as a process of its own, for signals from outside (a scheduler, a terminal)."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli(STOPPABLE), "--output_dir",
                             str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
@pytest.mark.parametrize("sent, exit_code", [(signal.SIGTERM, PREEMPTED_EXIT_CODE), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_then_resume_gives_the_uninterrupted_result(tmp_path, env, train_run, straight_run,
                                                                   sent, exit_code):
    """SIGTERM from a scheduler, or one Ctrl-C at the terminal: a checkpoint at the next step
    and a clean exit (75 asks a scheduler to requeue; 130, Ctrl-C's, does not); the same
    command then ends where the uninterrupted run did."""
    values, straight, stopped = STOPPABLE, straight_run, tmp_path / "stopped"
    process = start_stoppable(stopped, env)
    wait_for_step(stopped / "metrics.jsonl", 3, process)  # mid-epoch: 9 steps per epoch
    process.send_signal(sent)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == exit_code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert f"rerun the same command to resume (exit status {exit_code})" in output
    said = "stopping after this step: saving a checkpoint (Ctrl-C again to quit without saving)"
    assert (said in output) == (sent == signal.SIGINT)
    assert "time: setup" in output  # a stopped run also says where its time went
    (checkpoint,) = list_checkpoints(stopped)
    stop_step = json.loads((checkpoint / "train_state.json").read_text())["global_step"]
    assert 3 <= stop_step < 9, "the stop should land in the middle of the first epoch"

    ok(train_run({**values, "output_dir": stopped}))  # resume: auto
    final_straight = load_file(str(list_checkpoints(straight)[-1] / "model.safetensors"))
    final_resumed = load_file(str(list_checkpoints(stopped)[-1] / "model.safetensors"))
    for key in final_straight:
        torch.testing.assert_close(final_resumed[key], final_straight[key], rtol=1e-5, atol=1e-6)

    def after_stop(out):
        return [{k: v for k, v in r.items() if k != "images_per_s" and not k.startswith("time/")}
                for r in read_metrics(out / "metrics.jsonl") if r["step"] > stop_step]

    resumed_records, straight_records = after_stop(stopped), after_stop(straight)
    assert len(resumed_records) == len(straight_records) > 0
    for resumed, reference in zip(resumed_records, straight_records):
        assert resumed.keys() == reference.keys()
        assert list(resumed.values()) == pytest.approx(list(reference.values()), rel=1e-5)
    run_ids = {read_offline_run(f)["run_id"] for f in offline_runs(stopped)}
    assert len(offline_runs(stopped)) == 2 and len(run_ids) == 1, "resume started a new W&B run"


@pytest.mark.slow
def test_ctrl_c_twice_quits_at_once_and_the_newest_complete_checkpoint_resumes(tmp_path, env, train_run):
    """The second Ctrl-C does not wait for the checkpoint the first asked for: one line, exit
    130; whatever it cut short, the newest complete checkpoint verifies and the rerun resumes."""
    out = tmp_path / "run"
    values = {**STOPPABLE, "max_steps": 6, "checkpoint_steps": 1, "keep_checkpoints": 5, "report_to": "none",
              "output_dir": out}
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr_file:
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli(values)], env=env, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=stderr_file, text=True)
    wait_for_step(out / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGINT)
    # the second once the first was handled: two signals in one long C call count as one
    deadline = time.time() + 30
    while "stopping after this step" not in errors.read_text():
        assert time.time() < deadline and process.poll() is None, errors.read_text()[-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    started = time.time()
    stdout, _ = process.communicate(timeout=120)
    stderr = errors.read_text()
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert time.time() - started < 30, "the second Ctrl-C should not wait for the stop's checkpoint"
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith("quit on a second Ctrl-C")]
    newest = list_checkpoints(out)[-1]
    assert f"quit on a second Ctrl-C without saving; {newest.name} is complete: the same command " \
           "resumes from it" == line
    assert verify_checkpoint(newest) is None
    resumed = ok(train_run(values))
    assert f"resuming from {newest.name}" in resumed.stdout


def test_ctrl_c_while_closing_ends_at_once_saying_the_run_is_saved(tmp_path, monkeypatch, train_run):
    """After the report (W&B's upload, the Hub push) there is no checkpoint to announce: Ctrl-C
    ends the process at once with one line saying what is saved and how to upload the rest."""
    import os

    from pet_pipeline.trainer import Trainer

    original = Trainer.close

    def close(self, exit_code):
        os.kill(os.getpid(), signal.SIGINT)  # a person at the terminal, during the W&B upload
        time.sleep(2)
        original(self, exit_code)

    monkeypatch.setattr(Trainer, "close", close)
    out = tmp_path / "run"
    result = train_run({**TINY, "max_steps": 2, "output_dir": out})
    assert result.returncode == 130, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "stopping after this step" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("stopped on SIGINT")]
    assert line.startswith(f"stopped on SIGINT while closing the run (W&B's upload, the Hub push): the run "
                           f"is saved in {out}; `wandb sync` uploads W&B's files later")
    assert (out / "model" / "model.safetensors").is_file() and (out / "eval" / "metrics.json").is_file()


# --------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.cluster  # several processes: pytest -m cluster
def test_two_cpu_processes_train_log_plain_lines_and_sync_only_at_log_steps(tmp_path, env):
    """2 processes, output to a pipe as in any SLURM job: rank 0 alone writes; the console has
    one plain line per log interval and no bar redraws; outside the log steps (and the first,
    which times the steps) the ranks issue no collective, so nothing syncs host and device."""
    out, counts = tmp_path / "ddp", tmp_path / "collectives"
    counts.mkdir()
    env2 = {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "COLLECTIVES_DIR": str(counts)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(ROOT / "tests" / "faults.py"), "count-collectives", str(ROOT / "train.py")]
    # batch 16: CPU kernels then give a 1x1 conv the grad layout DDP warns about (not at 8)
    raw = subprocess.run([*launch, *cli({**TINY, **COATNET, "epochs": 1, "val_fraction": 0.25, "log_every": 2,
                                         "synthetic_images_per_class": 32, "batch_size": 16,
                                         "output_dir": out})],
                         env=env2, cwd=ROOT, capture_output=True, timeout=600)
    assert b"\r" not in raw.stdout + raw.stderr, "a progress bar redraw in a redirected log"
    result = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    ok(result)
    assert "2 process(es)" in result.stdout, "torchrun did not give 2 processes"
    assert result.stdout.count("pet-pipeline:") == 1, "the summary must print once"
    # 144 training images / (16 per device x 2 processes) = 5 optimizer steps, logged at 2 and 4
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == [2, 4], "metrics.jsonl written by more than one rank, or not at the log steps"
    assert json.loads((out / "eval/metrics.json").read_text())["n"] == 192  # every test image once

    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in progress] == ["step 2/5 (40%)", "step 4/5 (80%)"]
    assert all(" | loss " in line and " img/s | ETA " in line for line in progress)
    assert "Grad strides do not match" not in result.stderr

    for rank in (0, 1):
        record = json.loads((counts / f"rank-{rank}.json").read_text())
        assert record["steps"] == [1, 2, 3, 4, 5]
        syncing = [step for step, n in zip(record["steps"], record["per_step"]) if n]
        assert syncing == [1, 2, 4], f"rank {rank}: collectives at steps {syncing}"


# --------------------------------------------------------------------------- bad input


def test_a_loss_that_becomes_nan_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, train_run):
    """lr 1e30 without clipping: step 1's loss is finite, step 2's is not. The run ends at the
    next sync point in one sentence, saves nothing after it and exports nothing."""
    out = tmp_path / "nan"
    result = train_run({**TINY, **COATNET, "lr": 1e30, "clip_grad_norm": None, "warmup_epochs": 0,
                        "max_steps": 6, "checkpoint_steps": 1, "output_dir": out})
    refused(result, "training loss became nan by step 2", "lower lr", "step_00000001 is kept")
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]
    assert not (out / "model").exists() and not (out / "eval").exists()
    for raw in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON, every line
        json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_metrics_jsonl_is_strict_json(tmp_path):
    from pet_pipeline.tracking import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write({"step": 1, "train_loss": float("nan"), "images_per_s": float("inf"), "lr": 1e-3})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert record == {"step": 1, "train_loss": None, "images_per_s": None, "lr": 1e-3}


def test_pretrained_weights_unreachable_ends_in_one_sentence(tmp_path, env):
    """A process of its own: huggingface_hub reads HF_HOME when it is imported."""
    offline = {**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = train_in_subprocess({**TINY, **COATNET, "pretrained": True, "val_fraction": 0.25,
                                  "output_dir": tmp_path / "o"}, offline)
    refused(result, "pretrained_path", "pretrained: false", "offline and not in the Hugging Face cache")
    assert not (tmp_path / "o").exists(), "refused before the data was read or anything written"


@pytest.mark.parametrize("args, fragment", [
    (["--data_dir", "/no/such/folder"], "data_dir: /no/such/folder does not exist"),
    (["--pretrained_path", str(ROOT / "README.md")], "is not a readable weights file"),
])
def test_data_and_weights_mistakes_answer_before_anything_is_read_or_written(tmp_path, train_run, args,
                                                                            fragment):
    refused(train_run([*cli(TINY), *args, "--output_dir", str(tmp_path / "o")]), fragment)
    assert not (tmp_path / "o").exists()


def test_model_without_pretrained_weights_is_refused():
    with pytest.raises(UserError, match="pretrained_path.*pretrained: false"):
        build_model("coatnet_rmlp_0_rw_224", num_classes=12, pretrained=True)


def test_checkpoint_of_another_split_is_refused(tmp_path):
    check_same_split(TrainState(split="0123abcd"), "0123abcd", checkpoint=tmp_path)  # the same: fine
    with pytest.raises(UserError, match="another train/val split"):
        check_same_split(TrainState(split="0123abcd"), "4567ef00", checkpoint=tmp_path)
    with pytest.raises(UserError, match="another train/val split"):  # made before splits were recorded
        check_same_split(TrainState().load_state_dict({}), "4567ef00", checkpoint=tmp_path)


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / ".tmp-step_00000009").mkdir(parents=True)
    (folder / ".tmp-step_00000009" / "train_state.json").write_text("{}")
    (folder / "step_00000008").mkdir()  # renamed but without its state file
    (folder / "step_00000004").mkdir()
    (folder / "step_00000004" / "train_state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004"]


# --------------------------------------------------------------------------- the other options


@pytest.mark.slow
def test_mixup_class_weights_plateau_early_stopping_and_tensorboard(tmp_path, train_run):
    """The remaining optimisation options in one run; a learning rate too small to improve
    anything makes early stopping fire after `patience` epochs without a better accuracy."""
    out = tmp_path / "options"
    result = ok(train_run({**TINY, "epochs": 6, "val_fraction": 0.25, "mixup": 0.8, "cutmix": 1.0,
                           "class_weights": "balanced", "scheduler": "plateau", "lr": 1e-9, "min_lr": 1e-10,
                           "early_stopping_patience": 1, "report_to": "tensorboard", "output_dir": out}))
    records = read_metrics(out / "metrics.jsonl")
    val = [r for r in records if "val_accuracy" in r]
    assert len(val) == 2, f"expected a stop after 2 epochs (patience 1), got {len(val)} validations"
    assert "early stopping" in result.stdout
    assert all(r["train_loss"] > 0 for r in records if "train_loss" in r)
    assert list(out.glob("**/events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "eval/metrics.json").is_file()


@pytest.mark.slow
def test_resume_overwrite_starts_fresh_and_resume_path_uses_that_checkpoint(tmp_path, train_run):
    out = tmp_path / "run"
    values = {**TINY, "keep_checkpoints": 5, "output_dir": out}
    ok(train_run({**values, "epochs": 2}))
    first, second = list_checkpoints(out)
    # an earlier checkpoint of this run is refused in place: it would rewrite the run's history
    refused(train_run({**values, "epochs": 3, "resume": first}), "another output_dir")
    assert list_checkpoints(out) == [first, second]
    # a new output_dir starts from it, and PATH is never changed
    branch = tmp_path / "branch"
    again = ok(train_run({**values, "output_dir": branch, "epochs": 3, "resume": first}))
    first_step = json.loads((first / "train_state.json").read_text())["global_step"]  # 12 a epoch
    assert f"resuming from {first.name}, step {first_step}" in again.stdout
    epochs = [json.loads((c / "train_state.json").read_text())["epoch"] for c in list_checkpoints(branch)]
    assert epochs == [2, 3]
    assert list_checkpoints(out) == [first, second]
    fresh = ok(train_run({**values, "epochs": 1, "resume": "overwrite"}))
    assert "resuming" not in fresh.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1] == first_step  # starts over


def test_class_weights_schedules_and_sync_batchnorm():
    from timm.layers import convert_sync_batchnorm

    from pet_pipeline.optim import balanced_class_weights, build_optimizer, build_scheduler

    weights = balanced_class_weights([0, 0, 0, 1], num_classes=2)  # n / (K * n_k)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 4 / 2]))

    model = build_model("coatnet_nano_rw_224", num_classes=12, pretrained=False, image_size=32)
    groups = build_optimizer(model, lr=1e-3, weight_decay=0.05).param_groups
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)  # norms and biases are exempt
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())

    for name, check in (("cosine", lambda lrs: lrs[-1] < lrs[4] / 10),
                        ("constant", lambda lrs: lrs[4:] == [lrs[4]] * len(lrs[4:]))):
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
        scheduler = build_scheduler(optimizer, name=name, total_steps=20, warmup_steps=5, min_lr=1e-6)
        lrs = []
        for step in range(1, 21):
            scheduler.step_update(step)
            lrs.append(optimizer.param_groups[0]["lr"])
        assert lrs[0] < lrs[3] < lrs[4] == max(lrs) == pytest.approx(1e-3), f"{name}: warmup {lrs[:6]}"
        assert check(lrs), f"{name}: {lrs}"

    # plateau counts epochs: 1 warmup epoch to the full lr, then /10 after 2 flat epochs
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    plateau = build_scheduler(optimizer, name="plateau", total_steps=100, warmup_steps=10,
                              min_lr=1e-6, steps_per_epoch=10)
    lrs = []
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.6, 0.6], start=1):
        plateau.step_update(epoch * 10)  # ignored: plateau moves per epoch
        plateau.step(epoch, accuracy)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:3] == pytest.approx([1e-3, 1e-3, 1e-3]) and lrs[-1] == pytest.approx(1e-4), lrs
    state = json.loads(json.dumps(plateau.lr_scheduler.state_dict()))  # what checkpoints carry
    assert state["num_bad_epochs"] == 0 and state["best"] == 0.6

    synced = convert_sync_batchnorm(model)
    kinds = {type(m).__name__ for m in synced.modules()}
    assert not any(k in ("BatchNorm2d", "BatchNormAct2d") for k in kinds)
    assert any("Sync" in k for k in kinds)


# --------------------------------------------------------------------------- stop agreement cadence


class _TwoRanks:
    """An accelerator stand-in for StopFlag: 2 processes; `gather` counts the collectives and
    adds the other rank's row (its flag, and a second per step)."""

    num_processes, device = 2, "cpu"

    def __init__(self):
        self.gathers, self.other_rank_signalled = 0, False

    def gather(self, mine):
        import torch

        self.gathers += 1
        other = torch.tensor([[float(self.other_rank_signalled), 1.0]])
        return torch.cat([mine, other])


def _flag_with_clock(monkeypatch, seconds_per_step: float):
    from pet_pipeline import preemption

    now = [0.0]
    monkeypatch.setattr(preemption.time, "perf_counter", lambda: now[0])
    flag = preemption.StopFlag(signals=())
    flag.arm(every=10)
    return flag, now, seconds_per_step


def _run_steps(flag, now, seconds_per_step, ranks, steps):
    for step in steps:
        now[0] += seconds_per_step
        flag.check(ranks, step)


def test_ranks_agree_on_stopping_every_log_every_steps_not_every_step(monkeypatch):
    flag, now, pace = _flag_with_clock(monkeypatch, seconds_per_step=0.5)
    ranks = _TwoRanks()
    _run_steps(flag, now, pace, ranks, range(1, 101))
    assert ranks.gathers == 11  # step 1 (it times the steps), then 10, 20, ..., 100


def test_slow_steps_bring_the_agreement_within_the_time_budget(monkeypatch):
    from pet_pipeline.preemption import AGREE_WITHIN_S

    flag, now, pace = _flag_with_clock(monkeypatch, seconds_per_step=AGREE_WITHIN_S / 3)
    ranks = _TwoRanks()
    _run_steps(flag, now, pace, ranks, range(1, 31))
    assert ranks.gathers == 1 + 29 // 3  # every 3rd step: a signal is acted on within the budget


def test_a_signal_on_another_rank_stops_this_one_at_the_next_agreement(monkeypatch):
    from pet_pipeline.preemption import StopRequested

    flag, now, pace = _flag_with_clock(monkeypatch, seconds_per_step=0.5)
    ranks = _TwoRanks()
    _run_steps(flag, now, pace, ranks, range(1, 13))
    ranks.other_rank_signalled = True
    _run_steps(flag, now, pace, ranks, range(13, 20))  # no agreement before step 20
    with pytest.raises(StopRequested):
        _run_steps(flag, now, pace, ranks, [20])


def test_progress_keeps_the_bar_in_a_terminal_and_prints_lines_elsewhere(capsys):
    from pet_pipeline.tracking import Progress

    record = {"epoch": 0, "train_loss": 0.5, "lr": 1e-3, "images_per_s": 80.0}
    terminal = Progress(10, 0, enabled=True, interactive=True)
    terminal.update()
    terminal.show(record)
    assert terminal.bar is not None and "loss=0.5000" in str(terminal.bar)
    terminal.close()
    assert "step 1/10" not in capsys.readouterr().out

    piped = Progress(10, 0, enabled=True, interactive=False)
    piped.update()
    piped.show(record)
    assert piped.bar is None
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("step 1/10 (10%) | epoch 0 | loss 0.5000 | lr 1.00e-03 | 80 img/s | ETA ")
