"""Disentanglement on faces with exact, independent ground truth: MIG, SAP, DCI, and the
FactorVAE and beta-VAE scores.

They need data whose factors are known and independent: synthetic faces written with
``zoo data synth --independent`` (`zoo.data.synth.FACTORS`: hair, one of six values, and 12
binary attributes; undrawable combinations are skipped and counted). Every score reads
posterior means (`benchmarks.latents`), so z is what the encoder says, not a sample:

- **MIG**, **SAP** and **DCI** use the benchmark split's first ``--n`` images and their
  factors: the first two thirds fit what a score fits (SAP's and DCI's classifiers), the last
  third scores it; MIG uses them all.
- The **FactorVAE** and **beta-VAE** scores fix one factor and resample the rest, so they
  render new faces (`FaceOracle`) with the renderer that drew the folder, through the same
  JPEG and crop, each in batches of faces that share one value of the fixed factor.

The scores are pure functions of arrays (`mutual_information_gap`, `sap_score`, `dci`,
`factor_vae_score`, `beta_vae_score`), so the tests check them with oracle and random
encoders and hand-computed examples; the metric classes only gather the arrays. A
conditional model's z is read given its labels; its factors live in y, so these scores
describe what z holds besides them. Higher is better for every score here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.latents import require_sklearn, split_means
from benchmarks.metric import BenchContext, Metric, option, register_metric
from zoo.data import synth
from zoo.errors import ZooError
from zoo.latent import encode_means

FIT_SHARE = 2 / 3  # of the split: what SAP and DCI fit on; the rest scores them


# -- the scores, on arrays --------------------------------------------------------------------


def discretize(codes: np.ndarray, bins: int) -> np.ndarray:
    """Each code dimension cut into ``bins`` equal-width bins over its range (as
    disentanglement_lib does for MIG): int N x D."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for i in range(codes.shape[1]):
        edges = np.histogram(codes[:, i], bins)[1]
        out[:, i] = np.digitize(codes[:, i], edges[:-1])
    return out


def mutual_information(codes: np.ndarray, factors: np.ndarray, bins: int) -> np.ndarray:
    """D x K mutual information (nats) between each discretized code and each factor."""
    from sklearn.metrics import mutual_info_score

    discrete = discretize(codes, bins)
    return np.array(
        [
            [mutual_info_score(factors[:, k], discrete[:, i]) for k in range(factors.shape[1])]
            for i in range(codes.shape[1])
        ]
    )


def mutual_information_gap(
    codes: np.ndarray, factors: np.ndarray, bins: int = 20
) -> tuple[float, list[float]]:
    """MIG (Chen et al. 2018, "Isolating sources of disentanglement in VAEs"): per factor, the
    gap between the two code dimensions that hold the most information about it, over the
    factor's entropy; averaged over factors. 1: each factor is in one dimension alone; 0: none
    is, or it is in two dimensions equally."""
    info = mutual_information(codes, factors, bins)
    ranked = -np.sort(-info, axis=0)
    second = ranked[1] if info.shape[0] > 1 else np.zeros(info.shape[1])
    entropy = np.array([_entropy(factors[:, k]) for k in range(factors.shape[1])])
    varying = _varying(factors)
    gaps = (ranked[0] - second) / np.where(entropy > 0, entropy, 1)
    return _mean(gaps, varying), _per_factor(gaps, varying)


def sap_score(
    fit_codes: np.ndarray, fit_factors: np.ndarray, codes: np.ndarray, factors: np.ndarray
) -> tuple[float, np.ndarray]:
    """SAP (Kumar et al. 2018, "Variational inference of disentangled latent concepts from
    unlabeled observations"): a D x K matrix of how well each code dimension alone predicts
    each factor, then per factor the gap between its best and second-best dimension, averaged.

    For discrete factors the paper uses a threshold classifier and its balanced accuracy:
    here a decision tree on the one dimension with as many leaves as the factor has values
    (one threshold for a binary factor), fitted on the fit set and scored on the other by
    balanced accuracy adjusted for chance (scikit-learn's ``adjusted=True``), so a dimension
    that says nothing scores 0 and one that says everything 1, as the paper's R^2 does for
    continuous factors. (disentanglement_lib uses a linear SVM's plain accuracy, whose floor is
    the majority class's share and whose strong default regularisation makes the score depend
    on the codes' scale.)
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.tree import DecisionTreeClassifier

    scores = np.zeros((codes.shape[1], factors.shape[1]))
    varying = _varying(fit_factors, factors)
    for k in varying:
        leaves = len(np.unique(fit_factors[:, k]))
        for i in range(codes.shape[1]):
            tree = DecisionTreeClassifier(max_leaf_nodes=leaves, random_state=0)
            tree.fit(fit_codes[:, i : i + 1], fit_factors[:, k])
            predicted = tree.predict(codes[:, i : i + 1])
            with warnings.catch_warnings():  # a value the scored set lacks may be predicted
                warnings.simplefilter("ignore", UserWarning)
                scores[i, k] = balanced_accuracy_score(factors[:, k], predicted, adjusted=True)
    ranked = -np.sort(-scores, axis=0)
    second = ranked[1] if scores.shape[0] > 1 else np.zeros(scores.shape[1])
    return _mean(ranked[0] - second, varying), scores


def dci(
    fit_codes: np.ndarray,
    fit_factors: np.ndarray,
    codes: np.ndarray,
    factors: np.ndarray,
    trees: int = 100,
) -> dict[str, Any]:
    """DCI (Eastwood & Williams 2018, "A framework for the quantitative evaluation of
    disentangled representations"): a gradient-boosted classifier per factor (as
    disentanglement_lib), whose feature importances form the D x K matrix R.

    - disentanglement: per dimension 1 - H_K(its row of R, normalised), weighted by the
      dimension's share of all importance (1: each dimension matters for one factor only);
    - completeness: per factor 1 - H_D(its column, normalised), averaged (1: each factor is
      read from one dimension only);
    - informativeness: the classifiers' accuracy on the scored set, averaged.
    """
    from sklearn.ensemble import GradientBoostingClassifier

    varying = _varying(fit_factors, factors)
    importance = np.zeros((codes.shape[1], len(varying)))
    accuracy = np.zeros(factors.shape[1])
    for column, k in enumerate(varying):
        model = GradientBoostingClassifier(n_estimators=trees, random_state=0)
        model.fit(fit_codes, fit_factors[:, k])
        importance[:, column] = np.abs(model.feature_importances_)
        accuracy[k] = np.mean(model.predict(codes) == factors[:, k])
    completeness = np.zeros(factors.shape[1])
    completeness[varying] = completeness_per_factor(importance)
    return {
        "disentanglement": disentanglement_from_importance(importance),
        "completeness": _mean(completeness, varying),
        "completeness_per_factor": _per_factor(completeness, varying),
        "informativeness": _mean(accuracy, varying),
        "informativeness_per_factor": _per_factor(accuracy, varying),
        "importance": importance.tolist(),  # code dimension x scored factor
    }


def disentanglement_from_importance(importance: np.ndarray) -> float:
    """DCI disentanglement of a D x K importance matrix."""
    total = importance.sum()
    if total <= 0:
        return 0.0
    if importance.shape[1] < 2:
        return 1.0
    per_code = 1 - _column_entropy(importance.T, base=importance.shape[1])
    return float(np.sum(per_code * importance.sum(axis=1) / total))


def completeness_from_importance(importance: np.ndarray) -> float:
    """DCI completeness of a D x K importance matrix."""
    return float(np.mean(completeness_per_factor(importance)))


def completeness_per_factor(importance: np.ndarray) -> np.ndarray:
    """Each factor's completeness: 1 - the entropy (log D) of its column of importance."""
    if importance.shape[0] < 2:
        return np.ones(importance.shape[1])
    return 1 - _column_entropy(importance, base=importance.shape[0])


def factor_vae_score(
    codes_for: Callable[[int, int, int], np.ndarray],
    sizes: tuple[int, ...],
    scale: np.ndarray,
    *,
    votes: int,
    eval_votes: int,
    batch: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The FactorVAE score (Kim & Mnih 2018, "Disentangling by factorising"): fix one factor
    at one value, encode ``batch`` faces that share it, divide each dimension by its spread
    over the data (``scale``; dimensions with scale under 0.05 are collapsed and left out),
    and vote for the dimension of least variance; a majority-vote classifier maps each
    dimension to the factor it votes for most; the score is its accuracy on further votes.
    ``codes_for(factor, value, n)`` gives the codes of n faces with that factor fixed."""
    active = scale >= 0.05
    if not active.any():
        return {"score": 0.0, "train_accuracy": 0.0, "active_dims": 0}

    def vote_counts(n: int) -> np.ndarray:
        counts = np.zeros((len(scale), len(sizes)), dtype=np.int64)
        for _ in range(n):
            factor = int(rng.integers(len(sizes)))
            value = int(rng.integers(sizes[factor]))
            variance = np.var(codes_for(factor, value, batch) / scale, axis=0, ddof=1)
            counts[int(np.argmin(np.where(active, variance, np.inf))), factor] += 1
        return counts

    train, held_out = vote_counts(votes), vote_counts(eval_votes)
    classifier = np.argmax(train, axis=1)
    rows = np.arange(len(scale))
    return {
        "score": float(held_out[rows, classifier].sum() / max(held_out.sum(), 1)),
        "train_accuracy": float(train[rows, classifier].sum() / max(train.sum(), 1)),
        "active_dims": int(active.sum()),
    }


def beta_vae_score(
    codes_for: Callable[[int, int, int], np.ndarray],
    sizes: tuple[int, ...],
    *,
    points: int,
    eval_points: int,
    pairs: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The beta-VAE score (Higgins et al. 2017, "beta-VAE: learning basic visual concepts with a
    constrained variational framework"): for a factor fixed at one value, the mean absolute
    difference between the codes of ``pairs`` pairs of faces that share it; a linear classifier
    (logistic regression) learns which factor was fixed from that vector; the score is its
    accuracy on further points. Each point fixes one value for all its pairs."""
    from sklearn.linear_model import LogisticRegression

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for _ in range(n):
            factor = int(rng.integers(len(sizes)))
            value = int(rng.integers(sizes[factor]))
            first, second = codes_for(factor, value, pairs), codes_for(factor, value, pairs)
            features.append(np.mean(np.abs(first - second), axis=0))
            labels.append(factor)
        return np.array(features), np.array(labels)

    fit_x, fit_y = sample(points)
    x, y = sample(eval_points)
    classifier = LogisticRegression(max_iter=2000).fit(fit_x, fit_y)
    return {
        "score": float(classifier.score(x, y)),
        "train_accuracy": float(classifier.score(fit_x, fit_y)),
    }


def _varying(*factor_sets: np.ndarray) -> list[int]:
    """The factors that take at least two values in every given set: a factor that does not
    vary (a small split can lack one) cannot be predicted or scored, so it is left out."""
    return [
        k
        for k in range(factor_sets[0].shape[1])
        if all(len(np.unique(factors[:, k])) > 1 for factors in factor_sets)
    ]


def _mean(values: np.ndarray, varying: list[int]) -> float:
    if not varying:
        raise ZooError("no factor varies in the images scored; use more images (--n)")
    return float(np.mean(np.asarray(values)[varying]))


def _per_factor(values: np.ndarray, varying: list[int]) -> list[float | None]:
    """Per factor, None for those left out (`_varying`)."""
    return [float(values[k]) if k in varying else None for k in range(len(values))]


def _entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _column_entropy(matrix: np.ndarray, base: int) -> np.ndarray:
    """Entropy (log ``base``) of each column of a non-negative matrix, normalised to sum 1 (an
    all-zero column is uniform: entropy 1)."""
    totals = matrix.sum(axis=0, keepdims=True)
    p = np.where(totals > 0, matrix / np.where(totals > 0, totals, 1), 1 / matrix.shape[0])
    logs = np.log(np.where(p > 0, p, 1)) / np.log(base)
    return -(p * logs).sum(axis=0)


# -- ground truth from the benchmark's data --------------------------------------------------


def require_ground_truth(context: BenchContext, metric: str) -> dict:
    """The folder's synthetic marker, or one line saying how to make data with ground truth."""
    require_sklearn()
    marker = synth.ground_truth(context.data.root)
    if marker is None:
        raise ZooError(
            f"{metric} needs data with independent ground-truth factors and {context.data.root} "
            "has none; write some with: zoo data synth --independent --out DIR, train on "
            "--data DIR and benchmark there"
        )
    return marker


def split_factors(context: BenchContext, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(posterior means, factors) of the benchmark split's first ``--n`` images."""
    require_ground_truth(context, metric)
    count = context.count
    if count < 6:
        raise ZooError(f"{metric} needs at least 6 images; raise --n or use a larger split")
    codes = split_means(context, context.data, count)
    attrs = context.data.labels(list(synth.ATTRIBUTES))[:count]
    return codes, synth.attributes_to_factors(attrs).numpy()


def fit_and_score(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, ...]:
    cut = int(len(codes) * FIT_SHARE)
    return codes[:cut], factors[:cut], codes[cut:], factors[cut:]


@dataclass
class FaceOracle:
    """Renders faces with chosen factors, as the data folder's renderer drew them, and
    encodes them: "fix one factor, resample the rest" for the intervention scores."""

    context: BenchContext
    size: int  # the folder's face size (the marker's), before the model's preprocessing
    generator: torch.Generator

    def codes(self, factor: int, value: int, n: int) -> np.ndarray:
        factors, _ = synth.sample_factors(n, self.generator, fixed={factor: value})
        attrs = synth.factors_to_attributes(factors)
        faces = synth.render_faces(attrs, self.size, synth.draw_nuisance(n, self.generator))
        images = synth.model_inputs(faces, self.context.data.preprocess).to(self.context.device)
        model = self.context.model.eval()
        labels = None
        if model.conditional:
            order = [synth.ATTRIBUTES.index(name) for name in self.context.info.attr_names]
            labels = attrs[:, order].float().to(self.context.device)
        return encode_means(model, images, labels).double().numpy()


def oracle(context: BenchContext, metric: str, seed_offset: int) -> FaceOracle:
    marker = require_ground_truth(context, metric)
    missing = set(context.info.attr_names) - set(synth.ATTRIBUTES)
    if context.model.conditional and missing:
        raise ZooError(
            f"{metric}: the model reads labels the synthetic faces do not have "
            f"({', '.join(sorted(missing))}); train it on the synthetic folder"
        )
    generator = torch.Generator().manual_seed(context.settings.seed * 1000 + seed_offset)
    return FaceOracle(context, int(marker["size"]), generator)


# -- the metrics ----------------------------------------------------------------------------


def _ground_truth_record(context: BenchContext) -> dict[str, Any]:
    marker = synth.ground_truth(context.data.root) or {}
    return {"factors": list(synth.FACTORS), "skipped_at_writing": marker.get("skipped")}


@register_metric("mig")
class MutualInformationGap(Metric):
    """MIG on the synthetic faces' independent factors (`mutual_information_gap`)."""

    title = "MIG"

    @dataclass(frozen=True)
    class Options:
        bins: int = option(20, "Equal-width bins per code dimension.", low=2, high=1000)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        codes, factors = split_factors(context, "mig")
        score, per_factor = mutual_information_gap(codes, factors, context.options(self).bins)
        per_factor = dict(zip(synth.FACTORS, per_factor, strict=True))
        return {"mig": score, "per_factor": per_factor, **_ground_truth_record(context)}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {"MIG": f"{result['mig']:.3f}"}


@register_metric("sap")
class SeparatedAttributePredictability(Metric):
    """SAP on the synthetic faces' independent factors (`sap_score`)."""

    title = "SAP"

    def compute(self, context: BenchContext) -> dict[str, Any]:
        score, matrix = sap_score(*fit_and_score(*split_factors(context, "sap")))
        return {"sap": score, "scores": matrix.tolist(), **_ground_truth_record(context)}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {"SAP": f"{result['sap']:.3f}"}


@register_metric("dci")
class DisentanglementCompletenessInformativeness(Metric):
    """DCI on the synthetic faces' independent factors (`dci`)."""

    title = "DCI"

    @dataclass(frozen=True)
    class Options:
        trees: int = option(100, "Boosting stages of each factor's classifier.", low=1)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        parts = fit_and_score(*split_factors(context, "dci"))
        result = dci(*parts, trees=context.options(self).trees)
        return {**result, **_ground_truth_record(context)}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {
            "DCI-D": f"{result['disentanglement']:.3f}",
            "DCI-C": f"{result['completeness']:.3f}",
            "DCI-I": f"{result['informativeness']:.3f}",
        }


@register_metric("factorvae")
class FactorVAEScore(Metric):
    """The FactorVAE score on faces rendered with one factor fixed (`factor_vae_score`)."""

    title = "FactorVAE score"

    @dataclass(frozen=True)
    class Options:
        batch: int = option(64, "Faces per vote, all sharing the fixed factor.", low=2)
        votes: int = option(300, "Votes the majority-vote classifier is fitted on.", low=1)
        eval_votes: int = option(150, "Votes it is scored on.", low=1)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        options = context.options(self)
        codes, _ = split_factors(context, "factorvae")
        faces = oracle(context, "factorvae", seed_offset=1)
        result = factor_vae_score(
            faces.codes,
            synth.FACTOR_SIZES,
            np.std(codes, axis=0, ddof=1),
            votes=options.votes,
            eval_votes=options.eval_votes,
            batch=options.batch,
            rng=np.random.default_rng(context.settings.seed),
        )
        return {**result, **_ground_truth_record(context)}

    def data_used(self, context: BenchContext) -> dict[str, Any]:
        return {**context.data_record(), "rendered": "faces with one factor fixed, per vote"}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {"FactorVAE": f"{result['score']:.3f}"}


@register_metric("betavae")
class BetaVAEScore(Metric):
    """The beta-VAE score on pairs of faces rendered sharing one factor (`beta_vae_score`)."""

    title = "beta-VAE score"

    @dataclass(frozen=True)
    class Options:
        pairs: int = option(32, "Pairs of faces per point, all sharing the fixed factor.", low=1)
        points: int = option(300, "Points the linear classifier is fitted on.", low=2)
        eval_points: int = option(150, "Points it is scored on.", low=1)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        options = context.options(self)
        faces = oracle(context, "betavae", seed_offset=2)
        result = beta_vae_score(
            faces.codes,
            synth.FACTOR_SIZES,
            points=options.points,
            eval_points=options.eval_points,
            pairs=options.pairs,
            rng=np.random.default_rng(context.settings.seed),
        )
        return {**result, **_ground_truth_record(context)}

    def data_used(self, context: BenchContext) -> dict[str, Any]:
        return {**context.data_record(0), "rendered": "pairs of faces sharing one factor"}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {"beta-VAE": f"{result['score']:.3f}"}
