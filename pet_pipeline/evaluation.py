"""One evaluation, used for validation during training, the final test report and evaluate.py.

`predict` runs the model over a prepared DataLoader and gathers logits, labels and dataset
indices from every rank with `gather_for_metrics`, which drops the samples that the
distributed sampler repeated to even out the last batch: every sample counts exactly once.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from pet_pipeline.files import replaced
from pet_pipeline.metrics import compute_with_evaluate, per_class_scores, save_results

if TYPE_CHECKING:
    import datasets

    from pet_pipeline.plots import Guesses

STOPPED = "stopped"  # what evaluate_and_report returns when a stop signal interrupted it


@dataclass
class Predictions:
    probabilities: np.ndarray  # (n, K) softmax outputs
    labels: np.ndarray  # (n,) true class indices
    indices: np.ndarray  # (n,) row in the evaluated datasets.Dataset
    # rows whose image could not be read during the evaluation: left out of the above
    unreadable: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def class_probabilities(model, pixel_values: torch.Tensor, accelerator, *, tta: str = "none") -> torch.Tensor:
    """Softmax over the classes, float32 (N, K), under the accelerator's mixed precision.

    tta "flip": the mean of the softmax of each image and of its horizontal mirror (a mirrored
    photo shows the same pet). Two forward passes of the batch rather than one of twice its
    size, so that the memory a batch needs stays what `batch_size` says.
    """
    with accelerator.autocast():
        logits = model(pixel_values)
    probabilities = logits.float().softmax(dim=1)
    if tta == "flip":
        with accelerator.autocast():
            mirrored = model(pixel_values.flip(-1))
        probabilities = (probabilities + mirrored.float().softmax(dim=1)) / 2
    return probabilities


@torch.no_grad()
def predict(model, loader, accelerator, *, should_stop=None, tta: str = "none") -> Predictions | None:
    """Predictions for every sample of `loader`, identical on every rank.

    `should_stop(batch_number)` is asked after every batch (all ranks together, numbers from
    1); when it says yes the evaluation is abandoned and None is returned, so a preemption
    signal is not missed. `tta`: see class_probabilities.
    """
    was_training = model.training
    model.eval()
    columns = [], [], [], []  # probabilities, labels, indices, unreadable flags
    for number, batch in enumerate(loader, start=1):
        gathered = accelerator.gather_for_metrics(
            (class_probabilities(model, batch["pixel_values"], accelerator, tta=tta),
             batch["label"], batch["index"], batch["unreadable"])
        )
        for store, value in zip(columns, gathered):
            store.append(value.cpu())
        if should_stop is not None and should_stop(number):
            model.train(was_training)
            return None
    model.train(was_training)
    probabilities, labels, indices, unreadable = (torch.cat(column).numpy() for column in columns)
    read = unreadable < 0  # an image that could not be read is left out, and named in the report
    return Predictions(probabilities=probabilities[read].astype(np.float64), labels=labels[read],
                       indices=indices[read], unreadable=np.sort(indices[~read]))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def class_confusion_matrix(predictions: Predictions, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows true and columns predicted, every class of the model included."""
    return confusion_matrix(predictions.labels, predictions.predicted, labels=list(range(num_classes)))


def compute_metrics(predictions: Predictions, class_names: list[str], top_confused: int = 10, *,
                    matrix: np.ndarray | None = None) -> dict:
    """Accuracy, top-5, macro/weighted P/R/F1, per class, most-confused pairs, ECE.

    `matrix`: the class_confusion_matrix of `predictions`, when the caller has it already.
    """
    k = len(class_names)
    if matrix is None:
        matrix = class_confusion_matrix(predictions, k)
    metrics = {"n": int(len(predictions.labels))}
    # headline numbers through `evaluate`, with the metric scripts shipped in the package
    metrics.update(compute_with_evaluate(predictions.labels, predictions.predicted,
                                         predictions.probabilities, matrix=matrix))
    scores = per_class_scores(matrix)
    metrics["per_class"] = {
        name: {"precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
               "f1": float(scores["f1"][i]), "support": int(scores["support"][i])}
        for i, name in enumerate(class_names)
    }
    off_diagonal = [(int(matrix[i, j]), class_names[i], class_names[j])
                    for i in range(k) for j in range(k) if i != j and matrix[i, j] > 0]
    metrics["most_confused"] = [
        {"true": t, "predicted": p_, "count": c}
        for c, t, p_ in sorted(off_diagonal, key=lambda x: (-x[0], x[1], x[2]))[:top_confused]
    ]
    metrics["expected_calibration_error"] = expected_calibration_error(
        predictions.probabilities, predictions.labels)
    return metrics


def write_confusion_matrix_csv(path: Path, matrix: np.ndarray, class_names: list[str]) -> None:
    """Rows are true classes, columns predicted; class names as headers."""
    with replaced(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *class_names])
        for name, row in zip(class_names, matrix):
            writer.writerow([name, *map(int, row)])


def read_confusion_matrix_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[int(v) for v in row[1:]] for row in rows[1:]]), rows[0][1:]


def write_report(out_dir: str | Path, predictions: Predictions, class_names: list[str],
                 image_ids: list[str], *, matrix: np.ndarray | None = None) -> dict:
    """eval/metrics.json, confusion_matrix.csv, predictions.csv, classification_report.txt.

    `matrix`: the class_confusion_matrix of `predictions`, when the caller has it already.
    """
    from sklearn.metrics import classification_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if matrix is None:
        matrix = class_confusion_matrix(predictions, len(class_names))
    metrics = compute_metrics(predictions, class_names, matrix=matrix)
    # images that could not be read when evaluated (after the start-up scan): not in n
    metrics["unreadable"] = [image_ids[i] for i in predictions.unreadable]
    _save_metrics(out_dir / "metrics.json", metrics)
    write_confusion_matrix_csv(out_dir / "confusion_matrix.csv", matrix, class_names)
    with replaced(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "true", "predicted", "confidence"])
        for i in np.argsort(predictions.indices, kind="stable"):
            writer.writerow([image_ids[predictions.indices[i]], class_names[predictions.labels[i]],
                             class_names[predictions.predicted[i]],
                             f"{predictions.probabilities[i].max():.4f}"])
    # from the samples, not the matrix's weighted cells: with weights its support column
    # would print as floats (21.0)
    report = classification_report(predictions.labels, predictions.predicted,
                                   labels=list(range(len(class_names))),
                                   target_names=class_names, digits=4, zero_division=0)
    with replaced(out_dir / "classification_report.txt") as f:
        f.write(report)
    return metrics


def _save_metrics(path: Path, metrics: dict) -> None:
    """metrics.json with evaluate's system info, written aside and renamed into place."""
    import os

    from pet_pipeline.files import write_failed

    aside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        os.replace(save_results(path.parent, metrics, file_name=aside.name), path)
    except OSError as error:
        aside.unlink(missing_ok=True)
        raise write_failed(error, path) from None


# ----------------------------------------------------------------------------- the full report


@dataclass
class ReportInputs:
    """What an evaluation's report is made of, and the folder it goes to."""

    out_dir: Path
    predictions: Predictions
    dataset: datasets.Dataset  # the evaluated images; predictions.indices are its rows
    class_names: list[str]
    data_config: dict  # the eval transform's: how the model saw the images
    image_ids: list[str]  # of `dataset`'s rows

    def pixels(self, positions: np.ndarray) -> torch.Tensor | None:
        """The model inputs of these positions in `predictions`."""
        return _model_inputs(self.dataset, self.predictions.indices[positions], self.data_config)

    def pictures(self, pixels: torch.Tensor) -> list[np.ndarray]:
        """Model inputs as images to show (HWC, [0, 1])."""
        from pet_pipeline.gradcam import denormalize

        return list(denormalize(pixels, self.data_config["mean"], self.data_config["std"]))

    def guesses(self, positions: np.ndarray) -> Guesses:
        """True class, predicted class and confidence of these positions in `predictions`."""
        from pet_pipeline.plots import Guesses

        predictions, names = self.predictions, self.class_names
        return Guesses(true_names=[names[i] for i in predictions.labels[positions]],
                       predicted_names=[names[i] for i in predictions.predicted[positions]],
                       confidences=predictions.probabilities[positions].max(axis=1))


def _sample_indices(predictions: Predictions, count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` positions for the sample grid: a fixed random draw, mistakes first."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(predictions.labels))
    wrong = predictions.predicted[order] != predictions.labels[order]
    return np.concatenate([order[wrong], order[~wrong]])[:count]


def _model_inputs(dataset, rows, data_config):
    """The eval-transformed tensors of dataset rows, as the model saw them."""
    from pet_pipeline.loader import PetTorchDataset
    from pet_pipeline.transforms import build_eval_transform, decode_size

    view = PetTorchDataset(dataset, build_eval_transform(data_config),
                           min_side=decode_size(data_config, None))
    return torch.stack([view[int(i)]["pixel_values"] for i in rows]) if len(rows) else None


def evaluate_and_report(model, loader, accelerator, *, data_config: dict, out_dir: str | Path,
                        dataset=None, class_names: list[str] | None = None, gradcam_images: int = 8,
                        sample_images: int = 10, step: int | None = None, should_stop=None,
                        tta: str = "none"):
    """Predict on every rank, then (main process) write the report and send it to the trackers.

    Files in `out_dir`: metrics.json, confusion_matrix.csv/.png, predictions.csv,
    classification_report.txt, prediction_samples.png, misclassified_gradcam.png.
    `dataset` is the datasets.Dataset that `loader` reads (by default the one behind its
    PetTorchDataset); `class_names` default to its label names.
    Returns the metrics on the main process, None elsewhere, and STOPPED on every rank when
    `should_stop()` said yes during prediction (a preemption signal). `tta`: "none", or "flip"
    (the mean of each image's and its mirror's softmax, see class_probabilities).
    """
    from pet_pipeline.plots import plot_confusion_matrix

    dataset = loader.dataset.source if dataset is None else dataset
    class_names = dataset.features["label"].names if class_names is None else class_names
    predictions = predict(model, loader, accelerator, should_stop=should_stop, tta=tta)
    if predictions is None:
        return STOPPED
    if not accelerator.is_main_process:
        return None
    report = ReportInputs(out_dir=Path(out_dir), predictions=predictions, dataset=dataset,
                          class_names=class_names, data_config=data_config,
                          image_ids=dataset["image_id"][:])
    # once: the metrics, the CSV and the plot all read this one
    matrix = class_confusion_matrix(predictions, len(class_names))
    metrics = write_report(report.out_dir, predictions, class_names, report.image_ids, matrix=matrix)
    plot_confusion_matrix(matrix, class_names, report.out_dir / "confusion_matrix.png")
    _plot_prediction_samples(report, sample_images)
    _plot_gradcams_of_mistakes(report, model, accelerator, gradcam_images)
    thumbnails = ({} if not any(t.name == "wandb" for t in accelerator.trackers)
                  else thumbnails_of_mistakes(dataset, predictions, data_config))
    log_report_to_trackers(accelerator, report, metrics, step=step, thumbnails=thumbnails)
    return metrics


def _plot_prediction_samples(report: ReportInputs, count: int) -> None:
    """prediction_samples.png: up to `count` images, mistakes first."""
    from pet_pipeline.plots import plot_prediction_samples

    shown = _sample_indices(report.predictions, count)
    pixels = report.pixels(shown)
    guesses = report.guesses(shown)
    plot_prediction_samples(report.pictures(pixels) if pixels is not None else [],
                            guesses.true_names, guesses.predicted_names, guesses.confidences,
                            report.out_dir / "prediction_samples.png")


def _plot_gradcams_of_mistakes(report: ReportInputs, model, accelerator, count: int) -> None:
    """misclassified_gradcam.png: Grad-CAM of the predicted class on the first `count`
    mistakes, what the model looked at when wrong (no file without a mistake)."""
    predictions = report.predictions
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)[:count]
    if not len(wrong):
        return
    from pet_pipeline.gradcam import compute_gradcams  # pytorch-grad-cam, only when used
    from pet_pipeline.plots import plot_gradcam_gallery

    pixels = report.pixels(wrong)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    cams = compute_gradcams(raw_model, pixels.to(accelerator.device),
                            [int(c) for c in predictions.predicted[wrong]])
    plot_gradcam_gallery(report.pictures(pixels), list(cams), report.guesses(wrong),
                         report.out_dir / "misclassified_gradcam.png")


MAX_THUMBNAILS = 500


def thumbnails_of_mistakes(dataset, predictions: Predictions, data_config: dict, *,
                           size: int = 96, limit: int = MAX_THUMBNAILS) -> dict[int, np.ndarray]:
    """Small uint8 HWC pictures of what the model saw, for the first `limit` misclassified
    images, keyed by their position in `predictions`: the W&B table's image column."""
    from PIL import Image

    from pet_pipeline.gradcam import denormalize

    wrong = np.flatnonzero(predictions.predicted != predictions.labels)[:limit]
    thumbnails = {}
    for start in range(0, len(wrong), 64):  # a few MB of model inputs at a time
        chunk = wrong[start:start + 64]
        pixels = _model_inputs(dataset, predictions.indices[chunk], data_config)
        for position, image in zip(chunk, denormalize(pixels, data_config["mean"], data_config["std"])):
            picture = Image.fromarray((image * 255).round().astype(np.uint8))
            picture.thumbnail((size, size))
            thumbnails[int(position)] = np.asarray(picture)
    return thumbnails


def log_report_to_trackers(accelerator, report: ReportInputs, metrics: dict, *, step: int | None = None,
                           thumbnails: dict[int, np.ndarray] | None = None) -> None:
    """Final metrics as the run summary, the PNGs as images, predictions as a W&B table (with
    a thumbnail on the rows of `thumbnails`, the misclassified) and the confusion matrix as a
    W&B confusion-matrix plot."""
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            _log_to_wandb(tracker.run, report, scalars, step=step, thumbnails=thumbnails or {})
        elif tracker.name == "tensorboard":
            _log_to_tensorboard(tracker.writer, report.out_dir, scalars, step=step)


def _log_to_wandb(run, report: ReportInputs, scalars: dict, *, step: int | None,
                  thumbnails: dict[int, np.ndarray]) -> None:
    import wandb

    run.summary.update(scalars)
    images = {f"eval/{p.stem}": wandb.Image(str(p)) for p in sorted(report.out_dir.glob("*.png"))}
    predictions, names = report.predictions, report.class_names
    table = wandb.Table(columns=["image_id", "true", "predicted", "confidence", "image"], data=[
        [report.image_ids[i], names[t], names[p], float(c),
         wandb.Image(thumbnails[row]) if row in thumbnails else None]
        for row, (i, t, p, c) in enumerate(zip(predictions.indices, predictions.labels,
                                               predictions.predicted,
                                               predictions.probabilities.max(axis=1)))])
    # at the run's final step: without one, W&B moves its step past the final one and
    # drops the test metrics and timings logged at that step afterwards
    run.log({**images, "eval/predictions": table,
             "eval/confusion_matrix_plot": wandb.plot.confusion_matrix(
                 y_true=predictions.labels.tolist(), preds=predictions.predicted.tolist(),
                 class_names=names)}, **({"step": step} if step is not None else {}))


def _log_to_tensorboard(writer, out_dir: Path, scalars: dict, *, step: int | None) -> None:
    from PIL import Image

    for path in sorted(out_dir.glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image(f"eval/{path.stem}", image, global_step=step or 0, dataformats="HWC")
    for key, value in scalars.items():
        writer.add_scalar(key, value, global_step=step or 0)
