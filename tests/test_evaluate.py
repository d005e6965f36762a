"""evaluate.py and the report: exact gathering across processes, files, bad input.

The scripts run in this process (conftest.run_in_process) except under a launcher of several
processes."""

from __future__ import annotations

import csv
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import evaluate_in_process, ok, train_in_process
from PIL import Image

from pet_pipeline.breeds import CAT_BREEDS
from pet_pipeline.evaluation import read_confusion_matrix_csv
from pet_pipeline.synthetic import synthetic_pets_dir

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


def run(script, args, env, launcher=None):
    """train.py or evaluate.py in this process; with a `launcher` (torchrun, accelerate launch),
    as the processes it starts."""
    if launcher is None:
        return (train_in_process if script == "train.py" else evaluate_in_process)(args)
    return subprocess.run([*launcher, str(ROOT / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


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
@pytest.mark.cluster  # several processes: pytest -m cluster
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


@pytest.mark.slow
def test_plain_timm_loads_model_dir_and_predicts_as_evaluate_py(trained_run, env, tmp_path):
    """model/ is timm's own format: `local-dir:` builds the model at the run's 64 px (not the
    architecture's 224) with its class names, and timm's data config and transform give
    evaluate.py's predictions, image by image."""
    import timm
    import torch

    ok(run("evaluate.py", ["--model_dir", str(trained_run / "model"), "--gradcam_images", "0",
                           "--output_dir", str(tmp_path / "report")], env))
    with open(tmp_path / "report/predictions.csv", newline="") as f:
        expected = list(csv.DictReader(f))

    model = timm.create_model(f"local-dir:{trained_run / 'model'}", pretrained=True).eval()
    data_config = timm.data.resolve_model_data_config(model)
    assert tuple(data_config["input_size"]) == (3, 64, 64)
    transform = timm.data.create_transform(**data_config, is_training=False)
    label_names = model.pretrained_cfg["label_names"]
    assert label_names == list(CAT_BREEDS)
    images = synthetic_pets_dir(images_per_class=16, image_size=48) / "images"  # the run's TINY data
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(images / f"{row['image_id']}.jpg").convert("RGB"))
                             for row in expected])
        probabilities = model(batch).softmax(dim=1)
    assert len(expected) == 96
    assert [label_names[i] for i in probabilities.argmax(dim=1)] == [row["predicted"] for row in expected]
    # predictions.csv rounds the confidence to 4 digits
    assert probabilities.max(dim=1).values.tolist() == pytest.approx(
        [float(row["confidence"]) for row in expected], abs=1.1e-4)


@pytest.mark.slow
def test_the_run_writes_a_model_card_from_its_report(trained_run, env):
    """model/README.md, the card that push_to_hub uploads with model/: YAML metadata for the
    Hub, the test metrics and per-class tables of eval/metrics.json, the confusion matrix,
    the data filter and split sizes, the training config, intended use and limits."""
    import yaml
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_run / "model" / "README.md")
    metrics = json.loads((trained_run / "eval/metrics.json").read_text())
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert card.data.library_name == "timm" and card.data.license and card.data.pipeline_tag
    assert {"accuracy", "f1"} <= set(card.data.metrics)
    assert not card.data.datasets  # generated data: no Hub dataset to name
    (accuracy,) = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy.dataset_split == "test" and accuracy.metric_value == round(metrics["accuracy"], 4)

    text = card.text
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in text
    assert f"| macro F1 | {metrics['macro_f1']:.4f} |" in text
    for breed, row in metrics["per_class"].items():
        assert (f"| {breed} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
                f"{row['support']} |") in text
    assert "](confusion_matrix.png)" in text
    assert (trained_run / "model/confusion_matrix.png").read_bytes() == \
        (trained_run / "eval/confusion_matrix.png").read_bytes()

    sizes = dict(re.findall(r"^\| (train|val|test) \| (\d+) \|$", text, flags=re.M))
    from conftest import annotation_ids

    trainval = synthetic_pets_dir(images_per_class=16, image_size=48) / "annotations" / "trainval.txt"
    cats = [i for i in annotation_ids(trainval) if i.rsplit("_", 1)[0] in CAT_BREEDS]
    assert int(sizes["test"]) == metrics["n"]
    assert int(sizes["train"]) + int(sizes["val"]) == len(cats) and int(sizes["val"]) > 0
    assert f"`species: {config['species']}` ({len(CAT_BREEDS)} cat breeds)" in text
    assert "generated images" in text and "trained from scratch" in text

    config_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    written = yaml.safe_load(config_block)
    assert written == {k: v for k, v in config.items()
                       if k not in ("data_dir", "pretrained_path", "output_dir", "resume")}
    assert "## Intended use and limits" in text and 'timm.create_model("local-dir:' in text


# --------------------------------------------------------------------------- checkpoints


def fake_checkpoint(run_dir: Path, weights: dict, *, ema: dict | None = None) -> Path:
    """A checkpoints/step_N folder as train.py leaves it, holding the given state dicts."""
    from safetensors.torch import save_file

    from pet_pipeline.transforms import model_data_config

    checkpoint = run_dir / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    save_file(weights, str(checkpoint / "model.safetensors"))
    if ema is not None:
        save_file(ema, str(checkpoint / "ema.safetensors"))
    data_config = model_data_config("coatnet_nano_rw_224", 32)
    (checkpoint / "train_state.json").write_text(json.dumps(
        {"global_step": 10, "model": "coatnet_nano_rw_224", "class_names": list(CAT_BREEDS),
         "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}))
    return checkpoint


def tiny_coatnet(seed: int):
    import torch

    from pet_pipeline.model import build_model

    torch.manual_seed(seed)
    return build_model("coatnet_nano_rw_224", num_classes=len(CAT_BREEDS), pretrained=False,
                       image_size=32).eval()


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module.", "module.", "_orig_mod.", ""])
def test_a_checkpoint_loads_whatever_wrapped_the_model(tmp_path, prefix):
    """accelerate's save_state keeps the DDP (`module.`) and torch.compile (`_orig_mod.`)
    prefixes: a checkpoint of any process count, compiled or not, gives the same model."""
    import torch

    from pet_pipeline.model import load_trained_model

    source = tiny_coatnet(seed=1)
    weights = {prefix + k: v.contiguous() for k, v in source.state_dict().items()}
    checkpoint = fake_checkpoint(tmp_path / "run", weights)
    loaded, description = load_trained_model(checkpoint)
    assert not loaded.training
    assert description["label_names"] == list(CAT_BREEDS) and description["num_classes"] == 12
    assert description["run_dir"] == tmp_path / "run"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_a_checkpoint_with_ema_loads_the_ema_weights(tmp_path):
    import torch
    from timm.utils import ModelEmaV3

    from pet_pipeline.model import load_trained_model

    trained, averaged = tiny_coatnet(seed=1), tiny_coatnet(seed=2)
    weights = {"module." + k: v.contiguous() for k, v in trained.state_dict().items()}
    ema = ModelEmaV3(averaged)  # saved as checkpoint.save_checkpoint does: keys `module.`
    checkpoint = fake_checkpoint(tmp_path / "run", weights,
                                 ema={k: v.contiguous() for k, v in ema.state_dict().items()})
    loaded, description = load_trained_model(checkpoint)
    assert description["weights"].name == "ema.safetensors"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), averaged(x), rtol=0, atol=0)
        assert not torch.allclose(loaded(x), trained(x))


@pytest.mark.slow
@pytest.mark.cluster  # several processes: pytest -m cluster
def test_a_two_process_checkpoint_evaluates_like_the_exported_model(env, tmp_path):
    """A run trained by 2 processes with EMA: its last checkpoint, evaluated by 2 processes,
    predicts as its model/ folder (the same final EMA weights without validation) with 1."""
    two = {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    out = tmp_path / "run"
    ok(run("train.py", [*TINY, "--model", "test_efficientnet", "--ema_decay", "0.9", "--val_fraction", "0",
                        "--epochs", "1", "--gradcam_images", "0", "--output_dir", str(out)], two,
           launcher=torchrun))
    (checkpoint,) = sorted((out / "checkpoints").glob("step_*"))[-1:]
    assert (checkpoint / "ema.safetensors").is_file()
    args = ["--batch_size", "7", "--gradcam_images", "0"]
    ok(run("evaluate.py", [*args, "--model_dir", str(out / "model"), "--output_dir", str(tmp_path / "model")],
           env))
    result = ok(run("evaluate.py", [*args, "--model_dir", str(checkpoint),
                                    "--output_dir", str(tmp_path / "checkpoint")], two, launcher=torchrun))
    assert "2 process(es)" in result.stdout
    with open(tmp_path / "model/predictions.csv", newline="") as f:
        from_model = list(csv.DictReader(f))
    with open(tmp_path / "checkpoint/predictions.csv", newline="") as f:
        from_checkpoint = list(csv.DictReader(f))
    assert len(from_model) == 96
    # same images, labels and predictions; the confidence (4 digits) to its last digit, as
    # other batches may round it the other way
    columns = ("image_id", "true", "predicted")
    assert [[r[c] for c in columns] for r in from_checkpoint] == [[r[c] for c in columns] for r in from_model]
    assert [float(r["confidence"]) for r in from_checkpoint] == pytest.approx(
        [float(r["confidence"]) for r in from_model], abs=1.1e-4)


def test_test_and_train_splits_evaluate_even_when_no_validation_split_can_be_made(env, tmp_path):
    """--split test never builds the validation split; --split train keeps the run's
    val_fraction (train is trainval minus val) and says how it was adapted."""
    import yaml
    from conftest import write_pet_folder

    counts = {breed: (2, 2) for breed in CAT_BREEDS}
    counts["Bengal"] = (1, 2)  # one trainval image: no stratified split can give it a val image
    folder = write_pet_folder(tmp_path / "pets", counts, image_size=32)
    model = tiny_coatnet(seed=1)
    checkpoint = fake_checkpoint(tmp_path / "run", {"module." + k: v.contiguous()
                                                    for k, v in model.state_dict().items()})
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"data_dir": str(folder), "val_fraction": 0.1, "seed": 0}))
    args = ["--model_dir", str(checkpoint), "--gradcam_images", "0", "--num_workers", "0",
            "--batch_size", "8"]
    for split, n in (("test", 24), ("train", 23)):
        result = ok(run("evaluate.py", [*args, "--split", split,
                                        "--output_dir", str(tmp_path / split)], env))
        assert json.loads((tmp_path / split / "metrics.json").read_text())["n"] == n
        note = "val_fraction: breed Bengal has 1 trainval image(s), too few for a validation split"
        assert (note in result.stdout) == (split == "train"), result.stdout
