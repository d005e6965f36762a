"""Precision, recall and F1 in one pass, for `evaluate.load(<this folder>)`.

The Hub has three separate scripts (precision, recall, f1) that each run scikit-learn's
precision_recall_fscore_support; one script gives the three from a single call.
"""

import datasets
import evaluate
from sklearn.metrics import precision_recall_fscore_support

_DESCRIPTION = """
Precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 * precision * recall / (precision + recall),
per class and then averaged over the classes: `macro` weighs every class the same, `weighted`
weighs each class by its number of true samples (support).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    average (`str`): "macro" (default), "weighted", "micro", or None for per-class lists.
    labels (`list` of `int`): the classes to average over. Give all K classes (`range(K)`):
        without it, a class that is neither predicted nor present is silently left out of the
        macro average.
    zero_division (`float` or "warn"): the value of a ratio whose denominator is 0 (default 0).
    sample_weight (`list` of `float`): per-sample weights.

Returns:
    precision, recall, f1 (`float`, or `list` of `float` when `average=None`).
    support (`list`, only when `average=None`): the number of true samples a class (their total
        weight, with `sample_weight`).

Examples:
    >>> metric = evaluate.load("pet_pipeline/metrics/precision_recall_f1")
    >>> metric.compute(references=[0, 1, 2, 0], predictions=[0, 2, 2, 0], average="macro", labels=[0, 1, 2])
    {'precision': 0.5, 'recall': 0.6666666666666666, 'f1': 0.5555555555555555}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionRecallF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("int32"),
                "references": datasets.Value("int32"),
            }),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_recall_fscore_support.html"
            ],
        )

    def _compute(self, predictions, references, average="macro", labels=None, zero_division=0,
                 sample_weight=None):
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, average=average, labels=labels, zero_division=zero_division,
            sample_weight=sample_weight)
        if average is None:  # per class: numpy arrays -> JSON-friendly lists
            return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                    "support": support.tolist()}
        return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
