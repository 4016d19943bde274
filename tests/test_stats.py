"""Paired statistics: per-task differences with t intervals, and their average over domains."""

from __future__ import annotations

import math

import pytest

from amt.stats import combine, estimate, mean_ci95, paired_difference, t_quantile


def test_paired_difference_by_hand():
    a, b = [80.0, 70.0, 90.0, 60.0], [78.0, 69.0, 85.0, 61.0]
    d = [2.0, 1.0, 5.0, -1.0]
    mean = sum(d) / 4
    s = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    est = paired_difference(a, b)
    assert est.mean == pytest.approx(1.75) and est.half == pytest.approx(t_quantile(3) * s / 2)
    assert t_quantile(3) == pytest.approx(3.182, abs=1e-3)
    assert not est.excludes_zero  # [−2.8, 6.3]
    assert paired_difference([1.0, 2.0, 3.0], [0.0, 1.1, 1.9]).excludes_zero
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([1.0], [1.0, 2.0])


def test_pairing_is_far_tighter_than_separate_intervals_when_tasks_vary():
    a = [50.0 + 10 * (t % 5) + 1.0 for t in range(20)]  # task difficulty varies a lot; a is 1 point better
    b = [50.0 + 10 * (t % 5) + (0.5 if t % 2 else 1.5) - 1.0 for t in range(20)]
    assert mean_ci95(a)[1] > 5 and paired_difference(a, b).half < 0.5


def test_combining_domains_averages_means_and_variances():
    e1, e2 = estimate([1.0, 2.0, 3.0]), estimate([4.0, 4.0, 7.0, 5.0])
    c = combine([e1, e2])
    assert c.mean == pytest.approx((2.0 + 5.0) / 2) and c.n == 7
    assert c.var_mean == pytest.approx((e1.var_mean + e2.var_mean) / 4)
    df = (e1.var_mean + e2.var_mean) ** 2 / (e1.var_mean**2 / 2 + e2.var_mean**2 / 3)  # Welch–Satterthwaite
    assert c.half == pytest.approx(t_quantile(df) * math.sqrt(c.var_mean))
    single = estimate([3.0])
    assert math.isnan(single.half) and not single.excludes_zero and math.isnan(combine([single, e1]).half)
