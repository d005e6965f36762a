"""The report's building blocks: local `evaluate` metrics, the figures, Grad-CAM.

The evaluate metrics run in one subprocess with the Hub switched off and an empty HF_HOME:
that is how a compute node without internet sees them (evaluate reads those variables at
import), and it keeps evaluate's module cache out of the user's home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pet_pipeline import plots
from pet_pipeline.breeds import BREEDS, CAT_BREEDS
from pet_pipeline.gradcam import compute_gradcams, denormalize, gradcam_setup

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_LISTS = {12: list(CAT_BREEDS), 37: list(BREEDS)}


def fixed_predictions(k: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predicted, probabilities), ~60% right; class k-1 is never a label nor a
    prediction, so averaging over the classes seen differs from averaging over all k."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k - 1, size=n)
    probabilities = rng.dirichlet(np.ones(k), size=n)
    boost = rng.random(n) < 0.6
    probabilities[boost, labels[boost]] += 1.0
    probabilities[:, k - 1] *= 0.01  # a score but never the top one
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return labels, probabilities.argmax(axis=1), probabilities


NEVER_PREDICTED, NEVER_PRESENT = 1, 2  # in predictions_with_gaps; and k-1 is neither


def predictions_with_gaps(k: int = 12, n: int = 240, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) where precision, recall or both divide by zero for some class."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([c for c in range(k - 1) if c != NEVER_PRESENT], size=n)
    probabilities = rng.dirichlet(np.ones(k), size=n)
    boost = rng.random(n) < 0.6
    probabilities[boost, labels[boost]] += 1.0
    probabilities[:, [NEVER_PREDICTED, k - 1]] *= 0.01  # a score but never the top one
    probabilities[rng.random(n) < 0.1, NEVER_PRESENT] += 3.0
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return labels, probabilities


def assert_png(path: Path, min_width: int = 300, min_height: int = 200) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 6000 and min_height <= height <= 6000, (width, height)
    return width, height


# ------------------------------------------------------------------ evaluate metrics

OFFLINE_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import pet_pipeline.metrics
from pet_pipeline.evaluation import Predictions, compute_metrics, write_report
from pet_pipeline.metrics import compute_with_evaluate, load_metric, save_results

loads = []  # every evaluate.load of this process, by metric folder name
real_load = pet_pipeline.metrics.evaluate.load
def counting_load(path, *args, **kwargs):
    loads.append(Path(path).name)
    return real_load(path, *args, **kwargs)
pet_pipeline.metrics.evaluate.load = counting_load
data = np.load(f"{sys.argv[1]}/predictions_12.npz")
twelve = Predictions(data["probabilities"], data["labels"], np.arange(len(data["labels"])))
out = {"loads": {}}
first = compute_metrics(twelve, [f"breed_{i}" for i in range(12)])
out["loads"]["first"] = list(loads)
out["loads"]["same"] = compute_metrics(twelve, [f"breed_{i}" for i in range(12)]) == first
out["loads"]["second"] = list(loads)

data = np.load(f"{sys.argv[1]}/gaps.npz")
write_report(sys.argv[1] + "/report", Predictions(data["probabilities"], data["labels"],
                                                  np.arange(len(data["labels"]))),
             [f"breed_{i}" for i in range(12)], [f"image_{i}" for i in range(len(data["labels"]))])
for k in (3, 12, 37):
    data = np.load(f"{sys.argv[1]}/predictions_{k}.npz")
    out[k] = compute_with_evaluate(data["labels"], data["predicted"], data["probabilities"])
data = np.load(f"{sys.argv[1]}/predictions_12.npz")
out["per_class"] = load_metric("precision_recall_f1").compute(
    predictions=data["predicted"], references=data["labels"], average=None, labels=list(range(12)))
try:
    load_metric("bleu")
except ValueError as e:
    out["unknown"] = str(e)
out["saved_default"] = str(save_results(sys.argv[1] + "/saved", out[12]))
out["saved_named"] = str(save_results(sys.argv[1] + "/saved", {**out[12], "n": np.int64(300)},
                                      file_name="metrics.json"))
out["loads"]["end"] = list(loads)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def offline_results(tmp_path_factory):
    """What the local metric modules compute with HF_HUB/DATASETS/EVALUATE_OFFLINE=1 and an
    empty HF_HOME."""
    work = tmp_path_factory.mktemp("evaluate-offline")
    for k in (3, 12, 37):
        labels, predicted, probabilities = fixed_predictions(k)
        np.savez(work / f"predictions_{k}.npz", labels=labels, predicted=predicted,
                 probabilities=probabilities)
    labels, probabilities = predictions_with_gaps()
    np.savez(work / "gaps.npz", labels=labels, probabilities=probabilities)
    hf_home = work / "hf-home"
    hf_home.mkdir()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "EVALUATE_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("HF_MODULES_CACHE", "HF_EVALUATE_CACHE", "HF_METRICS_CACHE", "HF_DATASETS_CACHE"):
        env.pop(key, None)  # everything must come from the empty HF_HOME
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), work


@pytest.mark.parametrize("k", [12, 37])
def test_local_evaluate_metrics_equal_sklearn(offline_results, k):
    results = offline_results[0][str(k)]
    labels, predicted, probabilities = fixed_predictions(k)
    all_classes = list(range(k))
    expected = {"accuracy": accuracy_score(labels, predicted),
                "top5_accuracy": top_k_accuracy_score(labels, probabilities, k=5, labels=all_classes)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=all_classes,
                                                     average=average, zero_division=0)
        expected.update({f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f})
    assert set(results) == set(expected)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    # the absent class k-1 counts in the macro average: differs from sklearn's default labels
    seen_only = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)[2]
    assert results["macro_f1"] != pytest.approx(seen_only)


def test_local_evaluate_per_class_and_small_k(offline_results):
    results = offline_results[0]
    labels, predicted, _ = fixed_predictions(12)
    p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=list(range(12)), zero_division=0)
    np.testing.assert_allclose(results["per_class"]["precision"], p)
    np.testing.assert_allclose(results["per_class"]["recall"], r)
    np.testing.assert_allclose(results["per_class"]["f1"], f)
    np.testing.assert_array_equal(results["per_class"]["support"], np.bincount(labels, minlength=12))
    assert "top5_accuracy" not in results["3"]  # top-5 of 3 classes says nothing
    assert "bleu" in results["unknown"] and "accuracy" in results["unknown"]


def test_report_figures_equal_sklearn_on_the_samples(offline_results):
    """metrics.json and confusion_matrix.csv of write_report, which derives its figures from
    one confusion matrix, against scikit-learn run on the samples themselves."""
    from pet_pipeline.evaluation import read_confusion_matrix_csv

    work = offline_results[1]
    labels, probabilities = predictions_with_gaps()
    predicted, k = probabilities.argmax(axis=1), probabilities.shape[1]
    all_classes = list(range(k))
    assert NEVER_PREDICTED in labels and NEVER_PREDICTED not in predicted
    assert NEVER_PRESENT in predicted and NEVER_PRESENT not in labels
    assert k - 1 not in labels and k - 1 not in predicted
    saved = json.loads((work / "report" / "metrics.json").read_text())

    expected = {"n": len(labels), "accuracy": accuracy_score(labels, predicted),
                "top5_accuracy": top_k_accuracy_score(labels, probabilities, k=5, labels=all_classes)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=all_classes,
                                                     average=average, zero_division=0)
        expected.update({f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f})
    assert {key: saved[key] for key in expected} == expected  # exactly, not approximately
    p, r, f, support = precision_recall_fscore_support(labels, predicted, labels=all_classes,
                                                       zero_division=0)
    assert saved["per_class"] == {
        f"breed_{i}": {"precision": p[i], "recall": r[i], "f1": f[i], "support": support[i]}
        for i in all_classes}
    assert saved["per_class"][f"breed_{NEVER_PREDICTED}"]["precision"] == 0.0
    assert saved["per_class"][f"breed_{NEVER_PRESENT}"]["recall"] == 0.0
    assert saved["per_class"][f"breed_{k - 1}"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    matrix, names = read_confusion_matrix_csv(work / "report" / "confusion_matrix.csv")
    np.testing.assert_array_equal(matrix, confusion_matrix(labels, predicted, labels=all_classes))
    assert names == [f"breed_{i}" for i in all_classes]


def test_metric_modules_are_loaded_once_a_process(offline_results):
    """Validation after validation, and the final report, reuse the modules loaded first."""
    loads = offline_results[0]["loads"]
    assert sorted(loads["first"]) == ["accuracy", "precision_recall_f1", "top_k_accuracy"]
    assert loads["second"] == loads["first"], "a second compute_metrics loaded the metric modules again"
    assert loads["same"]
    assert loads["end"] == loads["first"], "write_report, compute_with_evaluate or load_metric loaded again"


def test_save_results_writes_evaluate_json(offline_results):
    results, work = offline_results
    default, named = Path(results["saved_default"]), Path(results["saved_named"])
    assert default.parent == work / "saved" and default.name.startswith("result-")
    assert default.suffix == ".json"
    assert named == work / "saved" / "metrics.json"
    saved = json.loads(named.read_text())
    assert saved["accuracy"] == results["12"]["accuracy"] and saved["n"] == 300
    for key in ("_timestamp", "_git_commit_hash", "_evaluate_version", "_python_version"):
        assert key in saved
    assert not list((work / "saved").glob("*.lock"))


def test_save_results_outside_a_git_checkout_prints_no_git_error(tmp_path):
    """evaluate.save asks git for the commit; outside a checkout git's "fatal: not a git
    repository" used to land in every run's log."""
    root = Path(__file__).resolve().parents[1]
    script = ("import sys; from pet_pipeline.metrics import save_results; "
              "print(save_results(sys.argv[1], {'accuracy': 0.5}, file_name='m.json'))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fatal" not in result.stderr and "git" not in result.stderr, result.stderr
    saved = json.loads((tmp_path / "out" / "m.json").read_text())
    assert saved["accuracy"] == 0.5 and saved["_git_commit_hash"] is None


# ------------------------------------------------------------------ figures

def confusion(k: int, seed: int = 0) -> np.ndarray:
    labels, predicted, _ = fixed_predictions(k, n=20 * k, seed=seed)
    return confusion_matrix(labels, predicted, labels=list(range(k)))


def test_confusion_matrix_png_for_12_and_37_classes(tmp_path):
    import matplotlib.pyplot as plt

    sizes = {}
    for k, names in CLASS_LISTS.items():
        path = plots.plot_confusion_matrix(confusion(k), names, tmp_path / f"cm_{k}.png")
        assert path == tmp_path / f"cm_{k}.png"
        sizes[k] = assert_png(path, min_width=800, min_height=400)
    assert sizes[37][0] > sizes[12][0] and sizes[37][1] > sizes[12][1]
    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_confusion_matrix_with_an_empty_row(tmp_path):
    matrix = confusion(12)
    matrix[3] = 0  # a class without samples: normalised row of zeros, no NaN warning
    assert_png(plots.plot_confusion_matrix(matrix, CLASS_LISTS[12], tmp_path / "cm.png"))


def metrics_records(with_val: bool) -> list[dict]:
    records = []
    for step in range(1, 41):
        records.append({"step": step, "epoch": step // 10, "train_loss": 2.0 / step, "lr": 1e-3 * step / 40,
                        "images_per_s": 100.0})
        if with_val and step % 10 == 0:
            records.append({"step": step, "epoch": step // 10, "val_accuracy": step / 45,
                            "val_macro_f1": step / 50})
    records.append({"step": 40, "test_accuracy": 0.8, "test_macro_f1": 0.78})
    return records


@pytest.mark.parametrize("records", [metrics_records(True), metrics_records(False), []],
                         ids=["with-val", "no-val", "empty"])
def test_training_curves_png(tmp_path, records):
    assert_png(plots.plot_training_curves(records, tmp_path / "curves.png"), min_width=1000)


def photos(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("k", [12, 37])
def test_prediction_samples_png(tmp_path, k):
    names = CLASS_LISTS[k]
    true = [names[(7 * i) % k] for i in range(10)]
    predicted = [t if i % 3 else names[(7 * i + 1) % k] for i, t in enumerate(true)]
    path = plots.plot_prediction_samples(photos(10), true, predicted, np.linspace(0.2, 0.99, 10),
                                         tmp_path / "samples.png")
    width, height = assert_png(path)
    assert width > height  # 5 columns x 2 rows
    assert_png(plots.plot_prediction_samples(photos(3), true[:3], predicted[:3], [0.5] * 3,
                                             tmp_path / "three.png"), min_width=200)


@pytest.mark.parametrize("k", [12, 37])
def test_gradcam_gallery_png(tmp_path, k):
    names = CLASS_LISTS[k]
    images = [np.random.default_rng(i).random((32, 32, 3), dtype=np.float32) for i in range(4)]
    cams = [np.outer(np.hanning(16), np.hanning(16))] * 4  # another size than the images: resized
    true, predicted = names[:4], [names[-1], names[-2], names[2], names[0]]
    assert_png(plots.plot_gradcam_gallery(images, cams, plots.Guesses(true, predicted, [0.9, 0.8, 0.7, 0.6]),
                                          tmp_path / "gallery.png"))
    assert_png(plots.plot_gradcam_gallery(photos(2), [np.zeros((5, 5))] * 2,
                                          plots.Guesses(true[:2], predicted[:2], [0.5, 0.5]),
                                          tmp_path / "pil.png"), min_width=200)
    assert_png(plots.plot_gradcam_gallery([], [], plots.Guesses([], [], []), tmp_path / "none.png"),
               min_width=200)


# ------------------------------------------------------------------ Grad-CAM

SIZE = 64  # px; CoAtNet and ViT are built for it, the CNNs take any size

GRADCAM_MODELS = {
    # name: (create_model kwargs, the target layer gradcam_setup must pick)
    "coatnet_nano_rw_224": (dict(img_size=SIZE), lambda m: m.stages[-1]),
    "resnet18": ({}, lambda m: m.layer4[-1]),
    "vit_tiny_patch16_224": (dict(img_size=SIZE), lambda m: m.blocks[-1].norm1),
    "convnext_atto": ({}, lambda m: m.stages[-1]),
}


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU the threads'
    contention made these tests ~20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", list(GRADCAM_MODELS))
def test_gradcams_on_tiny_models(name, one_torch_thread):
    kwargs, expected_layer = GRADCAM_MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=12, **kwargs)
    target_layers, reshape_transform = gradcam_setup(model)
    assert target_layers == [expected_layer(model)]
    assert (reshape_transform is not None) == name.startswith("vit")

    # The target layer's output, after the reshape, is an NCHW map with the model's width.
    seen = []
    handle = target_layers[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
    pixel_values = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        model.eval()
        target_classes = model(pixel_values).argmax(dim=1).tolist()
    handle.remove()
    features = reshape_transform(seen[0]) if reshape_transform else seen[0]
    assert features.dim() == 4 and features.shape[:2] == (3, model.num_features)

    model.train()
    with torch.no_grad():  # as when called right after predict(): Grad-CAM still gets gradients
        cams = compute_gradcams(model, pixel_values, target_classes)
    assert cams.shape == (3, SIZE, SIZE) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    # A map without spatial variation would mean the layer carries no spatial signal.
    assert (cams.reshape(3, -1).std(axis=1) > 1e-3).all()
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no stray gradients left


def test_coatnet_below_64_px_localises_with_the_stage_before(one_torch_thread):
    """At 32 px CoAtNet's last stage is 1x1: its heat map would be flat."""
    torch.manual_seed(0)
    model = timm.create_model("coatnet_nano_rw_224", pretrained=False, num_classes=12, img_size=32)
    assert gradcam_setup(model, input_size=(3, 32, 32))[0] == [model.stages[-2]]
    assert gradcam_setup(model, input_size=(3, 64, 64))[0] == [model.stages[-1]]
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # the predicted classes: the ones with positive evidence somewhere
        target_classes = model.eval()(pixel_values).argmax(dim=1).tolist()
    cams = compute_gradcams(model, pixel_values, target_classes)
    assert cams.shape == (3, 32, 32)
    assert (cams.reshape(3, -1).std(axis=1) > 1e-3).all()


class ChannelsLastNet(torch.nn.Module):
    """Not a known family; its features are channels-last (B, H, W, C), as in Swin."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 32 px -> (B, 8, 16, 16)
        self.to_nhwc = torch.nn.Identity()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        features = self.to_nhwc(self.conv(x).permute(0, 2, 3, 1))
        return self.fc(self.pool(features.permute(0, 3, 1, 2)).flatten(1))


class PlainNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)  # (B, 8, 1, 1): 4-D, but no map left
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_gradcam_fallback_finds_last_spatial_map(one_torch_thread):
    torch.manual_seed(0)
    plain = PlainNet()
    target_layers, reshape_transform = gradcam_setup(plain, input_size=(3, 32, 32))
    assert target_layers == [plain.features] and reshape_transform is None
    cams = compute_gradcams(plain, torch.randn(2, 3, 32, 32), [0, 1])
    assert cams.shape == (2, 32, 32)

    channels_last = ChannelsLastNet()
    target_layers, reshape_transform = gradcam_setup(channels_last, input_size=(3, 32, 32))
    assert target_layers == [channels_last.to_nhwc]
    assert reshape_transform(torch.zeros(1, 16, 16, 8)).shape == (1, 8, 16, 16)
    assert compute_gradcams(channels_last, torch.randn(2, 3, 32, 32), [0, 1]).shape == (2, 32, 32)


def test_denormalize_inverts_the_eval_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.rand(2, 3, 8, 6)
    normalised = (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    batch = denormalize(normalised, mean, std)
    assert batch.shape == (2, 8, 6, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    single = denormalize(normalised[0], mean, std)
    assert single.shape == (8, 6, 3)
    assert denormalize(normalised * 10, mean, std).max() <= 1.0  # clipped for overlays
