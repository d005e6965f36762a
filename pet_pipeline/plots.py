"""The report's figures: confusion matrix, training curves, prediction samples, Grad-CAM gallery.

Every function draws on its own `matplotlib.figure.Figure` with an Agg canvas and writes a
PNG: no display is needed, pyplot's global figure list is never used (so nothing stays open
and a long run doesn't grow), and a notebook user's backend is left alone. Each returns the
path it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CORRECT_COLOUR, MISTAKE_COLOUR = "tab:green", "tab:red"
DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path) -> Path:
    from pet_pipeline.files import replaced

    path = Path(path)
    with replaced(path, "wb") as handle:  # a full disk: one sentence, the old plot intact
        figure.savefig(handle, format="png")
    figure.clear()  # drop the artists now rather than whenever the GC gets to them
    return path


def _as_float_image(image) -> np.ndarray:
    """PIL image, uint8 array or float array in [0, 1] -> float32 HWC RGB in [0, 1]."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _mark(ax, *, correct: bool) -> str:
    """Coloured border around an image axis (ticks hidden, spines kept); returns the colour."""
    colour = CORRECT_COLOUR if correct else MISTAKE_COLOUR
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4 if not correct else 2)
    return colour


# ------------------------------------------------------------------ confusion matrix

SHOW_COUNTS_UP_TO = 20  # classes; above that per-cell numbers are unreadable, colour carries it


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path) -> Path:
    """Counts and row-normalised (recall per true class) side by side, rows true, columns predicted."""
    from matplotlib.colors import Normalize, PowerNorm
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    k = len(class_names)
    # ~0.3 in a cell keeps 37 rotated breed names legible; a floor keeps 2..12 classes roomy.
    side = max(5.0, 0.3 * k + 2.5)
    tick_size = 10 if k <= 12 else 8 if k <= 24 else 7
    show_values = k <= SHOW_COUNTS_UP_TO
    value_size = 9 if k <= 12 else 7
    support = matrix.sum(axis=1, keepdims=True)
    # A class with no true samples gets a row of zeros, not NaN.
    normalised = np.divide(matrix, support, out=np.zeros(matrix.shape, dtype=float), where=support > 0)

    # Without numbers in the cells, a linear scale leaves 1-3 confusions out of 40 invisible
    # next to the diagonal; a square-root scale keeps them visible.
    colour_scale = "" if show_values else " (colour: square-root scale)"

    figure = _new_figure(2 * side + 1.5, 0.9 * side + 1.0)
    axes = figure.subplots(1, 2)
    panels = (
        (matrix, "d", max(1, int(matrix.max(initial=0))), f"Counts (n = {int(matrix.sum())}){colour_scale}"),
        (normalised, ".2f", 1.0, f"Row-normalised: recall per true class{colour_scale}"),
    )
    for ax, (values, fmt, vmax, title) in zip(axes, panels):
        display = ConfusionMatrixDisplay(confusion_matrix=values, display_labels=class_names)
        norm = Normalize(0, vmax) if show_values else PowerNorm(0.5, 0, vmax)
        display.plot(ax=ax, cmap="Blues", include_values=show_values, values_format=fmt,
                     xticks_rotation=45 if k <= 12 else 90, colorbar=False, im_kw={"norm": norm},
                     text_kw={"fontsize": value_size})
        figure.colorbar(display.im_, ax=ax, shrink=0.8)
        if k <= 12:  # 45-degree labels read best anchored at their end, under their column
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
                label.set_rotation_mode("anchor")
        ax.tick_params(labelsize=tick_size)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_title(title, fontsize=12)
    return _save(figure, path)


# ------------------------------------------------------------------ training curves

def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = sorted((r["step"], r[key]) for r in records
                    if r.get(key) is not None and r.get("step") is not None)
    return [s for s, _ in points], [v for _, v in points]


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12,
            color="0.4")


def plot_training_curves(records: list[dict], path) -> Path:
    """Training loss, validation accuracy (and macro F1, final test accuracy), lr, against step.

    `records` are metrics.jsonl lines; any key may be missing from any line.
    """
    figure = _new_figure(15.0, 4.2)
    loss_ax, val_ax, lr_ax = figure.subplots(1, 3)

    steps, loss = _series(records, "train_loss")
    if steps:
        loss_ax.plot(steps, loss, color="tab:blue")
    else:
        _no_data(loss_ax, "no training loss logged")
    loss_ax.set_title("Training loss")

    drew_val = False
    for key, label, style in (("val_accuracy", "val accuracy", "o-"),
                              ("val_macro_f1", "val macro F1", "s--")):
        steps, values = _series(records, key)
        if steps:
            val_ax.plot(steps, values, style, label=label, markersize=4)
            drew_val = True
    steps, values = _series(records, "test_accuracy")
    if steps:  # the final test result, as a point at the step it was measured
        val_ax.plot(steps, values, "*", color="tab:red", markersize=12, label="test accuracy (final)")
    if not drew_val:
        _no_data(val_ax, "no validation split")
    if drew_val or steps:
        val_ax.legend(loc="lower right")
        val_ax.set_ylim(0.0, 1.02)
    val_ax.set_title("Validation accuracy")

    steps, lr = _series(records, "lr")
    if steps:
        lr_ax.plot(steps, lr, color="tab:purple")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _no_data(lr_ax, "no learning rate logged")
    lr_ax.set_title("Learning rate")

    for ax in (loss_ax, val_ax, lr_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return _save(figure, path)


# ------------------------------------------------------------------ prediction samples

def _title(true_name: str, predicted_name: str, confidence: float) -> str:
    text = f"{true_name} / {predicted_name} ({confidence:.2f})"
    return text if len(text) <= 30 else f"{true_name} /\n{predicted_name} ({confidence:.2f})"


def plot_prediction_samples(images: Sequence, true_names: Sequence[str], predicted_names: Sequence[str],
                            confidences: Sequence[float], path, columns: int = 5) -> Path:
    """A grid of images titled "true / predicted (confidence)": green when right, red title
    and thick red border when wrong."""
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    figure = _new_figure(2.8 * columns, 3.0 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    for ax, image, true_name, predicted_name, confidence in zip(
            axes, images, true_names, predicted_names, confidences):
        ax.imshow(_as_float_image(image))
        colour = _mark(ax, correct=true_name == predicted_name)
        ax.set_title(_title(true_name, predicted_name, confidence), color=colour, fontsize=9)
    wrong = sum(t != p for t, p in zip(true_names, predicted_names))
    if n == 0:
        _no_data(axes[0], "no images")
    figure.suptitle(f"true / predicted (confidence): {wrong} of {n} wrong, marked red", fontsize=12)
    return _save(figure, path)


# ------------------------------------------------------------------ Grad-CAM gallery

@dataclass
class Guesses:
    """What the model made of each image shown, in the images' order."""

    true_names: Sequence[str]
    predicted_names: Sequence[str]
    confidences: Sequence[float]  # of the predicted class


def plot_gradcam_gallery(images: Sequence, cams: Sequence[np.ndarray], guesses: Guesses, path,
                         pairs_per_row: int = 3) -> Path:
    """Each image next to its Grad-CAM overlay (pytorch-grad-cam's show_cam_on_image), titled
    with the true class and the guess.

    Meant for the misclassified images; pass what you want shown. `images` are what the model
    saw (e.g. `gradcam.denormalize(pixel_values, ...)`) or PIL images; a CAM of another size is
    resized to its image.
    """
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    n = len(images)
    pairs_per_row = max(1, min(pairs_per_row, n))
    rows = max(1, math.ceil(n / pairs_per_row))
    figure = _new_figure(5.0 * pairs_per_row, 2.8 * rows + 0.4)
    axes = np.atleast_2d(figure.subplots(rows, 2 * pairs_per_row)).reshape(rows, -1)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (image, cam, true_name, predicted_name, confidence) in enumerate(
            zip(images, cams, guesses.true_names, guesses.predicted_names, guesses.confidences)):
        row, pair = divmod(i, pairs_per_row)
        original_ax, overlay_ax = axes[row, 2 * pair], axes[row, 2 * pair + 1]
        rgb = _as_float_image(image)
        cam = np.asarray(cam, dtype=np.float32)
        if cam.shape != rgb.shape[:2]:
            cam = cv2.resize(cam, (rgb.shape[1], rgb.shape[0]))
        overlay = show_cam_on_image(rgb, np.clip(cam, 0.0, 1.0), use_rgb=True)
        correct = true_name == predicted_name
        for ax, picture, title in ((original_ax, rgb, f"true: {true_name}"),
                                   (overlay_ax, overlay, f"pred: {predicted_name} ({confidence:.2f})")):
            ax.set_axis_on()
            ax.imshow(picture)
            colour = _mark(ax, correct=correct)
            ax.set_title(title, color=colour, fontsize=9)
    if n == 0:
        _no_data(axes[0, 0], "no misclassified images")
    figure.suptitle("Grad-CAM: image and where the model looked for its prediction", fontsize=12)
    return _save(figure, path)
