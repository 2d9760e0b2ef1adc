"""The Fréchet distance between two Gaussians fitted to feature vectors (FID's formula, Heusel et
al. 2017), in float64: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

``tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
symmetric ``S1^(1/2) S2 S1^(1/2)``, which has the eigenvalues of ``S1 S2`` (AB and BA share their
non-zero eigenvalues), so only symmetric eigendecompositions are needed and no complex square root
appears, whatever the rank of the covariances (a few hundred samples of 128 features is fine)."""

from __future__ import annotations

from typing import Tuple

import torch


def gaussian_stats(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D), unbiased) of ``features`` (N, D), in float64."""
    f = features.detach().to(torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least two feature vectors (N, D), got shape {tuple(f.shape)}")
    mean = f.mean(0)
    centred = f - mean
    return mean, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding
    errors in its eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between N(mean1, cov1) and N(mean2, cov2) (float64)."""
    mean1, cov1, mean2, cov2 = (t.to(torch.float64) for t in (mean1, cov1, mean2, cov2))
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mean1 - mean2
    return float(diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_root)


def frechet_between(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of feature vectors."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
