"""Paired comparisons of two selected configurations across seeds: the mean difference, its 95%
confidence interval (t distribution) and the paired t-test, and the sentence that reports them."""

from __future__ import annotations

import math

import pandas as pd


def paired_stats(a: pd.DataFrame, b: pd.DataFrame, column: str = "test_all") -> dict:
    """The difference a − b of ``column`` (an accuracy, in points) over the seeds both have: n, mean,
    the 95% confidence interval half-width (t distribution), and the paired t-test's t and p (None
    for fewer than 3 seeds or a constant difference)."""
    pair = a[["seed", column]].dropna().merge(b[["seed", column]].dropna(), on="seed", suffixes=("_a", "_b"))
    x, y = pair[f"{column}_a"].to_numpy() * 100, pair[f"{column}_b"].to_numpy() * 100
    d = x - y
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan, "half": None, "t": None, "p": None}
    if n >= 3 and d.std(ddof=1) > 0:
        from scipy import stats

        t, p = stats.ttest_rel(x, y)
        out.update(half=float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)), t=float(t), p=float(p))
    return out


def paired_test(head: str, a: pd.DataFrame, b: pd.DataFrame, column: str = "test_all") -> str:
    """``head``: the paired t-test across seeds of ``column`` (default test All) of two selected
    configurations (rows with ``seed`` and the column) and the 95% confidence interval of the mean
    difference a − b, in points."""
    st = paired_stats(a, b, column)
    what = column.replace("test_", "").capitalize()
    n, mean = st["n"], st["mean"]
    if n < 3:
        return f"{head}: only {n} paired seed{'s' * (n != 1)}; a paired t-test needs at least 3, so none was computed."
    if st["t"] is None:
        return f"{head}: the difference in {what} is {mean:+.2f} points on every one of {n} seeds; no t-test."
    half = st["half"]
    return (
        f"{head}: mean difference in {what} {mean:+.2f} points, 95% CI [{mean - half:+.2f}, {mean + half:+.2f}] "
        f"over {n} paired seeds; paired t-test t({n - 1}) = {st['t']:.2f}, p = {st['p']:.3g}."
    )
