"""The outlier scores computed from per-image statistics and the training reference, each
oriented so that higher = more outlying, and their one-line definitions (the literature behind
them: docs/outlier_scores.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np

from glowflow.errors import GlowflowError
from glowflow.ood.classifier import combined_score as classifier_combined
from glowflow.ood.orientation import combined_score, orientation_score
from glowflow.ood.reference import Reference, dos_log_density, top_gaussian_nll

SCORE_DEFINITIONS: Dict[str, str] = {
    "nll": "bits/dim under the model (Nalisnick et al., 2019 show it alone fails)",
    "complexity": "bits/dim minus the bits/dim of a lossless codec (Serra et al., 2020)",
    "typicality": "|bits/dim - mean training bits/dim| (Nalisnick et al., 2019b)",
    "level_bpd": "bits/dim contributed by one level's latents (Schirrmeister et al., 2020)",
    "hierarchy_ratio": "bits/dim minus the level-1 (local) contribution (Schirrmeister et al., 2020)",
    "top_gaussian": "-log density of the top latent under its nearest training class Gaussian (Lee et al., 2018)",
    "dos": "-log density of the image's statistics under their training density (Morningstar et al., 2021)",
    "orientation": "how much likelier the image is turned over or on its side than as it is, against training images",
    "dos_orientation": "dos plus orientation, each standardised on held-back inliers",
    "classifier": "-log density of a label classifier's features under the nearest class (Lee et al., 2018)",
    "combined": "dos_orientation plus half the classifier score, standardised (the default; needs labels)",
    "likelihood_ratio": "bits/dim minus a background model's bits/dim (Ren et al., 2019)",
}


def outlier_scores(
    stats: Mapping[str, np.ndarray], reference: Reference, background_stats: Optional[Mapping[str, np.ndarray]] = None
) -> Dict[str, np.ndarray]:
    """Every outlier score (N,) from :func:`compute_statistics` output for N images (and, for
    the likelihood ratio, a background model's on the same images); higher = more outlying.

    * ``nll``: ``bpd``.
    * ``complexity``: ``bpd - codec_bpd`` (Serra et al., 2020; their S(x) with the sign making
      outliers high). Present when ``stats`` has ``codec_bpd``.
    * ``typicality``: ``|bpd - reference.bpd_mean|`` (Nalisnick et al., 2019b, per sample).
    * ``level_<i>_bpd`` for i = 1..L: the level contributions of :func:`compute_statistics`.
    * ``hierarchy_ratio`` (L >= 2): ``bpd - level_1_bpd = sum_{i >= 2} level_<i>_bpd``, i.e.
      ``-log2(p(x) / p_1(x)) / D`` with ``p_1`` the level-1 factor of the likelihood (prior of the
      first split latent times the first level's Jacobian); for L = 2 it equals ``level_2_bpd``,
      the final-scale score of Schirrmeister et al. (2020).
    * ``top_gaussian`` (when the reference has class Gaussians and ``stats`` has ``top_latent``):
      :func:`top_gaussian_nll`, the top latent's NLL per feature under its nearest class Gaussian
      (Lee et al., 2018, per-class covariance).
    * ``dos``: ``-log`` density of the statistics under the reference (Morningstar et al., 2021).
    * ``orientation`` and ``dos_orientation`` (when the reference has an orientation part and
      ``stats`` has ``transform_bpd``): :func:`glowflow.ood.orientation.orientation_score` and
      :func:`glowflow.ood.orientation.combined_score` (the model's preference for the image as
      it is over its transforms, alone and added to ``dos``).
    * ``classifier`` (when the reference has a label classifier, :mod:`glowflow.ood.classifier`;
      ``stats`` must then have its ``classifier_features``): :func:`top_gaussian_nll` of the features
      under the classifier's class Gaussians.
    * ``combined``: :func:`glowflow.ood.classifier.combined_score`: ``dos_orientation`` (``dos``
      without the orientation part) plus ``classifier``, each standardised; without a classifier,
      ``dos_orientation`` (or ``dos``) itself.
    * ``likelihood_ratio`` (when ``background_stats`` is given): ``bpd - background bpd``
      = ``-(log p_model(x) - log p_background(x)) / (D ln 2)`` (Ren et al., 2019); both models
      must see the same n_bits and image size, so the discretisation constants cancel.
    """
    bpd = np.asarray(stats["bpd"], dtype=np.float64)
    level_bpd = np.asarray(stats["level_bpd"], dtype=np.float64)
    if level_bpd.shape[1] != reference.num_levels:
        raise GlowflowError(f"statistics have {level_bpd.shape[1]} levels, the reference {reference.num_levels}")
    scores: Dict[str, np.ndarray] = {"nll": bpd}
    if "codec_bpd" in stats:
        scores["complexity"] = bpd - np.asarray(stats["codec_bpd"], dtype=np.float64)
    scores["typicality"] = np.abs(bpd - reference.bpd_mean)
    for i in range(level_bpd.shape[1]):
        scores[f"level_{i + 1}_bpd"] = level_bpd[:, i]
    if level_bpd.shape[1] >= 2:
        scores["hierarchy_ratio"] = bpd - level_bpd[:, 0]
    if reference.latent is not None and "top_latent" in stats:
        scores["top_gaussian"] = top_gaussian_nll(reference.latent, stats["top_latent"])
    scores["dos"] = -dos_log_density(reference, stats, scores.get("top_gaussian"))
    if reference.orientation is not None:
        scores["orientation"] = orientation_score(reference.orientation, stats)
        scores["dos_orientation"] = combined_score(reference.orientation, scores["dos"], scores["orientation"])
    base = scores.get("dos_orientation", scores["dos"])
    if reference.classifier is not None:
        if "classifier_features" not in stats:
            raise GlowflowError(
                "the outlier reference has a label classifier: compute the statistics with its features "
                "(OutlierDetector.statistics, or StatisticsSettings(features=...))"
            )
        scores["classifier"] = top_gaussian_nll(reference.classifier_gaussians, stats["classifier_features"])
    scores["combined"] = classifier_combined(reference.classifier, base, scores.get("classifier"))
    if background_stats is not None:
        bg = np.asarray(background_stats["bpd"], dtype=np.float64)
        if bg.shape != bpd.shape:
            raise GlowflowError(f"background statistics cover {bg.size} images, the model's {bpd.size}")
        scores["likelihood_ratio"] = bpd - bg
    return scores


def score_definition(name: str) -> str:
    """One-line definition of a score name from :func:`outlier_scores`."""
    match = re.fullmatch(r"level_(\d+)_bpd", name)
    if match:
        return f"bits/dim contributed by level {match.group(1)}'s latents (Schirrmeister et al., 2020)"
    return SCORE_DEFINITIONS[name]


@dataclass
class ScoredSet:
    """One image set as a run scores it: its name, :func:`compute_statistics` output (N images)
    under the model and, when there is one, under the background model, and
    :func:`outlier_scores` of them."""

    name: str
    stats: Dict[str, np.ndarray]
    background_stats: Optional[Dict[str, np.ndarray]]
    scores: Dict[str, np.ndarray]
