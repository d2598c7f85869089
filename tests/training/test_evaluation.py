"""Accuracy by class and by Many / Medium / Few group, and weight-norm balance (docs/reference.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from study.training.evaluation import accuracy_report, balance_stats, logits_from_features, summarize


def test_group_means_at_the_threshold_boundaries():
    # training counts: 101 -> Many; 100 and 20 -> Medium (boundaries included); 19 -> Few
    counts = [101, 100, 20, 19]
    # 4 test images per class; correct: class 0 4/4, class 1 2/4, class 2 1/4, class 3 3/4
    labels = np.repeat(np.arange(4), 4)
    preds = np.array([0, 0, 0, 0, 1, 1, 0, 2, 2, 0, 0, 0, 3, 3, 3, 1])
    r = accuracy_report(preds, labels, counts, many=100, few=20)
    assert r["per_class"] == [1.0, 0.5, 0.25, 0.75]
    assert r["many"] == pytest.approx(1.0)
    assert r["medium"] == pytest.approx((0.5 + 0.25) / 2)
    assert r["few"] == pytest.approx(0.75)
    assert r["all"] == pytest.approx((1.0 + 0.5 + 0.25 + 0.75) / 4)
    assert r["micro"] == pytest.approx(10 / 16)


def test_all_is_the_mean_of_per_class_accuracy_not_micro():
    counts = [500, 50, 5]
    labels = np.array([0] * 8 + [1] * 2 + [2] * 2)  # an unbalanced evaluation set
    preds = np.array([0] * 8 + [0, 0] + [2, 0])
    r = accuracy_report(preds, labels, counts, many=100, few=20)
    assert r["per_class"] == [1.0, 0.0, 0.5]
    assert r["all"] == pytest.approx(0.5)
    assert r["micro"] == pytest.approx(9 / 12)
    assert (r["many"], r["medium"], r["few"]) == (1.0, 0.0, 0.5)


def test_empty_group_is_nan():
    counts = [300, 200, 150]  # every class is Many
    labels = np.array([0, 1, 2, 2])
    preds = np.array([0, 1, 2, 0])
    r = accuracy_report(preds, labels, counts, many=100, few=20)
    assert r["many"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert math.isnan(r["medium"]) and math.isnan(r["few"])
    assert not math.isnan(r["all"])


def test_classes_missing_from_the_evaluation_set_are_skipped():
    counts = [200, 50, 10]
    labels = np.array([0, 0, 2])  # no image of class 1
    preds = np.array([0, 1, 2])
    r = accuracy_report(preds, labels, counts, many=100, few=20)
    assert r["per_class"] == [0.5, None, 1.0]
    assert r["all"] == pytest.approx(0.75)
    assert math.isnan(r["medium"])
    assert "per_class" not in summarize(r) and summarize(r)["all"] == r["all"]


def test_balance_stats_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        C = int(rng.integers(3, 60))
        norms = rng.uniform(0.1, 3.0, C)
        counts = rng.integers(1, 500, C)
        s = balance_stats(norms, counts)
        assert s["norm_ratio"] == pytest.approx(norms.max() / norms.min())
        assert s["norm_cv"] == pytest.approx(np.std(norms) / np.mean(norms))  # population std
        assert s["norm_spearman"] == pytest.approx(spearmanr(counts, norms).statistic)


def test_balance_stats_hand_values_and_degenerate_cases():
    s = balance_stats([4.0, 2.0, 1.0], [500, 50, 5])
    assert s["norm_ratio"] == pytest.approx(4.0)
    mean = 7 / 3
    std = math.sqrt(((4 - mean) ** 2 + (2 - mean) ** 2 + (1 - mean) ** 2) / 3)
    assert s["norm_cv"] == pytest.approx(std / mean)
    assert s["norm_spearman"] == pytest.approx(1.0)  # frequent classes have the larger norms
    assert balance_stats([1.0, 2.0, 4.0], [500, 50, 5])["norm_spearman"] == pytest.approx(-1.0)
    flat = balance_stats([1.0, 1.0, 1.0], [500, 50, 5])
    assert flat["norm_ratio"] == 1.0 and flat["norm_cv"] == 0.0 and math.isnan(flat["norm_spearman"])
    assert math.isnan(balance_stats([0.0, 1.0, 2.0], [3, 2, 1])["norm_ratio"])
    assert math.isnan(balance_stats([1.0, 2.0], [3, 2])["norm_spearman"])  # too few classes


def test_flip_tta_averages_the_two_views():
    head = torch.nn.Linear(3, 2)
    f, ff = torch.randn(4, 3), torch.randn(4, 3)
    with torch.no_grad():
        expected = 0.5 * (head(f) + head(ff))
        torch.testing.assert_close(logits_from_features(head, f, ff), expected)
        torch.testing.assert_close(logits_from_features(head, f), head(f))
