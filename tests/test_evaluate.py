"""evaluate.py and the report: exact gathering across processes, files, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pet_pipeline.breeds import CAT_BREEDS
from pet_pipeline.evaluation import read_confusion_matrix_csv

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset", "synthetic", "--synthetic_images_per_class", "16", "--synthetic_image_size", "48",
    "--model", "coatnet_nano_rw_224", "--pretrained", "false", "--image_size", "64",
    "--batch_size", "8", "--lr", "2e-3", "--num_workers", "0", "--drop_path_rate", "0.0",
    "--report_to", "none", "--val_fraction", "0.25",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environment = dict(os.environ)
    environment.update(PET_PIPELINE_CACHE=str(tmp_path_factory.mktemp("pet-cache")),
                       HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")
    return environment


def run(script, args, env, launcher=(sys.executable,)):
    return subprocess.run([*launcher, str(ROOT / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def ok(result):
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, env):
    """A small finished training run (2 epochs, 64 px so that Grad-CAM has a 2x2 map)."""
    out = tmp_path_factory.mktemp("run") / "run"
    ok(run("train.py", [*TINY, "--epochs", "2", "--output_dir", str(out)], env))
    return out


@pytest.mark.slow
def test_training_writes_the_full_report(trained_run):
    out = trained_run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 96
    assert set(metrics["per_class"]) == set(CAT_BREEDS)
    assert sum(c["support"] for c in metrics["per_class"].values()) == 96
    for key in ("accuracy", "top5_accuracy", "macro_f1", "weighted_f1", "expected_calibration_error",
                "_evaluate_version"):
        assert key in metrics, key
    matrix, names = read_confusion_matrix_csv(out / "confusion_matrix.csv")
    assert names == list(CAT_BREEDS) and matrix.sum() == 96
    assert np.trace(matrix) / 96 == pytest.approx(metrics["accuracy"])
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96 and len({r["image_id"] for r in rows}) == 96
    assert {r["true"] for r in rows} == set(CAT_BREEDS)
    assert np.mean([r["true"] == r["predicted"] for r in rows]) == pytest.approx(metrics["accuracy"])
    assert "Abyssinian" in (out / "classification_report.txt").read_text()
    pngs = [out / "confusion_matrix.png", out / "prediction_samples.png", trained_run / "training_curves.png"]
    if metrics["accuracy"] < 1:
        pngs.append(out / "misclassified_gradcam.png")
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        with Image.open(png) as image:
            assert min(image.size) > 200, png


@pytest.mark.slow
def test_evaluate_py_reproduces_the_training_accuracy(trained_run, env, tmp_path):
    result = ok(run("evaluate.py", ["--model_dir", str(trained_run / "model"), "--batch_size", "5",
                                    "--output_dir", str(tmp_path / "again")], env))
    reported = json.loads((trained_run / "eval/metrics.json").read_text())
    again = json.loads((tmp_path / "again/metrics.json").read_text())
    assert again["accuracy"] == reported["accuracy"] and again["n"] == reported["n"]
    assert f"{reported['accuracy']:.4f}" in result.stdout


@pytest.mark.slow
def test_two_processes_count_every_sample_once(trained_run, env, tmp_path):
    """96 test images, batch 7, 2 processes: 96 is no multiple of 14, so the sampler pads."""
    args = ["--model_dir", str(trained_run / "model"), "--batch_size", "7", "--gradcam_images", "0"]
    ok(run("evaluate.py", [*args, "--output_dir", str(tmp_path / "one")], env))
    two = ok(run("evaluate.py", [*args, "--output_dir", str(tmp_path / "two")],
                 {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                 launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2")))
    assert "2 process(es)" in two.stdout
    one_matrix, _ = read_confusion_matrix_csv(tmp_path / "one/confusion_matrix.csv")
    two_matrix, _ = read_confusion_matrix_csv(tmp_path / "two/confusion_matrix.csv")
    assert one_matrix.sum() == two_matrix.sum() == 96
    np.testing.assert_array_equal(one_matrix, two_matrix)
    one_rows = (tmp_path / "one/predictions.csv").read_text().splitlines()
    two_rows = (tmp_path / "two/predictions.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in one_rows] == [r.split(",")[:3] for r in two_rows]

    # the same under `accelerate launch` (its multi-process launcher, on CPU over gloo)
    launched = ok(run("evaluate.py", [*args, "--output_dir", str(tmp_path / "launched")],
                      {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                      launcher=(sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                str(ROOT / "accelerate_config.yaml"), "--num_processes", "2",
                                "--mixed_precision", "no", "--main_process_port", str(free_port()))))
    assert "2 process(es)" in launched.stdout
    launched_matrix, _ = read_confusion_matrix_csv(tmp_path / "launched/confusion_matrix.csv")
    np.testing.assert_array_equal(one_matrix, launched_matrix)


@pytest.mark.slow
def test_val_split_is_the_training_runs_own(trained_run, env, tmp_path):
    """--split val takes val_fraction and seed from the run's config.yaml: same 24 images."""
    ok(run("evaluate.py", ["--model_dir", str(trained_run / "model"), "--split", "val",
                           "--gradcam_images", "0", "--output_dir", str(tmp_path / "val")], env))
    val = json.loads((tmp_path / "val/metrics.json").read_text())
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best_val = max(r["val_accuracy"] for r in records if "val_accuracy" in r)
    assert val["n"] == 24 and val["accuracy"] == pytest.approx(best_val)


@pytest.mark.slow
def test_bad_model_folders_and_data_end_in_one_sentence(trained_run, env, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "model", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    garbled = tmp_path / "garbled"
    shutil.copytree(trained_run / "model", garbled)
    (garbled / "config.json").write_text("{not json")
    cases = {
        "missing": (["--model_dir", str(tmp_path / "nowhere")], "model_dir"),
        "no model_dir": ([], "model_dir"),
        "corrupt weights": (["--model_dir", str(broken)], "model_dir"),
        "corrupt config": (["--model_dir", str(garbled)], "model_dir"),
        "class mismatch": (["--model_dir", str(trained_run / "model"), "--species", "dog"], "species"),
        "empty split": (["--model_dir", str(trained_run / "model"), "--split", "val",
                         "--val_fraction", "0"], "split"),
    }
    for name, (args, key) in cases.items():
        result = run("evaluate.py", args, env)
        assert result.returncode == 2, f"{name}: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, name
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and key in errors[0], f"{name}: {result.stderr[-500:]}"
