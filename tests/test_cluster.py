"""Beyond one machine: two "nodes" without SLURM, stops and kills of multi-process runs, a real
SLURM cluster running the scripts in slurm/, the offline prefetch and the sweep summary.

Every run is train.py in subprocesses on generated pets at 32 px, launched the way the
scripts launch it. The SLURM tests start a private cluster (tests/slurm_cluster.py) and skip,
saying why, where SLURM is not installed or we are not root.

Marked `cluster`: a plain `pytest` leaves them out, `pytest -m cluster` runs them; CI runs both.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pet_pipeline.checkpoint import list_checkpoints, read_train_state, verify_checkpoint
from pet_pipeline.evaluation import read_confusion_matrix_csv
from pet_pipeline.preemption import PREEMPTED_EXIT_CODE
from pet_pipeline.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_env  # noqa: E402
from slurm_cluster import LocalSlurm, SkipCluster  # noqa: E402
from wandb_offline import read_offline_run  # noqa: E402

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# 12 cat breeds of generated pets at 48 px, trained at 32 px: about a second per step, which
# the tests that send a signal once step N is logged count on to land where they expect.
TINY = [
    "--dataset", "synthetic", "--synthetic_image_size", "48", "--model", "coatnet_nano_rw_224",
    "--pretrained", "false", "--image_size", "32", "--batch_size", "8", "--lr", "2e-3",
    "--num_workers", "0", "--log_every", "1", "--drop_path_rate", "0.0", "--report_to", "none",
]
# 96 trainval (72 train, 24 val) and 96 test images: 5 steps per epoch with 2 processes
SMALL = [*TINY, "--synthetic_images_per_class", "16", "--val_fraction", "0.25"]
# 48 train images (3 steps per epoch with 2 processes) and a long validation (240 images one
# at a time, a few seconds), so that a signal sent after the last step lands inside it
LONG_VALIDATION = [*TINY, "--synthetic_images_per_class", "48", "--val_fraction", "0.8333",
                   "--eval_batch_size", "1", "--epochs", "2", "--checkpoint_steps", "2"]
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def env(pet_cache):
    """The session's run environment (its data cache too), one thread a process, without the
    variables of a SLURM job that pytest may run in."""
    environment = run_env(pet_cache, PET_PIPELINE_PYTHON=PYTHON, OMP_NUM_THREADS="1")
    return {k: v for k, v in environment.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


def torchrun(args, env, *, nproc=2):
    """A 2-process CPU run the way the README gives it; returns the Popen."""
    return subprocess.Popen(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(ROOT / "train.py"), *args],
        env={**env, "ACCELERATE_USE_CPU": "1"}, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def assert_ok(returncode: int, output: str, what: str = "train.py") -> None:
    assert returncode == 0, f"{what} failed ({returncode}):\n{output[-4000:]}"


def wait_for_record(out: Path, running, predicate, timeout=300) -> dict:
    """The first metrics.jsonl record for which predicate(record) holds, while running()."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not running():
            raise AssertionError("the training ended before the awaited metrics.jsonl record")
        path = out / "metrics.jsonl"
        if path.exists():
            for record in read_metrics(path):
                if predicate(record):
                    return record
        time.sleep(0.1)
    raise AssertionError("the awaited metrics.jsonl record never came")


def final_weights(out: Path) -> dict:
    return load_file(str(list_checkpoints(out)[-1] / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- two nodes, no SLURM


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_a_one_process_evaluation(tmp_path, env):
    """Two launchers as slurm/train_multinode.sbatch starts them on CPU nodes (machine ranks
    0 and 1, one process each, 127.0.0.1); then evaluate.py with one process on the model."""
    out, port = tmp_path / "two-nodes", free_port()
    launchers = [
        subprocess.Popen(
            [PYTHON, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "configs/accelerate/multinode.yaml"), "--mixed_precision", "no",
             "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             str(ROOT / "train.py"), *SMALL, "--epochs", "3", "--output_dir", str(out)],
            env={**env, "ACCELERATE_USE_CPU": "1"}, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [finish(p) for p in launchers]
    for p, output in zip(launchers, outputs):
        assert_ok(p.returncode, output, "a launcher")
    assert "2 process(es) on cpu" in outputs[0], "the two machines did not form one run"
    # 72 images / (8 per process x 2 processes) = 5 steps per epoch, not 9 (two lone runs)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 16))

    report = tmp_path / "one-process-eval"
    result = subprocess.run([PYTHON, str(ROOT / "evaluate.py"), "--model_dir", str(out / "model"),
                             "--output_dir", str(report), "--gradcam_images", "0"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_ok(result.returncode, result.stdout + result.stderr, "evaluate.py")
    two_nodes, names = read_confusion_matrix_csv(out / "eval/confusion_matrix.csv")
    one_process, names_again = read_confusion_matrix_csv(report / "confusion_matrix.csv")
    assert names == names_again and two_nodes.sum() == 96, "every test image exactly once"
    assert (two_nodes.sum(axis=0) > 0).sum() >= 2, "a model that predicts one class tests nothing"
    assert (two_nodes == one_process).all(), f"2 nodes:\n{two_nodes}\n1 process:\n{one_process}"


# --------------------------------------------------------------------------- stop, kill, resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env) -> Path:
    """The reference: the LONG_VALIDATION run with 2 processes, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    assert_ok(process.wait(timeout=600), finish(process))
    return out


def stop_and_resume(out: Path, env, *, when, signal_to_launcher=signal.SIGTERM, pause=0.0):
    """Start a 2-process run, signal torchrun once `when(record)`; return (stopped run's
    output, its exit status, the checkpoint it left); then resume it to the end."""
    process = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    wait_for_record(out, lambda: process.poll() is None, when)
    time.sleep(pause)
    process.send_signal(signal_to_launcher)  # to torchrun only: its workers have their own session
    output = finish(process)
    checkpoint = list_checkpoints(out)[-1]
    state = read_train_state(checkpoint)  # before the resumed run rotates it away
    resumed = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    resumed_output = finish(resumed)
    assert_ok(resumed.returncode, resumed_output, "the resumed run")
    assert f"resuming from {checkpoint.name}" in resumed_output
    return output, process.returncode, state


def assert_stopped_cleanly(output: str, returncode: int, signal_name: str = "SIGTERM") -> None:
    # every rank saved and left with train.py's status (75, or 130 for Ctrl-C); torchrun (also
    # inside `accelerate launch` with several processes), itself signalled, forwards the signal,
    # waits for its workers and exits 1 with a SignalException traceback
    assert returncode == 1, output[-3000:]
    assert "SignalException" in output and f"stopping on {signal_name} at step" in output, output[-3000:]
    exit_code = 130 if signal_name == "SIGINT" else PREEMPTED_EXIT_CODE
    assert f"rerun the same command to resume (exit status {exit_code})" in output


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_mid_epoch_checkpoints_and_resumes_to_the_same_weights(tmp_path, env, uninterrupted, sent):
    """SIGTERM from a scheduler, or Ctrl-C at the terminal (which reaches torchrun: its workers
    have a session of their own, and it forwards the signal to them)."""
    out = tmp_path / "stopped"
    output, returncode, state = stop_and_resume(
        out, env, when=lambda r: r.get("step", 0) >= 4 and "train_loss" in r, signal_to_launcher=sent)
    assert_stopped_cleanly(output, returncode, sent.name)
    said = "stopping after this step: saving a checkpoint (Ctrl-C again to quit without saving)"
    assert output.count(said) == (1 if sent == signal.SIGINT else 0), "only the main process says it"
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < STEPS_PER_EPOCH, state
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


@pytest.mark.slow
def test_ctrl_c_twice_under_torchrun_still_ends_with_the_stops_checkpoint(tmp_path, env):
    """torchrun forwards the first Ctrl-C to its workers (they have sessions of their own, so
    the terminal's second one never reaches them) and swallows the second while it waits for
    them: the stop the first asked for completes with its checkpoint, every rank exits, and
    the same command resumes. (One process quits at once on the second: tests/test_train.py.)"""
    out = tmp_path / "run"
    process = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    wait_for_record(out, lambda: process.poll() is None,
                    lambda r: r.get("step", 0) >= 4 and "train_loss" in r)
    workers = psutil.Process(process.pid).children()
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = finish(process)
    assert_stopped_cleanly(output, process.returncode, "SIGINT")
    assert "quit on a second Ctrl-C" not in output
    stopped_at = int(output.split("stopping on SIGINT at step ")[1].split()[0])
    newest = list_checkpoints(out)[-1]
    assert read_train_state(newest)["global_step"] == stopped_at and verify_checkpoint(newest) is None
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    resumed = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    resumed_output = finish(resumed)
    assert_ok(resumed.returncode, resumed_output, "the resumed run")
    assert f"resuming from {newest.name}" in resumed_output


@pytest.mark.slow
def test_an_image_deleted_mid_run_under_two_processes_is_named_once_and_replaced(tmp_path, env):
    """The rank that meets it flags it; the flags of both ranks are gathered at the log step,
    the main process names it once, and the run goes on with a stand-in on every rank."""
    from conftest import write_pet_folder

    pets = write_pet_folder(tmp_path / "pets", {b: (8, 2) for b in ("Abyssinian", "Bengal", "Birman")},
                            image_size=48)
    out = tmp_path / "run"
    process = subprocess.Popen(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "faults.py"), "delete-after-epoch:0", str(ROOT / "train.py"), *TINY,
         "--data_dir", str(pets), "--breeds", "Abyssinian,Bengal,Birman", "--batch_size", "4",
         "--epochs", "3", "--val_fraction", "0", "--max_unreadable_fraction", "0.2",
         "--output_dir", str(out)],
        env={**env, "ACCELERATE_USE_CPU": "1", "FAULT_IMAGE": str(pets / "images" / "Bengal_2.jpg")},
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = finish(process)
    assert_ok(process.returncode, output)
    assert output.count("unreadable during training: Bengal_2 (missing file)") == 1, output[-3000:]
    records = [r for r in read_metrics(out / "metrics.jsonl") if "unreadable_image" in r]
    assert [(r["unreadable_image"], r["epoch"]) for r in records] == [("Bengal_2", 1)]
    assert "unreadable images (named in metrics.jsonl and eval/metrics.json): 1 in training" in output


@pytest.mark.slow
def test_sigterm_during_validation_checkpoints_and_resumes_to_the_same_weights(
        tmp_path, env, uninterrupted):
    out = tmp_path / "stopped"
    output, returncode, state = stop_and_resume(
        out, env, when=lambda r: r.get("step") == STEPS_PER_EPOCH and "train_loss" in r,
        pause=0.5)  # past the step's own stop check, well inside the ~4 s validation
    assert_stopped_cleanly(output, returncode)
    # stopped inside epoch 0's validation: all its steps done, the epoch not closed
    assert state["epoch"] == 0 and state["step_in_epoch"] == STEPS_PER_EPOCH, state
    val_epochs = [r["epoch"] for r in read_metrics(out / "metrics.jsonl") if "val_accuracy" in r]
    assert val_epochs == [0, 1], "epoch 0 must be validated once, after the resume"
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_quickly_and_resume_continues(tmp_path, env, uninterrupted):
    out = tmp_path / "killed"
    process = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    # after step 3 (the checkpoint of step 2 is complete), inside epoch 0's validation
    wait_for_record(out, lambda: process.poll() is None, lambda r: r.get("step") == 3 and "train_loss" in r)
    (rank1,) = [p for p in psutil.Process(process.pid).children()
                if p.environ().get("RANK") == "1"]
    last_good = list_checkpoints(out)[-1]
    killed_at = time.time()
    rank1.send_signal(signal.SIGKILL)
    output = finish(process, timeout=120)
    assert process.returncode != 0, output[-3000:]
    assert time.time() - killed_at < 60, "the job should end within torchrun's shutdown timeout"
    assert not psutil.pid_exists(rank1.pid) or rank1.status() == psutil.STATUS_ZOMBIE

    assert list_checkpoints(out)[-1] == last_good, "a checkpoint cut short by the kill must not count"
    resumed = torchrun([*LONG_VALIDATION, "--output_dir", str(out)], env)
    resumed_output = finish(resumed)
    assert_ok(resumed.returncode, resumed_output, "the resumed run")
    assert f"resuming from {last_good.name}" in resumed_output
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


def test_processes_that_do_not_join_one_job_stop_at_once(tmp_path, env):
    """torchrun with 2 processes but no ACCELERATE_USE_CPU on a machine without CUDA: each
    process would train alone on one output_dir (a multi-GPU launch config on CPUs)."""
    out = tmp_path / "mismatch"
    cpu_env = {k: v for k, v in env.items() if k != "ACCELERATE_USE_CPU"}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(ROOT / "train.py"), *SMALL,
                             "--output_dir", str(out)], env={**cpu_env, "CUDA_VISIBLE_DEVICES": ""},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "launch: 2 processes were started but Accelerate joined 1" in output, output[-3000:]
    assert "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2" in output
    assert time.time() - started < 60
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_after_the_collective_timeout(tmp_path, env):
    """SIGSTOP on rank 1: rank 0 gives up after collective_timeout_s with one sentence, the
    launcher stops the job, and the checkpoint before it is intact. torchrun then gives the
    stopped worker 30 s after SIGTERM before SIGKILL (fixed on a worker failure)."""
    out = tmp_path / "frozen"
    timeout_s, torchrun_grace_s = 15, 30
    process = torchrun([*SMALL, "--epochs", "2", "--checkpoint_steps", "1",
                        "--collective_timeout_s", str(timeout_s), "--output_dir", str(out)], env)
    wait_for_record(out, lambda: process.poll() is None, lambda r: r.get("step") == 2 and "train_loss" in r)
    (rank1,) = [p for p in psutil.Process(process.pid).children() if p.environ().get("RANK") == "1"]
    frozen_at = time.time()
    rank1.send_signal(signal.SIGSTOP)
    try:
        output = finish(process, timeout=120)
    finally:
        if psutil.pid_exists(rank1.pid):
            rank1.send_signal(signal.SIGKILL)
    elapsed = time.time() - frozen_at
    assert process.returncode != 0, output[-3000:]
    assert elapsed < timeout_s + torchrun_grace_s + 15, f"the job took {elapsed:.0f} s:\n{output[-2500:]}"
    assert f"waited over {timeout_s} s for the others in a collective" in output, output[-3000:]
    assert verify_checkpoint(list_checkpoints(out)[-1]) is None


# --------------------------------------------------------------------------- a real SLURM cluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Two emulated nodes; stops every daemon it started, by pid, however the tests end."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
    except SkipCluster as reason:
        pytest.skip(str(reason))
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, script: str, args: list[str], env, logs: Path, **extra_env) -> str:
    logs.mkdir(parents=True, exist_ok=True)
    name = "%x-%A_%a.out" if "sweep" in script else "%x-%j.out"
    return slurm.sbatch([f"--output={logs / name}", *(["--array=0-1"] if "sweep" in script else []),
                         script, *args], cwd=ROOT, env={**env, **extra_env})


def job_log(logs: Path, job_id: str) -> str:
    (path,) = logs.glob(f"*-{job_id}.out")
    return path.read_text()


def assert_no_strays(out: Path) -> None:
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the job outlived it: {left}"


MULTINODE_ARGS = [*SMALL, "--epochs", "2"]


@pytest.fixture(scope="module")
def multinode_run(slurm, env, tmp_path_factory):
    """`sbatch slurm/train_multinode.sbatch` on 2 nodes, never stopped: (output_dir, log, job)."""
    base = tmp_path_factory.mktemp("multinode")
    out, logs = base / "run", base / "logs"
    job = submit(slurm, "slurm/train_multinode.sbatch", [*MULTINODE_ARGS, "--output_dir", str(out)],
                 env, logs)
    info = slurm.wait_for(job, timeout=600)
    return out, job_log(logs, job), info


@pytest.mark.slow
def test_multinode_job_trains_on_both_nodes_and_writes_the_report(multinode_run):
    out, log, info = multinode_run
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NodeList"] == "n[1-2]"
    assert "head node n1 (127.0.0.1:" in log
    assert "2 process(es) on cpu (MULTI_CPU)" in log
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 11)), "2 epochs of 5 steps with 2 processes"
    assert json.loads((out / "eval/metrics.json").read_text())["n"] == 96
    assert (out / "eval/confusion_matrix.csv").is_file() and (out / "model/model.safetensors").is_file()
    assert_no_strays(out)


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_into_the_same_weights_and_wandb_run(
        slurm, env, tmp_path, multinode_run):
    out, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(slurm, "slurm/train_multinode.sbatch",
                 [*MULTINODE_ARGS, "--report_to", "wandb", "--output_dir", str(out)], env, logs)
    wait_for_record(out, lambda: slurm.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"),
                    lambda r: r.get("step") == 2)  # inside epoch 0 (5 steps)
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 sends
    info = slurm.wait_for(job, timeout=600)
    log = job_log(logs, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-5000:]
    assert "SIGUSR1: asking the training to checkpoint and stop" in log
    assert f"requeueing job {job}" in log and "attempt 2" in log
    stopped_at = int(log.split("stopping on SIGTERM at step ")[1].split()[0])
    assert 2 <= stopped_at < 5, "the stop should land inside the first epoch"
    assert f"resuming from step_{stopped_at:08d}" in log

    assert_same_weights(final_weights(out), final_weights(multinode_run[0]))
    runs = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({read_offline_run(r)["run_id"] for r in runs}) == 1, \
        "the requeued attempt must log into the same W&B run"
    assert_no_strays(out)


@pytest.mark.slow
def test_scancel_stops_with_a_checkpoint_without_requeue_and_resubmitting_resumes(slurm, env, tmp_path):
    """slurm/train.sbatch (one process, no launcher): a user's scancel must stay a cancel."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = [*SMALL, "--epochs", "2", "--output_dir", str(out)]
    job = submit(slurm, "slurm/train.sbatch", args, env, logs)
    wait_for_record(out, lambda: slurm.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"),
                    lambda r: r.get("step") == 2)
    slurm.run("scancel", job)  # TERM now, KILL after KillWait (30 s)
    deadline = time.time() + 60
    while slurm.run("squeue", "-h", "-j", job, check=False).strip() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a requeue, if the script asked for one, would show by now
    info, log = slurm.job(job), job_log(logs, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log[-4000:]
    assert "SIGTERM: asking the training to checkpoint and stop" in log and "requeueing" not in log
    assert "stopping on SIGTERM at step" in log
    (checkpoint,) = list_checkpoints(out)
    assert 2 <= read_train_state(checkpoint)["global_step"] < 9, "stopped inside the first epoch"

    again = submit(slurm, "slurm/train.sbatch", args, env, logs)  # the same command resumes
    info = slurm.wait_for(again, timeout=600)
    log = job_log(logs, again)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"resuming from {checkpoint.name}" in log and "1 process(es) on cpu" in log
    assert (out / "eval/metrics.json").is_file()
    assert_no_strays(out)


@pytest.mark.slow
def test_sweep_array_trains_each_row_and_leaves_a_summary(slurm, env, tmp_path):
    table = tmp_path / "grid.tsv"
    table.write_text("# two tasks\nlr    warmup_epochs\n2e-3  0.5\n1e-3  1\n")
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    job = submit(slurm, "slurm/sweep.sbatch", [*SMALL, "--epochs", "1"], env, logs,
                 SWEEP_TABLE=str(table), SWEEP_DIR=str(sweep))
    for task in ("0", "1"):
        info = slurm.wait_for(f"{job}_{task}", timeout=600)
        assert info["JobState"] == "COMPLETED", job_log(logs, f"{job}_{task}")[-4000:]
    for task, lr in (("0", 2e-3), ("1", 1e-3)):
        config = yaml.safe_load((sweep / f"task-{task}/config.yaml").read_text())
        assert config["lr"] == lr and (sweep / f"task-{task}/eval/metrics.json").is_file()
    summary = (sweep / "summary.md").read_text()
    assert "2 of 2 runs finished" in summary
    assert "| run | lr | warmup_epochs | accuracy |" in summary
    assert summary.count("| done |") == 2


# --------------------------------------------------------------------------- scripts and helpers


def test_sbatch_scripts_parse_and_carry_the_preemption_settings():
    for script in ("train.sbatch", "train_multinode.sbatch", "sweep.sbatch"):
        text = (ROOT / "slurm" / script).read_text()
        subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], check=True)
        for directive in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--output=logs/"):
            assert f"#SBATCH {directive}" in text, f"{script}: {directive}"
        assert '"$@"' in text, f"{script} must forward its arguments to train.py"
    subprocess.run(["bash", "-n", str(ROOT / "slurm/preemptible.sh")], check=True)
    assert (ROOT / "logs").is_dir(), "SLURM fails a job silently when its --output folder is missing"


def test_sweep_summary_lists_varied_settings_best_first(tmp_path):
    for name, lr, accuracy in (("task-0", 1e-4, 0.5), ("task-1", 3e-4, 0.75), ("task-2", 1e-3, None)):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"lr": lr, "model": "m", "output_dir": str(run)}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_accuracy": 0.25}) + "\n")
        if accuracy is not None:
            (run / "eval/metrics.json").write_text(json.dumps(
                {"accuracy": accuracy, "macro_f1": accuracy, "weighted_f1": accuracy, "n": 8}))
    result = subprocess.run([PYTHON, str(ROOT / "slurm/summarize_sweep.py"), str(tmp_path),
                             "--tasks", "4"], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].endswith("2 of 4 runs finished")
    assert lines[2] == "| run | lr | accuracy | macro_f1 | weighted_f1 | best_val_accuracy | n | status |"
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| task-1", "| task-0", "| task-2"]
    assert lines[6].endswith("| 0.2500 |  | not finished |")
    assert (tmp_path / "summary.csv").read_text().splitlines()[1].startswith("task-1,0.0003,0.7500")


# --------------------------------------------------------------------------- offline prefetch


def prefetch(args, env, **extra):
    return subprocess.run([PYTHON, "-m", "pet_pipeline.prefetch", *args], env={**env, **extra},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_prefetch_without_network_ends_in_one_sentence(tmp_path, env):
    result = prefetch(["--config", "configs/gpu.yaml"], env, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: dataset: could not download 'timm/oxford-iiit-pet'")
    assert "HF_HUB_OFFLINE is set" in line


def test_prefetch_arguments(tmp_path, env):
    result = prefetch(["--help"], env)
    assert result.returncode == 0 and "--weights_dir" in result.stdout
    nothing = prefetch(["--config", "configs/quickstart.yaml"], env)
    assert nothing.returncode == 0 and "nothing to download" in nothing.stdout
    for bad, message in ((["--weights_dir"], "weights_dir: missing value"),
                         (["--modle", "resnet18"], "did you mean 'model'"),
                         (["--dataset", "synthetic", "--model", "no_such_net"], "model")):
        result = prefetch(bad, env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert message in line


def test_prefetch_copies_cached_weights_and_prints_the_offline_settings(tmp_path, env):
    """A Hub cache that already holds a model's weights (as after a download): prefetch finds
    them offline, copies them to --weights_dir and prints the settings for the jobs."""
    import timm
    from safetensors.torch import save_file

    name = "test_vit"
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    repo = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    weights = timm.create_model(name).state_dict()
    save_file(weights, str(snapshot / "model.safetensors"))

    result = prefetch(["--dataset", "synthetic", "--model", name, "--weights_dir",
                       str(tmp_path / "weights")], env, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert f"export HF_HOME={tmp_path / 'hf'} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in result.stdout
    copied = tmp_path / "weights" / f"{name}.safetensors"
    assert f"--pretrained_path {copied}" in result.stdout
    assert_same_weights(load_file(str(copied)), weights)
