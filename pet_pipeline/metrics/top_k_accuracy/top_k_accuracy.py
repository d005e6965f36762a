"""Top-k accuracy from class scores, for `evaluate.load(<this folder>)`.

The Hub has no top-k metric; this one follows the structure of its scikit-learn based
scripts, with scikit-learn's top_k_accuracy_score underneath.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import top_k_accuracy_score

_DESCRIPTION = """
Top-k accuracy is the fraction of samples whose true class is among the k classes with the
highest scores. Top-1 accuracy is plain accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (`list` of `list` of `float`): one row of K class scores (probabilities or
        logits) a sample.
    references (`list` of `int`): true class indices.
    k (`int`): how many of the top-scored classes count as a hit (default 5).
    labels (`list` of `int`): all K classes, in score-column order. Needed when some class is
        missing from `references`; by default `range(K)`.
    sample_weight (`list` of `float`): per-sample weights.

Returns:
    top_k_accuracy (`float`): in [0, 1].

Examples:
    >>> metric = evaluate.load("pet_pipeline/metrics/top_k_accuracy")
    >>> metric.compute(references=[0, 2], prediction_scores=[[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], k=2)
    {'top_k_accuracy': 0.5}
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
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                # float64: a float32 round trip could turn near-equal scores into ties
                "prediction_scores": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Value("int32"),
            }),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.top_k_accuracy_score.html"
            ],
        )

    def _compute(self, prediction_scores, references, k=5, labels=None, sample_weight=None):
        scores = np.asarray(prediction_scores, dtype=np.float64)
        if labels is None:
            labels = list(range(scores.shape[1]))
        return {"top_k_accuracy": float(top_k_accuracy_score(
            references, scores, k=k, labels=labels, sample_weight=sample_weight))}
