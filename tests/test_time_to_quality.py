"""The pure logic of benchmarks/time_to_quality.py: the Fréchet distance (against a float64
brute-force formula), when a curve first reaches a bits/dim, and when the clock stops."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from frechet import frechet_between, frechet_distance, gaussian_stats  # noqa: E402
from time_to_quality import evaluation_times  # noqa: E402
from ttq_report import format_reach, markdown_table, time_to_reach  # noqa: E402


def brute_force_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), with scipy's general matrix square root."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root).real)


@pytest.mark.parametrize("n_a,n_b,dims", [(200, 150, 6), (40, 60, 12)])
def test_frechet_matches_brute_force(n_a, n_b, dims):
    rng = np.random.default_rng(dims)
    mix = rng.normal(size=(dims, dims))
    a = rng.normal(size=(n_a, dims)) @ mix
    b = rng.normal(size=(n_b, dims)) @ mix.T * 0.7 + 0.3
    expected = brute_force_frechet(a, b)
    got = frechet_between(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_rank_deficient_covariance():
    """Fewer samples than features (singular covariances): still the brute-force value."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 20)), rng.normal(size=(30, 20)) + 0.1
    expected = brute_force_frechet(a, b)
    assert frechet_between(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_of_a_set_with_itself_is_zero_and_known_gaussians():
    features = torch.randn(100, 5, dtype=torch.float64)
    assert frechet_between(features, features) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) and N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2)
    d, mean = 3, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    assert frechet_distance(torch.zeros(d), eye, mean, 4 * eye) == pytest.approx(5.0 + d)
    mean_est, cov_est = gaussian_stats(features)
    assert torch.allclose(cov_est, torch.from_numpy(np.cov(features.numpy(), rowvar=False)))
    assert torch.allclose(mean_est, features.mean(0))


def test_time_to_reach():
    points = [(5.0, 5.0), (10.0, 4.2), (15.0, 3.9), (20.0, 3.8)]
    assert time_to_reach(points, 4.5) == (pytest.approx(5.0 + 0.5 / 0.8 * 5.0), "interpolated")
    assert time_to_reach(points, 4.0) == (pytest.approx(10.0 + 0.2 / 0.3 * 5.0), "interpolated")
    assert time_to_reach(points, 3.7) == (None, "not reached")
    assert time_to_reach(points, 6.0) == (5.0, "by")  # reached before (or at) the first evaluation
    assert time_to_reach(points, 4.2) == (10.0, "interpolated")  # exactly at an evaluation
    # the first crossing counts, even when the curve comes back up; the order of points does not matter
    bumpy = [(15.0, 3.6), (5.0, 4.5), (10.0, 3.9)]
    assert time_to_reach(bumpy, 4.0) == (pytest.approx(5.0 + 0.5 / 0.6 * 5.0), "interpolated")
    # a non-finite evaluation is above every threshold; interpolating from it is not possible
    assert time_to_reach([(5.0, math.nan), (10.0, 3.9)], 4.0) == (10.0, "by")
    assert format_reach(12.345, "interpolated") == "12.3"
    assert format_reach(5.0, "by") == "<= 5.0"
    assert format_reach(None, "not reached") == "not reached"


def test_evaluation_times():
    assert evaluation_times([10, 20, 40], 5) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert evaluation_times([7], 5) == [5, 7]
    assert evaluation_times([0.5], 0.25) == [0.25, 0.5]
    assert evaluation_times([2], 5) == [2]


def test_markdown_table():
    table = markdown_table(["recipe", "bpd"], [["a", 3.14159], ["b", 150.0]])
    assert table.splitlines() == ["| recipe | bpd |", "|---|---:|", "| a | 3.142 |", "| b | 150.0 |"]
