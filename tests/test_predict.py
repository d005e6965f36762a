"""predict.py: top-k rows for image files, folders and globs, as evaluate.py sees the images.

One tiny model is trained once for the module (conftest's TINY at 64 px, so that Grad-CAM has
a 2x2 map); predict.py and evaluate.py run in this process (conftest.run_in_process), except
under torchrun. The bad-input tests need no trained model: they must stop before loading one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, evaluate_in_process, ok, refused, run_in_process
from PIL import Image

from pet_pipeline.breeds import CAT_BREEDS
from pet_pipeline.synthetic import synthetic_pets_dir

ROOT = Path(__file__).resolve().parents[1]
TOP5_COLUMNS = ["path", "label", "probability", "label_2", "probability_2", "label_3", "probability_3",
                "label_4", "probability_4", "label_5", "probability_5", "error"]
# evaluate.py's predictions.csv gives the confidence to 4 decimals; predict.py to 6
CSV_ROUNDING = 5e-5 + 1e-6


def predict_in_process(args: list) -> object:
    import predict

    return run_in_process(predict.main, [str(arg) for arg in args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_hand(model_dir: Path, paths: list, *, flip: bool = False) -> np.ndarray:
    """The model's softmax for these files, computed here: evaluate.py's decoding and eval
    transform, one forward pass (with `flip`, the mean with the mirrored tensor's)."""
    import torch

    from pet_pipeline.images import open_rgb
    from pet_pipeline.model import load_trained_model
    from pet_pipeline.transforms import build_eval_transform, decode_size

    model, description = load_trained_model(model_dir)
    data_config = description["data_config"]
    transform = build_eval_transform(data_config)
    pixels = torch.stack([transform(open_rgb(str(p), decode_size(data_config, None))) for p in paths])
    with torch.no_grad():
        probabilities = model(pixels).softmax(dim=1)
        if flip:
            probabilities = (probabilities + model(pixels.flip(-1)).softmax(dim=1)) / 2
    return probabilities.double().numpy()


def ranked_probabilities(row: dict, k: int) -> list[float]:
    return [float(row["probability" if rank == 1 else f"probability_{rank}"]) for rank in range(1, k + 1)]


def link(sources: list[Path], folder: Path) -> list[Path]:
    """Hard links of `sources` in `folder` (the images are never copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        os.link(source, folder / source.name)
    return [folder / source.name for source in sources]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, train_run) -> Path:
    """model/ of a tiny finished run: test_efficientnet, 12 cat breeds, 64 px."""
    out = tmp_path_factory.mktemp("predict-run") / "run"
    ok(train_run({**TINY, "image_size": 64, "max_steps": 24, "output_dir": str(out)}))
    return out / "model"


@pytest.fixture(scope="module")
def evaluated(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(a folder holding the run's 96 test images, evaluate.py's predictions.csv rows by image id)."""
    report = tmp_path_factory.mktemp("evaluate") / "report"
    ok(evaluate_in_process(["--model_dir", str(model_dir), "--gradcam_images", "0", "--num_workers", "0",
                            "--output_dir", str(report)]))
    expected = {row["image_id"]: row for row in read_csv(report / "predictions.csv")}
    images = synthetic_pets_dir(images_per_class=16, image_size=48) / "images"  # TINY's data
    photos = report.parent / "photos"
    link([images / f"{image_id}.jpg" for image_id in expected], photos)
    return photos, expected


# ----------------------------------------------------------------------------- agreement


@pytest.mark.slow
def test_predict_gives_evaluate_pys_predictions_file_by_file(model_dir, evaluated, tmp_path):
    photos, expected = evaluated
    result = ok(predict_in_process(["--model_dir", model_dir, photos, "--output", tmp_path / "p.csv",
                                    "--batch_size", "16", "--num_workers", "0"]))
    assert "1 process(es)" in result.stdout
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == TOP5_COLUMNS
    assert [row["path"] for row in rows] == sorted(str(p) for p in photos.iterdir())  # input order
    assert len(rows) == len(expected) == 96
    for row in rows:
        evaluation = expected[Path(row["path"]).stem]
        assert row["label"] == evaluation["predicted"], row["path"]
        assert float(row["probability"]) == pytest.approx(float(evaluation["confidence"]), abs=CSV_ROUNDING)
        assert row["error"] == ""
        assert len({row[f"label_{rank}"] for rank in range(2, 6)} | {row["label"]}) == 5
    # the five probabilities, against the model run by hand, to the 6 decimals written
    reference = np.sort(by_hand(model_dir, [row["path"] for row in rows]), axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose([ranked_probabilities(row, 5) for row in rows], reference, atol=1e-5)

    # timm's local-dir: on the same folder loads the same model, classes and transform; the
    # run's last checkpoint holds the same weights (no validation split: model/ is the last step)
    for name, source in (("timm", f"local-dir:{model_dir}"),
                         ("checkpoint", model_dir.parent / "checkpoints/step_00000024")):
        ok(predict_in_process(["--model_dir", source, photos, "--output", tmp_path / f"{name}.csv",
                               "--batch_size", "16", "--num_workers", "0"]))
        assert read_csv(tmp_path / f"{name}.csv") == rows, name


@pytest.mark.slow
@pytest.mark.cluster  # several processes: pytest -m cluster
def test_two_processes_give_every_image_once_in_input_order(model_dir, evaluated, env, tmp_path):
    """96 images and a broken file, batch 7 on 2 processes: 97 is no multiple of 14, so the
    sampler repeats images to even out the last batch; the rows have each image once."""
    photos, _ = evaluated
    broken = tmp_path / "broken" / "notes.jpg"
    broken.parent.mkdir()
    broken.write_text("not a photo\n")
    args = ["--model_dir", model_dir, photos, broken, "--batch_size", "7", "--num_workers", "0"]
    ok(predict_in_process([*args, "--output", tmp_path / "one.csv"]))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    two = subprocess.run([*torchrun, str(ROOT / "predict.py"), *map(str, args), "--output",
                          str(tmp_path / "two.csv")],
                         env={**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    one, two_rows = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    paths = [row["path"] for row in two_rows]
    assert paths == [row["path"] for row in one] == [*sorted(str(p) for p in photos.iterdir()), str(broken)]
    assert len(set(paths)) == 97
    labels = [f"label{'' if rank == 1 else f'_{rank}'}" for rank in range(1, 6)]
    assert [[row[c] for c in (*labels, "error")] for row in two_rows] == \
        [[row[c] for c in (*labels, "error")] for row in one]
    assert two_rows[-1]["error"] == "not an image PIL can read" and two_rows[-1]["label"] == ""
    np.testing.assert_allclose([ranked_probabilities(row, 5) for row in two_rows[:-1]],
                               [ranked_probabilities(row, 5) for row in one[:-1]], atol=1e-5)


# ----------------------------------------------------------------------------- inputs and outputs


def broken_png() -> bytes:
    """A PNG whose header and end are sound but whose pixel data is not: only decoding finds it."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2:len(data) // 2 + 200] = bytes(200)
    return bytes(data)


@pytest.mark.slow
def test_an_unreadable_file_gets_its_row_with_the_reason(model_dir, evaluated, tmp_path):
    photos, _ = evaluated
    good = link(sorted(photos.iterdir())[:3], tmp_path / "in")
    cut = good[0].read_bytes()
    (tmp_path / "in/cut.jpg").write_bytes(cut[:len(cut) // 2])  # a JPEG cut off in its pixel data
    (tmp_path / "in/notes.jpg").write_text("a text file named .jpg\n")
    (tmp_path / "in/empty.jpg").write_bytes(b"")
    (tmp_path / "in/broken.png").write_bytes(broken_png())
    # one loader worker: a file that fails to decode there must not end the worker or the run
    result = ok(predict_in_process(["--model_dir", model_dir, tmp_path / "in", "--output", tmp_path / "p.csv",
                                    "--num_workers", "1"]))
    rows = {Path(row["path"]).name: row for row in read_csv(tmp_path / "p.csv")}
    assert list(rows) == sorted(p.name for p in (tmp_path / "in").iterdir())  # none left out
    reasons = {"cut.jpg": "truncated JPEG", "notes.jpg": "not an image PIL can read",
               "empty.jpg": "empty file", "broken.png": "can't be decoded (broken data stream"}
    for name, reason in reasons.items():
        assert rows[name]["error"].startswith(reason), rows[name]
        assert rows[name]["label"] == rows[name]["probability"] == rows[name]["label_5"] == ""
        assert f"could not read {tmp_path / 'in' / name}" in result.stdout
    reference = by_hand(model_dir, good)
    for path, probabilities in zip(good, reference):
        row = rows[path.name]
        assert row["error"] == "" and row["label"] == CAT_BREEDS[probabilities.argmax()]
        assert float(row["probability"]) == pytest.approx(probabilities.max(), abs=1e-5)


@pytest.mark.slow
def test_top_k_is_capped_and_json_jsonl_folders_and_globs(model_dir, evaluated, tmp_path):
    photos, _ = evaluated
    sources = sorted(photos.iterdir())
    link(sources[:1], tmp_path / "a")
    link(sources[1:2], tmp_path / "a/sub/deeper")
    Image.open(sources[2]).save(tmp_path / "a/sub/c.png")  # another format, found by its extension
    (tmp_path / "a/readme.txt").write_text("not an image: a folder yields images only\n")
    link(sources[3:5], tmp_path / "g")
    Image.open(sources[5]).save(tmp_path / "g/skipped.png")
    a = tmp_path / "a"
    # the folder (recursive, sorted by path components: a/Abyssinian_... < a/sub/...), then the
    # glob (sorted); a file named again is kept once, where it came first
    expected = [a / sources[0].name, a / "sub/c.png", a / "sub/deeper" / sources[1].name,
                tmp_path / "g" / sources[3].name, tmp_path / "g" / sources[4].name]
    args = ["--model_dir", model_dir, a, tmp_path / "g/*.jpg", a / sources[0].name, "--top_k", "50",
            "--num_workers", "0"]
    ok(predict_in_process([*args, "--output", tmp_path / "p.json"]))
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [row["path"] for row in rows] == [str(p) for p in expected]
    assert list(rows[0]) == ["path", *[f"{name}{'' if k == 1 else f'_{k}'}" for k in range(1, 13)
                                       for name in ("label", "probability")], "error"]  # 12 classes
    for row, probabilities in zip(rows, by_hand(model_dir, expected)):
        assert row["error"] is None
        assert {row["label"], *(row[f"label_{k}"] for k in range(2, 13))} == set(CAT_BREEDS)
        assert ranked_probabilities(row, 12) == pytest.approx(sorted(probabilities)[::-1], abs=1e-5)
    ok(predict_in_process([*args, "--output", tmp_path / "out/p.jsonl"]))  # a new folder is made
    lines = (tmp_path / "out/p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


@pytest.mark.slow
def test_tta_flip_is_the_mean_of_both_softmaxes_in_predict_and_evaluate(model_dir, evaluated, tmp_path):
    """Without the option evaluate.py refuses --tta (unknown key, exit 2) and predict.py gives the
    plain softmax, which differs from the mean with the mirror's by more than the tolerance."""
    photos, _ = evaluated
    paths = sorted(photos.iterdir())
    plain, flipped = by_hand(model_dir, paths), by_hand(model_dir, paths, flip=True)
    assert np.abs(plain - flipped).max(axis=1).mean() > 1e-3  # the mirror really changes the output

    ok(predict_in_process(["--model_dir", model_dir, *paths[:12], "--tta", "flip", "--output",
                           tmp_path / "p.csv", "--num_workers", "0"]))
    rows = read_csv(tmp_path / "p.csv")
    assert [row["label"] for row in rows] == [CAT_BREEDS[i] for i in flipped[:12].argmax(axis=1)]
    np.testing.assert_allclose([ranked_probabilities(row, 5) for row in rows],
                               np.sort(flipped[:12], axis=1)[:, ::-1][:, :5], atol=1e-5)

    ok(evaluate_in_process(["--model_dir", str(model_dir), "--tta", "flip", "--gradcam_images", "0",
                            "--num_workers", "0", "--output_dir", str(tmp_path / "report")]))
    by_id = {path.stem: (plain[i], flipped[i]) for i, path in enumerate(paths)}
    evaluation = read_csv(tmp_path / "report/predictions.csv")
    assert len(evaluation) == 96
    for row in evaluation:
        _, mean = by_id[row["image_id"]]
        assert row["predicted"] == CAT_BREEDS[mean.argmax()], row
        assert float(row["confidence"]) == pytest.approx(mean.max(), abs=CSV_ROUNDING)
    # and the plain confidences would not pass: they differ by more than the rounding
    assert max(abs(float(row["confidence"]) - by_id[row["image_id"]][0].max()) for row in evaluation) > 1e-3


@pytest.mark.slow
def test_gradcam_writes_one_overlay_per_readable_image(model_dir, evaluated, tmp_path):
    photos, _ = evaluated
    link(sorted(photos.iterdir())[:3], tmp_path / "in")
    (tmp_path / "in/Zz_notes.jpg").write_text("not a photo\n")  # sorted last: row 4
    result = ok(predict_in_process(["--model_dir", model_dir, tmp_path / "in", "--gradcam", tmp_path / "cams",
                                    "--output", tmp_path / "p.csv", "--num_workers", "0"]))
    rows = read_csv(tmp_path / "p.csv")
    assert [row["error"] != "" for row in rows] == [False, False, False, True]
    names = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert names == [f"{i}_{Path(row['path']).stem}.png" for i, row in enumerate(rows[:3], start=1)]
    assert "wrote 3 Grad-CAM overlay(s)" in result.stdout
    for name in names:
        with Image.open(tmp_path / "cams" / name) as overlay:
            assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (64, 64)


# ----------------------------------------------------------------------------- bad input


BAD_INPUTS = {
    # name: (arguments, fragments of the one error sentence)
    "a glob without matches": (["--model_dir", "{model}", "{photo}", "{tmp}/nowhere/*.jpg"],
                               ["inputs:", "nowhere/*.jpg", "matches no image"]),
    "a missing file": (["--model_dir", "{model}", "{tmp}/missing.jpg"], ["missing.jpg", "matches no image"]),
    "a folder without images": (["--model_dir", "{model}", "{tmp}/empty"], ["empty", "matches no image"]),
    "no images at all": (["--model_dir", "{model}"], ["inputs:", "no images given"]),
    "no model_dir": (["{photo}"], ["model_dir: required"]),
    "a missing model folder": (["--model_dir", "{tmp}/nowhere", "{photo}"], ["model_dir:", "not a folder"]),
    "a model without weights": (["--model_dir", "{tmp}/no-weights", "{photo}"], ["model_dir:", "no weights"]),
    "a model without classes": (["--model_dir", "{tmp}/no-classes", "{photo}"], ["model_dir:", "no classes"]),
    "a Hub model offline": (["--model_dir", "hf-hub:nobody/no-such-pets-model", "{photo}"],
                            ["hf-hub:nobody/no-such-pets-model", "HF_HUB_OFFLINE"]),
    "top_k 0": (["--model_dir", "{model}", "{photo}", "--top_k", "0"], ["top_k:", ">= 1"]),
    "tta unknown": (["--model_dir", "{model}", "{photo}", "--tta", "crop"], ["tta:", "none, flip"]),
    "an output folder": (["--model_dir", "{model}", "{photo}", "--output", "{tmp}/folder.csv"],
                         ["output:", "is a folder"]),
    "an output under a file": (["--model_dir", "{model}", "{photo}", "--output", "{photo}/sub/p.csv"],
                               ["output:", "can't be created", "is a file"]),
    "a read-only output folder": (["--model_dir", "{model}", "{photo}", "--output", "{read_only}/p.csv"],
                                  ["output:", "can't be written"]),
    "an output of another type": (["--model_dir", "{model}", "{photo}", "--output", "{tmp}/p.txt"],
                                  ["output:", ".txt", ".csv, .json or .jsonl"]),
    "a gradcam folder that is a file": (["--model_dir", "{model}", "{photo}", "--gradcam", "{photo}"],
                                        ["gradcam:", "is a file"]),
}


@pytest.fixture
def bad_input_places(tmp_path):
    """The paths BAD_INPUTS names: a photo, a model folder that passes the checks before torch
    (its weights are an empty file: loading it would fail differently), broken model folders."""
    Image.new("RGB", (40, 30), (200, 120, 40)).save(tmp_path / "photo.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder.csv").mkdir()
    description = {"architecture": "test_efficientnet", "num_classes": 2, "label_names": ["a", "b"],
                   "pretrained_cfg": {"input_size": [3, 32, 32]}}
    for name, config, weights in (("model", description, True), ("no-weights", description, False),
                                  ("no-classes", {**description, "label_names": None}, True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        if weights:
            (tmp_path / name / "model.safetensors").write_bytes(b"")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through permission bits; sysfs takes no new files, even from root
        read_only = Path("/sys")
    yield {"tmp": tmp_path, "photo": tmp_path / "photo.jpg", "model": tmp_path / "model",
           "read_only": read_only}
    (tmp_path / "read-only").chmod(0o755)


def bad_input_argv(name: str, places: dict) -> list[str]:
    return [arg.format(**places) for arg in BAD_INPUTS[name][0]]


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_ends_in_one_sentence_and_exit_2(name, bad_input_places):
    refused(predict_in_process(bad_input_argv(name, bad_input_places)), *BAD_INPUTS[name][1])


def test_bad_input_is_refused_before_torch_is_imported(bad_input_places, env):
    """Every case of BAD_INPUTS in one fresh interpreter: exit 2 each time, and torch, timm and
    datasets never imported."""
    cases = [bad_input_argv(name, bad_input_places) for name in BAD_INPUTS]
    probe = (f"import runpy, sys\ncodes = []\nfor argv in {cases!r}:\n    sys.argv = ['predict.py', *argv]\n"
             "    try:\n        runpy.run_path('predict.py', run_name='__main__')\n"
             "    except SystemExit as e:\n        codes.append(e.code)\n"
             "print(codes, sorted(m for m in ('torch', 'timm', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == f"{[2] * len(cases)} []", result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == len(cases)  # one sentence a case
