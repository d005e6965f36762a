"""Metrics with Hugging Face `evaluate`, from metric scripts that ship inside this package.

    metric = load_metric("accuracy")                  # an evaluate.EvaluationModule, loaded once a process
    results = compute_with_evaluate(labels, predicted, probabilities)
    scores = per_class_scores(matrix)                 # from a (K, K) confusion matrix
    save_results(out / "eval", results, file_name="metrics.json")

`evaluate.load("accuracy")` downloads its script from the Hub and fails on an offline
compute node; `evaluate.load(<folder>)` with a folder holding `<folder name>.py` runs a
local script and needs no network (nor HF_HOME contents: evaluate copies the script into
its modules cache there). The scripts are the Hub's structure with scikit-learn underneath:

    accuracy/accuracy.py                        accuracy
    precision_recall_f1/precision_recall_f1.py  precision, recall, f1 (average= macro, weighted, ...)
    top_k_accuracy/top_k_accuracy.py            top_k_accuracy (k=5 by default)

Accuracy and precision/recall/F1 are computed from the confusion matrix's K*K cells, each
weighted by its count (`confusion_cells`): scikit-learn gives exactly the figures it gives
on the n samples, and a report that has the matrix already needs no second pass over them.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix


def _import_evaluate_library():
    """Hugging Face `evaluate`, even though this project has its own top-level evaluate.py.

    Python puts a script's folder first on sys.path, so under `python train.py` (or pytest
    from the project root) a plain `import evaluate` would find the project's CLI script
    instead of the library. The library is a package (`evaluate/__init__.py`), the script a
    lone module file: take the first *package* named evaluate on sys.path, wherever this
    package and the checkout lie (an editable install, a wheel in site-packages, a plain
    checkout), without changing sys.path.
    """
    loaded = sys.modules.get("evaluate")
    if loaded is not None and hasattr(loaded, "__path__"):  # the library, imported before
        return loaded
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec("evaluate", [entry or os.curdir])
        # has_location is False for a namespace package (a plain folder called evaluate/)
        if spec is not None and spec.submodule_search_locations is not None and spec.has_location:
            library = importlib.util.module_from_spec(spec)
            sys.modules["evaluate"] = library  # before running it, as `import` does
            try:
                spec.loader.exec_module(library)
            except BaseException:
                sys.modules.pop("evaluate", None)
                raise
            return library
    raise ModuleNotFoundError("pet_pipeline needs the Hugging Face `evaluate` library; "
                              "pip install evaluate", name="evaluate")


evaluate = _import_evaluate_library()

METRICS_DIR = Path(__file__).resolve().parent
LOCAL_METRICS = ("accuracy", "precision_recall_f1", "top_k_accuracy")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of LOCAL_METRICS, loaded from its script in this package, offline; the same module
    object on every call in a process."""
    if not (METRICS_DIR / name / f"{name}.py").is_file():
        raise ValueError(f"metric: {name!r} is not shipped with pet_pipeline; choose from {LOCAL_METRICS}.")
    return _load_local_metric(name)


@functools.cache
def _load_local_metric(name: str) -> evaluate.EvaluationModule:
    # Cached: on every call evaluate.load parses the script, hashes and copies it into its
    # modules cache and builds a new module, which every validation paid for. One module can
    # be reused: compute() empties it again.
    # keep_in_memory: no Arrow cache file and file lock under HF_HOME per computation, which
    # shared cluster filesystems handle badly. (Single process only, which is how we use it:
    # predictions are gathered with gather_for_metrics first.)
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def confusion_cells(matrix) -> dict:
    """`references`, `predictions` and `sample_weight` for a metric module: one sample per
    cell of the (K, K) confusion `matrix` (rows true, columns predicted), weighted by its count."""
    matrix = np.asarray(matrix)
    references, predictions = np.indices(matrix.shape).reshape(2, -1)
    return {"references": references.tolist(), "predictions": predictions.tolist(),
            "sample_weight": matrix.ravel().tolist()}


def compute_with_evaluate(labels, predicted, probabilities, *, matrix=None) -> dict:
    """accuracy, top5_accuracy (when K > 5), macro_/weighted_ precision, recall, f1.

    `probabilities` is (n, K); K, not the classes that happen to occur in `labels`, sets the
    class list, so a class absent from this split still counts (as 0) in macro averages.
    `matrix` is the (K, K) confusion matrix of `labels` against `predicted`, when the caller
    has it already. Keys match `evaluation.compute_metrics`.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    all_classes = list(range(probabilities.shape[1]))
    if matrix is None:
        matrix = confusion_matrix(labels, predicted, labels=all_classes)
    cells = confusion_cells(matrix)

    results = load_metric("accuracy").compute(**cells)
    if len(all_classes) > 5:  # top-5 of 5 or fewer classes is always 1
        top_k = load_metric("top_k_accuracy").compute(
            prediction_scores=probabilities, references=np.asarray(labels).tolist(), k=5,
            labels=all_classes)
        results["top5_accuracy"] = top_k["top_k_accuracy"]
    precision_recall_f1 = load_metric("precision_recall_f1")
    for average in ("macro", "weighted"):
        scores = precision_recall_f1.compute(**cells, average=average, labels=all_classes, zero_division=0)
        results.update({f"{average}_{name}": value for name, value in scores.items()})
    return results


def per_class_scores(matrix) -> dict:
    """`precision`, `recall`, `f1` and `support`: lists in class order, from the (K, K)
    confusion `matrix` (a class without predictions or samples gets 0)."""
    return load_metric("precision_recall_f1").compute(
        **confusion_cells(matrix), average=None, labels=list(range(len(matrix))), zero_division=0)


def _plain(value):
    """numpy scalars and arrays -> Python numbers and lists, which json can write."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_results(path_dir: str | Path, results: dict, *, file_name: str | None = None) -> Path:
    """Write `results` with `evaluate.save`, which adds `_timestamp`, `_git_commit_hash`,
    `_evaluate_version`, `_python_version` and `_interpreter_path`; returns the file written.

    Without `file_name` evaluate names the file `result-YYYY_MM_DD-HH_MM_SS.json`: two saves
    within one second overwrite each other, so pass a name for files other tools read.
    Note that evaluate.save runs `git rev-parse` in the current directory (the hash is the
    working directory's, or null outside a repository).
    """
    target = Path(path_dir) / file_name if file_name else Path(path_dir)
    plain_results = json.loads(json.dumps(results, default=_plain))
    with _git_quiet_outside_a_repository():
        return Path(evaluate.save(str(target), **plain_results))


@contextmanager
def _git_quiet_outside_a_repository():
    """Outside a git checkout, evaluate.save's `git rev-parse` prints "fatal: not a git
    repository" on our stderr (the hash is null either way): send the child's stderr
    (file descriptor 2, which it inherits) to /dev/null for that call only."""
    if any((folder / ".git").exists() for folder in (Path.cwd(), *Path.cwd().parents)):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
