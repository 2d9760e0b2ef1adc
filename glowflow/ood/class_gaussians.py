"""Class-conditional Gaussians of feature vectors (the top latent's, the label classifier's), the
negative log-density under the nearest class, and their plain-array form in a reference file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np

from glowflow.errors import GlowflowError
from glowflow.ood import checks
from glowflow.ood.statistics import NO_LABEL

LATENT_SHRINKAGE = 0.1
"""Each class covariance of the top latent is ``S + LATENT_SHRINKAGE * mean(diag S) * I``
(S the sample covariance): invertible with fewer images than features, and less overfitted."""
MIN_CLASS_IMAGES = 2
"""Classes with fewer fit images than this get no Gaussian of their own."""
CLASSIFIER_SHRINKAGE = 1e-3
"""The classifier features' tied covariance is ``S + CLASSIFIER_SHRINKAGE * mean(diag S) * I``."""


@dataclass
class LatentGaussians:
    """One Gaussian per class of the top latent's features (F = features, c = classes; one
    class, label :data:`NO_LABEL`, when the fit images had no labels): ``classes`` (c,) int64,
    ``means`` (c, F), ``precision_cholesky`` (c, F, F) float32 with ``precision = P P^T`` of the
    shrunk covariance (:data:`LATENT_SHRINKAGE`), or (1, F, F): one covariance shared by every
    class (``tied``)."""

    classes: np.ndarray
    means: np.ndarray
    precision_cholesky: np.ndarray


def fit_latent_gaussians(
    top_latent: np.ndarray, labels: Optional[np.ndarray], shrinkage: float = LATENT_SHRINKAGE, tied: bool = False
) -> LatentGaussians:
    """Class-conditional Gaussians of the (N, F) top-latent features (Lee et al., 2018, with a
    covariance per class rather than one shared, as in quadratic discriminant analysis).

    ``labels`` (N,): each image's class, :data:`NO_LABEL` where unknown. Every class with at least
    :data:`MIN_CLASS_IMAGES` images gets a mean and the covariance ``S + shrinkage * mean(diag S)
    * I``; with no labels (any image unlabelled, or fewer than two such classes) one Gaussian is
    fitted on all images. ``tied``: one covariance for all classes, the pooled within-class one
    (linear discriminant analysis, as Lee et al. fit it), so the nearest class is the one at the
    smallest Mahalanobis distance; its one precision Cholesky factor is stored once, (1, F, F).
    Stored in float32 (what is saved is what scores).
    """
    features = np.asarray(top_latent, dtype=np.float64)
    labels = np.full(len(features), NO_LABEL) if labels is None else np.asarray(labels).reshape(-1)
    classes, counts = np.unique(labels, return_counts=True)
    kept = classes[counts >= MIN_CLASS_IMAGES]
    if (labels == NO_LABEL).any() or kept.size < 2:
        kept, labels = np.array([NO_LABEL]), np.full(len(features), NO_LABEL)
    means, covariances, counts = [], [], []
    for label in kept:
        members = features[labels == label]
        means.append(members.mean(0))
        centred = members - means[-1]
        covariances.append(centred.T @ centred)
        counts.append(len(members))
    if tied:
        covariances = [sum(covariances) / sum(counts)]
    else:
        covariances = [c / n for c, n in zip(covariances, counts)]
    choleskies = []
    for covariance in covariances:
        covariance = covariance + shrinkage * max(float(np.mean(np.diag(covariance))), 1e-12) * np.eye(len(covariance))
        choleskies.append(_precision_cholesky(covariance))
    return LatentGaussians(
        classes=kept.astype(np.int64),
        means=np.stack(means).astype(np.float32),
        precision_cholesky=np.stack(choleskies).astype(np.float32),
    )


def _precision_cholesky(covariance: np.ndarray) -> np.ndarray:
    """Upper-triangular P with ``P P^T`` = the inverse of the (F, F) ``covariance`` (as
    scikit-learn's ``precisions_cholesky_``)."""
    from scipy.linalg import solve_triangular

    lower = np.linalg.cholesky(covariance)
    return solve_triangular(lower, np.eye(len(covariance)), lower=True).T


def top_gaussian_nll(latent: LatentGaussians, top_latent: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(N,) ``-max_c log N(f; mean_c, cov_c) / F`` of the (N, F) top-latent features: the negative
    log-density, in nats per feature, under the nearest class Gaussian (higher = more
    outlying)."""
    features = np.asarray(top_latent, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != latent.means.shape[1]:
        raise GlowflowError(
            f"the top-latent features have shape {features.shape[1:]}, the reference's Gaussians "
            f"{latent.means.shape[1]} (a model with another architecture?)"
        )
    f = features.shape[1]
    means, chols = latent.means.astype(np.float64), latent.precision_cholesky.astype(np.float64)
    chols = np.broadcast_to(chols, (len(means),) + chols.shape[1:])  # tied: the one factor for every class
    log_norms = np.log(np.diagonal(chols, axis1=1, axis2=2)).sum(1) - 0.5 * f * math.log(2 * math.pi)
    best = np.full(len(features), -np.inf)
    for start in range(0, len(features), batch):
        rows = features[start : start + batch]
        for mean, chol, log_norm in zip(means, chols, log_norms):
            y = (rows - mean) @ chol
            density = log_norm - 0.5 * np.einsum("nf,nf->n", y, y)
            best[start : start + batch] = np.maximum(best[start : start + batch], density)
    return -best / f


def latent_arrays(latent: Optional[LatentGaussians], prefix: str = "latent") -> Dict[str, np.ndarray]:
    """Class Gaussians as arrays named ``<prefix>_...`` (none when there are none)."""
    if latent is None:
        return {}
    return {
        f"{prefix}_classes": latent.classes,
        f"{prefix}_means": latent.means,
        f"{prefix}_precision_cholesky": latent.precision_cholesky,
    }


def latent_from_arrays(data: Mapping[str, np.ndarray], path: str, prefix: str = "latent") -> Optional[LatentGaussians]:
    """The class Gaussians stored by :func:`latent_arrays` (None when absent), every array
    checked (:mod:`glowflow.ood.checks`)."""
    if f"{prefix}_means" not in data:
        return None
    means = checks.array(data, f"{prefix}_means", path, (None, None), np.float32)
    c, f = means.shape
    classes = checks.array(data, f"{prefix}_classes", path, (c,), np.int64)
    chol = checks.cholesky(data, f"{prefix}_precision_cholesky", path, (None, f, f), np.float32)
    if len(chol) not in (1, c):
        raise checks.bad(path, f"{prefix}_precision_cholesky holds {len(chol)} factors, not 1 (shared) or {c}")
    return LatentGaussians(classes=classes, means=means, precision_cholesky=chol)
