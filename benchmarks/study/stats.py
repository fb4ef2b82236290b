"""Mean, spread and confidence intervals over seeds, and paired comparisons between rows.

The interval is Student's t over seeds, not a bootstrap: a study has 3 to 10 seeds per row,
and with so few a percentile bootstrap can only resample the values it has (3 seeds give 10
distinct resamples, and an interval no wider than their range), so it is far too narrow,
while the t-interval is exact when seed noise is normal and widens honestly as n shrinks.
Two rows trained on the same seeds are compared seed by seed (a paired t on the
differences), which removes what the seeds share (data order, initialisation) from the
noise. No correction is made for comparing many rows at once; the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample sd and t-interval (both None for n = 1: never a fake)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Paired:
    """A row against the baseline on the seeds both have: the mean difference (row minus
    baseline), its t-interval and p-value, and whether the interval excludes 0."""

    n: int
    difference: float
    low: float | None
    high: float | None
    p_value: float | None
    real: bool

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def _finite(values: Sequence[float]) -> list[float]:
    numbers = [float(v) for v in values]
    if not numbers:
        raise ValueError("no values to summarise")
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"values must be finite numbers, got {numbers}")
    return numbers


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sd (n - 1 in the denominator) and the ``confidence`` t-interval of the mean."""
    numbers = _finite(values)
    n = len(numbers)
    mean = math.fsum(numbers) / n
    if n == 1:
        return Summary(n=1, mean=mean, sd=None, low=None, high=None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in numbers) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n=n, mean=mean, sd=sd, low=mean - half, high=mean + half)


def paired(
    values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
) -> Paired:
    """Compare ``values`` with ``baseline`` seed by seed (the two lists in the same seed
    order). With one pair there is no interval and nothing is called real. Differences that
    are all equal and not zero (a deterministic gap) are real, with a zero-width interval."""
    rows, bases = _finite(values), _finite(baseline)
    if len(rows) != len(bases):
        raise ValueError(f"paired values need the same seeds: {len(rows)} and {len(bases)}")
    differences = [a - b for a, b in zip(rows, bases, strict=True)]
    summary = summarize(differences, confidence)
    if summary.n == 1 or summary.sd is None:
        return Paired(summary.n, summary.mean, None, None, None, real=False)
    if summary.sd == 0:
        p_value = 1.0 if summary.mean == 0 else 0.0
        return Paired(
            summary.n, summary.mean, summary.mean, summary.mean, p_value, real=summary.mean != 0
        )
    t = summary.mean / (summary.sd / math.sqrt(summary.n))
    p_value = float(2 * stats.t.sf(abs(t), summary.n - 1))
    assert summary.low is not None and summary.high is not None
    real = summary.low > 0 or summary.high < 0
    return Paired(summary.n, summary.mean, summary.low, summary.high, p_value, real=real)
