"""Metrics with Hugging Face `evaluate`, from metric scripts that ship inside this package.

    metric = load_metric("accuracy")                  # an evaluate.EvaluationModule
    results = compute_with_evaluate(labels, predicted, probabilities)
    save_results(out / "eval", results, file_name="metrics.json")

`evaluate.load("accuracy")` downloads its script from the Hub and fails on an offline
compute node; `evaluate.load(<folder>)` with a folder holding `<folder name>.py` runs a
local script and needs no network (nor HF_HOME contents: evaluate copies the script into
its modules cache there). The scripts are the Hub's structure with scikit-learn underneath:

    accuracy/accuracy.py                        accuracy
    precision_recall_f1/precision_recall_f1.py  precision, recall, f1 (average= macro, weighted, ...)
    top_k_accuracy/top_k_accuracy.py            top_k_accuracy (k=5 by default)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np


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
    """One of LOCAL_METRICS, loaded from its script in this package, offline."""
    script_dir = METRICS_DIR / name
    if not (script_dir / f"{name}.py").is_file():
        raise ValueError(f"metric: {name!r} is not shipped with pet_pipeline; choose from {LOCAL_METRICS}.")
    # keep_in_memory: no Arrow cache file and file lock under HF_HOME per computation, which
    # shared cluster filesystems handle badly. (Single process only, which is how we use it:
    # predictions are gathered with gather_for_metrics first.)
    return evaluate.load(str(script_dir), keep_in_memory=True)


def compute_with_evaluate(labels, predicted, probabilities) -> dict:
    """accuracy, top5_accuracy (when K > 5), macro_/weighted_ precision, recall, f1.

    `probabilities` is (n, K); K, not the classes that happen to occur in `labels`, sets the
    class list, so a class absent from this split still counts (as 0) in macro averages.
    Keys match `evaluation.compute_metrics`.
    """
    labels = np.asarray(labels).tolist()
    predicted = np.asarray(predicted).tolist()
    probabilities = np.asarray(probabilities, dtype=np.float64)
    all_classes = list(range(probabilities.shape[1]))

    results = load_metric("accuracy").compute(predictions=predicted, references=labels)
    if len(all_classes) > 5:  # top-5 of 5 or fewer classes is always 1
        top_k = load_metric("top_k_accuracy").compute(
            prediction_scores=probabilities, references=labels, k=5, labels=all_classes)
        results["top5_accuracy"] = top_k["top_k_accuracy"]
    precision_recall_f1 = load_metric("precision_recall_f1")
    for average in ("macro", "weighted"):
        scores = precision_recall_f1.compute(predictions=predicted, references=labels, average=average,
                                             labels=all_classes, zero_division=0)
        results.update({f"{average}_{name}": value for name, value in scores.items()})
    return results


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
