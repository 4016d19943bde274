"""Statistics of per-task accuracies: means with 95% confidence intervals, and paired differences between
methods evaluated on the same tasks. Pure Python (no torch), so reports use it on ``results.json`` alone.

Every method is evaluated on the same tasks, random starts and corrupted images, so the difference of two
methods is measured task by task: the CI of the mean *paired* difference is far narrower than the two
methods' separate CIs suggest. An average over domains is the mean of the per-domain means; its variance
combines the per-domain variances of the mean (Σ_d s_d²/T_d)/D², with Welch–Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96·σ/√T of T per-task accuracies (population σ; same unit as input);
    (nan, nan) for none."""
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return mean, 1.96 * std / math.sqrt(len(xs))


@lru_cache(maxsize=256)
def t_quantile(df: float, p: float = 0.975) -> float:
    """Quantile ``p`` of Student's t distribution with ``df`` degrees of freedom (inf: the normal's)."""
    if not df > 0:
        return float("nan")
    from scipy.stats import t  # scipy comes with the corruption library; imported only when needed

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval: ``mean ± half`` (``low``, ``high``), from ``n`` tasks."""

    mean: float
    half: float  # 95% CI half-width (nan with fewer than 2 tasks)
    n: int
    var_mean: float  # variance of the mean, s²/n (for combining domains)
    df: float  # degrees of freedom of the t interval

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def excludes_zero(self) -> bool:
        """True when the whole 95% CI lies on one side of 0 (a significant difference)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.half, "low": self.low, "high": self.high, "n_tasks": self.n,
                "significant": self.excludes_zero}


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and t-based 95% CI (sample standard deviation, T − 1 degrees of freedom) of per-task values."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Estimate(float("nan"), float("nan"), 0, float("nan"), 0.0)
    mean = sum(xs) / n
    if n == 1:
        return Estimate(mean, float("nan"), 1, float("nan"), 0.0)
    var_mean = sum((x - mean) ** 2 for x in xs) / (n - 1) / n
    return Estimate(mean, t_quantile(n - 1) * math.sqrt(var_mean), n, var_mean, float(n - 1))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """Mean of the per-task differences ``a[t] − b[t]`` with its 95% CI (same tasks, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same tasks: {len(a)} vs {len(b)} values")
    return estimate([x - y for x, y in zip(a, b)])


def combine(estimates: Sequence[Estimate]) -> Estimate:
    """The average of per-domain estimates: mean of the means, variance Σ var_mean / D², Welch–Satterthwaite
    degrees of freedom."""
    ests = [e for e in estimates if e.n > 0]
    if not ests:
        return Estimate(float("nan"), float("nan"), 0, float("nan"), 0.0)
    d = len(ests)
    mean = sum(e.mean for e in ests) / d
    n = sum(e.n for e in ests)
    if any(e.n < 2 for e in ests):
        return Estimate(mean, float("nan"), n, float("nan"), 0.0)
    var_mean = sum(e.var_mean for e in ests) / d**2
    denom = sum(e.var_mean**2 / e.df for e in ests)
    df = (sum(e.var_mean for e in ests) ** 2 / denom) if denom > 0 else float("inf")
    half = t_quantile(df) * math.sqrt(var_mean) if var_mean > 0 else 0.0
    return Estimate(mean, half, n, var_mean, df)
