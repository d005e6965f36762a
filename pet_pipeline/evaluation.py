"""One evaluation, used for validation during training, the final test report and evaluate.py.

`predict` runs the model over a prepared DataLoader and gathers logits, labels and dataset
indices from every rank with `gather_for_metrics`, which drops the samples that the
distributed sampler repeated to even out the last batch: every sample counts exactly once.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


@dataclass
class Predictions:
    probabilities: np.ndarray  # (n, K) softmax outputs
    labels: np.ndarray  # (n,) true class indices
    indices: np.ndarray  # (n,) row in the evaluated datasets.Dataset

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


@torch.no_grad()
def predict(model, loader, accelerator, *, should_stop=None) -> Predictions | None:
    """Predictions for every sample of `loader`, identical on every rank.

    `should_stop()` is asked after every batch (all ranks together); when it says yes the
    evaluation is abandoned and None is returned, so a preemption signal is not missed.
    """
    was_training = model.training
    model.eval()
    probabilities, labels, indices = [], [], []
    for batch in loader:
        with accelerator.autocast():
            logits = model(batch["pixel_values"])
        gathered = accelerator.gather_for_metrics(
            (logits.float().softmax(dim=1), batch["label"], batch["index"])
        )
        for store, value in zip((probabilities, labels, indices), gathered):
            store.append(value.cpu())
        if should_stop is not None and should_stop():
            model.train(was_training)
            return None
    model.train(was_training)
    return Predictions(
        probabilities=torch.cat(probabilities).numpy().astype(np.float64),
        labels=torch.cat(labels).numpy(),
        indices=torch.cat(indices).numpy(),
    )


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


def compute_metrics(predictions: Predictions, class_names: list[str], top_confused: int = 10) -> dict:
    """Accuracy, top-5, macro/weighted P/R/F1, per class, most-confused pairs, ECE."""
    y_true, y_pred = predictions.labels, predictions.predicted
    k = len(class_names)
    all_labels = list(range(k))
    metrics = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    if k > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(
            y_true, predictions.probabilities, k=5, labels=all_labels))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=all_labels, average=average, zero_division=0)
        metrics.update({f"{average}_precision": float(p), f"{average}_recall": float(r),
                        f"{average}_f1": float(f)})
    p, r, f, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_labels, zero_division=0)
    metrics["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    matrix = confusion_matrix(y_true, y_pred, labels=all_labels)
    off_diagonal = [(int(matrix[i, j]), class_names[i], class_names[j])
                    for i in range(k) for j in range(k) if i != j and matrix[i, j] > 0]
    metrics["most_confused"] = [
        {"true": t, "predicted": p_, "count": c}
        for c, t, p_ in sorted(off_diagonal, key=lambda x: (-x[0], x[1], x[2]))[:top_confused]
    ]
    metrics["expected_calibration_error"] = expected_calibration_error(
        predictions.probabilities, y_true)
    return metrics


def write_confusion_matrix_csv(path: Path, matrix: np.ndarray, class_names: list[str]) -> None:
    """Rows are true classes, columns predicted; class names as headers."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *class_names])
        for name, row in zip(class_names, matrix):
            writer.writerow([name, *map(int, row)])


def read_confusion_matrix_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[int(v) for v in row[1:]] for row in rows[1:]]), rows[0][1:]


def write_report(out_dir: str | Path, predictions: Predictions, class_names: list[str],
                 image_ids: list[str]) -> dict:
    """eval/metrics.json, confusion_matrix.csv, predictions.csv, classification_report.txt."""
    from sklearn.metrics import classification_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(predictions, class_names)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    matrix = confusion_matrix(predictions.labels, predictions.predicted,
                              labels=list(range(len(class_names))))
    write_confusion_matrix_csv(out_dir / "confusion_matrix.csv", matrix, class_names)
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "true", "predicted", "confidence"])
        for i in np.argsort(predictions.indices, kind="stable"):
            writer.writerow([image_ids[predictions.indices[i]], class_names[predictions.labels[i]],
                             class_names[predictions.predicted[i]],
                             f"{predictions.probabilities[i].max():.4f}"])
    report = classification_report(predictions.labels, predictions.predicted,
                                   labels=list(range(len(class_names))),
                                   target_names=class_names, digits=4, zero_division=0)
    (out_dir / "classification_report.txt").write_text(report)
    return metrics
