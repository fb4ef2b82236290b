"""Label leakage: how well each attribute can be read from z alone.

A conditional model that keeps an attribute in z (as well as in y) learns to take it from z,
and then ignores y: its edits fail. Leakage measures it directly: a probe (scikit-learn's
logistic regression with balanced class weights, on standardised posterior means) is fitted
per attribute on the model's train split and scored on the benchmark split by balanced
accuracy. 0.5 is no leakage (z says nothing of the attribute); 1.0 is z holding it whole.

For a conditional model **lower is better**: the decoder must read y. For an unconditional
model the same number is how much of the attribute z captured, and **higher is better**.
It needs labels, not ground truth, so it runs on CelebA as on the synthetic faces. An
attribute that does not vary in the fitting set, or in the scored set, has no score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.latents import require_sklearn, split_means, train_split
from benchmarks.metric import BenchContext, Metric, option, register_metric
from zoo.errors import ZooError


def probe_balanced_accuracy(
    fit_codes: np.ndarray, fit_labels: np.ndarray, codes: np.ndarray, labels: np.ndarray
) -> list[float | None]:
    """Per label column, the balanced accuracy on (codes, labels) of a logistic-regression
    probe fitted on (fit_codes, fit_labels); None where either set has one class only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores: list[float | None] = []
    for column in range(labels.shape[1]):
        fit_y, y = fit_labels[:, column], labels[:, column]
        if len(np.unique(fit_y)) < 2 or len(np.unique(y)) < 2:
            scores.append(None)
            continue
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)
        )
        probe.fit(fit_codes, fit_y)
        scores.append(float(balanced_accuracy_score(y, probe.predict(codes))))
    return scores


@register_metric("leakage")
class LabelLeakage(Metric):
    """Balanced accuracy of per-attribute probes on z alone (`probe_balanced_accuracy`)."""

    title = "Label leakage"

    @dataclass(frozen=True)
    class Options:
        n_fit: int = option(2000, "Train-split images the probes are fitted on.", low=10)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        require_sklearn()
        names = list(context.info.attr_names)
        if not names:
            raise ZooError(
                f"leakage needs attribute labels and {context.checkpoint} records none; "
                "train on labelled data (CelebA or the synthetic faces)"
            )
        train = train_split(context)
        n_fit = min(context.options(self).n_fit, len(train))
        fit_codes = split_means(context, train, n_fit)
        codes = split_means(context, context.data, context.count)
        fit_labels = train.labels(names)[:n_fit].numpy()
        labels = context.data.labels(names)[: context.count].numpy()
        scores = probe_balanced_accuracy(fit_codes, fit_labels, codes, labels)
        per_attribute = dict(zip(names, scores, strict=True))
        scored = [score for score in scores if score is not None]
        if not scored:
            raise ZooError(
                f"no attribute of {context.data.root} varies in both the train split and the "
                f"{context.data.split} split; leakage cannot be measured there"
            )
        return {
            "leakage": float(np.mean(scored)),
            "per_attribute": per_attribute,
            "lower_is_better": bool(context.model.conditional),
            "n_fit": n_fit,
        }

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        arrow = "↓" if result["lower_is_better"] else "↑"
        return {"leakage": f"{result['leakage']:.3f} {arrow}"}

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        return {"leakage": result["leakage"]}
